//! The prediction lines (JSON Lines, one per input) and the accuracy over
//! the inputs whose true label the run knows, and the `--out` file they go
//! to ([`create_output`]: checked and created before any work, written
//! under a temporary name and renamed when complete).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::plan::PredictSummary;
use crate::fsutil::AtomicFile;
use crate::{Error, Result};

/// Whether `a` and `b` describe the same file (the same inode on the same
/// device: a second name, a hard link or a symbolic link to it).
#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Whether `a` and `b` name the same file (their canonical paths).
#[cfg(not(unix))]
fn same_file_paths(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The output file `out` (`--out` of `predict` and `search`), checked and
/// created before any work is done, so that a run of many minutes does not
/// end on an unwritable output: refused when it is a directory, when it
/// is one of `inputs` (`(flag, path)`: the same file under any name, hard
/// and symbolic links included, which writing would replace) or when its
/// directory is missing or not writable. The lines go to a temporary file
/// in the same directory ([`AtomicFile`]) renamed to `out` only when
/// complete: a killed process leaves no cut file at the final name (and
/// its leftover temporary is removed by the next run).
pub fn create_output(out: &Path, inputs: &[(&str, &Path)]) -> Result<AtomicFile> {
    let refuse = |m: String| Error::setting("--out", format!("--out {}: {m}", out.display()));
    if let Ok(meta) = std::fs::metadata(out) {
        if meta.is_dir() {
            return Err(refuse("is a directory; give a file name".into()));
        }
        for (flag, input) in inputs {
            #[cfg(unix)]
            let same = std::fs::metadata(input).is_ok_and(|m| same_file(&meta, &m));
            #[cfg(not(unix))]
            let same = same_file_paths(out, input);
            if same {
                return Err(refuse(format!(
                    "is the same file as {flag} {} (writing the output would replace its own \
                     input); give --out another name",
                    input.display()
                )));
            }
        }
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(refuse(format!(
            "its directory {} does not exist (or is not a directory); create it first",
            dir.display()
        )));
    }
    if let Some(name) = out.file_name().and_then(|n| n.to_str()) {
        match crate::fsutil::remove_stale_temporaries(dir, name) {
            Ok(removed) => {
                for p in removed {
                    tracing::info!("removed {}, left by an interrupted run", p.display());
                }
            }
            Err(e) => tracing::debug!("{e}"),
        }
    }
    AtomicFile::create(out).map_err(|e| {
        refuse(format!(
            "cannot write in {} ({e}); choose a writable directory",
            dir.display()
        ))
    })
}

/// Where the lines go.
enum Sink<'a> {
    /// `--out`, renamed to its final name by [`Labeller::finish`].
    File(AtomicFile),
    /// Standard output.
    Stdout(std::io::StdoutLock<'a>),
}

impl Sink<'_> {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::File(f) => f,
            Sink::Stdout(s) => s,
        }
    }
}

/// Writes one line per labelled input and keeps the accuracy's tally.
pub(crate) struct Labeller<'a> {
    sink: Sink<'a>,
    out_name: PathBuf,
    /// The run's classes.
    labels: &'a [String],
    /// The input's label names (its true labels index these).
    names: &'a [String],
    /// The run's class of each input label name, if it has one.
    class_of: Vec<Option<usize>>,
    correct: usize,
    labelled: usize,
    unknown: usize,
}

impl<'a> Labeller<'a> {
    /// Lines go to `out` (made by [`create_output`]; stdout when `None`);
    /// `labels` are the run's classes, `names` the label names of the
    /// input.
    pub(crate) fn open(
        out: Option<AtomicFile>,
        labels: &'a [String],
        names: &'a [String],
    ) -> Result<Self> {
        let out_name = out
            .as_ref()
            .map_or_else(|| PathBuf::from("<stdout>"), |f| f.path().to_path_buf());
        let sink = match out {
            Some(f) => Sink::File(f),
            None => Sink::Stdout(std::io::stdout().lock()),
        };
        Ok(Labeller {
            sink,
            out_name,
            labels,
            names,
            class_of: names
                .iter()
                .map(|n| labels.iter().position(|l| l == n))
                .collect(),
            correct: 0,
            labelled: 0,
            unknown: 0,
        })
    }

    /// One input's line: `fields` (its id and what identifies it), the
    /// most probable class, every class's probability and, when the input
    /// has one, its true label (counted in the accuracy when the run knows
    /// it).
    pub(crate) fn write(
        &mut self,
        mut fields: Map<String, Value>,
        probs: &[f32],
        truth: Option<u32>,
    ) -> Result<()> {
        let best = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        fields.insert("label".into(), json!(self.labels[best]));
        let per_class: Map<String, Value> = self
            .labels
            .iter()
            .cloned()
            .zip(probs.iter().map(|&x| json!(f64::from(x))))
            .collect();
        fields.insert("probabilities".into(), Value::Object(per_class));
        if let Some(t) = truth {
            let t = t as usize;
            fields.insert("true_label".into(), json!(self.names[t]));
            match self.class_of[t] {
                Some(c) => {
                    self.labelled += 1;
                    self.correct += usize::from(c == best);
                }
                None => self.unknown += 1,
            }
        }
        writeln!(self.sink.writer(), "{}", Value::Object(fields))
            .map_err(|e| Error::io(&self.out_name, e))
    }

    /// Flush the lines (an `--out` file is synced and renamed to its
    /// final name); warn about true labels the run does not know.
    pub(crate) fn finish(
        self,
        run_id: String,
        examples: usize,
        out: Option<PathBuf>,
    ) -> Result<PredictSummary> {
        match self.sink {
            Sink::File(f) => f.commit()?,
            Sink::Stdout(mut s) => s.flush().map_err(|e| Error::io(&self.out_name, e))?,
        }
        if self.unknown > 0 {
            let names: Vec<&str> = self
                .class_of
                .iter()
                .zip(self.names)
                .filter(|(c, _)| c.is_none())
                .map(|(_, n)| n.as_str())
                .collect();
            tracing::warn!(
                "{} row(s) have a true label the run was not trained on ({}); they are labelled but left out of the accuracy",
                self.unknown,
                names.join(", ")
            );
        }
        Ok(PredictSummary {
            run_id,
            examples,
            accuracy: (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64),
            labelled: self.labelled,
            unknown_labels: self.unknown,
            out,
        })
    }
}
