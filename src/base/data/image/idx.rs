//! The IDX format of MNIST and Fashion-MNIST (plain or `.gz`): an images
//! file (magic `00 00 08 03`: unsigned bytes, 3 dimensions, then the image
//! count, rows and columns as big-endian u32, then the pixels) and a labels
//! file (magic `00 00 08 01`, the count, then one byte per image). Both are
//! read whole into memory; a file that is shorter or longer than its header
//! says, or whose magic is not the expected one, is an error naming it.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::super::input;
use super::Image;
use crate::data::Encoding;
use crate::{Error, Result};

const IMAGES_MAGIC: [u8; 4] = [0, 0, 8, 3];
const LABELS_MAGIC: [u8; 4] = [0, 0, 8, 1];

/// The images of one IDX images file, in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct IdxImages {
    path: PathBuf,
    count: usize,
    rows: u32,
    cols: u32,
    pixels: Vec<u8>,
}

/// Prints the shape, not the pixels.
impl fmt::Debug for IdxImages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdxImages")
            .field("path", &self.path)
            .field("count", &self.count)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, message: String) -> Error {
    Error::Dataset {
        path: path.to_owned(),
        message,
    }
}

/// The header after the magic: `dims` big-endian u32.
fn read_header(
    path: &Path,
    reader: &mut dyn Read,
    magic: [u8; 4],
    what: &str,
    dims: usize,
) -> Result<Vec<u32>> {
    let mut head = vec![0u8; 4 + 4 * dims];
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    if got < 4 || head[..4] != magic {
        return Err(bad(
            path,
            format!(
                "not an IDX {what} file: its magic number is {} (expected {})",
                hex4(&head[..got.min(4)]),
                hex4(&magic)
            ),
        ));
    }
    if got < head.len() {
        return Err(bad(
            path,
            format!(
                "the IDX header is cut short ({got} of {} bytes)",
                head.len()
            ),
        ));
    }
    Ok(head[4..]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn hex4(bytes: &[u8]) -> String {
    let words: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if words.is_empty() {
        "missing (empty file)".to_owned()
    } else {
        words.join(" ")
    }
}

/// Read exactly `n` bytes after the header; fewer or more is an error.
fn read_body(path: &Path, reader: &mut dyn Read, n: usize, what: &str) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    // `take` bounds the read by the header's size plus one byte, so a
    // lying header never allocates more than the data that is there.
    reader
        .take(n as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Error::io(path, e))?;
    if body.len() < n {
        return Err(bad(
            path,
            format!(
                "the file is cut short: the header announces {n} bytes of {what}, \
                 it holds {}",
                body.len()
            ),
        ));
    }
    if body.len() > n {
        return Err(bad(
            path,
            format!("the file holds more than the {n} bytes of {what} its header announces"),
        ));
    }
    Ok(body)
}

impl IdxImages {
    /// Read an images file (`.gz` decompressed by its extension).
    pub fn read(path: &Path) -> Result<IdxImages> {
        let mut reader = input::open(path, Encoding::Latin1)?;
        let dims = read_header(path, &mut reader, IMAGES_MAGIC, "images", 3)?;
        let (count, rows, cols) = (dims[0], dims[1], dims[2]);
        if rows == 0 || cols == 0 {
            return Err(bad(path, format!("images of {rows}x{cols} pixels")));
        }
        let n = (count as usize)
            .checked_mul(rows as usize)
            .and_then(|n| n.checked_mul(cols as usize))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("{count} images of {rows}x{cols} is too large"),
                )
            })?;
        let pixels = read_body(path, &mut reader, n, "pixels")?;
        Ok(IdxImages {
            path: path.to_owned(),
            count: count as usize,
            rows,
            cols,
            pixels,
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many images it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds no image.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Rows (height) of every image.
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Columns (width) of every image.
    pub fn cols(&self) -> u32 {
        self.cols
    }

    /// Image `index` (0-based) as a gray [`Image`]; `None` past the end.
    pub fn image(&self, index: usize) -> Option<Image> {
        let size = self.rows as usize * self.cols as usize;
        let start = index.checked_mul(size)?;
        let pixels = self.pixels.get(start..start.checked_add(size)?)?;
        Image::new(self.cols, self.rows, 1, pixels.to_vec()).ok()
    }
}

/// Read a labels file that must hold `expected` labels (one per image of
/// `images`).
pub(super) fn read_labels(path: &Path, expected: usize, images: &Path) -> Result<Vec<u8>> {
    let mut reader = input::open(path, Encoding::Latin1)?;
    let dims = read_header(path, &mut reader, LABELS_MAGIC, "labels", 1)?;
    let count = dims[0] as usize;
    if count != expected {
        return Err(bad(
            path,
            format!(
                "holds {count} labels, but {} holds {expected} images",
                images.display()
            ),
        ));
    }
    read_body(path, &mut reader, count, "labels")
}

/// The labels file that goes with an images file: the same name with
/// `images-idx3` replaced by `labels-idx1` (`train-images-idx3-ubyte.gz` ->
/// `train-labels-idx1-ubyte.gz`); `None` when the name has no `images-idx3`.
pub fn labels_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let at = name.find("images-idx3")?;
    let labels = format!(
        "{}labels-idx1{}",
        &name[..at],
        &name[at + "images-idx3".len()..]
    );
    Some(images.with_file_name(labels))
}

/// The id prefix of an images file: its name before `-images-idx3`
/// (`train`, `t10k`), or the name without compression extension.
pub(super) fn id_prefix(images: &Path) -> String {
    let (base, _) = input::split_compression(images);
    match base.find("-images-idx3") {
        Some(at) if at > 0 => base[..at].to_owned(),
        _ => base,
    }
}
