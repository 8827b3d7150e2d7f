//! `sherl-extract run`: the stages composed. [`run`] checks the plan
//! ([`super::plan`]), opens the backbone and its session ([`open_backbone`],
//! [`open_session`]), tokenizes into cache order ([`super::order`]),
//! records provenance ([`super::provenance`]), opens the cache directory and
//! scans it for `--resume` ([`CacheWriter`]), and writes each remaining
//! shard ([`super::pipeline::write_shard`]). Shards are sealed by rename;
//! `manifest.json` is written last. `--resume` keeps every sealed shard
//! whose header matches the settings and recomputes the rest; each shard's
//! content depends only on the settings and its examples, so the result
//! equals an uninterrupted run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::order::CacheOrder;
use super::pipeline::StageTimes;
use super::plan::{self, ExtractPlan, LayerChoice};
use crate::backbone::{BackboneDir, BertConfig};
use crate::batching::PaddedBatch;
use crate::cache::manifest::{ExtractSettings, Manifest};
use crate::cache::writer::{CacheWriter, ShardSlot};
use crate::data::Dataset;
use crate::runtime::{BackboneSession, DeviceChoice, Runtime, SessionConfig};
use crate::tokenize::{Encoded, Tokenizer};
use crate::{Error, Result};

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

/// The backbone directory, its config (when it has one) and its tokenizer
/// truncating at `max_len`.
pub struct Backbone {
    /// The directory.
    pub dir: BackboneDir,
    /// `config.json`, when present (a bring-your-own ONNX may come without).
    pub config: Option<BertConfig>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
}

/// Open the backbone of `path` for settings `s` (`--max-len` checked
/// against its position embeddings).
pub fn open_backbone(path: &Path, s: &ExtractSettings) -> Result<Backbone> {
    let dir = BackboneDir::open(path)?;
    let config = if dir.config_path().exists() {
        Some(dir.config()?)
    } else {
        None
    };
    if let Some(c) = &config {
        plan::check_max_len(s, c.max_tokens())?;
    }
    let tokenizer = Tokenizer::from_file(&dir.tokenizer_path(), s.max_len)?;
    Ok(Backbone {
        dir,
        config,
        tokenizer,
    })
}

