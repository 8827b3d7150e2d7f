//! Labelled text datasets: this module owns reading a user's dataset (CSV,
//! TSV, JSON Lines or plain text with one example per line, plain or
//! `.gz`/`.bz2`/`.zst`, from a file or standard input, Parquet tables
//! (feature `parquet`), or one folder per class)
//! into memory as [`Example`]s that carry a class id and a split name. It
//! also owns the label map (sorted, or the user's `--labels` list) and the
//! seeded, group-aware train/valid/test split, so that every later stage sees
//! the same examples in the same order for the same inputs.
//!
//! The entry point is [`load`], driven by a [`DatasetPlan`]; the binaries
//! build that plan from [`DatasetArgs`]. Image datasets (folders of PNG/JPEG,
//! tables naming image files, IDX) are read by [`load_images`] from the
//! same plan, under the same split and label rules ([`image`]).
//!
//! Line numbers in messages and in [`Example::source_line`] are 1-based and
//! count lines of the decompressed file, header included; a CSV row whose
//! quoted field spans several lines is numbered by the line it starts on.
//!
//! Quoting: CSV fields may be quoted as in RFC 4180 (a quoted field may hold
//! the delimiter, `""` for a quote, and line breaks). TSV fields are not
//! quoted unless [`ReadOptions::tsv_quotes`] is set: a `"` is an ordinary
//! character and one line is one row, as in the IANA text/tab-separated-values
//! definition. A quoted field that holds line breaks may run over at most
//! [`ReadLimits::max_quoted_lines`] more lines and
//! [`ReadLimits::max_quoted_bytes`] bytes; a quote still open past that, or at
//! end of file, or a row that goes wrong after a quoted line break (text
//! after a closing quote, a wrong field count), is a bad row reported at the
//! line where it starts. Skipping it skips only that line: reading resumes
//! on the next line, so a stray `"` costs one row, never the rest of the file.
//!
//! Bounded input: no line (CSV, TSV, JSON Lines, decompressed) may be longer
//! than [`ReadLimits::max_line_bytes`]. An over-long line is an error naming
//! the file and line, found without reading the rest of the line, and is not
//! skipped by [`ReadOptions::skip_bad_rows`] (skipping it would mean reading
//! on to its end, which may never come). A folders-format file larger than
//! the same bound is a bad example (read no further than the bound), and
//! entries that are not regular files (devices, FIFOs) are ignored.

pub mod args;
mod delimited;
mod folders;
pub mod image;
mod input;
mod jsonl;
mod loader;
pub mod paired;
#[cfg(feature = "parquet")]
mod parquet;
mod rows;
mod split;
mod text;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use self::image::{load_images, ImageDataset, ImageExample, ImageOptions, ImageSource};
pub use args::DatasetArgs;
pub use loader::load;
pub use split::SplitSpec;

use crate::{Error, Result};

/// How to parse dataset files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Pick by extension after stripping `.gz`/`.bz2`/`.zst`: `.csv` is CSV,
    /// `.tsv`/`.tab` TSV, `.jsonl`/`.ndjson`/`.json` JSON Lines, `.txt`
    /// plain text, `.parquet` [`Format::Parquet`], a name ending in
    /// `-idx3-ubyte` [`Format::Idx`]; a
    /// directory is [`Format::ImageFolders`] when every file in its class
    /// folders is a `.png`/`.jpg`/`.jpeg` (and there is one), else
    /// [`Format::Folders`]; standard input ([`STDIN`]) is plain text.
    #[default]
    Auto,
    /// Comma-separated values (RFC 4180 quoting).
    Csv,
    /// Tab-separated values: one line per row, `"` an ordinary character,
    /// unless [`ReadOptions::tsv_quotes`] asks for CSV's quoting rules.
    Tsv,
    /// One JSON object per line; blank lines are skipped.
    Jsonl,
    /// `root/<label>/<file>`: one sub-folder per class, one file per example
    /// (its trimmed content). Column options do not apply, except that no
    /// label column gives unlabelled examples.
    Folders,
    /// Plain text: every line that is not blank is one unlabelled example
    /// (trimmed), with the id `<file stem>:<line>`. Column options do not
    /// apply; a label column must be optional ([`ReadOptions::label_optional`]).
    Text,
    /// Images, `root/<label>/<image file>` (PNG or JPEG): read by
    /// [`image::load_images`], not by [`load`].
    ImageFolders,
    /// IDX files as MNIST and Fashion-MNIST ship them (`*-images-idx3-ubyte`
    /// with its `*-labels-idx1-ubyte`, plain or `.gz`): read by
    /// [`image::load_images`], not by [`load`].
    Idx,
    /// A Parquet table (feature `parquet`): columns by name or top-level
    /// position, as CSV; a row's line is its 1-based row number.
    Parquet,
}

