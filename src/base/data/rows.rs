//! What every row reader shares: [`RawRow`] (a row before label mapping),
//! the per-row checks that turn raw cells into one ([`build_row`]: missing
//! text or label, empty id or group), and [`BadRows`] (fail on a malformed
//! row, or skip and count it). The format readers (`delimited`, `jsonl`,
//! `text`, `folders`) build on this module and nothing here knows them: the
//! loader picks the reader for each file. Label ids, id uniqueness and
//! splits are decided later, in `load`.

use std::path::Path;

use super::input::{self, LineReader};
use super::{Column, Encoding, ReadOptions};
use crate::{Error, Result};

/// How many skipped rows get their own warning.
const WARN_FIRST: u64 = 5;

/// One row as read, before label mapping. `T` is what the example holds:
/// its text (`String`), or for image datasets where its pixels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawRow<T = String> {
    pub line: u64,
    pub id: String,
    /// Whether `id` came from the id column (and so must be unique).
    pub explicit_id: bool,
    pub text: T,
    pub text_pair: Option<String>,
    /// Trimmed and non-empty when there is a label column.
    pub label: Option<String>,
    pub group: Option<String>,
}

/// The rows of one file.
#[derive(Debug)]
pub(super) struct FileRows<T = String> {
    pub rows: Vec<RawRow<T>>,
    /// Data rows seen, good or bad.
    pub rows_read: u64,
    /// Rows spanning several lines through quoted line breaks (CSV/TSV).
    pub multi_line_rows: u64,
    /// Unquoted-TSV rows with a field starting with `"`, kept as text.
    pub literal_quote_rows: u64,
}

impl<T> Default for FileRows<T> {
    fn default() -> Self {
        FileRows {
            rows: Vec::new(),
            rows_read: 0,
            multi_line_rows: 0,
            literal_quote_rows: 0,
        }
    }
}

/// Fails on a bad row, or counts it when skipping is on.
#[derive(Debug)]
pub(super) struct BadRows {
    skip: bool,
    pub count: u64,
}

impl BadRows {
    pub fn new(skip: bool) -> Self {
        BadRows { skip, count: 0 }
    }

