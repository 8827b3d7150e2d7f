//! `sherl-extract run`: the one composer. A backbone directory with a
//! `backbone.json` is an image backbone ([`super::image::run`]); any other
//! is a BERT-family text encoder ([`super::text::run`]). Both compose the
//! same stages: the plan checked ([`super::plan`]), the backbone and its
//! session opened, the inputs put in cache order ([`super::order`]),
//! provenance recorded ([`super::provenance`]), the cache directory opened
//! and scanned for `--resume` (`common::open_writer`), each
//! remaining shard written ([`super::pipeline`]) and sealed by rename,
//! `manifest.json` last.

use super::common::{ExtractReporter, ExtractSummary};
use super::plan::ExtractPlan;
use crate::backbone::BackboneDir;
use crate::extract::runtime::Runtime;
use crate::Result;

/// Run the extraction described by `plan`.
pub fn run(
    rt: &Runtime,
    plan: &ExtractPlan,
    reporter: &dyn ExtractReporter,
) -> Result<ExtractSummary> {
    if BackboneDir::open(&plan.backbone)?.is_image() {
        super::image::run(rt, plan, reporter)
    } else {
        super::text::run(rt, plan, reporter)
    }
}
