//! `sherl-extract run` for a text backbone: the stages composed. [`run`] checks the plan
//! ([`super::plan`]), opens the backbone and its session ([`open_backbone`],
//! [`open_session`]), tokenizes into cache order ([`super::order`]),
//! records provenance ([`super::provenance`]), opens the cache directory and
//! scans it for `--resume` ([`CacheWriter`]), and writes each remaining
//! shard ([`super::pipeline::write_shard`]). Shards are sealed by rename;
//! `manifest.json` is written last. `--resume` keeps every sealed shard
//! whose header matches the settings and recomputes the rest; each shard's
//! content depends only on the settings and its examples, so the result
//! equals an uninterrupted run.

use std::path::Path;
use std::time::Instant;

use super::common::{log_stage_times, open_writer, ExtractReporter, ExtractSummary, RunTally};
use super::order::CacheOrder;
use super::plan::{self, ExtractPlan, LayerChoice};
use crate::backbone::{BackboneDir, BertConfig};
use crate::batching::PaddedBatch;
use crate::cache::manifest::{ExtractSettings, Manifest};
use crate::cache::writer::CacheWriter;
use crate::data::Dataset;
use crate::extract::runtime::{BackboneSession, DeviceChoice, Runtime, SessionConfig};
use crate::extract::tokenize::{Encoded, Tokenizer};
use crate::{Error, Result};

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
    let s = crate::extract::onnx::export_backbone(cfg, &ckpt, model)?;
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
    // ONNX Runtime opens the model itself: check first that it is a
    // regular file (a FIFO would block it, a device never end), naming it.
    // Only opened, not read: models are large and ONNX Runtime reads them.
    drop(crate::fsutil::open_regular(model)?);
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

/// The extraction of `plan` for a text backbone.
pub fn run(
    rt: &Runtime,
    plan: &ExtractPlan,
    reporter: &dyn ExtractReporter,
) -> Result<ExtractSummary> {
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
    let mut times = super::common::StageTimes::default();

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
