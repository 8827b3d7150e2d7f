//! Labelled image datasets: reading a folder of class folders of PNG/JPEG
//! files, a CSV/TSV/JSON Lines table whose column names an image file, or
//! the IDX files MNIST-style datasets ship, into [`ImageExample`]s; and the
//! [`Preprocess`] recipe that turns a decoded [`Image`] into a model input.
//!
//! The entry point is [`load_images`], driven by the same [`DatasetPlan`] as
//! text datasets ([`crate::data::load`]) plus [`ImageOptions`]: the same
//! `--split` (seeded, group-aware), `--labels` (label list and order, other
//! labels dropped and counted) and `--group-column` rules apply, through
//! the same code. [`ReadOptions::skip_bad_rows`] covers images: an image
//! that cannot be read or decoded is a bad row, skipped and counted when
//! asked, else an error naming the table and row (or the file).
//!
//! Every image is decoded once while loading, to find the bad ones (a
//! truncated PNG is only found by decoding it), and its pixels are dropped;
//! [`ImageSource::decode`] reads it again when it is needed. IDX images are
//! kept in memory (one byte per pixel), shared by their examples.
//!
//! Unlabelled images for `predict` (a single image file, a flat folder of
//! images, image paths on stdin) are read by [`load_image_inputs`].
//!
//! Formats ([`Format`], `--format`):
//! - [`Format::ImageFolders`] (or `folders`): `root/<label>/<file>`, class
//!   folders and files in name order, hidden entries ignored; the id is
//!   `<label>/<file name>`. No group column. [`Format::Auto`] picks it for
//!   a directory whose class folders hold only `.png`/`.jpg`/`.jpeg` files.
//! - CSV, TSV, JSON Lines, Parquet: [`ImageOptions::image_column`] holds the image
//!   path, relative to the table's folder (absolute paths are kept); the
//!   other columns as for text (label, id, group).
//! - [`Format::Idx`]: `<prefix>-images-idx3-ubyte[.gz]`, labelled by
//!   `<prefix>-labels-idx1-ubyte[.gz]` next to it (not read for unlabelled
//!   data); the id is `<prefix>:<index>` (0-based) and the label the class
//!   number in decimal (`"0"`..`"9"`), or its name from
//!   [`ImageOptions::idx_label_names`]. No group column. Label names sort as
//!   strings, so give `--labels` (the names or numbers in class order) to
//!   keep class ids equal to the numbers.

mod decode;
mod idx;
mod inputs;
mod preprocess;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use decode::{decode_image, read_image, Background, Image};
pub use idx::{labels_path, IdxImages};
pub use inputs::load_image_inputs;
pub use preprocess::{Interpolation, Preprocess, Resize};

use super::folders::{class_tree, read_class_folders};
use super::loader::{self, Assembled};
use super::rows::{BadRows, FileRows, RawRow};
use super::{delimited, jsonl, Column, DatasetPlan, Format, LoadReport, ReadOptions};
use crate::{Error, Result};

/// File extensions (lowercase) that [`Format::Auto`] takes for images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// How image datasets are read, beyond [`ReadOptions`] (in JSON, missing
/// fields take their defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ImageOptions {
    /// Table column holding each image's path (default `image`).
    pub image_column: Column,
    /// What transparent pixels are composited on (default white).
    pub background: Background,
    /// Largest image file read, in bytes (default 64 MiB); a larger one is
    /// a bad row.
    pub max_file_bytes: u64,
    /// Most bytes the decoder may allocate for one image (default 256 MiB,
    /// e.g. an 8-bit RGBA image of 67 megapixels); an image whose header
    /// claims more is a bad row, refused before its pixels are read.
    pub max_decoded_bytes: u64,
    /// Names of IDX class numbers: class `k` is labelled
    /// `idx_label_names[k]` (e.g. Fashion-MNIST's `classes.txt`, read with
    /// [`read_class_names`]); empty (the default): the numbers in decimal.
    /// A class number without a name is an error naming the labels file.
    pub idx_label_names: Vec<String>,
}

