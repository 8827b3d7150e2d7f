//! Byte-level input for dataset files: picking the decompressor from the file
//! name (`.gz`, `.bz2`, `.zst`), streaming it as a `BufRead`, dropping a
//! UTF-8 byte-order mark, and turning bytes into text in the chosen
//! [`Encoding`], and [`LineReader`], which cuts the stream into physical
//! lines without ever holding more than a bounded number of bytes of one
//! line (so `/dev/zero`, or a small `.gz` that inflates to one endless line,
//! ends with an error instead of filling memory). Nothing here knows about
//! rows or columns.

use std::io::{self, BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use super::Encoding;
use crate::{Error, Result};

/// The UTF-8 encoding of U+FEFF.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Compression of a dataset file, from its last extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Bzip2,
    Zstd,
}

/// The file name of `path` without its compression extension, and that
/// compression.
pub(super) fn split_compression(path: &Path) -> (String, Compression) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    for (ext, compression) in [
        (".gz", Compression::Gzip),
        (".bz2", Compression::Bzip2),
        (".zst", Compression::Zstd),
    ] {
        if lower.ends_with(ext) {
            return (name[..name.len() - ext.len()].to_owned(), compression);
        }
    }
    (name, Compression::None)
}

/// The file stem used in generated ids: `train` for `data/train.csv.gz`,
/// `stdin` for standard input.
pub(super) fn file_stem(path: &Path) -> String {
    if super::is_stdin(path) {
        return "stdin".to_owned();
    }
    let (base, _) = split_compression(path);
    Path::new(&base)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or(base)
}

/// Open `path` for streaming, decompressing by extension; in UTF-8 mode a
/// leading byte-order mark is consumed, and in either encoding a UTF-16 or
/// UTF-32 byte-order mark is an error saying so ([`wide_bom`]).
/// [`super::STDIN`] reads standard input (never decompressed); any other
/// path must be a regular file ([`crate::fsutil::open_regular`]), so a FIFO
/// or a device such as `/dev/zero` is refused, naming it, before anything
/// is read.
pub(super) fn open(path: &Path, encoding: Encoding) -> Result<Box<dyn BufRead>> {
    if super::is_stdin(path) {
        let stdin: Box<dyn BufRead> = Box::new(BufReader::new(io::stdin()));
        return check_start(stdin, path, encoding);
    }
    let file = crate::fsutil::open_regular(path)?;
    let raw = BufReader::new(file);
    let reader: Box<dyn BufRead> = match split_compression(path).1 {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(raw))),
        Compression::Bzip2 => Box::new(BufReader::new(bzip2::bufread::MultiBzDecoder::new(raw))),
        Compression::Zstd => Box::new(BufReader::new(
            zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| Error::io(path, e))?,
        )),
    };
    check_start(reader, path, encoding)
}

/// What a UTF-16 or UTF-32 byte-order mark at the start of `bytes` says,
/// as a message (sherl reads UTF-8 and Latin-1 only; read as either, such
/// a file is NUL bytes between the characters).
pub(super) fn wide_bom(bytes: &[u8]) -> Option<String> {
    let (name, iconv) = if bytes.starts_with(b"\xFF\xFE\0\0") {
        ("UTF-32 (little-endian)", "UTF-32")
    } else if bytes.starts_with(b"\0\0\xFE\xFF") {
        ("UTF-32 (big-endian)", "UTF-32")
    } else if bytes.starts_with(b"\xFF\xFE") {
        ("UTF-16 (little-endian)", "UTF-16")
    } else if bytes.starts_with(b"\xFE\xFF") {
        ("UTF-16 (big-endian)", "UTF-16")
    } else {
        return None;
    };
    Some(format!(
        "the file starts with a {name} byte-order mark: it is {iconv} text, and sherl \
         reads UTF-8 (or Latin-1); convert it to UTF-8 first, e.g. \
         `iconv -f {iconv} -t UTF-8 FILE > FILE.utf8`"
    ))
}

/// Look at the first bytes: refuse a UTF-16/32 byte-order mark
/// ([`wide_bom`]); in UTF-8 mode consume a UTF-8 one.
fn check_start(
    mut reader: Box<dyn BufRead>,
    path: &Path,
    encoding: Encoding,
) -> Result<Box<dyn BufRead>> {
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        match reader.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    if let Some(message) = wide_bom(&head[..n]) {
        return Err(Error::Dataset {
            path: path.to_owned(),
            message,
        });
    }
    let skip = match encoding {
        Encoding::Utf8 if head[..n].starts_with(BOM) => BOM.len(),
        _ => 0,
    };
    Ok(Box::new(Cursor::new(head[skip..n].to_vec()).chain(reader)))
}

