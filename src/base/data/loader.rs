//! [`load`]: runs a [`DatasetPlan`] end to end. It reads every file with
//! the reader for its format (`read_rows`), checks that explicit ids are unique, builds the label map (sorted
//! labels seen, or the user's list, dropping and counting other labels),
//! gives each example its split (from its file, or from the seeded
//! [`SplitSpec`](super::SplitSpec)) and fills the [`LoadReport`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::rows::{BadRows, FileRows};
use super::{delimited, folders, jsonl, split, text};
use super::{
    Dataset, DatasetPlan, Example, Format, LoadReport, ReadOptions, SplitSource, SplitSpec,
};
use crate::{Error, Result};

/// Split name of every example of a [`SplitSource::Single`] without a spec.
const DEFAULT_SPLIT: &str = "train";

/// The rows of one file and the split they belong to (`None`: decided by
/// the split spec).
struct Part<T> {
    split: Option<String>,
    path: PathBuf,
    rows: FileRows<T>,
}

/// One example after label mapping and splitting, holding `T` (its text, or
/// where its image comes from).
pub(super) struct Item<T> {
    pub id: String,
    pub split: String,
    pub payload: T,
    pub text_pair: Option<String>,
    pub label: Option<u32>,
    pub group: Option<String>,
    pub line: u64,
}

/// What [`assemble`] makes of a plan: the examples, the label names and the
/// counts.
pub(super) struct Assembled<T> {
    pub items: Vec<Item<T>>,
    pub label_names: Vec<String>,
    pub report: LoadReport,
}

/// Read the dataset described by `plan` into memory.
///
/// Examples come in file order (for [`SplitSource::Files`], the files in the
/// order given). Errors: a missing file ([`Error::Io`]); an unknown column,
/// an empty file or no rows left after label filtering ([`Error::Dataset`]);
/// a malformed row unless [`skip_bad_rows`](super::ReadOptions::skip_bad_rows)
/// is set, or a duplicate explicit id ([`Error::DatasetLine`]); inconsistent
/// settings ([`Error::Setting`]).
pub fn load(plan: &DatasetPlan) -> Result<Dataset> {
    let read = &plan.read;
    let assembled = assemble(plan, &mut |path, need_group, bad| {
        read_rows(path, read, need_group, bad)
    })?;
    Ok(Dataset {
        examples: assembled
            .items
            .into_iter()
            .map(|item| Example {
                id: item.id,
                split: item.split,
                text: item.payload,
                text_pair: item.text_pair,
                label: item.label,
                group: item.group,
                source_line: item.line,
            })
            .collect(),
        label_names: assembled.label_names,
        report: assembled.report,
    })
}

/// A reader of one dataset file: `(path, need_group, bad rows)` to its rows.
pub(super) type ReadFile<'a, T> = dyn FnMut(&Path, bool, &mut BadRows) -> Result<FileRows<T>> + 'a;

/// Everything [`load`] does after reading, for any kind of example: reads
/// each file of `plan` with `read_file`, checks that explicit ids are unique,
/// builds the label map, drops (and counts) rows with other labels, gives
/// each example its split and fills the report. The image datasets
/// (`super::image`) share it, so both follow the same `--split`, `--labels`
/// and `--group-column` rules.
pub(super) fn assemble<T>(
    plan: &DatasetPlan,
    read_file: &mut ReadFile<'_, T>,
) -> Result<Assembled<T>> {
    let labels = checked_labels(plan)?;
    let read = &plan.read;
    let mut bad = BadRows::new(read.skip_bad_rows);
    let (parts, spec) = read_parts(plan, read_file, &mut bad)?;
    if bad.count > 0 {
        tracing::warn!("skipped {} bad rows", bad.count);
    }
    check_unique_ids(&parts)?;

    let label_names = label_names(plan, labels, &parts);
    let label_ids: HashMap<&str, u32> = label_names
        .iter()
        .enumerate()
        .map(|(i, l)| u32::try_from(i).map(|i| (l.as_str(), i)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::setting("labels", "more than 2^32 labels"))?;

    let mut report = LoadReport {
        rows_read: parts.iter().map(|p| p.rows.rows_read).sum(),
        skipped_bad_rows: bad.count,
        multi_line_rows: parts.iter().map(|p| p.rows.multi_line_rows).sum(),
        literal_quote_rows: parts.iter().map(|p| p.rows.literal_quote_rows).sum(),
        ..LoadReport::default()
    };
    let (mut examples, first_path) = labelled_items(plan, parts, &label_ids, &mut report)?;
    if let Some(spec) = spec {
        assign_splits(plan, spec, &mut examples, first_path)?;
    }
    for example in &examples {
        *report
            .split_counts
            .entry(example.split.clone())
            .or_default() += 1;
    }
    Ok(Assembled {
        items: examples,
        label_names,
        report,
    })
}

/// Read the files of `plan` (none of them empty) with `read_file`; returns
/// them with the split spec that decides their examples' splits, if any.
fn read_parts<'p, T>(
    plan: &'p DatasetPlan,
    read_file: &mut ReadFile<'_, T>,
    bad: &mut BadRows,
) -> Result<(Vec<Part<T>>, Option<&'p SplitSpec>)> {
    let mut parts = Vec::new();
    let spec = match &plan.source {
        SplitSource::Files(files) => {
            check_split_names(files)?;
            for (name, path) in files {
                let rows = read_file(path, false, bad)?;
                if rows.rows.is_empty() {
                    return Err(empty_file(path, Some(name), &rows));
                }
                parts.push(Part {
                    split: Some(name.clone()),
                    path: path.clone(),
                    rows,
                });
            }
            None
        }
        SplitSource::Single { path, split } => {
            if let Some(spec) = split {
                spec.validate()?;
            }
            let by_group = split.is_some() && plan.read.group_column.is_some();
            let rows = read_file(path, by_group, bad)?;
            if rows.rows.is_empty() {
                return Err(empty_file(path, None, &rows));
            }
            parts.push(Part {
                split: split.is_none().then(|| DEFAULT_SPLIT.to_owned()),
                path: path.clone(),
                rows,
            });
            split.as_ref()
        }
    };
    Ok((parts, spec))
}