impl ImageOptions {
    /// Default of [`ImageOptions::max_file_bytes`]: 64 MiB.
    pub const MAX_FILE_BYTES: u64 = 64 << 20;
    /// Default of [`ImageOptions::max_decoded_bytes`]: 256 MiB.
    pub const MAX_DECODED_BYTES: u64 = 256 << 20;
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            image_column: Column::Name("image".to_owned()),
            background: Background::White,
            max_file_bytes: Self::MAX_FILE_BYTES,
            max_decoded_bytes: Self::MAX_DECODED_BYTES,
            idx_label_names: Vec::new(),
        }
    }
}

/// Where an example's pixels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A PNG or JPEG file.
    File(PathBuf),
    /// Image `index` (0-based) of an IDX images file, held in memory.
    Idx {
        /// The images file, shared by all its examples.
        images: Arc<IdxImages>,
        /// 0-based index in it.
        index: usize,
    },
}

impl ImageSource {
    /// Decode the image (a file is read again). Errors name the file (and
    /// index).
    pub fn decode(&self, opts: &ImageOptions) -> Result<Image> {
        match self {
            ImageSource::File(path) => read_image(path, opts).map_err(|message| Error::Dataset {
                path: path.clone(),
                message,
            }),
            ImageSource::Idx { images, index } => {
                images.image(*index).ok_or_else(|| Error::Dataset {
                    path: images.path().to_owned(),
                    message: format!("no image {index}: the file holds {}", images.len()),
                })
            }
        }
    }

    /// The file the pixels come from (the IDX file for IDX images).
    pub fn path(&self) -> &Path {
        match self {
            ImageSource::File(path) => path,
            ImageSource::Idx { images, .. } => images.path(),
        }
    }
}

/// One labelled (or unlabelled) image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageExample {
    /// From the id column; else `<file stem>:<line>` (tables),
    /// `<label>/<file name>` (folders) or `<prefix>:<index>` (IDX).
    pub id: String,
    /// Split name (`train`, `valid`, ...).
    pub split: String,
    /// Where the pixels come from.
    pub source: ImageSource,
    /// Class id, an index into [`ImageDataset::label_names`]; `None` when
    /// the dataset is unlabelled.
    pub label: Option<u32>,
    /// Group key, when a group column is set (tables only).
    pub group: Option<String>,
    /// Tables: the 1-based line of the row; IDX: the 1-based image number;
    /// folders: 0.
    pub source_line: u64,
    /// Width of the decoded image, in pixels.
    pub width: u32,
    /// Height of the decoded image, in pixels.
    pub height: u32,
}

/// An image dataset: the examples (pixels not loaded, except IDX).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    /// Examples in file order (files in the order given), each with its split.
    pub examples: Vec<ImageExample>,
    /// Label strings by class id; empty for unlabelled data.
    pub label_names: Vec<String>,
    /// What happened while loading (bad rows are unreadable images too).
    pub report: LoadReport,
}

impl ImageDataset {
    /// The examples of one split, in file order.
    pub fn split<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ImageExample> + 'a {
        self.examples.iter().filter(move |e| e.split == name)
    }
}

/// Read the image dataset described by `plan` (files, split, labels, table
/// columns, `skip_bad_rows`) and `opts` into memory.
///
/// Errors as [`crate::data::load`]'s, plus: an image that cannot be read or
/// decoded, unless `skip_bad_rows` ([`Error::DatasetLine`] naming the table
/// and row, or [`Error::Dataset`] naming the image file); a malformed IDX
/// file or a labels file whose count differs ([`Error::Dataset`]); plain
/// text files, which cannot name images ([`Error::Setting`]).
pub fn load_images(plan: &DatasetPlan, opts: &ImageOptions) -> Result<ImageDataset> {
    let read = &plan.read;
    let Assembled {
        items,
        label_names,
        report,
    } = loader::assemble(plan, &mut |path, need_group, bad| {
        read_file(path, read, opts, need_group, bad)
    })?;
    let examples = items
        .into_iter()
        .map(|item| ImageExample {
            id: item.id,
            split: item.split,
            source: item.payload.source,
            label: item.label,
            group: item.group,
            source_line: item.line,
            width: item.payload.width,
            height: item.payload.height,
        })
        .collect();
    Ok(ImageDataset {
        examples,
        label_names,
        report,
    })
}

