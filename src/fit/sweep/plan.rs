//! What a sweep runs: its inputs, and the grid's runs this worker takes,
//! each with its run id.

use serde_json::Value;

use super::grid::{expand_retrieval_with, expand_with};
use crate::fit::config::FitConfig;
use crate::fit::error::FitError;
use crate::fit::retrieval::config::RetrievalConfig;
use crate::{Error, Result};

/// Indices of the runs worker `index` of `count` takes: every `count`-th
/// run starting at `index`. Every run belongs to exactly one worker.
pub fn partition(runs: usize, index: u32, count: u32) -> Vec<usize> {
    (0..runs).filter(|k| *k as u32 % count == index).collect()
}

/// Parse `I/M` (the parser `--shard-of` uses too).
pub fn parse_worker(s: &str) -> Result<(u32, u32)> {
    let w = crate::cache::manifest::WorkerInfo::parse("--worker", s)?;
    Ok((w.index, w.count))
}

/// What a sweep does.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    /// The cache(s) every run trains on.
    pub inputs: SweepInputs,
    /// Grid file.
    pub grid: std::path::PathBuf,
    /// Directory of run directories.
    pub out: std::path::PathBuf,
    /// Runs at once.
    pub jobs: usize,
    /// This worker and the number of workers (`--worker I/M`).
    pub worker: (u32, u32),
    /// Re-run runs that stopped with an error.
    pub retry_failed: bool,
    /// `--device` passed to every run.
    pub device: String,
    /// `--blas` passed to every run.
    pub blas: String,
    /// The `sherl-fit` executable that trains one run.
    pub exe: std::path::PathBuf,
    /// The most runs the grid may expand to (`--max-runs`; see
    /// [`super::grid::DEFAULT_MAX_RUNS`]).
    pub max_runs: usize,
}

/// What every run of a sweep trains on.
#[derive(Debug, Clone)]
pub enum SweepInputs {
    /// One cache and its backbone (`--task classification`).
    Classification {
        /// Feature cache.
        cache: std::path::PathBuf,
        /// Backbone directory.
        backbone: std::path::PathBuf,
    },
    /// An image cache and a caption cache with their backbones (`--task
    /// retrieval`).
    Retrieval {
        /// Image cache.
        image_cache: std::path::PathBuf,
        /// Caption cache.
        text_cache: std::path::PathBuf,
        /// Image backbone directory.
        image_backbone: std::path::PathBuf,
        /// Text backbone directory.
        text_backbone: std::path::PathBuf,
    },
}

impl SweepInputs {
    /// The `sherl-fit run` arguments naming the inputs.
    pub(super) fn args(&self) -> Vec<std::ffi::OsString> {
        let pairs: Vec<(&str, &std::path::Path)> = match self {
            SweepInputs::Classification { cache, backbone } => {
                vec![("--cache", cache), ("--backbone", backbone)]
            }
            SweepInputs::Retrieval {
                image_cache,
                text_cache,
                image_backbone,
                text_backbone,
            } => vec![
                ("--task", std::path::Path::new("retrieval")),
                ("--image-cache", image_cache),
                ("--text-cache", text_cache),
                ("--image-backbone", image_backbone),
                ("--text-backbone", text_backbone),
            ],
        };
        pairs
            .into_iter()
            .flat_map(|(flag, path)| [flag.into(), path.as_os_str().to_owned()])
            .collect()
    }
}

/// One run of the grid, as planned.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedRun {
    /// Position in the expanded grid.
    pub index: usize,
    /// Run id (directory name under `out`).
    pub run_id: String,
    /// Settings (of a retrieval run: the shared ones; its `method` unused).
    pub config: FitConfig,
    /// A retrieval run's towers, joint width and loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<RetrievalConfig>,
}

impl PlannedRun {
    /// The `sherl-fit run` flags of a retrieval run's own settings.
    pub(super) fn retrieval_args(&self) -> Vec<String> {
        let Some(rc) = &self.retrieval else {
            return Vec::new();
        };
        vec![
            "--image-method".into(),
            rc.image_method.name().into(),
            "--text-method".into(),
            rc.text_method.name().into(),
            "--joint-dim".into(),
            rc.joint_dim.to_string(),
            "--loss".into(),
            rc.loss.name().into(),
            "--margin".into(),
            rc.margin.to_string(),
        ]
    }
}

/// Expand the grid file for this worker (nothing is written).
pub fn plan_runs(plan: &SweepPlan) -> Result<Vec<PlannedRun>> {
    // A regular file of at most SMALL_FILE_LIMIT bytes: never a FIFO or
    // device read for ever.
    let grid: Value = crate::fsutil::read_json(&plan.grid)?;
    let in_file = |e: Error| match e {
        Error::Fit(source) => FitError::GridFile {
            path: plan.grid.clone(),
            source: Box::new(source),
        }
        .into(),
        other => other,
    };
    let hash = |cache: &std::path::Path| -> Result<String> {
        Ok(
            crate::cache::Manifest::read(&cache.join(crate::cache::manifest::MANIFEST))?
                .settings_hash,
        )
    };
    let (wi, wm) = plan.worker;
    match &plan.inputs {
        SweepInputs::Classification { cache, .. } => {
            let runs = expand_with(&grid, plan.max_runs).map_err(in_file)?;
            let h = hash(cache)?;
            Ok(partition(runs.len(), wi, wm)
                .into_iter()
                .map(|k| PlannedRun {
                    index: k,
                    run_id: runs[k].run_id(&h),
                    config: runs[k].clone(),
                    retrieval: None,
                })
                .collect())
        }
        SweepInputs::Retrieval {
            image_cache,
            text_cache,
            ..
        } => {
            let runs = expand_retrieval_with(&grid, plan.max_runs).map_err(in_file)?;
            let (ih, th) = (hash(image_cache)?, hash(text_cache)?);
            Ok(partition(runs.len(), wi, wm)
                .into_iter()
                .map(|k| {
                    let (cfg, rc) = &runs[k];
                    PlannedRun {
                        index: k,
                        run_id: rc.run_id(cfg, &ih, &th),
                        config: cfg.clone(),
                        retrieval: Some(rc.clone()),
                    }
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_partition_covers_every_run_once() {
        for runs in [0usize, 1, 7, 30] {
            for m in 1..6u32 {
                let mut all: Vec<usize> = (0..m).flat_map(|i| partition(runs, i, m)).collect();
                all.sort_unstable();
                assert_eq!(all, (0..runs).collect::<Vec<_>>());
            }
        }
        assert_eq!(parse_worker("1/4").unwrap(), (1, 4));
        assert!(parse_worker("4/4").is_err() && parse_worker("x").is_err());
    }
}