/// The label names: none without a label column, else the user's list
/// (`labels`) or the sorted labels seen in `parts`.
fn label_names<T>(
    plan: &DatasetPlan,
    labels: Option<Vec<String>>,
    parts: &[Part<T>],
) -> Vec<String> {
    match (&plan.read.label_column, labels) {
        (None, _) => Vec::new(),
        (Some(_), Some(list)) => list,
        (Some(_), None) => {
            let seen: BTreeSet<&str> = parts
                .iter()
                .flat_map(|p| &p.rows.rows)
                .filter_map(|r| r.label.as_deref())
                .collect();
            seen.into_iter().map(str::to_owned).collect()
        }
    }
}

/// The examples of `parts` with their label ids, dropping (and counting in
/// `report`) rows whose label has none; a part left without rows is an
/// error. Returns them with the first part's path.
fn labelled_items<T>(
    plan: &DatasetPlan,
    parts: Vec<Part<T>>,
    label_ids: &HashMap<&str, u32>,
    report: &mut LoadReport,
) -> Result<(Vec<Item<T>>, Option<PathBuf>)> {
    let mut examples = Vec::with_capacity(parts.iter().map(|p| p.rows.rows.len()).sum());
    let mut first_path = None;
    for part in parts {
        let before = examples.len();
        let dropped_before = report.dropped_labels.clone();
        for row in part.rows.rows {
            let label = match row.label {
                None => None,
                Some(label) => match label_ids.get(label.as_str()) {
                    Some(&id) => Some(id),
                    None => {
                        report.dropped_unknown_label += 1;
                        *report.dropped_labels.entry(label).or_default() += 1;
                        continue;
                    }
                },
            };
            examples.push(Item {
                id: row.id,
                split: part.split.clone().unwrap_or_default(),
                payload: row.text,
                text_pair: row.text_pair,
                label,
                group: row.group,
                line: row.line,
            });
        }
        if examples.len() == before {
            let dropped = diff(&report.dropped_labels, &dropped_before);
            let what = match (&plan.source, &part.split) {
                (SplitSource::Files(_), Some(name)) => {
                    format!("the `{name}` split file has no rows left")
                }
                _ => "no rows left".to_owned(),
            };
            return Err(Error::Dataset {
                path: part.path,
                message: format!(
                    "{what} after label filtering: {}",
                    dropped_summary(&dropped)
                ),
            });
        }
        first_path.get_or_insert(part.path);
    }
    if report.dropped_unknown_label > 0 {
        tracing::info!(
            "dropped {} rows with labels not in the label list: {}",
            report.dropped_unknown_label,
            counts_list(&report.dropped_labels)
        );
    }
    Ok((examples, first_path))
}

/// Give each example its split from `spec` (by group when the plan has a
/// group column); `first_path` names the dataset in errors.
fn assign_splits<T>(
    plan: &DatasetPlan,
    spec: &SplitSpec,
    examples: &mut [Item<T>],
    first_path: Option<PathBuf>,
) -> Result<()> {
    let groups: Option<Vec<&str>> = plan.read.group_column.as_ref().map(|_| {
        examples
            .iter()
            .map(|e| e.group.as_deref().unwrap_or_default())
            .collect()
    });
    let splits = split::assign(spec, groups.as_deref(), examples.len()).map_err(|message| {
        Error::Dataset {
            path: first_path.unwrap_or_default(),
            message,
        }
    })?;
    for (example, s) in examples.iter_mut().zip(splits) {
        example.split.clone_from(&spec.fractions[s].0);
    }
    Ok(())
}

