//! The folders format: `root/<label>/<file>`, one example per file. Class
//! folders and files are taken in name order and hidden entries (names
//! starting with `.`) are ignored; the text is the file's content, trimmed,
//! and the id is `<label>/<file name>`. Column options are ignored, except
//! that no label column gives unlabelled examples.
//!
//! Which entries are examples is decided in one place, [`class_tree`],
//! which both the readers and the dataset's fingerprint
//! ([`fingerprint`], recorded in a cache's manifest) use, so the
//! fingerprint covers exactly the files read:
//! - hidden entries (names starting with `.`) are ignored at both levels;
//! - symbolic links are followed, once: a class folder may be a link to a
//!   directory, an example a link to a regular file. The depth is fixed
//!   (`root/<class>/<file>`), so a link to a directory inside a class folder
//!   (e.g. `loop -> ..`) is a stray entry, never walked into, and cannot
//!   loop;
//! - only regular files are examples: a device, FIFO or socket (or a link
//!   to one, such as a link to `/dev/zero`) is a stray entry, ignored with a
//!   warning like a file at the top or a folder inside a class folder, and
//!   is never opened;
//! - an entry whose type cannot be found (a dangling link, one that cannot
//!   be examined) is a bad row: skipped and counted with
//!   [`ReadOptions::skip_bad_rows`], else an error naming it.
//!
//! A file larger than [`ReadLimits::max_line_bytes`](super::ReadLimits) is
//! a bad example, found without reading past the bound.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::input;
use super::rows::{BadRows, FileRows, RawRow};
use super::ReadOptions;
use crate::{Error, Result};

/// What a directory entry is, symlinks followed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    /// A device, FIFO or socket.
    Other,
    /// Its type cannot be found (a dangling link...): why.
    Broken(String),
}

/// Visible entries of `dir` (names not starting with `.`), sorted by name,
/// with what each is (symlinks followed).
fn list_dir(dir: &Path) -> Result<Vec<(PathBuf, Kind)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let kind = match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => Kind::Dir,
            Ok(meta) if meta.is_file() => Kind::File,
            Ok(_) => Kind::Other,
            Err(e) => Kind::Broken(broken_reason(&path, &e)),
        };
        entries.push((path, kind));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Why an entry whose metadata cannot be read is unusable, for a bad row.
fn broken_reason(path: &Path, e: &std::io::Error) -> String {
    let fix = "remove or fix it, or pass --skip-bad-rows to skip it";
    match fs::read_link(path) {
        Ok(target) if e.kind() == std::io::ErrorKind::NotFound => format!(
            "a symbolic link to {}, which does not exist (a dangling link); {fix}",
            target.display()
        ),
        Ok(target) => format!(
            "a symbolic link to {} that cannot be followed ({e}); {fix}",
            target.display()
        ),
        Err(_) => format!("cannot be examined ({e}); {fix}"),
    }
}

/// One example entry of a class-folder tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    /// Its class folder's name (the label).
    pub label: String,
    /// `root/<class>/<file>`.
    pub path: PathBuf,
    /// `Some(why)` when it cannot be read (a bad row); `None` for a
    /// regular file.
    pub broken: Option<String>,
}

/// What a class-folder tree holds, by the rules of the module docs.
#[derive(Debug, Default)]
pub(super) struct ClassTree {
    /// Examples (and broken entries, which are bad rows) in name order.
    pub entries: Vec<Entry>,
    /// Stray entries, skipped: files, devices and FIFOs at the top;
    /// folders, devices and FIFOs inside a class folder.
    pub stray: usize,
}

impl ClassTree {
    /// The regular files: the examples that are read.
    pub fn files(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.broken.is_none())
    }
}

/// List the class-folder tree rooted at `root`: the one listing the
/// readers, the format guess and the fingerprint share.
pub(super) fn class_tree(root: &Path) -> Result<ClassTree> {
    let mut tree = ClassTree::default();
    for (class_dir, kind) in list_dir(root)? {
        match kind {
            Kind::Dir => {}
            Kind::Broken(why) => {
                // Perhaps a class folder: a bad row, not silently nothing.
                tree.entries.push(Entry {
                    label: String::new(),
                    path: class_dir,
                    broken: Some(why),
                });
                continue;
            }
            Kind::File | Kind::Other => {
                tree.stray += 1;
                continue;
            }
        }
        let label = name_of(&class_dir)?;
        for (file, kind) in list_dir(&class_dir)? {
            match kind {
                Kind::File => tree.entries.push(Entry {
                    label: label.clone(),
                    path: file,
                    broken: None,
                }),
                Kind::Broken(why) => tree.entries.push(Entry {
                    label: label.clone(),
                    path: file,
                    broken: Some(why),
                }),
                Kind::Dir | Kind::Other => tree.stray += 1,
            }
        }
    }
    Ok(tree)
}

/// List a flat folder, `root/<file>`, by the rules of the module docs
/// (hidden entries ignored, links followed once, devices and FIFOs stray
/// and never opened, dangling links bad rows), each entry's label empty.
/// `None` when `root` holds a folder (a class-folder tree, then) or no
/// file at all.
pub(super) fn flat_tree(root: &Path) -> Result<Option<ClassTree>> {
    let mut tree = ClassTree::default();
    for (path, kind) in list_dir(root)? {
        match kind {
            Kind::Dir => return Ok(None),
            Kind::File => tree.entries.push(Entry {
                label: String::new(),
                path,
                broken: None,
            }),
            Kind::Broken(why) => tree.entries.push(Entry {
                label: String::new(),
                path,
                broken: Some(why),
            }),
            Kind::Other => tree.stray += 1,
        }
    }
    Ok((!tree.entries.is_empty()).then_some(tree))
}

/// sha256 (lowercase hex) of a class-folder dataset: over the sorted
/// `sha256  ./<class>/<file>` lines of the files [`class_tree`] lists as
/// examples (as `sha256sum` prints them), so exactly the files the readers
/// read; stray, hidden and broken entries are not part of it. For a tree
/// holding nothing else it equals what `fsutil::sha256_path` gives the
/// directory, so caches written before keep their settings hash.
pub(super) fn fingerprint(root: &Path) -> Result<String> {
    let tree = class_tree(root)?;
    crate::fsutil::sha256_listing(root, tree.files().map(|e| e.path.as_path()))
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
    let tree = class_tree(root)?;
    let mut out = FileRows::default();
    for entry in &tree.entries {
        out.rows_read += 1;
        if let Some(why) = &entry.broken {
            bad.file(&entry.path, why.clone())?;
            continue;
        }
        let file = &entry.path;
        let text = match example(file)? {
            Ok(text) => text,
            Err(message) => {
                bad.file(file, message)?;
                continue;
            }
        };
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.rows.push(RawRow {
            line: 0,
            id: format!("{}/{file_name}", entry.label),
            explicit_id: false,
            text,
            text_pair: None,
            label: opts.label_column.as_ref().map(|_| entry.label.clone()),
            group: None,
        });
    }
    let stray = tree.stray;
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
        if let Some(message) = input::wide_bom(&bytes) {
            return Ok(Err(message));
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
    let file = crate::fsutil::open_regular(path)?;
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
