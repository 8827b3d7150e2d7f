//! Images to label given without a table or class folders (`predict` on
//! an image run): a single image file, a flat folder of images, or image
//! paths on standard input, one per line. All are unlabelled.
//!
//! - a single file (`--format auto`, a `.png`/`.jpg`/`.jpeg` name): its id
//!   is the path as given;
//! - a flat folder (`--format auto`, `image-folders` or `folders`; a
//!   directory holding files and no folder): listed by the rules class
//!   folders follow ([`super::super::folders`]: hidden entries ignored,
//!   links followed once, devices and FIFOs skipped with a warning and
//!   never opened, dangling links bad rows), files in name order, each id
//!   the file's path relative to the folder. A directory that holds a
//!   folder is read as class folders, as before;
//! - standard input (`-`, `--format auto` or `text`): one image path a
//!   line (blank lines skipped), relative to the working directory, each
//!   id the line as given.
//!
//! A file that cannot be read or decoded (not an image, truncated, a
//! dangling link, a FIFO named on stdin) is a bad row: an error naming
//! it, or skipped and counted with [`ReadOptions::skip_bad_rows`].

use std::io::Read;
use std::path::{Path, PathBuf};

use super::super::folders::flat_tree;
use super::super::{is_stdin, Format, LoadReport, ReadOptions};
use super::{
    has_image_extension, read_image, ImageDataset, ImageExample, ImageOptions, ImageSource,
};
use crate::{Error, Result};

/// Most bytes of image paths read from standard input (16 MiB).
const STDIN_LIMIT: u64 = 16 << 20;

/// One input before decoding: id, file, why it is unusable (if it is).
type Candidate = (String, PathBuf, Option<String>);

/// The images `data` names when it is a single image file, a flat folder
/// or `-` (see the module docs), decoded once to find the bad ones;
/// `None` when it is none of these (a table, class folders, IDX: read
/// with [`super::load_images`]).
pub fn load_image_inputs(
    data: &Path,
    read: &ReadOptions,
    opts: &ImageOptions,
) -> Result<Option<ImageDataset>> {
    let Some(candidates) = candidates(data, read.format)? else {
        return Ok(None);
    };
    let mut report = LoadReport::default();
    let mut examples = Vec::with_capacity(candidates.len());
    for (line, (id, path, broken)) in candidates.into_iter().enumerate() {
        report.rows_read += 1;
        let decoded = match broken {
            Some(why) => Err(why),
            None => read_image(&path, opts),
        };
        let image = match decoded {
            Ok(image) => image,
            Err(message) if read.skip_bad_rows => {
                tracing::warn!("{}: skipped: {message}", path.display());
                report.skipped_bad_rows += 1;
                continue;
            }
            Err(message) => {
                let message = if message.contains("--skip-bad-rows") {
                    message
                } else {
                    format!("{message} (pass --skip-bad-rows to skip it)")
                };
                return Err(Error::Dataset { path, message });
            }
        };
        examples.push(ImageExample {
            id,
            split: "predict".to_owned(),
            source: ImageSource::File(path),
            label: None,
            group: None,
            source_line: line as u64 + 1,
            width: image.width(),
            height: image.height(),
        });
    }
    if examples.is_empty() {
        return Err(Error::Dataset {
            path: data.to_owned(),
            message: format!(
                "no image to label ({} skipped as bad rows)",
                report.skipped_bad_rows
            ),
        });
    }
    Ok(Some(ImageDataset {
        examples,
        label_names: Vec::new(),
        report,
    }))
}

/// The files `data` names, or `None` when it is not one of the inputs of
/// this module.
fn candidates(data: &Path, format: Format) -> Result<Option<Vec<Candidate>>> {
    if is_stdin(data) {
        if !matches!(format, Format::Auto | Format::Text) {
            return Ok(None);
        }
        return stdin_paths().map(Some);
    }
    if data.is_dir() {
        if !matches!(
            format,
            Format::Auto | Format::ImageFolders | Format::Folders
        ) {
            return Ok(None);
        }
        let Some(tree) = flat_tree(data)? else {
            return Ok(None);
        };
        if tree.stray > 0 {
            tracing::warn!(
                "{}: ignored {} entries that are not regular files (devices, FIFOs, sockets)",
                data.display(),
                tree.stray
            );
        }
        let list = tree
            .entries
            .into_iter()
            .map(|e| {
                let id = e
                    .path
                    .strip_prefix(data)
                    .unwrap_or(&e.path)
                    .display()
                    .to_string();
                (id, e.path, e.broken)
            })
            .collect();
        return Ok(Some(list));
    }
    if format == Format::Auto && has_image_extension(data) {
        return Ok(Some(vec![(
            data.display().to_string(),
            data.to_owned(),
            None,
        )]));
    }
    Ok(None)
}

/// Image paths on standard input, one a line, blank lines skipped.
fn stdin_paths() -> Result<Vec<Candidate>> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(STDIN_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(Path::new("-"), e))?;
    if bytes.len() as u64 > STDIN_LIMIT {
        return Err(Error::Dataset {
            path: PathBuf::from("-"),
            message: format!(
                "more than {STDIN_LIMIT} bytes of image paths on standard input; \
                 pass a folder of images or a table with an image column"
            ),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| Error::Dataset {
        path: PathBuf::from("-"),
        message: "standard input is not UTF-8: expected image paths, one a line".to_owned(),
    })?;
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .map(|l| (l.to_owned(), PathBuf::from(l), None))
        .collect())
}
