//! Parquet tables (feature `parquet`, which `extract` turns on), the way
//! Hugging Face distributes datasets: one row per example, columns picked
//! by name (or 0-based top-level position) as in CSV. Read with the
//! `parquet` crate's record API (no Arrow), only the columns asked for;
//! snappy-compressed or uncompressed column chunks (pyarrow's default is
//! snappy; other codecs are an error naming the file).
//!
//! Cells become text: strings as they are, integers, floats and booleans
//! written in decimal (a `ClassLabel` column's class numbers become the
//! labels `"0"`, `"1"`, ...), UTF-8 binary as text; a null is a missing
//! cell (a bad row where the column is needed), and a nested value
//! (struct, list, map: e.g. Hugging Face's embedded image `{bytes, path}`)
//! or non-UTF-8 binary is a bad row. A row's "line" in ids and messages is
//! its 1-based row number. A row the file cannot decode stops the read
//! with an error naming the file: the rest of its page cannot be trusted.

use std::borrow::Cow;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::rows::{build_row, hint, repeated_column, wanted, BadRows, Cells, FileRows};
use super::{input, Column, ReadOptions};
use crate::{Error, Result};

fn dataset(path: &Path, message: String) -> Error {
    Error::Dataset {
        path: path.to_owned(),
        message,
    }
}

/// The text of one cell; `Ok(None)` for a null, `Err` a bad-row message.
fn cell_text(field: &Field) -> std::result::Result<Option<String>, String> {
    Ok(Some(match field {
        Field::Null => return Ok(None),
        Field::Str(s) => s.clone(),
        Field::Bool(v) => v.to_string(),
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => s.to_owned(),
            Err(_) => return Err("binary value that is not UTF-8 text".to_owned()),
        },
        Field::Group(_) | Field::ListInternal(_) | Field::MapInternal(_) => {
            return Err("nested value (struct, list or map), not text; an embedded \
                        image ({bytes, path}) is not read, only image paths"
                .to_owned())
        }
        other => return Err(format!("value {other} of a type that is not text")),
    }))
}

/// Read a Parquet file's rows.
pub(super) fn read(
    path: &Path,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    if super::is_stdin(path) {
        return Err(Error::setting(
            "--format",
            "a Parquet file cannot be read from standard input: give its path",
        ));
    }
    let file = crate::fsutil::open_regular(path)?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| dataset(path, format!("not a readable Parquet file: {e}")))?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    let fields = root.get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    if let Some(message) = repeated_column(&names, opts) {
        return Err(dataset(
            path,
            message.replace("in the header", "in the schema"),
        ));
    }
    let find = |col: &Column| match col {
        Column::Name(name) => names.iter().position(|n| n == name),
        Column::Index(i) => (*i < names.len()).then_some(*i),
    };
    let mut opts = Cow::Borrowed(opts);
    if let Some(col) = &opts.label_column {
        if opts.label_optional && find(col).is_none() {
            opts.to_mut().label_column = None;
        }
    }
    // Each wanted column's top-level field.
    let mut picked: Vec<usize> = Vec::new();
    let mut at: Vec<(&'static str, usize)> = Vec::new();
    for (role, col) in wanted(&opts) {
        let i = find(col).ok_or_else(|| {
            dataset(
                path,
                format!(
                    "no {role} column {col}; the columns are: {}{}",
                    names.join(", "),
                    hint(role)
                ),
            )
        })?;
        picked.push(i);
        at.push((role, i));
    }
    picked.sort_unstable();
    picked.dedup();
    let projection = Type::group_type_builder(root.name())
        .with_fields(picked.iter().map(|&i| fields[i].clone()).collect())
        .build()
        .map_err(|e| dataset(path, format!("cannot select the columns: {e}")))?;
    // Position of each role's column in a projected row.
    let slot = |role: &str| {
        at.iter()
            .find(|(r, _)| *r == role)
            .and_then(|(_, i)| picked.iter().position(|p| p == i))
    };
    let slots = [
        slot("text"),
        slot("text pair"),
        slot("label"),
        slot("id"),
        slot("group"),
    ];
    let stem = input::file_stem(path);
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| dataset(path, format!("cannot read the rows: {e}")))?;
    let mut out = FileRows::default();
    for (n, row) in rows.enumerate() {
        let line = n as u64 + 1;
        out.rows_read += 1;
        let row = row.map_err(|e| dataset(path, format!("row {line} cannot be decoded: {e}")))?;
        let values: Vec<&Field> = row.get_column_iter().map(|(_, f)| f).collect();
        let mut texts: [Option<String>; 5] = Default::default();
        let mut problem = None;
        for (k, s) in slots.iter().enumerate() {
            let Some(&field) = s.and_then(|s| values.get(s)) else {
                continue;
            };
            match cell_text(field) {
                Ok(v) => texts[k] = v,
                Err(why) => {
                    problem = Some(format!("column {}: {why}", names[picked[s.unwrap_or(0)]]));
                    break;
                }
            }
        }
        if let Some(message) = problem {
            bad.row(path, line, message)?;
            continue;
        }
        let [text, text_pair, label, id, group] = texts;
        let cells = Cells {
            text,
            text_pair,
            label,
            id,
            group,
        };
        match build_row(cells, line, &stem, &opts, need_group) {
            Ok(row) => out.rows.push(row),
            Err(message) => bad.row(path, line, message)?,
        }
    }
    Ok(out)
}
