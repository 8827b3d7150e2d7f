//! CSV and TSV rows, through the `csv` crate (RFC 4180 quoting: quoted
//! fields may hold the delimiter, doubled quotes and newlines). Fields are
//! read as bytes and decoded in the chosen encoding. Lines end in LF or CRLF;
//! a row's line is where it starts, so neither quoted newlines nor blank lines
//! shift later line numbers. Columns are resolved once, against the header or
//! (without one) by index.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;

use super::input;
use super::rows::{build_row, hint, wanted, BadRows, Cells, FileRows};
use super::{Column, ReadOptions};
use crate::{Error, Result};

/// Field positions of the wanted columns in a CSV/TSV file.
struct Layout {
    width: usize,
    text: usize,
    text_pair: Option<usize>,
    label: Option<usize>,
    id: Option<usize>,
    group: Option<usize>,
}

impl Layout {
    /// Resolve columns against the header `names`, or, without a header,
    /// against a row of `width` fields.
    fn new(
        path: &Path,
        opts: &ReadOptions,
        names: Option<&[String]>,
        width: usize,
    ) -> Result<Layout> {
        let find = |role: &str, col: &Column| -> Result<usize> {
            let (i, available) = match (col, names) {
                (Column::Index(i), _) => (Some(*i).filter(|&i| i < width), None),
                (Column::Name(name), Some(names)) => {
                    (names.iter().position(|n| n == name), Some(names))
                }
                (Column::Name(_), None) => return Err(no_header_error(role, col)),
            };
            i.ok_or_else(|| {
                let message = match available {
                    Some(names) => format!(
                        "no {role} column named {col}; the columns are: {}{}",
                        names.join(", "),
                        hint(role)
                    ),
                    None => format!(
                        "{role} column {col} is out of range: rows have {width} fields \
                         (indices are 0-based)"
                    ),
                };
                Error::Dataset {
                    path: path.to_owned(),
                    message,
                }
            })
        };
        let opt =
            |role: &str, col: &Option<Column>| col.as_ref().map(|c| find(role, c)).transpose();
        Ok(Layout {
            width,
            text: find("text", &opts.text_column)?,
            text_pair: opt("text pair", &opts.text_pair_column)?,
            label: opt("label", &opts.label_column)?,
            id: opt("id", &opts.id_column)?,
            group: opt("group", &opts.group_column)?,
        })
    }
}

fn no_header_error(role: &str, col: &Column) -> Error {
    Error::Config(format!(
        "the {role} column is given by name ({col}), but the file has no header row \
         (--no-header): give a 0-based column index instead, or drop --no-header"
    ))
}

/// Read a CSV (`delimiter` `b','`) or TSV (`b'\t'`) file.
pub(super) fn read(
    path: &Path,
    delimiter: u8,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    if !opts.has_header {
        if let Some((role, col)) = wanted(opts)
            .into_iter()
            .find(|(_, c)| matches!(c, Column::Name(_)))
        {
            return Err(no_header_error(role, col));
        }
    }
    let stem = input::file_stem(path);
    let tally = Rc::new(Cell::new(Tally::default()));
    // Records end at `\n` only: with the csv crate's default CRLF terminator
    // the `\n` of a `\r\n` is consumed with the *next* record, which breaks
    // line numbers; the `\r` left at the end of the last field is dropped in
    // `field`.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .terminator(csv::Terminator::Any(b'\n'))
        .has_headers(false)
        .flexible(true)
        .from_reader(Tallied {
            inner: input::open(path, opts.encoding)?,
            tally: Rc::clone(&tally),
        });
    let mut record = csv::ByteRecord::new();
    let mut layout: Option<Layout> = None;
    let mut out = FileRows::default();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, e)),
        }
        if record.len() == 1 && field(&record, 0).is_empty() {
            continue; // a blank `\r\n` line
        }
        let line = start_line(&record, reader.position(), tally.get());
        let layout = match &layout {
            Some(layout) => layout,
            None if opts.has_header => {
                let names = header_names(path, line, &record, opts)?;
                layout = Some(Layout::new(path, opts, Some(&names), names.len())?);
                continue;
            }
            None => layout.insert(Layout::new(path, opts, None, record.len())?),
        };
        out.rows_read += 1;
        if record.len() != layout.width {
            bad.row(
                path,
                line,
                format!("expected {} fields, found {}", layout.width, record.len()),
            )?;
            continue;
        }
        match cells_from_record(&record, layout, opts)
            .and_then(|cells| build_row(cells, line, &stem, opts, need_group))
        {
            Ok(row) => out.rows.push(row),
            Err(message) => bad.row(path, line, message)?,
        }
    }
    Ok(out)
}

