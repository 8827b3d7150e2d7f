//! `predict` for a run trained on an image cache.

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Map};

use super::checks::{same, trained_columns, trained_model};
use super::output::Labeller;
use super::plan::{PredictPlan, PredictSummary};
use crate::backbone::{BackboneDir, Checkpoint};
use crate::batching::PaddedBatch;
use crate::cache::manifest::ImageInfo;
use crate::data::image::{load_image_inputs, load_images, ImageOptions, Preprocess};
use crate::extract::image::{exposed_model, ImageBackbone, ImageRunner};
use crate::extract::runtime::Runtime;
use crate::extract::tokenize::Encoded;
use crate::fit::batcher::Batch;
use crate::fit::error::FitError;
use crate::fit::model::{Arch, Model};
use crate::fit::run_dir::{self, RunConfig};
use crate::Result;

/// The ViT the run's image cache was extracted with (its description and
/// checkpoint checked, the preprocessing recipe the cache recorded) and
/// the run's trained model on the CPU, weights restored.
fn image_model(
    plan: &PredictPlan,
    rc: &RunConfig,
    image: &ImageInfo,
    dir: &BackboneDir,
    weights_path: &Path,
) -> Result<(ImageBackbone, Arch, Model)> {
    let desc_path = dir.description_path();
    same("backbone.json", &desc_path, &image.description.sha256)?;
    let ckpt_path = dir.safetensors_path();
    let Some(st) = &rc.cache.backbone.safetensors else {
        return Err(FitError::BadRun {
            path: plan.run.clone(),
            message: "the run's image cache records no ViT checkpoint".into(),
        }
        .into());
    };
    same("ViT checkpoint", &ckpt_path, &st.sha256)?;
    let recipe: Preprocess =
        serde_json::from_value(image.preprocess.clone()).map_err(|e| FitError::BadRun {
            path: plan.run.join(run_dir::CONFIG_FILE),
            message: format!("cache.image.preprocess is not a recipe: {e}"),
        })?;
    let desc = crate::backbone::ImageBackboneDesc::read(&desc_path)?;
    let backbone = ImageBackbone {
        desc,
        desc_path,
        recipe,
        patch_pool: image.patch_pool,
        tokens: image.tokens,
    };
    let cfg: crate::fit::nn::vit_layer::VitLayerConfig = rc
        .cache
        .backbone
        .config
        .clone()
        .and_then(|c| serde_json::from_value(c).ok())
        .ok_or_else(|| FitError::BadRun {
            path: plan.run.join(run_dir::CONFIG_FILE),
            message: "cache.backbone.config does not hold the ViT block sizes".into(),
        })?;
    let arch = Arch::Vit {
        cfg,
        layers: rc.cache.backbone.num_layers,
    };
    let ckpt = Checkpoint::open_vit(&ckpt_path)?;
    let dev = Device::Cpu;
    let model = trained_model(rc, &arch, &ckpt, weights_path, &dev).map_err(|e| {
        super::recorded_in(
            e,
            &plan.run.join(run_dir::CONFIG_FILE),
            &[("--probe-layer", "probe layer")],
        )
    })?;
    Ok((backbone, arch, model))
}

/// `predict` for a run trained on an image cache: the new images (a single
/// image file, a flat folder of images, image paths on stdin
/// ([`load_image_inputs`]); a folder of class folders, a table whose image
/// column names image files: `--image-column`, else the one the cache was
/// extracted from; IDX)
/// are decoded and preprocessed with the recipe the cache recorded (not
/// whatever `backbone.json` says now), run through the ViT with the
/// run's input layers exposed, pooled as the cache was, and labelled by
/// the trained modules. The backbone description, the ONNX model and the
/// ViT checkpoint must be the ones the cache was extracted with.
pub(crate) fn predict_images(
    rt: &Runtime,
    plan: &PredictPlan,
    rc: &RunConfig,
    image: &ImageInfo,
    dir: &BackboneDir,
    weights_path: &Path,
    out_file: Option<crate::fsutil::AtomicFile>,
) -> Result<PredictSummary> {
    let (backbone, arch, model) = image_model(plan, rc, image, dir, weights_path)?;
    let dev = Device::Cpu;
    let inputs = model.inputs().to_vec();
    let model_eval = model.inference();

    let trained = trained_columns(&rc.cache);
    let dplan = plan.data.to_plan(&trained);
    let options = ImageOptions {
        image_column: plan
            .data
            .image_column
            .clone()
            .or_else(|| trained.image.clone())
            .unwrap_or_else(|| ImageOptions::default().image_column),
        // IDX class numbers get the names the cache was extracted with.
        idx_label_names: trained.idx_class_names.clone(),
        ..ImageOptions::default()
    };
    // A single image, a flat folder or paths on stdin; else a table,
    // class folders or IDX.
    let data = match load_image_inputs(&plan.data.data, &dplan.read, &options)? {
        Some(data) => data,
        None => load_images(&dplan, &options)?,
    };
    let bytes = exposed_model(&plan.model_path(), &backbone.desc, &inputs)?;
    let mut session = crate::extract::runtime::F32Session::from_bytes(
        rt,
        &plan.model_path(),
        &bytes,
        &plan.session,
    )?;
    drop(bytes);
    let order: Vec<usize> = (0..data.examples.len()).collect();
    let mut runner = ImageRunner {
        session: &mut session,
        backbone: &backbone,
        options: &options,
        layers: &inputs,
        examples: &data.examples,
        order: &order,
    };
    let mut lines = Labeller::open(out_file, &rc.labels, &data.label_names)?;
    let hidden = arch.hidden();
    let tokens = backbone.tokens;
    let positions: Vec<usize> = (0..data.examples.len()).collect();
    for chunk in positions.chunks(plan.batch_size.max(1)) {
        let metas: Vec<crate::cache::ExampleMeta> = chunk
            .iter()
            .map(|&p| crate::cache::ExampleMeta {
                position: p as u64,
                id: data.examples[p].id.clone(),
                split: 0,
                label: None,
                ids: Vec::new(),
                type_ids: Vec::new(),
                image: Some(crate::cache::ImageMeta {
                    tokens: tokens as u32,
                    digest: [0; 32],
                }),
            })
            .collect();
        let out = runner.run(&metas)?;
        let layers: Vec<Vec<f32>> = out
            .outs
            .into_iter()
            .map(|a| a.into_array().into_raw_vec_and_offset().0)
            .collect();
        // Every image has `tokens` real tokens: an all-ones mask.
        let encs: Vec<Encoded> = chunk
            .iter()
            .map(|_| Encoded {
                ids: vec![0; tokens],
                type_ids: vec![0; tokens],
            })
            .collect();
        let refs: Vec<&Encoded> = encs.iter().collect();
        let pb = PaddedBatch::new(&refs, None);
        let ids = metas.iter().map(|m| m.id.clone()).collect();
        let batch = Batch::from_padded(&pb, layers, hidden, ids, &dev)?;
        let logits = model_eval.forward(&batch)?.logits;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, 1)?.to_vec2()?;
        for (&p, pr) in chunk.iter().zip(probs) {
            let e = &data.examples[p];
            let mut fields = Map::new();
            fields.insert("id".into(), json!(e.id));
            fields.insert("image".into(), json!(e.source.path().display().to_string()));
            lines.write(fields, &pr, e.label)?;
        }
    }
    lines.finish(rc.run_id.clone(), data.examples.len(), plan.out.clone())
}
