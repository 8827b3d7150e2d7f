//! CSV and TSV rows, read line by line by a small parser of our own so that
//! a malformed row costs that row only. (The file is over 500 lines
//! because the row parser, its quoting limits and its per-row error
//! reporting are one state machine that reads best in one place; its tests
//! are in `delimited/tests.rs`.)
//!
//! Quoting (always on for CSV, on for TSV only with
//! [`ReadOptions::tsv_quotes`]) follows RFC 4180: a field that starts with
//! `"` is quoted, may hold the delimiter, `""` for a quote, and line breaks,
//! and must end at its closing quote (a delimiter or the end of the line
//! follows it). A `"` inside an unquoted field is an ordinary character.
//! Without quoting (TSV by default) every line is one row and a `"` is text.
//!
//! A quoted line break continues the row on the next line, for at most
//! [`ReadLimits::max_quoted_lines`] lines and
//! [`ReadLimits::max_quoted_bytes`] bytes. When the quote is still open past
//! that or at end of file, or when a row goes wrong (text after a closing
//! quote, a wrong number of fields), the row is bad and reported at the line
//! where it starts; the lines read past that first line are put back and read
//! again as rows of their own. So a stray `"` never swallows the rest of the
//! file: with `--skip-bad-rows` it costs its own line only. A row with more
//! than 65,536 fields is bad too (a line of delimiters must not cost far
//! more memory than its bytes).
//!
//! Lines end in LF or CRLF (the `\r` of a CRLF ending is dropped; inside a
//! quoted field the line break is kept as it is). Blank lines are skipped. A
//! row's line is where it starts, so neither quoted line breaks nor blank
//! lines shift later line numbers. Columns are resolved once, against the
//! header or (without one) by index. Fields are bytes until the wanted ones
//! are decoded in the chosen encoding.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::Path;

use super::input::{self, LineReader};
use super::rows::{build_row, hint, repeated_column, wanted, BadRows, Cells, FileRows};
use super::{Column, ReadLimits, ReadOptions};
use crate::{Error, Result};
/// Field positions of the wanted columns in a CSV/TSV file.
struct Layout {
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
        let text = find("text", &opts.text_column)?;
        let text_pair = opt("text pair", &opts.text_pair_column)?;
        let label = match &opts.label_column {
            Some(col) if opts.label_optional => find("label", col).ok(),
            col => opt("label", col)?,
        };
        Ok(Layout {
            text,
            text_pair,
            label,
            id: opt("id", &opts.id_column)?,
            group: opt("group", &opts.group_column)?,
        })
    }
}

fn no_header_error(role: &str, col: &Column) -> Error {
    Error::setting(
        "--no-header",
        format!(
            "the {role} column is given by name ({col}), but the file has no header row \
             (--no-header): give a 0-based column index instead, or drop --no-header"
        ),
    )
}

