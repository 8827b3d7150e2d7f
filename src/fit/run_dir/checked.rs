//! Reading a run's files for use: `config.json` checked against the
//! sha256 the run recorded ([`read_checked_config`]) and its labels
//! checked ([`RunConfig::check_labels`]); the recorded checksums
//! ([`recorded_checksums`]); `metrics.jsonl` as a stream of bounded lines
//! ([`for_each_metrics_line`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{RunConfig, CONFIG_FILE, ERROR_FILE, SUMMARY_FILE};
use crate::fit::error::FitError;
use crate::{Error, Result};

/// The checksums a run recorded when it finished (`summary.json`) or
/// stopped (`error.json`): each `None` in a file written before sherl
/// recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Recorded {
    /// The file they were read from.
    #[serde(skip)]
    pub from: PathBuf,
    /// sha256 of `weights.safetensors`.
    #[serde(default)]
    pub weights_sha256: Option<String>,
    /// sha256 of `config.json`.
    #[serde(default)]
    pub config_sha256: Option<String>,
}

/// The checksums run `run_dir` recorded, from `summary.json`, or else
/// `error.json`; `None` when the run has neither file (still running, or
/// killed).
pub fn recorded_checksums(run_dir: &Path) -> Result<Option<Recorded>> {
    for name in [SUMMARY_FILE, ERROR_FILE] {
        let path = run_dir.join(name);
        if path.exists() {
            let mut r: Recorded = crate::fsutil::read_json(&path)?;
            r.from = path;
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// What [`read_checked_config`] could check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The bytes have the sha256 the run recorded.
    Matches,
    /// The run's record (this file) predates the checksum.
    Unrecorded(PathBuf),
    /// The run has no record yet (still running, or killed).
    Unfinished,
}

/// `run_dir/config.json`, read (a regular file, bounded) and checked
/// against the sha256 the run recorded in `summary.json` (or `error.json`):
/// the one way `predict` and `search` read it, so an edited file (labels
/// reordered, which would swap the classes) is refused, naming it. Its
/// path and bytes, and what could be checked.
pub fn read_checked_config(run_dir: &Path) -> Result<(PathBuf, Vec<u8>, Checked)> {
    let path = run_dir.join(CONFIG_FILE);
    if !path.exists() && !path.is_symlink() {
        return Err(FitError::BadRun {
            path: run_dir.to_path_buf(),
            message: "no config.json: not a run directory".into(),
        }
        .into());
    }
    let bytes = crate::fsutil::read_bounded(&path, crate::fsutil::SMALL_FILE_LIMIT)?;
    let checked = match recorded_checksums(run_dir)? {
        Some(Recorded {
            from,
            config_sha256: Some(want),
            ..
        }) => {
            let got = crate::fsutil::sha256_bytes(&bytes);
            if got != want {
                return Err(FitError::BadRun {
                    path: path.clone(),
                    message: format!(
                        "changed since the run wrote it: sha256 {} differs from the {} recorded in {}; \
                         an edited config.json (reordered or renamed labels, another model shape) \
                         would give wrong answers: restore the file, or train the run again",
                        crate::hash::abbrev(&got),
                        crate::hash::abbrev(&want),
                        from.display()
                    ),
                }
                .into());
            }
            Checked::Matches
        }
        Some(Recorded { from, .. }) => Checked::Unrecorded(from),
        None => Checked::Unfinished,
    };
    Ok((path, bytes, checked))
}

impl RunConfig {
    /// The labels name distinct classes, one per output of the model: a
    /// name given twice would make one class unreachable (and its
    /// predictions read as the other's).
    pub fn check_labels(&self, path: &Path) -> Result<()> {
        let bad = |message: String| -> Error {
            FitError::BadRun {
                path: path.to_path_buf(),
                message,
            }
            .into()
        };
        let mut seen = std::collections::BTreeSet::new();
        for l in &self.labels {
            if !seen.insert(l.as_str()) {
                return Err(bad(format!(
                    "label {l:?} is given twice in `labels`; each class needs its own name \
                     (the file was edited: restore it, or train the run again)"
                )));
            }
        }
        let classes = self.spec.as_ref().map_or(self.model.classes, |s| s.classes);
        if self.labels.len() != self.model.classes || self.labels.len() != classes {
            return Err(bad(format!(
                "{} labels for a model of {classes} classes (the file was edited: restore it, \
                 or train the run again)",
                self.labels.len()
            )));
        }
        Ok(())
    }

    /// A run without a recorded checksum of `config.json` (written by an
    /// older sherl): its labels must be the cache's, in the cache's order,
    /// when the cache is still at the recorded path with the recorded
    /// settings hash; when it is not, they are used unchecked, with a
    /// warning saying how to check them.
    pub(super) fn check_labels_against_cache(&self, path: &Path, from: &Path) -> Result<()> {
        let manifest = self.cache.path.join("manifest.json");
        #[derive(Deserialize)]
        struct Labels {
            #[serde(default)]
            settings_hash: String,
            #[serde(default)]
            labels: Vec<String>,
        }
        let read: Option<Labels> =
            crate::fsutil::read_json_limited(&manifest, crate::fsutil::METADATA_LIMIT).ok();
        match read {
            Some(m)
                if !self.cache.settings_hash.is_empty()
                    && m.settings_hash == self.cache.settings_hash =>
            {
                if m.labels != self.labels {
                    return Err(FitError::BadRun {
                        path: path.to_path_buf(),
                        message: format!(
                            "`labels` {:?} differ from those of the cache the run was trained on \
                             ({:?}, in {}): the file was edited; restore it, or train the run again",
                            self.labels,
                            m.labels,
                            manifest.display()
                        ),
                    }
                    .into());
                }
                tracing::warn!(
                    "{}: written by an older sherl without a checksum of {}; its labels match \
                     the cache's ({})",
                    from.display(),
                    path.display(),
                    manifest.display()
                );
            }
            _ => tracing::warn!(
                "{}: written by an older sherl without a checksum of {}, and the cache it was \
                 trained on is not at {}: its labels {:?} are used unchecked (they must be the \
                 cache's, in the cache's order: `sherl-cache inspect CACHE` lists them; training \
                 the run again records the checksum)",
                from.display(),
                path.display(),
                self.cache.path.display(),
                self.labels
            ),
        }
        Ok(())
    }
}

/// Longest line of `metrics.jsonl` read (a real line is a few hundred
/// bytes; a longer one is damage, and is reported as unreadable).
pub const METRICS_LINE_LIMIT: usize = 64 << 10;

/// The lines of a `metrics.jsonl`, streamed, never more than one line in
/// memory: `each(number, Some(text))` for each line (1-based, without its
/// line ending), `each(number, None)` for one longer than
/// [`METRICS_LINE_LIMIT`] or not UTF-8. The file must be a regular file
/// (a FIFO or a device such as `/dev/zero` is refused, see
/// [`crate::fsutil::open_regular`]) of at most
/// [`crate::fsutil::METADATA_LIMIT`] bytes; errors name it.
pub fn for_each_metrics_line(path: &Path, mut each: impl FnMut(usize, Option<&str>)) -> Result<()> {
    use std::io::{BufRead, Read};
    let limit = crate::fsutil::METADATA_LIMIT;
    let too_large = |n: u64| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{n} bytes or more, larger than the {limit} bytes sherl reads from a metrics.jsonl; is it the right file?"),
            ),
        )
    };
    let file = crate::fsutil::open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > limit {
        return Err(too_large(len));
    }
    let mut reader = std::io::BufReader::new(file.take(limit + 1));
    let mut line = Vec::new();
    let (mut number, mut total) = (0usize, 0u64);
    loop {
        line.clear();
        // One line: at most METRICS_LINE_LIMIT + 1 bytes kept, the rest of
        // a longer one skipped.
        let (mut length, mut ended) = (0usize, false);
        while !ended {
            let chunk = reader.fill_buf().map_err(|e| Error::io(path, e))?;
            if chunk.is_empty() {
                break;
            }
            let take = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    ended = true;
                    i + 1
                }
                None => chunk.len(),
            };
            let room = (METRICS_LINE_LIMIT + 2).saturating_sub(line.len());
            line.extend_from_slice(&chunk[..take.min(room)]);
            reader.consume(take);
            length += take;
        }
        if length == 0 {
            break;
        }
        total += length as u64;
        number += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let whole = length - usize::from(ended) <= METRICS_LINE_LIMIT;
        each(number, std::str::from_utf8(&line).ok().filter(|_| whole));
    }
    if total > limit {
        return Err(too_large(total));
    }
    Ok(())
}
