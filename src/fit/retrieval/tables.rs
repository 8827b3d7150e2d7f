//! The tables a retrieval cache was extracted from, read again to show a
//! hit's image file or caption (`sherl-fit search`, `examples.json`): the
//! cache stores ids and features, not the paths and texts.

use std::collections::HashMap;
use std::path::Path;

use crate::cache::Cache;

/// `id -> value` of the table column the cache's `kind` was read from
/// (`image`: the image column; `caption`: the text column), from the
/// files its manifest lists, each read only if it is still where it was
/// (as given when extracting) with the same sha256 and is a table with a
/// header; otherwise empty, with a warning.
pub fn table_column(cache: &Cache, kind: &str) -> HashMap<String, String> {
    let m = cache.manifest();
    let o = &m.dataset.options;
    let column = match kind {
        "image" => o["image"]["image_column"].as_str(),
        _ => o["text_column"].as_str(),
    };
    let (Some(column), Some(id_column)) = (column, o["id_column"].as_str()) else {
        tracing::warn!(
            "{}: the {kind} and id columns are not named in the manifest; the hits carry ids only",
            cache.dir().display()
        );
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for f in &m.dataset.files {
        let path = Path::new(&f.path);
        let fresh = crate::fsutil::sha256_file(path).is_ok_and(|h| h == f.sha256);
        let read = fresh
            .then(|| read_column(path, id_column, column))
            .flatten();
        match read {
            Some(rows) => out.extend(rows),
            None => tracing::warn!(
                "{}: missing, changed since the cache was extracted, or not a table with columns \
                 {id_column} and {column}; its hits carry ids only",
                path.display()
            ),
        }
    }
    out
}

fn read_column(path: &Path, id: &str, column: &str) -> Option<Vec<(String, String)>> {
    let delim = if path.extension().is_some_and(|e| e == "tsv") {
        b'\t'
    } else {
        b','
    };
    let mut r = csv::ReaderBuilder::new()
        .delimiter(delim)
        .from_path(path)
        .ok()?;
    let head = r.headers().ok()?.clone();
    let (i, c) = (
        head.iter().position(|h| h == id)?,
        head.iter().position(|h| h == column)?,
    );
    r.records()
        .map(|rec| {
            let rec = rec.ok()?;
            Some((rec.get(i)?.to_owned(), rec.get(c)?.to_owned()))
        })
        .collect()
}
