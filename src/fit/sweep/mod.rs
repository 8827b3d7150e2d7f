//! Sweeps: a grid file expands into many
//! [`FitConfig`](crate::fit::config::FitConfig)s that all train on the same
//! cache (the backbone never runs again).
//!
//! Grid file: a JSON object whose keys are `sherl-fit run` option names
//! (`lr` or `late-trainable`, dashes or underscores) and whose values are
//! lists (axes of a cartesian product) or single values (fixed for every
//! run). Alternatively `"runs": [{...}, ...]` lists explicit settings; any
//! other keys are then the base every listed run starts from. Runs are
//! numbered in a deterministic order (axes sorted by name, last axis
//! fastest), so `--worker I/M` partitions are stable across machines.
//! The runs are counted before the grid is expanded, and a grid of more
//! than `--max-runs` ([`DEFAULT_MAX_RUNS`]) is refused.
//!
//! A retrieval sweep (`--task retrieval`, two caches) takes the same grid
//! plus each tower's `image_method`/`text_method`, `joint_dim`, `loss` and
//! `margin` ([`expand_retrieval`]).
//!
//! - [`grid`]: the grid file's expansion into run settings;
//! - [`plan`]: the runs of this worker, with their ids;
//! - [`pool`]: the process pool that trains them.

pub mod grid;
pub mod plan;
pub mod pool;

pub use grid::{expand, expand_retrieval, expand_retrieval_with, expand_with, DEFAULT_MAX_RUNS};
pub use plan::{parse_worker, partition, plan_runs, PlannedRun, SweepInputs, SweepPlan};
pub use pool::{exit_with_parent, run_sweep, SweepOutcome, SweepReporter, PARENT_PID_ENV};