/// sha256 (lowercase hex) of a dataset input, as a cache's manifest
/// records it: a file's bytes, or for a folder of class folders the files
/// its reader reads, by the same listing (see the `folders` module:
/// hidden, stray and broken entries are not part of it, and it never opens
/// a FIFO or a device).
pub fn fingerprint(path: &Path) -> Result<String> {
    if path.is_dir() {
        folders::fingerprint(path)
    } else {
        crate::fsutil::sha256_file(path)
    }
}

/// The path that stands for standard input (`--data -`).
pub const STDIN: &str = "-";

/// Whether `path` is [`STDIN`].
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == STDIN
}

impl Format {
    /// The concrete format for `path`: `self` unless it is [`Format::Auto`],
    /// in which case the file extension (or being a directory) decides.
    pub fn resolve(self, path: &Path) -> Result<Format> {
        if self != Format::Auto {
            return Ok(self);
        }
        if is_stdin(path) {
            return Ok(Format::Text);
        }
        if path.is_dir() {
            return image::folder_format(path);
        }
        let (base, _) = input::split_compression(path);
        if base.to_ascii_lowercase().ends_with("-idx3-ubyte") {
            return Ok(Format::Idx);
        }
        if base.to_ascii_lowercase().ends_with(".parquet") {
            return Ok(Format::Parquet);
        }
        let ext = Path::new(&base)
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("tsv" | "tab") => Ok(Format::Tsv),
            Some("jsonl" | "ndjson" | "json") => Ok(Format::Jsonl),
            Some("txt") => Ok(Format::Text),
            _ => Err(Error::setting(
                "--format",
                format!(
                    "{}: cannot tell the format from the file name \
                     (expected .csv, .tsv, .tab, .jsonl, .ndjson, .json or .txt, optionally \
                     followed by .gz, .bz2 or .zst, .parquet, or a name ending in \
                     -idx3-ubyte); pass --format csv|tsv|jsonl|parquet|text|folders|\
                     image-folders|idx",
                    path.display()
                ),
            )),
        }
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Format::Auto),
            "csv" => Ok(Format::Csv),
            "tsv" | "tab" => Ok(Format::Tsv),
            "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
            "folders" | "folder" | "dir" => Ok(Format::Folders),
            "text" | "txt" | "lines" => Ok(Format::Text),
            "image-folders" | "image-folder" | "images" => Ok(Format::ImageFolders),
            "idx" => Ok(Format::Idx),
            "parquet" => Ok(Format::Parquet),
            _ => Err(Error::setting(
                "--format",
                format!(
                    "unknown dataset format `{s}`: expected auto, csv, tsv, jsonl, parquet, \
                     text, folders, image-folders or idx"
                ),
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Auto => "auto",
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Jsonl => "jsonl",
            Format::Folders => "folders",
            Format::Text => "text",
            Format::ImageFolders => "image-folders",
            Format::Idx => "idx",
            Format::Parquet => "parquet",
        })
    }
}

/// Character encoding of dataset files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// UTF-8, with or without a leading byte-order mark (which is dropped).
    /// Invalid UTF-8 is a bad row.
    #[default]
    Utf8,
    /// ISO-8859-1: every byte becomes the character U+00XX; never fails.
    Latin1,
}

impl FromStr for Encoding {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "utf8" | "utf-8" => Ok(Encoding::Utf8),
            "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" => Ok(Encoding::Latin1),
            _ => Err(Error::setting(
                "--encoding",
                format!("unknown encoding `{s}`: expected utf8 or latin1"),
            )),
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Utf8 => "utf8",
            Encoding::Latin1 => "latin1",
        })
    }
}

