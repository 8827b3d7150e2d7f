//! The folders format: `root/<label>/<file>`, one example per file. Class
//! folders and files are taken in name order and hidden entries (names
//! starting with `.`) are ignored; the text is the file's content, trimmed,
//! and the id is `<label>/<file name>`. Column options are ignored, except
//! that no label column gives unlabelled examples.
//!
//! Only regular files (symlinks followed) are examples: a device or FIFO in
//! a class folder is ignored like any other stray entry, so it is never read.
//! A file larger than [`ReadLimits::max_line_bytes`](super::ReadLimits) is
//! a bad example, found without reading past the bound.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::input;
use super::rows::{BadRows, FileRows, RawRow};
use super::ReadOptions;
use crate::{Error, Result};

/// What a directory entry is, symlinks followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Dir,
    File,
    /// A device, FIFO or socket.
    Other,
}

/// Visible entries of `dir` (names not starting with `.`), sorted by name,
/// with what each is (symlinks followed).
pub(super) fn list_dir(dir: &Path) -> Result<Vec<(PathBuf, Kind)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        let kind = if meta.is_dir() {
            Kind::Dir
        } else if meta.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        entries.push((path, kind));
    }
    entries.sort();
    Ok(entries)
}

/// Walk a class-folder tree: every regular file one level below a class
/// folder of `root`, in name order, is given to `visit` with its class
/// folder's name (the label). Returns the count of stray entries (files at
/// the top, folders or devices inside a class folder), which are skipped.
pub(super) fn walk_classes(
    root: &Path,
    mut visit: impl FnMut(&str, PathBuf) -> Result<()>,
) -> Result<usize> {
    let mut stray = 0usize;
    for (class_dir, kind) in list_dir(root)? {
        if kind != Kind::Dir {
            stray += 1;
            continue;
        }
        let label = name_of(&class_dir)?;
        for (file, kind) in list_dir(&class_dir)? {
            if kind != Kind::File {
                stray += 1;
                continue;
            }
            visit(&label, file)?;
        }
    }
    Ok(stray)
}

/// Read a class-folder tree rooted at `root` in the format named `format`
/// (for messages): one row per file, its id `<label>/<file name>`, its
/// content from `example` (an `Err(message)` there is a bad row).
pub(super) fn read_class_folders<T>(
    root: &Path,
    format: &str,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
    mut example: impl FnMut(&Path) -> Result<std::result::Result<T, String>>,
) -> Result<FileRows<T>> {
    if need_group {
        return Err(Error::setting(
            "--group-column",
            format!(
                "a split by group needs a group column, which the {format} format does not have"
            ),
        ));
    }
    if !root.is_dir() {
        return Err(Error::Dataset {
            path: root.to_owned(),
            message: format!(
                "the {format} format needs a directory holding one sub-folder per class"
            ),
        });
    }
    let mut out = FileRows::default();
    let stray = walk_classes(root, |label, file| {
        out.rows_read += 1;
        let text = match example(&file)? {
            Ok(text) => text,
            Err(message) => return bad.file(&file, message),
        };
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.rows.push(RawRow {
            line: 0,
            id: format!("{label}/{file_name}"),
            explicit_id: false,
            text,
            text_pair: None,
            label: opts.label_column.as_ref().map(|_| label.to_owned()),
            group: None,
        });
        Ok(())
    })?;
    if stray > 0 {
        tracing::warn!(
            "{}: ignored {stray} entries that are not <class folder>/<file>",
            root.display()
        );
    }
    Ok(out)
}

/// Read a class-folder tree of text files rooted at `root`.
pub(super) fn read(
    root: &Path,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    let max = opts.limits.max_line_bytes;
    read_class_folders(root, "folders", opts, need_group, bad, |file| {
        let bytes = read_at_most(file, max)?;
        if bytes.len() > max {
            return Ok(Err(format!(
                "the file is larger than {max} bytes (the --max-line-bytes bound on \
                 one example); raise --max-line-bytes if it really is that long"
            )));
        }
        Ok(
            input::decode(input::strip_bom(&bytes, opts.encoding), opts.encoding)
                .map(|text| text.trim().to_owned()),
        )
    })
}

/// The first `max + 1` bytes of `path` at most (more than `max` means the
/// file is too large).
pub(super) fn read_at_most(path: &Path, max: usize) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// A class folder's name, which becomes the label.
pub(super) fn name_of(dir: &Path) -> Result<String> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::Dataset {
            path: dir.to_owned(),
            message: "class folder name is not valid UTF-8".to_owned(),
        })
}