/// Bytes handed to the CSV parser so far, and the last of them.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    bytes: u64,
    last: Option<u8>,
}

/// The decompressed input, counted on its way into the CSV parser.
struct Tallied<R> {
    inner: R,
    tally: Rc<Cell<Tally>>,
}

impl<R: Read> Read for Tallied<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            let before = self.tally.get();
            self.tally.set(Tally {
                bytes: before.bytes + n as u64,
                last: Some(buf[n - 1]),
            });
        }
        Ok(n)
    }
}

/// The 1-based line where `record` starts. The csv crate records a
/// record's position *before* skipping blank lines, so count back from where
/// it ended instead: the parser's line counter there, minus the newlines
/// inside quoted fields, minus the terminating `\n` (absent only when the
/// record ends at end of file).
fn start_line(record: &csv::ByteRecord, end: &csv::Position, tally: Tally) -> u64 {
    let inside = record.as_slice().iter().filter(|&&b| b == b'\n').count() as u64;
    let terminated = end.byte() < tally.bytes || tally.last == Some(b'\n');
    end.line()
        .saturating_sub(inside + u64::from(terminated))
        .max(1)
}

/// Field `i` without the `\r` of a CRLF line ending.
fn field(record: &csv::ByteRecord, i: usize) -> &[u8] {
    let bytes = record.get(i).unwrap_or_default();
    if i + 1 == record.len() {
        bytes.strip_suffix(b"\r").unwrap_or(bytes)
    } else {
        bytes
    }
}

/// The header's column names, trimmed.
fn header_names(
    path: &Path,
    line: u64,
    record: &csv::ByteRecord,
    opts: &ReadOptions,
) -> Result<Vec<String>> {
    let bad = |message: String| Error::DatasetLine {
        path: path.to_owned(),
        line,
        message: format!("header row: {message}"),
    };
    let mut names = Vec::with_capacity(record.len());
    for i in 0..record.len() {
        let bytes = field(record, i);
        if bytes.contains(&b'\r') {
            return Err(bad(
                "holds a carriage return: the file seems to use old Mac (CR-only) line \
                 endings; convert them to LF or CRLF"
                    .to_owned(),
            ));
        }
        names.push(
            input::decode(bytes, opts.encoding)
                .map_err(bad)?
                .trim()
                .to_owned(),
        );
    }
    Ok(names)
}

fn cells_from_record(
    record: &csv::ByteRecord,
    layout: &Layout,
    opts: &ReadOptions,
) -> std::result::Result<Cells, String> {
    let cell = |i: Option<usize>| -> std::result::Result<Option<String>, String> {
        let Some(i) = i else { return Ok(None) };
        input::decode(field(record, i), opts.encoding)
            .map(Some)
            .map_err(|m| format!("field {i}: {m}"))
    };
    Ok(Cells {
        text: cell(Some(layout.text))?,
        text_pair: cell(layout.text_pair)?,
        label: cell(layout.label)?,
        id: cell(layout.id)?,
        group: cell(layout.group)?,
    })
}

fn csv_error(path: &Path, error: csv::Error) -> Error {
    let line = error.position().map(csv::Position::line);
    match error.into_kind() {
        csv::ErrorKind::Io(e) => Error::io(path, e),
        other => {
            let message = format!("{:?}", other);
            match line {
                Some(line) => Error::DatasetLine {
                    path: path.to_owned(),
                    line,
                    message,
                },
                None => Error::Dataset {
                    path: path.to_owned(),
                    message,
                },
            }
        }
    }
}