/// Read a CSV (`delimiter` `b','`) or TSV (`b'\t'`) file; `quoting`: fields
/// may be quoted (RFC 4180).
pub(super) fn read(
    path: &Path,
    delimiter: u8,
    quoting: bool,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    let mut opts = Cow::Borrowed(opts);
    if !opts.has_header && opts.label_optional && matches!(opts.label_column, Some(Column::Name(_)))
    {
        // An optional label named without a header to find it in: none.
        opts.to_mut().label_column = None;
    }
    if !opts.has_header {
        if let Some((role, col)) = wanted(&opts)
            .into_iter()
            .find(|(_, c)| matches!(c, Column::Name(_)))
        {
            return Err(no_header_error(role, col));
        }
    }
    let stem = input::file_stem(path);
    let lines = LineReader::open(path, opts.encoding, opts.limits.max_line_bytes)?;
    let mut splitter = Splitter::new(lines, delimiter, quoting, opts.limits);
    let mut layout: Option<Layout> = None;
    let mut out = FileRows::default();
    let mut first_multi_line = None;
    let mut first_literal_quote = None;
    loop {
        let record = match splitter.next_record()? {
            Next::End => break,
            Next::Broken { line, message } if layout.is_none() && opts.has_header => {
                return Err(Error::DatasetLine {
                    path: path.to_owned(),
                    line,
                    message: format!("header row: {message}"),
                });
            }
            Next::Broken { line, message } => {
                out.rows_read += 1;
                bad.row(path, line, message)?;
                continue;
            }
            Next::Row(record) => record,
        };
        let line = record.line;
        let layout = match &layout {
            Some(layout) => layout,
            None if opts.has_header => {
                let names = header_names(path, line, &record.fields, &opts)?;
                if let Some(message) = repeated_column(&names, &opts) {
                    return Err(Error::DatasetLine {
                        path: path.to_owned(),
                        line,
                        message: format!("header row: {message}"),
                    });
                }
                splitter.width = Some(names.len());
                let found = Layout::new(path, &opts, Some(&names), names.len())?;
                without_optional_label(path, &mut opts, &found);
                layout = Some(found);
                continue;
            }
            None => {
                splitter.width = Some(record.fields.len());
                let found = Layout::new(path, &opts, None, record.fields.len())?;
                without_optional_label(path, &mut opts, &found);
                layout.insert(found)
            }
        };
        out.rows_read += 1;
        if record.last_line > line {
            out.multi_line_rows += 1;
            first_multi_line.get_or_insert(line);
        }
        if !quoting && record.fields.iter().any(|f| f.starts_with(b"\"")) {
            out.literal_quote_rows += 1;
            first_literal_quote.get_or_insert(line);
        }
        match cells_from_record(&record.fields, layout, &opts)
            .and_then(|cells| build_row(cells, line, &stem, &opts, need_group))
        {
            Ok(row) => out.rows.push(row),
            Err(message) => bad.row(path, line, message)?,
        }
    }
    if let Some(line) = first_multi_line {
        tracing::info!(
            "{}: {} through quoted line breaks (the first at line {line})",
            path.display(),
            match out.multi_line_rows {
                1 => "1 row spans several lines".to_owned(),
                n => format!("{n} rows span several lines"),
            }
        );
    }
    if let Some(line) = first_literal_quote {
        tracing::warn!(
            "{}: {} a field starting with `\"` (the first at line {line}), read as text: TSV \
             fields are not quoted. If this file quotes fields as CSV does (e.g. written by \
             pandas' to_csv with sep='\\t'), pass --tsv-quotes",
            path.display(),
            match out.literal_quote_rows {
                1 => "1 row has".to_owned(),
                n => format!("{n} rows have"),
            }
        );
    }
    Ok(out)
}

/// An optional label column the file does not have: read it unlabelled.
fn without_optional_label(path: &Path, opts: &mut Cow<'_, ReadOptions>, layout: &Layout) {
    if layout.label.is_none() {
        if let Some(col) = &opts.label_column {
            tracing::info!(
                "{}: no label column {col}; reading it unlabelled",
                path.display()
            );
            opts.to_mut().label_column = None;
        }
    }
}

/// One row's fields (the `\r` of a CRLF ending dropped) and its lines.
struct Record {
    /// Line where the row starts.
    line: u64,
    /// Line where it ends (later than `line` after a quoted line break).
    last_line: u64,
    fields: Vec<Vec<u8>>,
}

/// Most fields one row may have.
const MAX_FIELDS: usize = 1 << 16;

/// What [`Splitter::next_record`] found.
enum Next {
    Row(Record),
    /// A row that cannot be read, starting at `line`: an unclosed quote, text
    /// after a closing quote, or the wrong number of fields. Only its first
    /// line is consumed.
    Broken {
        line: u64,
        message: String,
    },
    End,
}

/// Cuts a file's lines into rows, putting back the lines of a broken row.
struct Splitter {
    lines: LineReader,
    /// Lines taken by a row that turned out broken, to be read again.
    pending: VecDeque<(u64, Vec<u8>)>,
    delimiter: u8,
    quoting: bool,
    limits: ReadLimits,
    /// The number of fields every row must have, once known.
    width: Option<usize>,
}

impl Splitter {
    fn new(lines: LineReader, delimiter: u8, quoting: bool, limits: ReadLimits) -> Self {
        Splitter {
            lines,
            pending: VecDeque::new(),
            delimiter,
            quoting,
            limits,
            width: None,
        }
    }