    /// A malformed row starting at `line` of `path`.
    pub(super) fn row(&mut self, path: &Path, line: u64, message: String) -> Result<()> {
        self.handle(Error::DatasetLine {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// A malformed whole-file example (folders format).
    pub(super) fn file(&mut self, path: &Path, message: String) -> Result<()> {
        self.handle(Error::Dataset {
            path: path.to_owned(),
            message,
        })
    }

    fn handle(&mut self, error: Error) -> Result<()> {
        if !self.skip {
            return Err(error);
        }
        self.count += 1;
        if self.count <= WARN_FIRST {
            tracing::warn!("skipping bad row: {error}");
        }
        Ok(())
    }
}

/// The next line of a line-per-row format (JSON Lines, plain text) that is
/// not blank, decoded and trimmed, with its number. A line that does not
/// decode is a bad row; blank lines are skipped and not counted in
/// [`FileRows::rows_read`], every other line is.
pub(super) fn next_nonblank(
    reader: &mut LineReader,
    buf: &mut Vec<u8>,
    encoding: Encoding,
    out: &mut FileRows,
    bad: &mut BadRows,
) -> Result<Option<(u64, String)>> {
    while let Some(line) = reader.next_line(buf)? {
        let text = match input::decode(buf, encoding) {
            Ok(text) => text,
            Err(message) => {
                out.rows_read += 1;
                bad.row(reader.path(), line, message)?;
                continue;
            }
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            continue;
        }
        out.rows_read += 1;
        return Ok(Some((line, trimmed.to_owned())));
    }
    Ok(None)
}

/// The cells of one row that the options ask for, before any checks.
#[derive(Debug, Default)]
pub(super) struct Cells {
    pub text: Option<String>,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    pub id: Option<String>,
    pub group: Option<String>,
}

/// A column the options ask for by name that `names` (a header, a
/// Parquet schema) holds more than once, as a message: which of the two was
/// meant cannot be told, so the file is refused rather than the first one
/// silently used. Columns named twice that are not used (e.g. the empty
/// names of trailing commas) are harmless and not reported.
pub(super) fn repeated_column<S: AsRef<str>>(names: &[S], opts: &ReadOptions) -> Option<String> {
    for (role, col) in wanted(opts) {
        let Column::Name(name) = col else { continue };
        let at: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.as_ref() == name)
            .map(|(i, _)| i)
            .collect();
        if at.len() > 1 {
            let places: Vec<String> = at.iter().map(usize::to_string).collect();
            return Some(format!(
                "the {role} column {col} is named twice (or more) in the header, at 0-based \
                 positions {}; which one is meant cannot be told: rename the others",
                places.join(" and ")
            ));
        }
    }
    None
}

/// The columns the options ask for, as (role, column) pairs.
pub(super) fn wanted(opts: &ReadOptions) -> Vec<(&'static str, &Column)> {
    let mut cols = vec![("text", &opts.text_column)];
    let optional = [
        ("text pair", &opts.text_pair_column),
        ("label", &opts.label_column),
        ("id", &opts.id_column),
        ("group", &opts.group_column),
    ];
    cols.extend(
        optional
            .iter()
            .filter_map(|(r, c)| c.as_ref().map(|c| (*r, c))),
    );
    cols
}

/// Checks the cells of a row and builds it; the error is a bad-row message.
pub(super) fn build_row(
    cells: Cells,
    line: u64,
    stem: &str,
    opts: &ReadOptions,
    need_group: bool,
) -> std::result::Result<RawRow, String> {
    let missing = |what: &str, col: &Column| format!("missing {what} (column {col})");
    let text = cells
        .text
        .ok_or_else(|| missing("text", &opts.text_column))?;
    let text_pair = match &opts.text_pair_column {
        Some(col) => Some(cells.text_pair.ok_or_else(|| missing("text pair", col))?),
        None => None,
    };
    let non_empty = |v: Option<String>| {
        v.map(|s| s.trim().to_owned())
            .filter(|s: &String| !s.is_empty())
    };
    let label = match &opts.label_column {
        Some(col) => Some(non_empty(cells.label).ok_or_else(|| missing("or empty label", col))?),
        None => None,
    };
    let (id, explicit_id) = match &opts.id_column {
        Some(col) => (
            non_empty(cells.id).ok_or_else(|| missing("or empty id", col))?,
            true,
        ),
        None => (format!("{stem}:{line}"), false),
    };
    let group = non_empty(cells.group);
    if need_group && group.is_none() {
        if let Some(col) = &opts.group_column {
            return Err(missing("or empty group value", col));
        }
    }
    Ok(RawRow {
        line,
        id,
        explicit_id,
        text,
        text_pair,
        label,
        group,
    })
}

/// A pointer to the flag that picks a missing column.
pub(super) fn hint(role: &str) -> &'static str {
    match role {
        "label" => " (use --label-column to pick one, or --no-labels for unlabelled data)",
        "text" => " (use --text-column to pick one)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(text: &str, label: &str) -> Cells {
        Cells {
            text: Some(text.to_owned()),
            label: Some(label.to_owned()),
            ..Cells::default()
        }
    }

    #[test]
    fn build_row_checks_and_ids() {
        let opts = ReadOptions::default();
        let row = build_row(cells(" a ", " pos "), 7, "train", &opts, false).unwrap();
        assert_eq!(row.text, " a ");
        assert_eq!(row.label.as_deref(), Some("pos"));
        assert_eq!((row.id.as_str(), row.explicit_id), ("train:7", false));

        let err = build_row(cells("a", "  "), 7, "train", &opts, false).unwrap_err();
        assert!(err.contains("label") && err.contains("`label`"), "{err}");
        let missing_text = Cells {
            text: None,
            ..cells("", "pos")
        };
        assert!(build_row(missing_text, 1, "t", &opts, false).is_err());

        let opts = ReadOptions {
            label_column: None,
            id_column: Some(Column::Name("id".into())),
            group_column: Some(Column::Index(3)),
            ..ReadOptions::default()
        };
        let with_id = Cells {
            id: Some(" r1 ".into()),
            ..cells("a", "ignored")
        };
        let row = build_row(with_id, 2, "t", &opts, false).unwrap();
        assert_eq!((row.id.as_str(), row.explicit_id), ("r1", true));
        assert_eq!((row.label, row.group), (None, None));
        let err = build_row(cells("a", "x"), 2, "t", &opts, false).unwrap_err();
        assert!(err.contains("id"), "{err}");
        let no_group = Cells {
            id: Some("r1".into()),
            group: Some(" ".into()),
            ..cells("a", "x")
        };
        let err = build_row(no_group, 2, "t", &opts, true).unwrap_err();
        assert!(err.contains("group") && err.contains("#3"), "{err}");
    }
}