/// Physical lines of a dataset file, numbered from 1, each at most
/// `max_bytes` long (its `\n` not counted).
pub(super) struct LineReader {
    inner: Box<dyn BufRead>,
    path: PathBuf,
    max_bytes: usize,
    line: u64,
}

impl LineReader {
    /// Lines of `reader` (from `path`, which error messages name).
    pub(super) fn new(inner: Box<dyn BufRead>, path: &Path, max_bytes: usize) -> Self {
        LineReader {
            inner,
            path: path.to_owned(),
            max_bytes,
            line: 0,
        }
    }

    /// The path error messages name.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Open `path` as [`open`] does and read it line by line.
    pub(super) fn open(path: &Path, encoding: Encoding, max_bytes: usize) -> Result<Self> {
        Ok(LineReader::new(open(path, encoding)?, path, max_bytes))
    }

    /// The next line into `buf` (cleared first; without its `\n`, with a
    /// `\r` before it kept) and its 1-based number, or `None` at end of
    /// input. A line longer than the bound is an error naming the file and
    /// line, raised after reading at most the bound plus one buffer: the
    /// rest of the line is never read.
    pub(super) fn next_line(&mut self, buf: &mut Vec<u8>) -> Result<Option<u64>> {
        buf.clear();
        let mut seen_any = false;
        loop {
            let chunk = match self.inner.fill_buf() {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(&self.path, e)),
            };
            if chunk.is_empty() {
                break;
            }
            seen_any = true;
            let (content, used, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, i + 1, true),
                None => (chunk.len(), chunk.len(), false),
            };
            if buf.len() + content > self.max_bytes {
                return Err(Error::DatasetLine {
                    path: self.path.clone(),
                    line: self.line + 1,
                    message: format!(
                        "line is longer than {} bytes (the --max-line-bytes bound); \
                         is the file line-based text in the format given? Raise \
                         --max-line-bytes if a row really is that long",
                        self.max_bytes
                    ),
                });
            }
            buf.extend_from_slice(&chunk[..content]);
            self.inner.consume(used);
            if done {
                break;
            }
        }
        if !seen_any {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(self.line))
    }
}

/// Strip a leading byte-order mark from a whole file's bytes (UTF-8 mode).
pub(super) fn strip_bom(bytes: &[u8], encoding: Encoding) -> &[u8] {
    match encoding {
        Encoding::Utf8 => bytes.strip_prefix(BOM).unwrap_or(bytes),
        Encoding::Latin1 => bytes,
    }
}

