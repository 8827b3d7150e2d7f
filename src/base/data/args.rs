//! The dataset flags shared by the binaries ([`DatasetArgs`] for building a
//! cache, [`PredictDataArgs`] for labelling new texts, both flattening the
//! reading flags of [`ReadArgs`]) and their validation into a [`DatasetPlan`].
//! Combinations clap cannot express are checked in [`DatasetArgs::to_plan`],
//! so every mistake gets one clear [`Error::Setting`] message naming the flag.

use std::path::PathBuf;

use super::{
    Column, DatasetPlan, Encoding, Format, ReadLimits, ReadOptions, SplitSource, SplitSpec,
};
use crate::{Error, Result};

/// Where the labelled dataset is and how to read it.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct DatasetArgs {
    /// One dataset file (CSV, TSV, JSON Lines or .txt, optionally
    /// .gz/.bz2/.zst) or a folder with one sub-folder per class; cut into
    /// splits with --split.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,

    /// Training split file (instead of --data).
    #[arg(long, value_name = "FILE")]
    pub train: Option<PathBuf>,

    /// Validation split file (needs --train).
    #[arg(long, value_name = "FILE")]
    pub valid: Option<PathBuf>,

    /// Test split file (needs --train).
    #[arg(long, value_name = "FILE")]
    pub test: Option<PathBuf>,

    /// Column (header name, JSON key, or 0-based index) holding the text.
    #[arg(long, value_name = "COL", default_value = "text")]
    pub text_column: Column,

    /// Column holding the second text of a sentence-pair task.
    #[arg(long, value_name = "COL")]
    pub text_pair_column: Option<Column>,

    /// Column holding the label (default: label).
    #[arg(long, value_name = "COL")]
    pub label_column: Option<Column>,

    /// The dataset has no labels.
    #[arg(long)]
    pub no_labels: bool,

    /// Column holding unique example ids (default: file stem and line, e.g. train:12).
    #[arg(long, value_name = "COL")]
    pub id_column: Option<Column>,

    /// The labels, in class-id order (default: every label seen, sorted); rows
    /// with other labels are dropped and counted.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,

    /// Cut --data into seeded splits, e.g. train=0.8,valid=0.1,test=0.1
    /// (default: everything is train).
    #[arg(long, value_name = "NAME=FRACTION,...")]
    pub split: Option<String>,

    /// Seed of the --split shuffle.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub split_seed: u64,

    /// With --split, keep all rows sharing this column's value in one split
    /// (e.g. all reviews of one movie).
    #[arg(long, value_name = "COL")]
    pub group_column: Option<Column>,

    /// How the file is read.
    #[command(flatten)]
    pub read: ReadArgs,
}

/// The texts `sherl-fit predict` labels: one file or standard input, read
/// with the columns the run was trained on unless told otherwise. Only
/// reading flags: nothing about splits or the label set, which come from
/// the run.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct PredictDataArgs {
    /// Texts to label: a CSV, TSV or JSON Lines file (optionally
    /// .gz/.bz2/.zst), a plain text file (.txt, one example per line), or `-`
    /// for standard input (one example per line unless --format says otherwise).
    /// An image run takes a PNG/JPEG file, a folder of images (flat, or class
    /// folders), a table with an image column, or `-` with image paths one a line.
    #[arg(long, value_name = "FILE|DIR|-")]
    pub data: PathBuf,

    /// Column (header name, JSON key, or 0-based index) holding the text
    /// [default: the column the run's cache was extracted from].
    #[arg(long, value_name = "COL")]
    pub text_column: Option<Column>,

    /// Column holding the second text of a sentence-pair task [default: the
    /// run's, when it was trained on pairs].
    #[arg(long, value_name = "COL")]
    pub text_pair_column: Option<Column>,

    /// Column holding true labels, to report accuracy [default: the run's
    /// label column, used when the file has it].
    #[arg(long, value_name = "COL")]
    pub label_column: Option<Column>,

    /// Ignore any label column.
    #[arg(long, conflicts_with = "label_column")]
    pub no_labels: bool,

    /// Column holding example ids (default: file stem and line, e.g.
    /// reviews:12, or stdin:3).
    #[arg(long, value_name = "COL")]
    pub id_column: Option<Column>,

    /// Image tables (a run trained on an image cache): the column holding
    /// each image's path [default: the column the run's cache was extracted
    /// from, else `image`].
    #[arg(long, value_name = "COL")]
    pub image_column: Option<Column>,

    /// How the file is read.
    #[command(flatten)]
    pub read: ReadArgs,
}

/// The columns a run was trained on (from its cache's manifest, kept in the
/// run's `config.json`): the defaults of [`PredictDataArgs`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainedColumns {
    /// The text column.
    pub text: Column,
    /// The second text of a pair task.
    pub text_pair: Option<Column>,
    /// The label column.
    pub label: Option<Column>,
    /// Whether the training files had a header row (columns given by index
    /// otherwise).
    pub has_header: bool,
    /// An image cache's image column (`dataset.options.image.image_column`);
    /// absent for text, and in runs written before sherl recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Column>,
    /// IDX class names the cache was extracted with (`--class-names`,
    /// `dataset.options.image.idx_label_names`): predict labels IDX files
    /// with the same names. Empty for everything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idx_class_names: Vec<String>,
}