/// A column of a CSV/TSV file or a key of a JSON Lines object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// Header name (CSV/TSV) or object key (JSONL).
    Name(String),
    /// 0-based field position (CSV/TSV only).
    Index(usize),
}

impl FromStr for Column {
    type Err = Error;

    /// All ASCII digits is a 0-based [`Column::Index`]; anything else a
    /// [`Column::Name`] (surrounding whitespace is dropped).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::setting("column", "empty column name"));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse()
                .map(Column::Index)
                .map_err(|e| Error::setting("column", format!("column index `{s}`: {e}")))
        } else {
            Ok(Column::Name(s.to_owned()))
        }
    }
}

impl Column {
    /// The inverse of [`Column`]'s `Display` (`` `name` `` or `#i`), as
    /// cache manifests record columns; `None` for any other text.
    pub fn from_display(s: &str) -> Option<Column> {
        if let Some(name) = s.strip_prefix('`').and_then(|r| r.strip_suffix('`')) {
            return (!name.is_empty()).then(|| Column::Name(name.to_owned()));
        }
        s.strip_prefix('#')
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .map(Column::Index)
    }
}

/// In JSON (run files, manifests): a name is a string, an index a number.
impl serde::Serialize for Column {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Column::Name(name) => s.serialize_str(name),
            Column::Index(i) => s.serialize_u64(*i as u64),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Column {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Index(usize),
            Name(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Index(i) => Column::Index(i),
            Raw::Name(name) => Column::Name(name),
        })
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Column::Name(name) => write!(f, "`{name}`"),
            Column::Index(i) => write!(f, "#{i}"),
        }
    }
}

/// How to read each dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOptions {
    /// File format ([`Format::Auto`] by default).
    pub format: Format,
    /// Whether CSV/TSV files start with a header row (default `true`).
    /// Without one, columns can only be given by index.
    pub has_header: bool,
    /// Character encoding (UTF-8 by default).
    pub encoding: Encoding,
    /// Column holding the text (default `text`).
    pub text_column: Column,
    /// Column holding the second text of a pair task, if any.
    pub text_pair_column: Option<Column>,
    /// Column holding the label (default `label`); `None` for unlabelled data.
    pub label_column: Option<Column>,
    /// A file without [`ReadOptions::label_column`] is read as unlabelled
    /// instead of being an error (`predict`: true labels are optional).
    pub label_optional: bool,
    /// Column holding example ids; without one an id is `<file stem>:<line>`.
    pub id_column: Option<Column>,
    /// Column holding a group key (e.g. the movie a review is about); a
    /// [`SplitSpec`] then keeps every group in one split.
    pub group_column: Option<Column>,
    /// Skip (and count) malformed rows instead of failing on the first one.
    pub skip_bad_rows: bool,
    /// Read TSV fields with CSV's (RFC 4180) quoting rules; by default a TSV
    /// `"` is an ordinary character and a row never spans lines.
    pub tsv_quotes: bool,
    /// Bounds on lines and quoted fields.
    pub limits: ReadLimits,
}

/// Bounds that keep a malformed or hostile file from being read without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most bytes of one line (its `\n` not counted) of a CSV, TSV or JSON
    /// Lines file, after decompression, and of one folders-format file.
    pub max_line_bytes: usize,
    /// Most line breaks a CSV row (or a TSV row with
    /// [`ReadOptions::tsv_quotes`]) may hold inside quoted fields.
    pub max_quoted_lines: usize,
    /// Most bytes a CSV/TSV row may run over past its first line through
    /// quoted line breaks.
    pub max_quoted_bytes: usize,
}