/// Decode `bytes`; the error is a message ready for a bad-row report.
pub(super) fn decode(bytes: &[u8], encoding: Encoding) -> std::result::Result<String, String> {
    match encoding {
        Encoding::Latin1 => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
        Encoding::Utf8 => std::str::from_utf8(bytes).map(str::to_owned).map_err(|e| {
            format!(
                "invalid UTF-8 at byte {}; if the file is Latin-1, pass --encoding latin1",
                e.valid_up_to()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_from_name() {
        assert_eq!(
            split_compression(Path::new("d/a.csv.gz")),
            ("a.csv".to_owned(), Compression::Gzip)
        );
        assert_eq!(
            split_compression(Path::new("a.tsv.BZ2")),
            ("a.tsv".to_owned(), Compression::Bzip2)
        );
        assert_eq!(
            split_compression(Path::new("a.jsonl.zst")),
            ("a.jsonl".to_owned(), Compression::Zstd)
        );
        assert_eq!(
            split_compression(Path::new("a.csv")),
            ("a.csv".to_owned(), Compression::None)
        );
        assert_eq!(file_stem(Path::new("x/train.csv.gz")), "train");
        assert_eq!(file_stem(Path::new("train")), "train");
    }

    #[test]
    fn bom_is_skipped_once() {
        let read_all = |bytes: &'static [u8], encoding| {
            let mut out = String::new();
            check_start(Box::new(bytes), Path::new("x"), encoding)
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            out
        };
        let utf8 = Encoding::Utf8;
        assert_eq!(read_all(b"\xEF\xBB\xBFab", utf8), "ab");
        assert_eq!(read_all(b"ab", utf8), "ab");
        assert_eq!(read_all(b"abcdef", utf8), "abcdef");
        assert_eq!(read_all(b"a", utf8), "a");
        assert_eq!(read_all(b"", utf8), "");
        assert_eq!(read_all(b"\xEF\xBB\xBF\xEF\xBB\xBF", utf8), "\u{feff}");
        assert_eq!(read_all(b"\xEF\xBB\xBFab", Encoding::Latin1).len(), 5);
    }

    #[test]
    fn wide_byte_order_marks_are_named() {
        for (bytes, name) in [
            (&b"\xFF\xFEa\0"[..], "UTF-16 (little-endian)"),
            (b"\xFE\xFF\0a", "UTF-16 (big-endian)"),
            (b"\xFF\xFE\0\0", "UTF-32 (little-endian)"),
            (b"\0\0\xFE\xFF", "UTF-32 (big-endian)"),
        ] {
            let m = wide_bom(bytes).unwrap();
            assert!(m.contains(name) && m.contains("iconv"), "{m}");
        }
        assert!(wide_bom(b"\xEF\xBB\xBFa").is_none());
        assert!(wide_bom(b"\xFF").is_none());
    }

    fn lines_of(bytes: &'static [u8], max: usize) -> Vec<Result<(u64, Vec<u8>)>> {
        let mut reader = LineReader::new(Box::new(bytes), Path::new("x.csv"), max);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            match reader.next_line(&mut buf) {
                Ok(Some(n)) => out.push(Ok((n, buf.clone()))),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn lines_are_numbered_and_bounded() {
        let ok = |v: Vec<Result<(u64, Vec<u8>)>>| -> Vec<(u64, Vec<u8>)> {
            v.into_iter().map(|r| r.unwrap()).collect()
        };
        assert_eq!(
            ok(lines_of(b"ab\r\n\ncd", 4)),
            [(1, b"ab\r".to_vec()), (2, vec![]), (3, b"cd".to_vec())]
        );
        assert_eq!(ok(lines_of(b"", 4)), []);
        assert_eq!(ok(lines_of(b"\n", 4)), [(1, vec![])]);
        // Exactly the bound is fine; one byte more is an error naming the line.
        assert_eq!(ok(lines_of(b"abcd\n", 4)), [(1, b"abcd".to_vec())]);
        let got = lines_of(b"ab\nabcde\nx\n", 4);
        assert_eq!(got.len(), 2);
        match &got[1] {
            Err(Error::DatasetLine {
                path,
                line,
                message,
            }) => {
                assert_eq!((path.as_path(), *line), (Path::new("x.csv"), 2));
                assert!(message.contains("--max-line-bytes"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_endless_line_is_not_read_to_its_end() {
        /// An endless stream of `a`, counting what it hands out.
        struct Endless(std::rc::Rc<std::cell::Cell<u64>>);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(b'a');
                self.0.set(self.0.get() + buf.len() as u64);
                Ok(buf.len())
            }
        }
        let served = std::rc::Rc::new(std::cell::Cell::new(0));
        let inner = Box::new(BufReader::new(Endless(std::rc::Rc::clone(&served))));
        let mut reader = LineReader::new(inner, Path::new("zero"), 1 << 20);
        let mut buf = Vec::new();
        assert!(matches!(
            reader.next_line(&mut buf),
            Err(Error::DatasetLine { line: 1, .. })
        ));
        assert!(buf.len() <= 1 << 20, "{}", buf.len());
        assert!(served.get() <= (1 << 20) + (64 << 10), "{}", served.get());
    }

    #[test]
    fn decode_latin1_and_utf8() {
        assert_eq!(decode(b"caf\xe9", Encoding::Latin1).unwrap(), "café");
        assert_eq!(decode("café".as_bytes(), Encoding::Utf8).unwrap(), "café");
        let err = decode(b"caf\xe9", Encoding::Utf8).unwrap_err();
        assert!(
            err.contains("byte 3") && err.contains("--encoding latin1"),
            "{err}"
        );
        assert_eq!(strip_bom(b"\xEF\xBB\xBFx", Encoding::Utf8), b"x");
        assert_eq!(strip_bom(b"\xEF\xBB\xBFx", Encoding::Latin1).len(), 4);
    }
}