impl Default for TrainedColumns {
    /// [`ReadOptions`]' defaults: `text`, `label`, a header row.
    fn default() -> Self {
        let read = ReadOptions::default();
        TrainedColumns {
            text: read.text_column,
            text_pair: read.text_pair_column,
            label: read.label_column,
            has_header: read.has_header,
            image: None,
            idx_class_names: Vec::new(),
        }
    }
}

impl TrainedColumns {
    /// From a cache manifest's `dataset.options`, which records columns as
    /// JSON strings (names) or numbers (indices), or, before sherl 0.1's
    /// manifests changed that, as `` `name` `` / `#i`. Missing entries take
    /// the defaults.
    pub fn from_options(options: &serde_json::Value) -> TrainedColumns {
        let column_in = |options: &serde_json::Value, key: &str| -> Option<Column> {
            match &options[key] {
                serde_json::Value::String(s) => Column::from_display(s).or_else(|| s.parse().ok()),
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .map(Column::Index),
                _ => None,
            }
        };
        let column = |key: &str| column_in(options, key);
        let fallback = TrainedColumns::default();
        TrainedColumns {
            text: column("text_column").unwrap_or(fallback.text),
            text_pair: column("text_pair_column"),
            label: column("label_column"),
            has_header: options["has_header"].as_bool().unwrap_or(true),
            image: column_in(&options["image"], "image_column"),
            idx_class_names: options["image"]["idx_label_names"]
                .as_array()
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

impl PredictDataArgs {
    /// The plan for [`super::load`]: flags first, then the run's columns.
    /// A label column taken from the run is optional (a file without it is
    /// read unlabelled); one given with --label-column must be there. Files
    /// are read without a header only with --no-header, or when the run's
    /// columns (taken here) were indices into a file without one.
    pub fn to_plan(&self, trained: &TrainedColumns) -> DatasetPlan {
        let (label_column, label_optional) = match (&self.label_column, self.no_labels) {
            (_, true) => (None, false),
            (Some(col), false) => (Some(col.clone()), false),
            (None, false) => (trained.label.clone(), true),
        };
        let mut read = ReadOptions {
            text_column: self
                .text_column
                .clone()
                .unwrap_or_else(|| trained.text.clone()),
            text_pair_column: self
                .text_pair_column
                .clone()
                .or_else(|| trained.text_pair.clone()),
            label_column,
            label_optional,
            id_column: self.id_column.clone(),
            ..self.read.options()
        };
        if self.text_column.is_none() && !trained.has_header {
            read.has_header = false;
        }
        DatasetPlan {
            source: SplitSource::Single {
                path: self.data.clone(),
                split: None,
            },
            read,
            labels: None,
        }
    }
}

/// How each dataset file is read: the flags shared by every command that
/// reads data (flattened into [`DatasetArgs`] and [`PredictDataArgs`]).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ReadArgs {
    /// File format: auto picks it from the extension (after .gz/.bz2/.zst; .txt
    /// is plain text, one example per line; .parquet is Parquet; a name ending
    /// in -idx3-ubyte is idx), a directory of class folders is read as
    /// image-folders when they hold only PNG/JPEG files, else as folders of
    /// text files.
    #[arg(
        long,
        value_name = "auto|csv|tsv|jsonl|parquet|text|folders|image-folders|idx",
        default_value = "auto"
    )]
    pub format: Format,

    /// CSV/TSV files have no header row: give columns as 0-based indices.
    #[arg(long)]
    pub no_header: bool,

    /// Character encoding of the files (a UTF-8 byte-order mark is dropped).
    #[arg(long, value_name = "utf8|latin1", default_value = "utf8")]
    pub encoding: Encoding,

    /// Skip and count malformed rows instead of stopping at the first one (a
    /// row broken by a stray quote costs its own line only).
    #[arg(long)]
    pub skip_bad_rows: bool,

    /// Read TSV fields with CSV's quoting rules (a field starting with `"` may
    /// hold tabs, `""` and line breaks). By default a TSV `"` is text and
    /// every line is one row.
    #[arg(long)]
    pub tsv_quotes: bool,

    /// The longest line (and folders-format file) read, in bytes (suffix
    /// K/M/G for KiB/MiB/GiB); a longer one is an error naming file and line.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_line_bytes)]
    pub max_line_bytes: usize,

    /// Most line breaks one CSV row (TSV with --tsv-quotes) may hold inside
    /// quoted fields; a quote still open past that is a bad row (a stray `"`).
    #[arg(long, value_name = "N", default_value_t = ReadLimits::MAX_QUOTED_LINES)]
    pub max_quoted_lines: usize,

    /// Most bytes one CSV row (TSV with --tsv-quotes) may run over past its
    /// first line through quoted line breaks (suffix K/M/G for KiB/MiB/GiB).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_quoted_bytes: usize,
}