/// A Hugging Face checkpoint directory (config.json + model.safetensors)
/// without its `model.onnx`, run with the default model path: export it
/// there first, saying so, as `sherl-extract export-onnx` would (the export
/// is deterministic, so every machine writes the same file). Anything else
/// (a `--model` elsewhere, or a folder without a checkpoint) is left to the
/// session's own "not found" message.
pub fn export_on_first_use(
    backbone: &Backbone,
    model: &Path,
    reporter: &dyn ExtractReporter,
) -> Result<()> {
    let dir = &backbone.dir;
    let (Some(cfg), true) = (&backbone.config, model == dir.onnx_path()) else {
        return Ok(());
    };
    if model.exists() || !dir.safetensors_path().is_file() {
        return Ok(());
    }
    reporter.note(&format!(
        "{} has no model.onnx: exporting its checkpoint there first (once; as `sherl-extract export-onnx`)",
        dir.root().display()
    ));
    let t = Instant::now();
    let ckpt = crate::backbone::Checkpoint::open(&dir.safetensors_path())?;
    let s = crate::onnx::export_backbone(cfg, &ckpt, model)?;
    reporter.note(&format!(
        "exported {} layers to {} ({:.0} MB) in {:.1} s",
        s.layers,
        model.display(),
        s.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// An open ONNX Runtime session and what it will store.
pub struct Session {
    /// The session.
    pub session: BackboneSession,
    /// The device it runs on.
    pub device: DeviceChoice,
    /// Transformer layers of the backbone.
    pub n_layers: usize,
    /// Hidden states to store.
    pub layers: Vec<usize>,
    /// Hidden width.
    pub hidden: usize,
}

/// Open the session of `model`, and resolve the layers to store and the
/// hidden width (from `config`, or from the model's outputs without one).
pub fn open_session(
    rt: &Runtime,
    model: &Path,
    config: Option<&BertConfig>,
    session: &SessionConfig,
    layers: &LayerChoice,
    late_layers: usize,
    reporter: &dyn ExtractReporter,
) -> Result<Session> {
    let (mut s, device) = BackboneSession::open(rt, model, session)?;
    if let Some(reason) = &device.fallback_reason {
        reporter.note(&format!("device auto: running on CPU ({reason})"));
    }
    let n_layers = match config {
        Some(c) => c.num_hidden_layers,
        None => *s.layers().last().ok_or_else(|| Error::Onnx {
            path: model.to_path_buf(),
            message: "no hidden_states.i outputs (see `sherl-extract inspect-onnx`)".into(),
        })?,
    };
    let layers = plan::resolve_layers(layers, late_layers, n_layers)?;
    s.check_layers(&layers)?;
    let hidden = match config {
        Some(c) => c.hidden_size,
        None => probe_hidden(&mut s, &layers)?,
    };
    Ok(Session {
        session: s,
        device,
        n_layers,
        layers,
        hidden,
    })
}

/// The manifest of the cache `plan` describes (provenance and settings
/// hash), before any shard is written.
pub fn describe(
    plan: &ExtractPlan,
    backbone: &Backbone,
    session: &Session,
    data: &Dataset,
    order: &CacheOrder,
) -> Result<Manifest> {
    let backbone_info = super::provenance::backbone_info(
        &backbone.dir,
        &plan.model,
        backbone.config.as_ref(),
        session.n_layers,
        session.hidden,
    )?;
    let dataset = super::provenance::dataset_info(&plan.dataset, &data.report)?;
    let settings = ExtractSettings {
        layers: session.layers.clone(),
        ..plan.settings.clone()
    };
    Ok(super::provenance::manifest(
        backbone_info,
        dataset,
        settings,
        data.label_names.clone(),
        order,
        plan.worker,
        None,
    ))
}

/// Run the extraction described by `plan`.
pub fn run(
    rt: &Runtime,
    plan: &ExtractPlan,
    reporter: &dyn ExtractReporter,
) -> Result<ExtractSummary> {
    if BackboneDir::open(&plan.backbone)?.is_image() {
        return super::image::run(rt, plan, reporter);
    }
    let t0 = Instant::now();
    let s = &plan.settings;
    plan::validate(s)?;
    CacheWriter::check_target(&plan.out)?;
    let backbone = open_backbone(&plan.backbone, s)?;
    export_on_first_use(&backbone, &plan.model, reporter)?;
    let mut session = open_session(
        rt,
        &plan.model,
        backbone.config.as_ref(),
        &plan.session,
        &plan.layers,
        s.late_layers,
        reporter,
    )?;
    let t_open = t0.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let data = crate::data::load(&plan.dataset)?;
    let t_read = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let order = super::order::tokenize(&data, &backbone.tokenizer)?;
    let t_tokenize = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let manifest = describe(plan, &backbone, &session, &data, &order)?;
    let t_describe = t.elapsed().as_secs_f64();
    let mut times = super::pipeline::StageTimes::default();

    let (mut writer, todo, resumed) = open_writer(plan, manifest, reporter)?;
    let examples = &order.examples;
    let run_examples: u64 = todo.iter().map(|slot| slot.examples.len() as u64).sum();
    let run_tokens: u64 = todo
        .iter()
        .flat_map(|slot| examples[slot.examples.clone()].iter())
        .map(|e| e.len() as u64)
        .sum();
    reporter.start(run_examples, run_tokens);
    let (mut padded_run, mut tokens_run) = (0u64, 0u64);
    for slot in &todo {
        let _span = tracing::info_span!("shard", idx = slot.index).entered();
        let (sealed, padded, shard_times) = super::pipeline::write_shard(
            &mut session.session,
            &examples[slot.examples.clone()],
            &session.layers,
            writer.shard(slot)?,
            plan.compress_threads,
            s,
            reporter,
        )?;
        times.add(&shard_times);
        padded_run += padded;
        tokens_run += sealed.tokens;
        writer.record(&sealed);
    }
    reporter.finish();
    let t = std::time::Instant::now();
    let manifest = writer.finish()?;
    log_stage_times(
        &[
            ("open backbone and session", t_open),
            ("read data", t_read),
            ("tokenize", t_tokenize),
            ("provenance (file hashes)", t_describe),
        ],
        "backbone",
        &times,
        t.elapsed().as_secs_f64(),
        t0,
    );
    Ok(ExtractSummary::new(
        plan,
        &manifest,
        session.layers,
        RunTally {
            shards_written: todo.len(),
            shards_resumed: resumed,
            tokens_run,
            padded_tokens_run: padded_run,
        },
        t0,
        session.device.device,
    ))
}

/// Open the cache writer of `plan` with `manifest`, scan it for `--resume`
/// (saying how many sealed shards were kept): the writer, the shards to
/// compute and the count of those kept. Text and image runs share it.
pub(super) fn open_writer(
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
pub(super) struct RunTally {
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
    pub(super) fn new(
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
pub(super) fn stage_line(
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
pub(super) fn log_stage_times(
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

fn probe_hidden(session: &mut BackboneSession, layers: &[usize]) -> Result<usize> {
    let e = Encoded {
        ids: vec![101, 102],
        type_ids: vec![0, 0],
    };
    let b = PaddedBatch::new(&[&e], None);
    let (i, m, t) = b.views();
    let out = session.run(i, m, t, &layers[..1])?;
    Ok(out[0].shape()[2])
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