    fn take_line(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        if let Some(line) = self.pending.pop_front() {
            return Ok(Some(line));
        }
        let mut buf = Vec::new();
        Ok(self.lines.next_line(&mut buf)?.map(|n| (n, buf)))
    }

    /// The next row, skipping blank lines.
    fn next_record(&mut self) -> Result<Next> {
        let (first, bytes) = loop {
            match self.take_line()? {
                None => return Ok(Next::End),
                Some((_, bytes)) if matches!(bytes.as_slice(), b"" | b"\r") => {}
                Some(line) => break line,
            }
        };
        let mut parser = RowParser::new(self.delimiter, self.quoting, first);
        let mut end = parser.line(first, &bytes);
        // Lines after `first` this row has taken, and their bytes.
        let mut taken: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut taken_bytes = 0usize;
        loop {
            match end {
                LineEnd::Done => break,
                LineEnd::Bad(message) => return Ok(self.broken(first, taken, message)),
                LineEnd::Open { field, line } => {
                    let opened = quote_place(field, line, first);
                    let bound = if taken.len() >= self.limits.max_quoted_lines {
                        Some(format!(
                            "{} line breaks (--max-quoted-lines)",
                            self.limits.max_quoted_lines
                        ))
                    } else {
                        None
                    };
                    let next = match bound {
                        Some(_) => None,
                        None => self.take_line()?,
                    };
                    let Some((n, more)) = next else {
                        let message = match bound {
                            Some(bound) => format!(
                                "{opened} is still open after {bound}: a stray `\"`? (inside \
                                 a quoted field a quote is written `\"\"`; raise the bound if \
                                 the field really is that long)"
                            ),
                            None => format!(
                                "{opened} is never closed (end of file): a stray `\"`? \
                                 (inside a quoted field a quote is written `\"\"`)"
                            ),
                        };
                        return Ok(self.broken(first, taken, message));
                    };
                    taken_bytes = taken_bytes.saturating_add(more.len() + 1);
                    if taken_bytes > self.limits.max_quoted_bytes {
                        taken.push((n, more));
                        let message = format!(
                            "{opened} runs over more than {} bytes of later lines \
                             (--max-quoted-bytes): a stray `\"`? (inside a quoted field a \
                             quote is written `\"\"`; raise the bound if the field really \
                             is that long)",
                            self.limits.max_quoted_bytes
                        );
                        return Ok(self.broken(first, taken, message));
                    }
                    end = parser.line(n, &more);
                    taken.push((n, more));
                }
            }
        }
        let last_line = taken.last().map_or(first, |(n, _)| *n);
        let fields = parser.fields;
        if let Some(width) = self.width.filter(|&w| w != fields.len()) {
            let mut message = format!("expected {width} fields, found {}", fields.len());
            if !self.quoting && fields.iter().any(|f| f.starts_with(b"\"")) {
                message.push_str(
                    " (TSV fields are not quoted; if this file quotes fields as CSV does, \
                     pass --tsv-quotes)",
                );
            } else if last_line > first {
                message.push_str(&format!(
                    " in a row that runs over lines {first}-{last_line} through quoted line \
                     breaks: a stray `\"`?"
                ));
            }
            return Ok(self.broken(first, taken, message));
        }
        Ok(Next::Row(Record {
            line: first,
            last_line,
            fields,
        }))
    }

    /// A broken row starting at `line`: put back the lines after the first.
    fn broken(&mut self, line: u64, taken: Vec<(u64, Vec<u8>)>, message: String) -> Next {
        for taken in taken.into_iter().rev() {
            self.pending.push_front(taken);
        }
        Next::Broken { line, message }
    }
}