impl ReadArgs {
    /// These reading choices, with the default columns (text `text`, label
    /// `label`, nothing else) for the caller to replace.
    fn options(&self) -> ReadOptions {
        ReadOptions {
            format: self.format,
            has_header: !self.no_header,
            encoding: self.encoding,
            skip_bad_rows: self.skip_bad_rows,
            tsv_quotes: self.tsv_quotes,
            limits: ReadLimits {
                max_line_bytes: self.max_line_bytes,
                max_quoted_lines: self.max_quoted_lines,
                max_quoted_bytes: self.max_quoted_bytes,
            },
            ..ReadOptions::default()
        }
    }
}

/// A byte count: digits, optionally followed by `K`/`KiB`, `M`/`MiB` or
/// `G`/`GiB` (binary units, any case).
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => {
            return Err(format!(
                "`{s}` is not a size: expected a number of bytes, optionally followed by \
                 K, M or G (KiB, MiB, GiB)"
            ))
        }
    };
    let n: usize = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size: it does not start with a number"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn parse_line_bytes(s: &str) -> std::result::Result<usize, String> {
    match parse_size(s)? {
        0 => Err("the line bound must be at least 1 byte".to_owned()),
        n => Ok(n),
    }
}

impl DatasetArgs {
    /// Check flag combinations and build the plan [`super::load`] runs.
    pub fn to_plan(&self) -> Result<DatasetPlan> {
        let config = |flag: &str, m: &str| Error::setting(flag, m);
        let split_files = [
            ("train", &self.train),
            ("valid", &self.valid),
            ("test", &self.test),
        ];
        let source = match (&self.data, &self.train) {
            (Some(_), _) if self.train.is_some() || self.valid.is_some() || self.test.is_some() => {
                return Err(config(
                    "--data",
                    "--data conflicts with --train/--valid/--test: give one dataset file \
                     (and --split), or one file per split",
                ))
            }
            (Some(data), _) => SplitSource::Single {
                path: data.clone(),
                split: self
                    .split
                    .as_deref()
                    .map(|s| SplitSpec::parse(s, self.split_seed))
                    .transpose()?,
            },
            (None, Some(_)) => {
                if self.split.is_some() {
                    return Err(config(
                        "--split",
                        "--split only applies to --data; with --train/--valid/--test the \
                         files are the splits",
                    ));
                }
                SplitSource::Files(
                    split_files
                        .iter()
                        .filter_map(|(name, path)| {
                            path.as_ref().map(|p| ((*name).to_owned(), p.clone()))
                        })
                        .collect(),
                )
            }
            (None, None) if self.valid.is_some() || self.test.is_some() => {
                return Err(config("--train", "--valid and --test need --train"))
            }
            (None, None) => {
                return Err(config(
                    "--data",
                    "no dataset given: pass --data FILE (optionally with --split), or \
                     --train FILE with optional --valid/--test",
                ))
            }
        };
        if let Some((flag, p)) = [
            ("--data", &self.data),
            ("--train", &self.train),
            ("--valid", &self.valid),
            ("--test", &self.test),
        ]
        .into_iter()
        .find_map(|(flag, p)| p.as_ref().filter(|p| super::is_stdin(p)).map(|p| (flag, p)))
        {
            return Err(Error::setting(
                flag,
                format!(
                    "{}: a cache cannot be built from standard input: it records each dataset \
                     file's sha256 to tell when the data changed; save the data to a file first",
                    p.display()
                ),
            ));
        }
        if self.group_column.is_some() && self.split.is_none() {
            return Err(config(
                "--group-column",
                "--group-column only applies with --split (it keeps groups within one split)",
            ));
        }
        if self.no_labels && self.label_column.is_some() {
            return Err(config(
                "--no-labels",
                "--no-labels conflicts with --label-column",
            ));
        }
        if self.no_labels && self.labels.is_some() {
            return Err(config("--no-labels", "--no-labels conflicts with --labels"));
        }
        let label_column = match (&self.label_column, self.no_labels) {
            (_, true) => None,
            (Some(col), false) => Some(col.clone()),
            (None, false) => Some(Column::Name("label".to_owned())),
        };
        let labels = match &self.labels {
            None => None,
            Some(list) => {
                let list: Vec<String> = list.iter().map(|l| l.trim().to_owned()).collect();
                if list.iter().any(String::is_empty) {
                    return Err(config("--labels", "--labels holds an empty label"));
                }
                if let Some(dup) = list
                    .iter()
                    .enumerate()
                    .find_map(|(i, l)| list[..i].contains(l).then_some(l))
                {
                    return Err(config("--labels", &format!("--labels names `{dup}` twice")));
                }
                Some(list)
            }
        };
        Ok(DatasetPlan {
            source,
            read: ReadOptions {
                text_column: self.text_column.clone(),
                text_pair_column: self.text_pair_column.clone(),
                label_column,
                id_column: self.id_column.clone(),
                group_column: self.group_column.clone(),
                ..self.read.options()
            },
            labels,
        })
    }
}

#[cfg(test)]
mod tests;
