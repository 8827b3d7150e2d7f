//! JSON Lines rows: one object per line, blank lines skipped. Columns are
//! keys, checked against the first object; string values are used as they
//! are, numbers and booleans as their JSON text, null or absent as missing.
//! Lines are read through [`LineReader`], so one may not be longer than
//! [`ReadLimits::max_line_bytes`](super::ReadLimits::max_line_bytes).

use std::borrow::Cow;
use std::path::Path;

use serde_json::{Map, Value};

use super::input::{self, LineReader};
use super::rows::{build_row, hint, next_nonblank, wanted, BadRows, Cells, FileRows};
use super::{Column, ReadOptions};
use crate::{Error, Result};

/// Read a JSON Lines file.
pub(super) fn read(
    path: &Path,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    let mut opts = Cow::Borrowed(opts);
    let mut keys = Vec::new();
    for (role, col) in wanted(&opts) {
        match col {
            Column::Name(name) => keys.push((role, name.clone())),
            Column::Index(i) => {
                return Err(Error::setting(
                    format!("{role} column"),
                    format!(
                        "the {role} column is given by index ({i}), but JSON Lines rows are \
                         objects: name the column by its key"
                    ),
                ))
            }
        }
    }
    let stem = input::file_stem(path);
    let mut reader = LineReader::open(path, opts.encoding, opts.limits.max_line_bytes)?;
    let mut buf = Vec::new();
    let mut keys_checked = false;
    let mut out = FileRows::default();
    while let Some((line, text)) =
        next_nonblank(&mut reader, &mut buf, opts.encoding, &mut out, bad)?
    {
        let text = text.as_str();
        let object = match serde_json::from_str::<Checked>(text) {
            Ok(Checked {
                value: Value::Object(object),
                repeated,
            }) => {
                if let Some((_, key)) = keys.iter().find(|(_, k)| repeated.contains(k)) {
                    bad.row(
                        path,
                        line,
                        format!(
                            "the key `{key}` is given twice (or more) in this object; which \
                             value is meant cannot be told: rename the others"
                        ),
                    )?;
                    continue;
                }
                object
            }
            Ok(Checked { value: other, .. }) => {
                let hint = if other.is_array() && line == 1 {
                    " (the file looks like one JSON array; sherl reads JSON Lines: one \
                     object per line)"
                } else {
                    ""
                };
                bad.row(
                    path,
                    line,
                    format!("expected a JSON object, found {}{hint}", json_kind(&other)),
                )?;
                continue;
            }
            Err(e) => {
                bad.row(path, line, format!("invalid JSON: {e}"))?;
                continue;
            }
        };
        if !keys_checked {
            if opts.label_optional {
                if let Some(Column::Name(key)) = &opts.label_column {
                    if !object.contains_key(key) {
                        tracing::info!(
                            "{}: no label key `{key}` in the first object; reading it unlabelled",
                            path.display()
                        );
                        keys.retain(|(role, _)| *role != "label");
                        opts.to_mut().label_column = None;
                    }
                }
            }
            check_keys(path, line, &object, &keys)?;
            keys_checked = true;
        }
        match cells_from_object(&object, &opts)
            .and_then(|cells| build_row(cells, line, &stem, &opts, need_group))
        {
            Ok(row) => out.rows.push(row),
            Err(message) => bad.row(path, line, message)?,
        }
    }
    Ok(out)
}

/// The first object decides which keys exist: a wanted key missing there is
/// an unknown column, not a bad row.
fn check_keys(
    path: &Path,
    line: u64,
    object: &Map<String, Value>,
    keys: &[(&str, String)],
) -> Result<()> {
    match keys
        .iter()
        .find(|(_, key)| !object.contains_key(key.as_str()))
    {
        None => Ok(()),
        Some((role, key)) => {
            let available: Vec<&str> = object.keys().map(String::as_str).collect();
            Err(Error::Dataset {
                path: path.to_owned(),
                message: format!(
                    "no {role} column named `{key}`: the first object (line {line}) has \
                     the keys: {}{}",
                    available.join(", "),
                    hint(role)
                ),
            })
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn cells_from_object(
    object: &Map<String, Value>,
    opts: &ReadOptions,
) -> std::result::Result<Cells, String> {
    let cell = |col: Option<&Column>| -> std::result::Result<Option<String>, String> {
        let Some(Column::Name(key)) = col else {
            return Ok(None);
        };
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            Some(v) => Err(format!(
                "key `{key}` holds {}, expected a string",
                json_kind(v)
            )),
        }
    };
    Ok(Cells {
        text: cell(Some(&opts.text_column))?,
        text_pair: cell(opts.text_pair_column.as_ref())?,
        label: cell(opts.label_column.as_ref())?,
        id: cell(opts.id_column.as_ref())?,
        group: cell(opts.group_column.as_ref())?,
    })
}

/// A JSON value, with the keys its top-level object (if it is one) gives
/// more than once: `serde_json::Value` keeps the last silently.
struct Checked {
    value: Value,
    repeated: Vec<String>,
}

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl CheckedVisitor {
    fn plain<E>(value: Value) -> std::result::Result<Checked, E> {
        Ok(Checked {
            value,
            repeated: Vec::new(),
        })
    }
}

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Checked, A::Error> {
        let mut object = Map::new();
        let mut repeated = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if object.contains_key(&key) {
                repeated.push(key);
            } else {
                object.insert(key, value);
            }
        }
        Ok(Checked {
            value: Value::Object(object),
            repeated,
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        seq: A,
    ) -> std::result::Result<Checked, A::Error> {
        use serde::Deserialize;
        Self::plain(Value::deserialize(
            serde::de::value::SeqAccessDeserializer::new(seq),
        )?)
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<Checked, E> {
        Self::plain(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<Checked, E> {
        Self::plain(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<Checked, E> {
        Self::plain(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<Checked, E> {
        Self::plain(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<Checked, E> {
        Self::plain(Value::from(v))
    }

    fn visit_string<E>(self, v: String) -> std::result::Result<Checked, E> {
        Self::plain(Value::from(v))
    }

    fn visit_unit<E>(self) -> std::result::Result<Checked, E> {
        Self::plain(Value::Null)
    }

    fn visit_none<E>(self) -> std::result::Result<Checked, E> {
        Self::plain(Value::Null)
    }
}