/// "the quote that opens field 2 on this line" (or "on line N").
fn quote_place(field: usize, line: u64, first: u64) -> String {
    if line == first {
        format!("the quote that opens field {field} on this line")
    } else {
        format!("the quote that opens field {field} on line {line}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a field.
    Start,
    Unquoted,
    Quoted,
    /// Just after a `"` inside a quoted field: its end, or the first of `""`.
    AfterQuote,
}

/// How a line left the row being parsed.
#[derive(Debug, PartialEq, Eq)]
enum LineEnd {
    /// The row is complete.
    Done,
    /// Quoted field `field` (0-based), opened on `line`, is still open.
    Open { field: usize, line: u64 },
    /// The row is malformed.
    Bad(String),
}

/// The fields of one row, fed line by line.
struct RowParser {
    delimiter: u8,
    quoting: bool,
    fields: Vec<Vec<u8>>,
    field: Vec<u8>,
    state: State,
    /// Line where the row starts.
    first: u64,
    /// Line where the last quoted field opened.
    quote_line: u64,
    /// Fields past [`MAX_FIELDS`].
    dropped_fields: usize,
}

impl RowParser {
    fn new(delimiter: u8, quoting: bool, first: u64) -> Self {
        RowParser {
            first,
            delimiter,
            quoting,
            fields: Vec::new(),
            field: Vec::new(),
            state: State::Start,
            quote_line: 0,
            dropped_fields: 0,
        }
    }

    /// Close the current field; past [`MAX_FIELDS`] fields are counted, not
    /// kept (a line of delimiters would otherwise cost far more memory than
    /// its bytes).
    fn end_field(&mut self) {
        if self.fields.len() < MAX_FIELDS {
            self.fields.push(std::mem::take(&mut self.field));
        } else {
            self.field.clear();
            self.dropped_fields += 1;
        }
        self.state = State::Start;
    }

    /// Feed line `n` (without its `\n`).
    fn line(&mut self, n: u64, raw: &[u8]) -> LineEnd {
        let (body, cr) = match raw.strip_suffix(b"\r") {
            Some(body) => (body, true),
            None => (raw, false),
        };
        for &b in body {
            match self.state {
                State::Start if self.quoting && b == b'"' => {
                    self.state = State::Quoted;
                    self.quote_line = n;
                }
                State::Start | State::Unquoted if b == self.delimiter => self.end_field(),
                State::Start | State::Unquoted => {
                    self.field.push(b);
                    self.state = State::Unquoted;
                }
                State::Quoted if b == b'"' => self.state = State::AfterQuote,
                State::Quoted => self.field.push(b),
                State::AfterQuote if b == b'"' => {
                    self.field.push(b'"');
                    self.state = State::Quoted;
                }
                State::AfterQuote if b == self.delimiter => self.end_field(),
                State::AfterQuote => {
                    let at = if n == self.first {
                        String::new()
                    } else {
                        format!(
                            " (on line {n}, closing the quote opened on line {})",
                            self.quote_line
                        )
                    };
                    return LineEnd::Bad(format!(
                        "field {}: text after its closing quote{at}: a stray `\"`? (inside a \
                         quoted field a quote is written `\"\"`)",
                        self.fields.len()
                    ));
                }
            }
        }
        if self.state == State::Quoted {
            if cr {
                self.field.push(b'\r');
            }
            self.field.push(b'\n');
            return LineEnd::Open {
                field: self.fields.len(),
                line: self.quote_line,
            };
        }
        self.end_field();
        if self.dropped_fields > 0 {
            return LineEnd::Bad(format!(
                "more than {MAX_FIELDS} fields ({}): is the delimiter (the format) right?",
                MAX_FIELDS + self.dropped_fields
            ));
        }
        LineEnd::Done
    }
}

/// The header's column names, trimmed.
fn header_names(
    path: &Path,
    line: u64,
    fields: &[Vec<u8>],
    opts: &ReadOptions,
) -> Result<Vec<String>> {
    let bad = |message: String| Error::DatasetLine {
        path: path.to_owned(),
        line,
        message: format!("header row: {message}"),
    };
    let mut names = Vec::with_capacity(fields.len());
    for bytes in fields {
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
    fields: &[Vec<u8>],
    layout: &Layout,
    opts: &ReadOptions,
) -> std::result::Result<Cells, String> {
    let cell = |i: Option<usize>| -> std::result::Result<Option<String>, String> {
        let Some(i) = i else { return Ok(None) };
        input::decode(&fields[i], opts.encoding)
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

#[cfg(test)]
mod tests;
