//! `sherl-fit search`'s query through the frozen backbone (ONNX Runtime)
//! and the trained tower of its kind; the ranking is [`super::search`]'s.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::checks::same;
use super::search::{Hit, Query, SearchPlan, Searcher};
use crate::backbone::BackboneDir;
use crate::batching::{real_rows, PaddedBatch};
use crate::cache::Cache;
use crate::extract::runtime::{BackboneSession, Runtime, SessionConfig};
use crate::extract::tokenize::{Encoded, Tokenizer};
use crate::fit::batcher::Batch;
use crate::fit::error::FitError;
use crate::fit::model::Model;
use crate::{Error, Result};

/// `sherl-fit search`: the query of `plan` through the backbone its
/// tower's cache was made with (ONNX Runtime, as [`super::predict()`] runs new
/// inputs) and that trained tower, then ranked against the run's split
/// ([`Searcher`]).
///
/// An image query must be a regular file, checked first (a FIFO or device
/// is refused as such, not read).
pub fn search(rt: &Runtime, plan: &SearchPlan, session: &SessionConfig) -> Result<Vec<Hit>> {
    if let Query::Image(file) = &plan.query {
        check_query_image(file)?;
    }
    let searcher = Searcher::open(plan)?;
    let tower = searcher.query_tower(&plan.query);
    let dev = Device::Cpu;
    let z = match &plan.query {
        Query::Text(t) => text_query(rt, session, &plan.text_backbone, tower, t, &dev)?,
        Query::Image(f) => image_query(rt, session, &plan.image_backbone, tower, f, &dev)?,
    };
    searcher.rank(plan, &z)
}

/// The query image must be a regular file: a missing one is "not found",
/// a FIFO, device or directory is refused as what it is
/// ([`crate::fsutil::open_regular`], which never blocks on a FIFO).
fn check_query_image(file: &Path) -> Result<()> {
    crate::fsutil::open_regular(file)
        .map(drop)
        .map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Error::io(
                file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "query image not found"),
            ),
            other => other,
        })
}

/// `sherl-fit search`'s text query through the tokenizer and the ONNX
/// model of the backbone the caption cache was made with (its `max_len`),
/// then the trained text tower: `[1, J]`, not normalised.
fn text_query(
    rt: &Runtime,
    session_cfg: &SessionConfig,
    backbone: &Path,
    (cache, model, hidden): (&Cache, &Model, usize),
    text: &str,
    dev: &Device,
) -> Result<Tensor> {
    let dir = BackboneDir::open(backbone)?;
    let m = cache.manifest();
    let Some(tok) = &m.backbone.tokenizer else {
        return Err(FitError::BadRun {
            path: cache.dir().to_path_buf(),
            message: "the caption cache records no tokenizer".into(),
        }
        .into());
    };
    same("tokenizer", &dir.tokenizer_path(), &tok.sha256)?;
    let onnx = dir.onnx_path();
    same("ONNX model", &onnx, &m.backbone.onnx.sha256)?;
    let tokenizer =
        Tokenizer::from_file(&dir.tokenizer_path(), m.settings.max_len).map_err(|e| {
            super::recorded_in(
                e,
                &cache.dir().join(crate::cache::manifest::MANIFEST),
                &[("--max-len", "settings.max_len")],
            )
        })?;
    let enc = tokenizer.encode(text, None)?;
    let (mut session, _) = BackboneSession::open(rt, &onnx, session_cfg)?;
    let inputs = model.inputs().to_vec();
    session.check_layers(&inputs)?;
    let refs = [&enc];
    let pb = PaddedBatch::new(&refs, None);
    let (ids, mask, types) = pb.views();
    let outs = session.run(ids, mask, types, &inputs)?;
    let layers = outs
        .iter()
        .map(|h| real_rows(h.view(), 0, enc.len()))
        .collect();
    let batch = Batch::from_padded(&pb, layers, hidden, vec!["query".into()], dev)?;
    Ok(model.inference().forward(&batch)?.logits)
}

/// `sherl-fit search`'s image query decoded and preprocessed with the
/// recipe the image cache recorded, through the ViT's ONNX model with the
/// tower's input layers exposed (pooled as the cache was), then the
/// trained image tower: `[1, J]`, not normalised.
fn image_query(
    rt: &Runtime,
    session_cfg: &SessionConfig,
    backbone: &Path,
    (cache, model, hidden): (&Cache, &Model, usize),
    file: &Path,
    dev: &Device,
) -> Result<Tensor> {
    use crate::cache::{ExampleMeta, ImageMeta};
    use crate::data::image::{ImageExample, ImageOptions, ImageSource, Preprocess};
    use crate::extract::image::{exposed_model, ImageBackbone, ImageRunner};

    check_query_image(file)?;
    let dir = BackboneDir::open(backbone)?;
    let m = cache.manifest();
    let Some(info) = &m.image else {
        return Err(FitError::BadRun {
            path: cache.dir().to_path_buf(),
            message: "the image cache records no image recipe".into(),
        }
        .into());
    };
    let desc_path = dir.description_path();
    same("backbone.json", &desc_path, &info.description.sha256)?;
    let onnx = dir.onnx_path();
    same("ONNX model", &onnx, &m.backbone.onnx.sha256)?;
    let recipe: Preprocess =
        serde_json::from_value(info.preprocess.clone()).map_err(|e| FitError::BadRun {
            path: cache.dir().to_path_buf(),
            message: format!("image.preprocess is not a recipe: {e}"),
        })?;
    let backbone = ImageBackbone {
        desc: crate::backbone::ImageBackboneDesc::read(&desc_path)?,
        desc_path,
        recipe,
        patch_pool: info.patch_pool,
        tokens: info.tokens,
    };
    let inputs = model.inputs().to_vec();
    let bytes = exposed_model(&onnx, &backbone.desc, &inputs)?;
    let mut session =
        crate::extract::runtime::F32Session::from_bytes(rt, &onnx, &bytes, session_cfg)?;
    drop(bytes);
    let mut options = ImageOptions::default();
    if let Ok(b) = serde_json::from_value(m.dataset.options["image"]["background"].clone()) {
        options.background = b;
    }
    let examples = [ImageExample {
        id: "query".into(),
        split: String::new(),
        source: ImageSource::File(file.to_path_buf()),
        label: None,
        group: None,
        source_line: 0,
        width: 0,
        height: 0,
    }];
    let tokens = backbone.tokens;
    let mut runner = ImageRunner {
        session: &mut session,
        backbone: &backbone,
        options: &options,
        layers: &inputs,
        examples: &examples,
        order: &[0],
    };
    let out = runner.run(&[ExampleMeta {
        position: 0,
        id: "query".into(),
        split: 0,
        label: None,
        ids: Vec::new(),
        type_ids: Vec::new(),
        image: Some(ImageMeta {
            tokens: tokens as u32,
            digest: [0; 32],
        }),
    }])?;
    let layers = out
        .outs
        .into_iter()
        .map(|a| a.into_array().into_raw_vec_and_offset().0)
        .collect();
    // Every image token is real: an all-ones mask.
    let enc = Encoded {
        ids: vec![0; tokens],
        type_ids: vec![0; tokens],
    };
    let pb = PaddedBatch::new(&[&enc], None);
    let batch = Batch::from_padded(&pb, layers, hidden, vec!["query".into()], dev)?;
    Ok(model.inference().forward(&batch)?.logits)
}