impl ReadLimits {
    /// Default of [`ReadLimits::max_line_bytes`]: 16 MiB.
    pub const MAX_LINE_BYTES: usize = 16 << 20;
    /// Default of [`ReadLimits::max_quoted_lines`].
    pub const MAX_QUOTED_LINES: usize = 100;
    /// Default of [`ReadLimits::max_quoted_bytes`]: 1 MiB.
    pub const MAX_QUOTED_BYTES: usize = 1 << 20;
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_line_bytes: Self::MAX_LINE_BYTES,
            max_quoted_lines: Self::MAX_QUOTED_LINES,
            max_quoted_bytes: Self::MAX_QUOTED_BYTES,
        }
    }
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: Format::Auto,
            has_header: true,
            encoding: Encoding::Utf8,
            text_column: Column::Name("text".to_owned()),
            text_pair_column: None,
            label_column: Some(Column::Name("label".to_owned())),
            label_optional: false,
            id_column: None,
            group_column: None,
            skip_bad_rows: false,
            tsv_quotes: false,
            limits: ReadLimits::default(),
        }
    }
}

/// Where the examples come from and how they get their split names.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitSource {
    /// One file (or folder) per split, e.g. `[("train", a), ("valid", b)]`,
    /// all read with the same [`ReadOptions`], in this order.
    Files(Vec<(String, PathBuf)>),
    /// One file (or folder) cut into splits by `split`; without a
    /// [`SplitSpec`] every example is in split `train`.
    Single {
        /// The dataset file or folder.
        path: PathBuf,
        /// How to cut it into splits.
        split: Option<SplitSpec>,
    },
}

/// Everything [`load`] needs: validated settings, usually built by
/// [`DatasetArgs::to_plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetPlan {
    /// The files and how splits are made.
    pub source: SplitSource,
    /// How each file is read.
    pub read: ReadOptions,
    /// The label set, in class-id order. Rows with other labels are dropped
    /// (and counted); `None` uses the sorted set of labels seen.
    pub labels: Option<Vec<String>>,
}

/// One labelled (or unlabelled) text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// From the id column, or `<file stem>:<line>` (folders:
    /// `<label>/<file name>`).
    pub id: String,
    /// Split name (`train`, `valid`, ...).
    pub split: String,
    /// The text, as in the file (folders: the file content, trimmed).
    pub text: String,
    /// The second text of a pair, when a text-pair column is set.
    pub text_pair: Option<String>,
    /// Class id, an index into [`Dataset::label_names`]; `None` when the
    /// dataset is unlabelled.
    pub label: Option<u32>,
    /// Group key, when a group column is set.
    pub group: Option<String>,
    /// 1-based line of the decompressed file where the row starts (0 for the
    /// folders format; Parquet: the 1-based row number).
    pub source_line: u64,
}

/// Split names `sherl-fit` accepts as the validation split (it selects
/// the best epoch on it), in order of preference.
pub const VALID_SPLIT_NAMES: &[&str] = &["valid", "validation", "dev", "val"];

/// A dataset in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Examples in file order (files in the order given), each with its split.
    pub examples: Vec<Example>,
    /// Label strings by class id; empty for unlabelled data.
    pub label_names: Vec<String>,
    /// What happened while loading.
    pub report: LoadReport,
}

impl Dataset {
    /// The examples of one split, in file order.
    pub fn split<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Example> + 'a {
        self.examples.iter().filter(move |e| e.split == name)
    }
}

/// Counts gathered by [`load`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Data rows seen in all files (header and blank JSONL lines excluded),
    /// including those later skipped or dropped.
    pub rows_read: u64,
    /// Malformed rows skipped because of [`ReadOptions::skip_bad_rows`].
    pub skipped_bad_rows: u64,
    /// Rows dropped because their label is not in [`DatasetPlan::labels`].
    pub dropped_unknown_label: u64,
    /// Examples per split name.
    pub split_counts: BTreeMap<String, u64>,
    /// Rows dropped, per label string not in [`DatasetPlan::labels`].
    pub dropped_labels: BTreeMap<String, u64>,
    /// CSV/TSV rows that span several lines through quoted line breaks
    /// (each file with any gets one log line saying so).
    pub multi_line_rows: u64,
    /// TSV rows, read without [`ReadOptions::tsv_quotes`], holding a field
    /// that starts with `"`: the quote was kept as text (each file with any
    /// gets one warning saying so).
    pub literal_quote_rows: u64,
}

#[cfg(test)]
mod tests;