/// Read a class-name list: one name per line, trimmed, blank lines
/// skipped; an empty list or a name given twice is an error naming the file.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = crate::fsutil::read_text(path, crate::fsutil::SMALL_FILE_LIMIT)?;
    let mut names: Vec<String> = Vec::new();
    for name in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if names.iter().any(|n| n == name) {
            return Err(Error::Dataset {
                path: path.to_owned(),
                message: format!("class name `{name}` is given twice"),
            });
        }
        names.push(name.to_owned());
    }
    if names.is_empty() {
        return Err(Error::Dataset {
            path: path.to_owned(),
            message: "no class names (one per line)".to_owned(),
        });
    }
    Ok(names)
}

/// The format [`Format::Auto`] gives a directory: image folders when its
/// class folders hold only image files (and at least one), text folders
/// when they hold none; both kinds is an error asking for `--format`.
pub(super) fn folder_format(root: &Path) -> Result<Format> {
    let tree = class_tree(root)?;
    let (mut images, mut others) = (0usize, Vec::new());
    for entry in tree.files() {
        if has_image_extension(&entry.path) {
            images += 1;
        } else {
            others.push(&entry.path);
        }
    }
    match (images, others.as_slice()) {
        (0, _) => Ok(Format::Folders),
        (_, []) => Ok(Format::ImageFolders),
        (images, others) => Err(Error::setting(
            "--format",
            format!(
                "{}: the class folders hold {images} PNG/JPEG files (.png, .jpg, .jpeg) and \
                 {} other file{} (e.g. {}); a folder dataset is either images or texts, and \
                 images are decoded from PNG and JPEG only. Convert the other files to PNG \
                 (e.g. `convert x.gif x.png`) or remove them; or pass \
                 --format image-folders --skip-bad-rows to skip them as bad rows",
                root.display(),
                others.len(),
                if others.len() == 1 { "" } else { "s" },
                others[0].display()
            ),
        )),
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// What a row of an image dataset holds before label mapping.
struct Loaded {
    source: ImageSource,
    width: u32,
    height: u32,
}

fn read_file(
    path: &Path,
    read: &ReadOptions,
    opts: &ImageOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows<Loaded>> {
    let format = read.format.resolve(path)?;
    if path.is_dir() && !matches!(format, Format::Folders | Format::ImageFolders) {
        return Err(Error::Dataset {
            path: path.to_owned(),
            message: format!(
                "is a directory, but the format is {format}; a folder of class \
                 sub-folders needs --format image-folders (or auto)"
            ),
        });
    }
    match format {
        Format::Folders | Format::ImageFolders | Format::Auto => {
            folders(path, read, opts, need_group, bad)
        }
        Format::Idx => idx_file(path, read, opts, need_group),
        Format::Csv | Format::Tsv | Format::Jsonl | Format::Parquet => {
            table(path, format, read, opts, need_group, bad)
        }
        Format::Text => Err(Error::setting(
            "--format",
            format!(
                "{}: plain text cannot name images; use a CSV, TSV or JSON Lines table \
                 with an image column, a folder of class folders, or IDX files",
                path.display()
            ),
        )),
    }
}

fn no_group_column(format: &str) -> Error {
    Error::setting(
        "--group-column",
        format!("a split by group needs a group column, which the {format} format does not have"),
    )
}

fn folders(
    root: &Path,
    read: &ReadOptions,
    opts: &ImageOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows<Loaded>> {
    read_class_folders(root, "image-folders", read, need_group, bad, |file| {
        Ok(read_image(file, opts).map(|image| Loaded {
            source: ImageSource::File(file.to_owned()),
            width: image.width(),
            height: image.height(),
        }))
    })
}

fn idx_file(
    path: &Path,
    read: &ReadOptions,
    opts: &ImageOptions,
    need_group: bool,
) -> Result<FileRows<Loaded>> {
    if need_group {
        return Err(no_group_column("IDX"));
    }
    let images = Arc::new(IdxImages::read(path)?);
    let labels = match &read.label_column {
        None => None,
        Some(_) => {
            let labels_file = labels_path(path).ok_or_else(|| Error::Dataset {
                path: path.to_owned(),
                message: "cannot find the labels file: an IDX images file name holds \
                          `images-idx3`, its labels file the same name with `labels-idx1`; \
                          rename it, or read it as unlabelled (--no-labels)"
                    .to_owned(),
            })?;
            if !labels_file.is_file() && read.label_optional {
                None
            } else {
                let numbers = idx::read_labels(&labels_file, images.len(), path)?;
                Some(label_strings(
                    &numbers,
                    &opts.idx_label_names,
                    &labels_file,
                )?)
            }
        }
    };
    let prefix = idx::id_prefix(path);
    let mut out = FileRows::default();
    for index in 0..images.len() {
        out.rows_read += 1;
        out.rows.push(RawRow {
            line: index as u64 + 1,
            id: format!("{prefix}:{index}"),
            explicit_id: false,
            text: Loaded {
                source: ImageSource::Idx {
                    images: Arc::clone(&images),
                    index,
                },
                width: images.cols(),
                height: images.rows(),
            },
            text_pair: None,
            label: labels.as_ref().map(|l| l[index].clone()),
            group: None,
        });
    }
    Ok(out)
}

/// Each IDX class number as its label: its name, or the number in decimal.
fn label_strings(numbers: &[u8], names: &[String], labels_file: &Path) -> Result<Vec<String>> {
    if names.is_empty() {
        return Ok(numbers.iter().map(u8::to_string).collect());
    }
    numbers
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            names
                .get(usize::from(k))
                .cloned()
                .ok_or_else(|| Error::Dataset {
                    path: labels_file.to_owned(),
                    message: format!(
                        "image {i} has class {k}, which has no name: the class names \
                         (--class-names, or those the cache was extracted with) name {} \
                         classes, numbers 0 to {}; give one name per class number",
                        names.len(),
                        names.len() - 1
                    ),
                })
        })
        .collect()
}

fn table(
    path: &Path,
    format: Format,
    read: &ReadOptions,
    opts: &ImageOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows<Loaded>> {
    // The table readers read the image column as the text column.
    let topts = ReadOptions {
        text_column: opts.image_column.clone(),
        text_pair_column: None,
        ..read.clone()
    };
    let rows = match format {
        Format::Csv => delimited::read(path, b',', true, &topts, need_group, bad),
        Format::Tsv => delimited::read(path, b'\t', read.tsv_quotes, &topts, need_group, bad),
        Format::Parquet => loader::read_parquet(path, &topts, need_group, bad),
        _ => jsonl::read(path, &topts, need_group, bad),
    }
    .map_err(image_wording)?;
    let base = match path.parent() {
        Some(dir) if !super::is_stdin(path) && !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut out = FileRows {
        rows: Vec::with_capacity(rows.rows.len()),
        rows_read: rows.rows_read,
        multi_line_rows: rows.multi_line_rows,
        literal_quote_rows: rows.literal_quote_rows,
    };
    for row in rows.rows {
        let cell = row.text.trim();
        if cell.is_empty() {
            bad.row(
                path,
                row.line,
                format!("empty image path (column {})", opts.image_column),
            )?;
            continue;
        }
        let file = base.join(cell);
        let image = match read_image(&file, opts) {
            Ok(image) => image,
            Err(message) => {
                bad.row(
                    path,
                    row.line,
                    format!("image {}: {message}", file.display()),
                )?;
                continue;
            }
        };
        out.rows.push(RawRow {
            line: row.line,
            id: row.id,
            explicit_id: row.explicit_id,
            text: Loaded {
                source: ImageSource::File(file),
                width: image.width(),
                height: image.height(),
            },
            text_pair: None,
            label: row.label,
            group: row.group,
        });
    }
    Ok(out)
}

/// The table readers speak of the text column; here it is the image column.
fn image_wording(error: Error) -> Error {
    let fix = |m: String| {
        m.replace("no text column", "no image column")
            .replace("missing text (column", "missing image path (column")
            .replace("the text column", "the image column")
            .replace("--text-column", "--image-column")
    };
    match error {
        Error::Dataset { path, message } => Error::Dataset {
            path,
            message: fix(message),
        },
        Error::DatasetLine {
            path,
            line,
            message,
        } => Error::DatasetLine {
            path,
            line,
            message: fix(message),
        },
        Error::Setting { setting, message } => Error::Setting {
            setting: setting.replace("text column", "image column"),
            message: fix(message),
        },
        other => other,
    }
}
