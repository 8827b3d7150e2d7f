//! Plain text: one example per line, for labelling new texts (`predict`)
//! or unlabelled data. Every line that is not blank is an example, trimmed,
//! with the id `<file stem>:<line>` (`stdin:<line>` for standard input), so
//! ids point back at the line even when blank lines are skipped. There are
//! no columns: a text-pair, id or group column, or a label column that is
//! not optional, is an error rather than a silent guess. Lines are read
//! through [`LineReader`], so one may not be longer than
//! [`ReadLimits::max_line_bytes`](super::ReadLimits::max_line_bytes).

use std::path::Path;

use super::input::{self, LineReader};
use super::rows::{next_nonblank, BadRows, FileRows, RawRow};
use super::ReadOptions;
use crate::{Error, Result};

/// Read a plain text file (or standard input) line by line.
pub(super) fn read(path: &Path, opts: &ReadOptions, bad: &mut BadRows) -> Result<FileRows> {
    check_options(path, opts)?;
    let stem = input::file_stem(path);
    let mut reader = LineReader::open(path, opts.encoding, opts.limits.max_line_bytes)?;
    let mut buf = Vec::new();
    let mut out = FileRows::default();
    while let Some((line, text)) =
        next_nonblank(&mut reader, &mut buf, opts.encoding, &mut out, bad)?
    {
        out.rows.push(RawRow {
            line,
            id: format!("{stem}:{line}"),
            explicit_id: false,
            text,
            text_pair: None,
            label: None,
            group: None,
        });
    }
    Ok(out)
}

/// Plain text has one text per line and nothing else: refuse options that
/// ask for more.
fn check_options(path: &Path, opts: &ReadOptions) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::Dataset {
            path: path.to_owned(),
            message: format!(
                "is read as plain text (one example per line), which has no {what}; \
                 give a CSV, TSV or JSON Lines file (or --format) for that"
            ),
        })
    };
    if opts.text_pair_column.is_some() {
        return refuse("second text for a sentence-pair task");
    }
    if opts.id_column.is_some() {
        return refuse("id column");
    }
    if opts.group_column.is_some() {
        return refuse("group column");
    }
    if opts.label_column.is_some() && !opts.label_optional {
        return refuse("labels (pass --no-labels to read it unlabelled)");
    }
    Ok(())
}
