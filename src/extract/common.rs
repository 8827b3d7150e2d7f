//! What the text and the image extraction share: the progress callbacks,
//! the summary, the cache writer's opening and resume scan, and the stage
//! times printed by `-v`.

use std::path::PathBuf;
use std::time::Instant;

use super::plan::ExtractPlan;
use crate::cache::manifest::Manifest;
use crate::cache::writer::{CacheWriter, ShardSlot};
use crate::Result;

/// Progress callbacks (the binary draws them; the library never prints).
pub trait ExtractReporter: Sync {
    /// Work to do: examples and tokens this process will run.
    fn start(&self, examples: u64, tokens: u64);
    /// `examples`/`tokens` more were run.
    fn advance(&self, examples: u64, tokens: u64);
    /// A line for the user (device choice, skipped shards...).
    fn note(&self, message: &str);
    /// Done.
    fn finish(&self);
}

/// A reporter that reports nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl ExtractReporter for Silent {
    fn start(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64, _: u64) {}
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
    fn finish(&self) {}
}

/// What `run` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractSummary {
    /// Cache directory.
    pub cache: PathBuf,
    /// Examples in the cache (or this worker's part).
    pub examples: u64,
    /// Real tokens.
    pub tokens: u64,
    /// Stored layers.
    pub layers: Vec<usize>,
    /// Shards written by this process.
    pub shards_written: usize,
    /// Shards kept from an earlier run (`--resume`).
    pub shards_resumed: usize,
    /// Bytes of all shards.
    pub bytes_on_disk: u64,
    /// tokens x layers x hidden x 4.
    pub raw_f32_bytes: u64,
    /// Real tokens run through the backbone by this process.
    pub tokens_run: u64,
    /// Token slots including padding run by this process.
    pub padded_tokens_run: u64,
    /// Seconds spent.
    pub seconds: f64,
    /// Device used.
    pub device: String,
    /// Whether this is a partial (worker) cache.
    pub partial: bool,
}

/// Where the calling thread's time went in [`super::pipeline::write_shard`] (printed by
/// `sherl-extract -v run`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// In ONNX Runtime.
    pub backbone: f64,
    /// Cutting outputs into chunks (f32 rows of the real tokens).
    pub chunking: f64,
    /// Waiting for a compression thread to take a chunk (compression
    /// slower than the backbone).
    pub queue_wait: f64,
    /// After the last batch, waiting for compression and the writer.
    pub drain: f64,
}

impl StageTimes {
    /// Add `o` to these.
    pub fn add(&mut self, o: &StageTimes) {
        self.backbone += o.backbone;
        self.chunking += o.chunking;
        self.queue_wait += o.queue_wait;
        self.drain += o.drain;
    }
}

/// Open the cache writer of `plan` with `manifest`, scan it for `--resume`
/// (saying how many sealed shards were kept): the writer, the shards to
/// compute and the count of those kept. Text and image runs share it.
pub(crate) fn open_writer(
    plan: &ExtractPlan,
    manifest: Manifest,
    reporter: &dyn ExtractReporter,
) -> Result<(CacheWriter, Vec<ShardSlot>, usize)> {
    let mut writer = CacheWriter::open(&plan.out, manifest, plan.resume)?;
    let todo = writer.resume_scan(&|m| reporter.note(m))?;
    let resumed = writer.sealed_count();
    if resumed > 0 {
        reporter.note(&format!(
            "resume: {resumed} sealed shard(s) kept, {} to compute",
            todo.len()
        ));
    }
    Ok((writer, todo, resumed))
}

/// What this process did, counted while writing shards.
pub(crate) struct RunTally {
    /// Shards written by this process.
    pub shards_written: usize,
    /// Shards kept from an earlier run.
    pub shards_resumed: usize,
    /// Real tokens run through the backbone.
    pub tokens_run: u64,
    /// Token slots including padding.
    pub padded_tokens_run: u64,
}

impl ExtractSummary {
    /// The summary of a finished run of `plan` (text or image): totals from
    /// the final `manifest`, the rest from `tally`, time since `t0`.
    pub(crate) fn new(
        plan: &ExtractPlan,
        manifest: &Manifest,
        layers: Vec<usize>,
        tally: RunTally,
        t0: Instant,
        device: String,
    ) -> Self {
        ExtractSummary {
            cache: plan.out.clone(),
            examples: manifest.examples,
            tokens: manifest.tokens,
            shards_written: tally.shards_written,
            shards_resumed: tally.shards_resumed,
            bytes_on_disk: manifest.shards.iter().map(|s| s.bytes).sum(),
            raw_f32_bytes: manifest.raw_f32_bytes(),
            layers,
            tokens_run: tally.tokens_run,
            padded_tokens_run: tally.padded_tokens_run,
            seconds: t0.elapsed().as_secs_f64(),
            device,
            partial: plan.worker.is_some(),
        }
    }
}

/// The `-v` line of stage times: the run's own stages before the backbone
/// (`before`, label and seconds), then the backbone stage under
/// `backbone_label`, chunking, compression, drain, manifest and the total
/// since `t0`.
pub(crate) fn stage_line(
    before: &[(&str, f64)],
    backbone_label: &str,
    times: &StageTimes,
    manifest_s: f64,
    t0: Instant,
) -> String {
    let mut line = String::from("stages: ");
    for (label, secs) in before {
        line.push_str(&format!("{label} {secs:.2} s, "));
    }
    line.push_str(&format!(
        "{backbone_label} {:.2} s, chunking {:.2} s, waiting for compression {:.2} s, \
         draining compression and writer {:.2} s, manifest {manifest_s:.2} s; total {:.2} s",
        times.backbone,
        times.chunking,
        times.queue_wait,
        times.drain,
        t0.elapsed().as_secs_f64()
    ));
    line
}

/// Log [`stage_line`] at debug level (`-v`).
pub(crate) fn log_stage_times(
    before: &[(&str, f64)],
    backbone_label: &str,
    times: &StageTimes,
    manifest_s: f64,
    t0: Instant,
) {
    tracing::debug!(
        "{}",
        stage_line(before, backbone_label, times, manifest_s, t0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_line_lists_the_stages_in_order() {
        let times = StageTimes {
            backbone: 1.0,
            chunking: 0.25,
            queue_wait: 0.5,
            drain: 0.1,
        };
        let line = stage_line(
            &[("open", 0.5), ("read images", 2.0)],
            "decode + backbone",
            &times,
            0.0625,
            Instant::now(),
        );
        let (head, total) = line.rsplit_once("; total ").unwrap();
        assert_eq!(
            head,
            "stages: open 0.50 s, read images 2.00 s, decode + backbone 1.00 s, chunking \
             0.25 s, waiting for compression 0.50 s, draining compression and writer 0.10 s, \
             manifest 0.06 s"
        );
        assert!(total.ends_with(" s"), "{line}");
    }
}