/// Read every row of `path`. `need_group`: the split is by group, so a row
/// without a group value is bad.
fn read_rows(
    path: &Path,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    let format = opts.format.resolve(path)?;
    if matches!(format, Format::ImageFolders | Format::Idx) {
        return Err(Error::Dataset {
            path: path.to_owned(),
            message: format!(
                "is an image dataset (format {format}); this command reads text \
                 (images are read by sherl::data::image::load_images)"
            ),
        });
    }
    if format != Format::Folders && path.is_dir() {
        return Err(Error::Dataset {
            path: path.to_owned(),
            message: format!(
                "is a directory, but the format is {format}; a folder of class \
                 sub-folders needs --format folders (or auto)"
            ),
        });
    }
    match format {
        Format::Csv => delimited::read(path, b',', true, opts, need_group, bad),
        Format::Tsv => delimited::read(path, b'\t', opts.tsv_quotes, opts, need_group, bad),
        Format::Jsonl => jsonl::read(path, opts, need_group, bad),
        Format::Text => text::read(path, opts, bad),
        Format::Parquet => read_parquet(path, opts, need_group, bad),
        // `resolve` never returns `Auto`, and image formats were refused
        // above; treat them like folders defensively.
        Format::Folders | Format::Auto | Format::ImageFolders | Format::Idx => {
            folders::read(path, opts, need_group, bad)
        }
    }
}

/// A Parquet table's rows, or why this build cannot read one.
pub(super) fn read_parquet(
    path: &Path,
    opts: &ReadOptions,
    need_group: bool,
    bad: &mut BadRows,
) -> Result<FileRows> {
    #[cfg(feature = "parquet")]
    {
        super::parquet::read(path, opts, need_group, bad)
    }
    #[cfg(not(feature = "parquet"))]
    {
        let _ = (opts, need_group, bad);
        Err(Error::setting(
            "--format",
            format!(
                "{}: this build of sherl reads no Parquet (feature `parquet`, on with `extract`)",
                path.display()
            ),
        ))
    }
}

/// The user's label list, trimmed and checked (non-empty, distinct).
fn checked_labels(plan: &DatasetPlan) -> Result<Option<Vec<String>>> {
    let Some(list) = &plan.labels else {
        return Ok(None);
    };
    if plan.read.label_column.is_none() {
        return Err(Error::setting(
            "--labels",
            "a label list is given, but the dataset has no label column (--no-labels)",
        ));
    }
    if list.is_empty() {
        return Err(Error::setting("--labels", "the label list is empty"));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for label in list {
        let label = label.trim();
        if label.is_empty() {
            return Err(Error::setting(
                "--labels",
                "the label list holds an empty label",
            ));
        }
        if out.iter().any(|l| l == label) {
            return Err(Error::setting(
                "--labels",
                format!("label `{label}` is given twice in the label list"),
            ));
        }
        out.push(label.to_owned());
    }
    Ok(Some(out))
}

fn check_split_names(files: &[(String, PathBuf)]) -> Result<()> {
    if files.is_empty() {
        return Err(Error::setting("--train", "no dataset files given"));
    }
    for (i, (name, _)) in files.iter().enumerate() {
        if name.is_empty() {
            return Err(Error::setting("--train", "empty split name"));
        }
        if files[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::setting(
                "--train",
                format!("split `{name}` is given twice"),
            ));
        }
    }
    Ok(())
}

fn empty_file<T>(path: &Path, split: Option<&str>, rows: &FileRows<T>) -> Error {
    let what = match split {
        Some(name) => format!("the `{name}` split file has no rows"),
        None => "the dataset has no rows".to_owned(),
    };
    let message = if rows.rows_read > 0 {
        format!("{what}: all {} rows were bad and skipped", rows.rows_read)
    } else {
        what
    };
    Error::Dataset {
        path: path.to_owned(),
        message,
    }
}

fn check_unique_ids<T>(parts: &[Part<T>]) -> Result<()> {
    let mut seen: HashMap<&str, (&Path, u64)> = HashMap::new();
    for part in parts {
        for row in part.rows.rows.iter().filter(|r| r.explicit_id) {
            if let Some((path, line)) = seen.insert(&row.id, (&part.path, row.line)) {
                return Err(Error::DatasetLine {
                    path: part.path.clone(),
                    line: row.line,
                    message: format!(
                        "duplicate id `{}`: already used at {}:{line}",
                        row.id,
                        path.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Counts in `now` beyond those in `before`.
fn diff(now: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    now.iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn dropped_summary(dropped: &BTreeMap<String, u64>) -> String {
    let total: u64 = dropped.values().sum();
    format!(
        "{total} rows were dropped because their label is not in the label list \
         (--labels); labels seen: {}",
        counts_list(dropped)
    )
}

fn counts_list(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k} ({v})"))
        .collect::<Vec<_>>()
        .join(", ")
}
