//! Images through `sherl-extract run` (issue 11): the tiny ViT image
//! backbone of `tests/vit.rs` over generated PNGs, the cache read back
//! against ONNX Runtime's own outputs, and `--patch-pool`.

use std::path::{Path, PathBuf};
use std::process::Output;

use ndarray::{ArrayD, IxDyn};
use sherl::backbone::ImageBackboneDesc;
use sherl::cache::Cache;
use sherl::data::image::{read_image, ImageOptions};
use sherl::extract::runtime::F32Session;

use crate::common;
use crate::vit::{write_image_folders, write_tiny_vit_backbone, TINY_TOKENS};

pub(crate) struct ImageFixture {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub backbone: PathBuf,
    pub data: PathBuf,
}

pub(crate) fn image_fixture(per_class: usize) -> ImageFixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let backbone = root.join("vit");
    write_tiny_vit_backbone(&backbone);
    let data = root.join("imgs");
    write_image_folders(&data, per_class, 5);
    ImageFixture {
        _tmp: tmp,
        root,
        backbone,
        data,
    }
}

/// `sherl-extract run` on the fixture's images into `out` (the fixture's
/// split), with `extra` flags and `env`; the process's output as it is.
fn run_extract(f: &ImageFixture, out: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "run",
        "--backbone",
        f.backbone.to_str().unwrap(),
        "--data",
        f.data.to_str().unwrap(),
        "--split",
        "train=0.5,valid=0.25,test=0.25",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    common::run("sherl-extract", &args, &f.root, env)
}

pub(crate) fn extract_images(f: &ImageFixture, out: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--late-layers", "1", "--device", "cpu", "--threads", "2"];
    args.extend_from_slice(extra);
    let o = run_extract(f, out, &args, &[]);
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(&o)
    );
    let out = common::stdout(&o);
    serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON summary")
}

/// Every layer of every image, one image at a time through ONNX Runtime
/// (the model's per-layer tensors exposed as sherl does).
fn reference(backbone: &Path, image: &Path) -> Vec<Vec<f32>> {
    let desc = ImageBackboneDesc::read(&backbone.join("backbone.json")).unwrap();
    let model = backbone.join("model.onnx");
    let bytes = sherl::extract::image::exposed_model(&model, &desc, &[0, 1, 2]).unwrap();
    let mut s = F32Session::from_bytes(common::runtime(), &model, &bytes, &common::cpu()).unwrap();
    let img = read_image(image, &ImageOptions::default()).unwrap();
    let x = desc.preprocess.apply(&img).unwrap();
    let n = desc.image_size;
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 3, n, n]), x).unwrap();
    let out = s
        .run(
            &[("input_image", x.view())],
            &["hidden_states.0", "hidden_states.1", "hidden_states.2"],
        )
        .unwrap();
    out.into_iter()
        .map(|a| a.as_slice().unwrap().to_vec())
        .collect()
}

/// An f32 image cache holds exactly what ONNX Runtime returns for each
/// image (every token, every layer), with the image's id, label, split and
/// digest, no token ids; the manifest records the recipe; `--patch-pool 2`
/// stores the CLS token and the mean of the 2x2 patch grid.
#[test]
fn image_cache_equals_onnx_runtime() {
    let f = image_fixture(6);
    let s = extract_images(
        &f,
        "c",
        &[
            "--dtype",
            "f32",
            "--layers",
            "all",
            "--max-batch",
            "1",
            "--chunk-size",
            "2",
            "--examples-per-shard",
            "5",
        ],
    );
    assert_eq!(s["examples"], 12);
    assert_eq!(s["tokens"], 12 * TINY_TOKENS as u64);
    let cache = Cache::open(&f.root.join("c")).unwrap();
    let m = cache.manifest();
    assert_eq!(m.format_version, 3);
    assert_eq!(m.labels, vec!["a", "b"]);
    assert_eq!(m.settings.layers, vec![0, 1, 2]);
    assert_eq!(m.settings.max_len, TINY_TOKENS);
    assert_eq!(m.settings.chunk_size, 2, "--chunk-size is used as given");
    assert!(m.backbone.tokenizer.is_none());
    let info = m.image.as_ref().expect("an image cache records its images");
    let desc = ImageBackboneDesc::read(&f.backbone.join("backbone.json")).unwrap();
    assert_eq!(info.preprocess_sha256, desc.preprocess.digest());
    assert_eq!(
        info.preprocess,
        serde_json::to_value(&desc.preprocess).unwrap()
    );
    assert_eq!((info.tokens, info.patch_pool), (TINY_TOKENS, 1));

    let mut pooled_ref = Vec::new();
    for pos in 0..12u64 {
        let (meta, layers) = cache.example(pos, &[0, 1, 2]).unwrap();
        assert!(meta.ids.is_empty() && meta.type_ids.is_empty());
        assert_eq!(meta.len(), TINY_TOKENS);
        let path = f.data.join(&meta.id);
        let class = meta.id.split('/').next().unwrap();
        assert_eq!(m.labels[meta.label.unwrap() as usize], class);
        let img = read_image(&path, &ImageOptions::default()).unwrap();
        assert_eq!(meta.image.unwrap().digest, img.digest(), "{}", meta.id);
        let want = reference(&f.backbone, &path);
        for l in 0..3 {
            assert_eq!(
                layers[l], want[l],
                "{} hidden_states.{l}: an f32 cache is exact",
                meta.id
            );
        }
        pooled_ref.push((meta.id.clone(), want));
    }
    // Cache order: train, valid, test.
    assert_eq!(m.split_names, vec!["train", "valid", "test"]);

    let v = common::run("sherl-cache", &["verify", "c"], &f.root, &[]);
    assert!(v.status.success(), "{}", common::stderr(&v));

    // --patch-pool 2: CLS + one token, the mean of the 4 patches.
    let s = extract_images(
        &f,
        "p",
        &["--dtype", "f32", "--layers", "all", "--patch-pool", "2"],
    );
    assert_eq!(s["tokens"], 12 * 2);
    let cache = Cache::open(&f.root.join("p")).unwrap();
    assert_eq!(cache.manifest().image.as_ref().unwrap().patch_pool, 2);
    assert_ne!(cache.manifest().settings_hash, m.settings_hash);
    for pos in 0..12u64 {
        let (meta, layers) = cache.example(pos, &[2]).unwrap();
        let (_, want) = pooled_ref.iter().find(|(id, _)| id == &meta.id).unwrap();
        let d = want[2].len() / TINY_TOKENS;
        let mut expect = want[2][..d].to_vec();
        for j in 0..d {
            expect.push((1..5).map(|t| want[2][t * d + j]).sum::<f32>() / 4.0);
        }
        common::assert_close(&layers[0], &expect, 1e-5, 1e-5, &meta.id);
    }
}

/// `inspect-onnx` finds the ViT's per-layer tensors (the embedding output
/// and each layer's closing residual Add), in the order of backbone.json.
#[test]
fn inspect_onnx_finds_the_vit_layers() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_vit_backbone(tmp.path());
    let desc = ImageBackboneDesc::read(&tmp.path().join("backbone.json")).unwrap();
    let model = sherl::extract::onnx::inspect::read_model(&tmp.path().join("model.onnx")).unwrap();
    let i = sherl::extract::onnx::inspect::interface(&model);
    let found: Vec<(String, usize)> = i
        .candidates
        .iter()
        .map(|c| (c.tensor.clone(), c.suggested_index))
        .collect();
    let want: Vec<(String, usize)> = desc.hidden_states.iter().cloned().zip(0..).collect();
    assert_eq!(found, want);
}

fn fit_images(f: &ImageFixture, args: &[&str]) -> std::process::Output {
    let mut a = vec![
        "run",
        "--cache",
        "c",
        "--backbone",
        f.backbone.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    if !args.contains(&"--out") {
        a.extend(["--out", "runs"]);
    }
    a.extend_from_slice(args);
    common::run("sherl-fit", &a, &f.root, &[])
}

fn fit_ok(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
    serde_json::from_str(common::stdout(o).lines().last().unwrap()).unwrap()
}

/// `sherl-fit` on an image cache: linear-probe, late-layer, unipt and sherl
/// train (the ViT blocks from the ONNX initializers) and report metrics; a
/// seeded run is deterministic (full-ft: `full_ft_trains_every_vit_block`).
#[test]
fn four_methods_train_on_an_image_cache() {
    let f = image_fixture(10);
    extract_images(&f, "c", &["--dtype", "f32", "--layers", "all"]);
    // Without --chunk-size an image cache gets the image default (text's 32
    // would make chunks of thousands of tokens).
    let chunk_size = Cache::open(&f.root.join("c"))
        .unwrap()
        .manifest()
        .settings
        .chunk_size;
    assert_eq!(chunk_size, sherl::extract::plan::IMAGE_CHUNK_SIZE);
    assert_ne!(
        chunk_size,
        sherl::cache::manifest::ExtractSettings::default().chunk_size
    );
    let mut params = Vec::new();
    for method in ["linear-probe", "late-layer", "unipt", "sherl"] {
        let s = fit_ok(&fit_images(
            &f,
            &["--method", method, "--epochs", "2", "--batch-size", "4"],
        ));
        assert_eq!(s["method"], method);
        let acc = s["valid_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{method}: {acc}");
        assert!(s["test_accuracy"].as_f64().is_some(), "{method}");
        assert!(s["trainable_params"].as_u64().unwrap() > 0, "{method}");
        params.push(s["trainable_params"].as_u64().unwrap());
    }
    // the run records the recipe (predict applies it again)
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.root
                .join(
                    fit_ok(&fit_images(
                        &f,
                        &["--method", "sherl", "--epochs", "2", "--batch-size", "4"],
                    ))["run_dir"]
                        .as_str()
                        .unwrap(),
                )
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let desc = ImageBackboneDesc::read(&f.backbone.join("backbone.json")).unwrap();
    assert_eq!(
        cfg["cache"]["image"]["preprocess_sha256"],
        serde_json::json!(desc.preprocess.digest())
    );
    // the late layer (a ViT block of width 8) trains more than the probe
    assert!(params[1] > params[0], "{params:?}");

    // a seeded run is deterministic: the same weights from a second --out
    let a = fit_ok(&fit_images(
        &f,
        &[
            "--method",
            "sherl",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--seed",
            "3",
        ],
    ));
    let b = fit_ok(&fit_images(
        &f,
        &[
            "--method",
            "sherl",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--seed",
            "3",
            "--out",
            "runs2",
        ],
    ));
    let w = |s: &serde_json::Value| {
        std::fs::read(
            f.root
                .join(s["run_dir"].as_str().unwrap())
                .join("weights.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(w(&a), w(&b));
    assert_eq!(a["valid_accuracy"], b["valid_accuracy"]);
}

/// `sherl-fit predict` on new images (a folder of class folders): JSONL
/// with each image's id, path, label, probabilities and true label; the
/// accuracy over the labelled ones; a second predict writes the same bytes.
#[test]
fn predict_labels_new_images() {
    let f = image_fixture(8);
    extract_images(&f, "c", &["--dtype", "f32"]);
    let s = fit_ok(&fit_images(
        &f,
        &["--method", "sherl", "--epochs", "2", "--batch-size", "4"],
    ));
    let new = f.root.join("new");
    write_image_folders(&new, 3, 99);
    let run = s["run_dir"].as_str().unwrap();
    let o = common::run(
        "sherl-fit",
        &[
            "predict",
            "--run",
            run,
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            new.to_str().unwrap(),
            "--out",
            "pred.jsonl",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    let p = fit_ok(&o);
    assert_eq!(p["examples"], 6);
    assert_eq!(p["labelled"], 6);
    assert!(p["accuracy"].as_f64().is_some());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(f.root.join("pred.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let label = l["label"].as_str().unwrap();
        assert!(label == "a" || label == "b", "{l}");
        let sum: f64 = l["probabilities"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-5, "{l}");
        assert!(l["image"].as_str().unwrap().ends_with(".png"));
        assert_eq!(l["true_label"], l["id"].as_str().unwrap()[..1]);
    }
    let o2 = common::run(
        "sherl-fit",
        &[
            "predict",
            "--run",
            run,
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            new.to_str().unwrap(),
            "--out",
            "pred2.jsonl",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    fit_ok(&o2);
    assert_eq!(
        std::fs::read(f.root.join("pred.jsonl")).unwrap(),
        std::fs::read(f.root.join("pred2.jsonl")).unwrap()
    );
}

/// `--pool patch-mean` on an image cache leaves the CLS token out of the
/// mean: recorded in the run's config, and a seeded linear probe ends with
/// other weights than the same run with `--pool mean` (their features
/// differ only by the CLS token). On a text cache it is refused, naming the
/// setting.
#[test]
fn patch_mean_pool_on_images_refused_on_text() {
    let f = image_fixture(6);
    extract_images(&f, "c", &["--dtype", "f32"]);
    let run = |pool: &str, out: &str| {
        fit_ok(&fit_images(
            &f,
            &[
                "--method",
                "linear-probe",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--seed",
                "1",
                "--pool",
                pool,
                "--out",
                out,
            ],
        ))
    };
    let dir = |s: &serde_json::Value| f.root.join(s["run_dir"].as_str().unwrap());
    let patch = run("patch-mean", "runs_patch");
    let mean = run("mean", "runs_mean");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&patch).join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["config"]["pool"], "patch-mean", "{cfg}");
    assert_ne!(
        std::fs::read(dir(&patch).join("weights.safetensors")).unwrap(),
        std::fs::read(dir(&mean).join("weights.safetensors")).unwrap()
    );

    let t = crate::fit::fit_fixture(20, 3, &[]);
    let o = crate::fit::fit(&t.root, &["--pool", "patch-mean", "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("--pool patch-mean") && err.contains("holds text"),
        "{err}"
    );
}

/// Image tables under `predict`: `--image-column` picks the column; without
/// it the column the run's cache was extracted from (`--image-column file`
/// there) is used; a table without that column is an error naming it.
#[test]
fn predict_image_column_flag_and_default() {
    let f = image_fixture(6);
    // The training images as a table whose column `file` names them.
    let mut csv = String::from("file,label\n");
    for class in ["a", "b"] {
        for k in 0..6 {
            csv.push_str(&format!("imgs/{class}/{k:02}.png,{class}\n"));
        }
    }
    std::fs::write(f.root.join("train.csv"), &csv).unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            "train.csv",
            "--image-column",
            "file",
            "--split",
            "train=0.5,valid=0.25,test=0.25",
            "--late-layers",
            "1",
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--out",
            "c",
        ],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = fit_ok(&fit_images(
        &f,
        &[
            "--method",
            "linear-probe",
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ],
    ));
    let run = s["run_dir"].as_str().unwrap().to_owned();
    let predict = |data: &str, extra: &[&str]| {
        let mut a = vec![
            "predict",
            "--run",
            &run,
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            data,
            "--device",
            "cpu",
        ];
        a.extend_from_slice(extra);
        common::run("sherl-fit", &a, &f.root, &[])
    };
    // the run's column by default
    let p = fit_ok(&predict("train.csv", &["--out", "p1.jsonl"]));
    assert_eq!(p["examples"], 12);
    assert_eq!(p["labelled"], 12);
    // another column named by the flag
    std::fs::write(
        f.root.join("new.csv"),
        csv.replace("file,label", "path,label"),
    )
    .unwrap();
    let p = fit_ok(&predict(
        "new.csv",
        &["--image-column", "path", "--out", "p2.jsonl"],
    ));
    assert_eq!(p["examples"], 12);
    // the same images, the same probabilities (ids differ: file stem)
    let probs = |name: &str| -> Vec<(String, String)> {
        std::fs::read_to_string(f.root.join(name))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["image"].to_string(), v["probabilities"].to_string())
            })
            .collect()
    };
    assert_eq!(probs("p1.jsonl"), probs("p2.jsonl"));
    // a missing column is named, with the flag to use
    let o = predict("new.csv", &["--out", "p3.jsonl"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("new.csv") && err.contains("file") && err.contains("--image-column"),
        "{err}"
    );
    let o = predict("new.csv", &["--image-column", "nope", "--out", "p4.jsonl"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("nope"),
        "{}",
        common::stderr(&o)
    );
}

/// `full-ft` on an image cache: every ViT block trained from the cached
/// hidden_states.0. Before any step the model's pooled features are ONNX
/// Runtime's last hidden state, mean-pooled (within 1e-4); the training loss
/// falls; two seeded runs write the same weights; a cache without layer 0
/// is refused, naming it and the flag that stores it.
#[test]
fn full_ft_trains_every_vit_block() {
    use candle_core::Device;
    use sherl::backbone::BackboneDir;
    use sherl::batching::{Encoded, PaddedBatch};
    use sherl::fit::batcher::Batch;
    use sherl::fit::checks::{check_backbone, model_spec};
    use sherl::fit::config::FitConfig;
    use sherl::fit::model::{Method, Model};

    let f = image_fixture(10);
    extract_images(&f, "c", &["--dtype", "f32", "--layers", "all"]);

    // Step 0: the model is the backbone.
    let cache = Cache::open(&f.root.join("c")).unwrap();
    let (arch, ckpt) = check_backbone(&cache, &BackboneDir::open(&f.backbone).unwrap()).unwrap();
    let cfg = FitConfig {
        method: Method::FullFt.defaults(),
        ..FitConfig::default()
    };
    let spec = model_spec(&cfg, &cache, &arch).unwrap();
    let dev = Device::Cpu;
    let layers = cache.manifest().settings.layers.clone();
    let model = Model::build(spec, &layers, &arch, &ckpt, 0, &dev).unwrap();
    assert_eq!(model.inputs(), &[0]);
    let images = ["a/00.png", "a/03.png", "b/07.png"];
    let refs: Vec<Vec<Vec<f32>>> = images
        .iter()
        .map(|p| reference(&f.backbone, &f.data.join(p)))
        .collect();
    let hidden = arch.hidden();
    let h0: Vec<f32> = refs.iter().flat_map(|r| r[0].clone()).collect();
    let enc = Encoded {
        ids: vec![0; TINY_TOKENS],
        type_ids: vec![0; TINY_TOKENS],
    };
    let pb = PaddedBatch::new(&[&enc, &enc, &enc], None);
    let ids = images.iter().map(|s| s.to_string()).collect();
    let batch = Batch::from_padded(&pb, vec![h0], hidden, ids, &dev).unwrap();
    let pooled: Vec<f32> = model
        .inference()
        .pooled(&batch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = refs
        .iter()
        .flat_map(|r| {
            let last = &r[2];
            (0..hidden)
                .map(|j| {
                    (0..TINY_TOKENS).map(|t| last[t * hidden + j]).sum::<f32>() / TINY_TOKENS as f32
                })
                .collect::<Vec<f32>>()
        })
        .collect();
    common::assert_close(&pooled, &want, 1e-4, 1e-4, "pooled hidden_states.2");

    // Training: the loss falls; a seeded run is reproducible.
    let train = |out: &str| {
        fit_ok(&fit_images(
            &f,
            &[
                "--method",
                "full-ft",
                "--epochs",
                "4",
                "--batch-size",
                "4",
                "--lr",
                "0.003",
                "--lr-pretrained",
                "0.001",
                "--seed",
                "3",
                "--out",
                out,
            ],
        ))
    };
    let a = train("runs_a");
    let b = train("runs_b");
    assert_eq!(a["method"], "full-ft");
    let dir = |s: &serde_json::Value| f.root.join(s["run_dir"].as_str().unwrap());
    let losses: Vec<f64> = std::fs::read_to_string(dir(&a).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "train loss {losses:?}");
    // Every block is trained: more trainable parameters than the late layer.
    let late = fit_ok(&fit_images(
        &f,
        &["--method", "late-layer", "--epochs", "1", "--out", "runs_l"],
    ));
    assert!(
        a["trainable_params"].as_u64().unwrap() > late["trainable_params"].as_u64().unwrap(),
        "{a} {late}"
    );
    assert_eq!(
        std::fs::read(dir(&a).join("weights.safetensors")).unwrap(),
        std::fs::read(dir(&b).join("weights.safetensors")).unwrap()
    );
    assert_eq!(a["valid_accuracy"], b["valid_accuracy"]);

    // A cache without hidden_states.0 is refused with the flag to use.
    extract_images(&f, "c1", &["--dtype", "f32", "--layers", "1,2"]);
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--cache",
            "c1",
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--device",
            "cpu",
            "--method",
            "full-ft",
            "--out",
            "runs_c1",
        ],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("hidden_states.0") && err.contains("--layers all"),
        "{err}"
    );
}

/// `sherl-cache export` of an image cache: every token of every layer, as
/// cached, and no token-id files (image examples have no token ids).
#[test]
fn export_of_an_image_cache() {
    let f = image_fixture(4);
    extract_images(&f, "c", &["--dtype", "f16", "--layers", "all"]);
    let o = common::run(
        "sherl-cache",
        &["export", "c", "--layers", "2", "--out", "x"],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let x = f.root.join("x");
    assert!(x.join("hidden_states.2.npy").exists());
    assert!(!x.join("input_ids.npy").exists());
    assert!(!x.join("token_type_ids.npy").exists());
    let bytes = std::fs::read(x.join("hidden_states.2.npy")).unwrap();
    let header = String::from_utf8_lossy(&bytes[..128]).into_owned();
    assert!(
        header.contains(&format!("'shape': ({}, 8)", 8 * TINY_TOKENS)),
        "{header}"
    );
}

/// `predict` on IDX files of a run whose cache was extracted with
/// `--class-names`: the true labels get the same names, so the accuracy is
/// computed over every image (before, they were the class numbers, none of
/// the run's labels).
#[test]
fn predict_on_idx_uses_the_recorded_class_names() {
    let f = image_fixture(2);
    let n = 12u32;
    let (rows, cols) = (6u32, 5u32);
    let mut images = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        images.extend(d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(n.to_be_bytes());
    for i in 0..n {
        images.extend((0..rows * cols).map(|k| ((i * 37 + k * (1 + i % 2) * 11) % 256) as u8));
        labels.push((i % 2) as u8);
    }
    std::fs::write(f.root.join("x-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(f.root.join("x-labels-idx1-ubyte"), &labels).unwrap();
    std::fs::write(f.root.join("classes.txt"), "shirt\nshoe\n").unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            "x-images-idx3-ubyte",
            "--class-names",
            "classes.txt",
            "--split",
            "train=0.5,valid=0.25,test=0.25",
            "--late-layers",
            "1",
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--out",
            "c",
        ],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = fit_ok(&fit_images(
        &f,
        &[
            "--method",
            "linear-probe",
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ],
    ));
    let o = common::run(
        "sherl-fit",
        &[
            "predict",
            "--run",
            s["run_dir"].as_str().unwrap(),
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            "x-images-idx3-ubyte",
            "--out",
            "p.jsonl",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    let p = fit_ok(&o);
    assert_eq!(p["examples"], 12);
    assert_eq!(p["labelled"], 12, "{p}");
    assert_eq!(p["unknown_labels"], 0, "{p}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(f.root.join("p.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["true_label"], "shirt", "{first}");
}

/// The ViT checkpoint beside the model is rebuilt from the ONNX graph and
/// compared on the first run, which writes a stamp of the two hashes; later
/// runs trust the stamp only while both files still hash to it: an edited
/// checkpoint is refused even with a stamp present, and a stamp that does
/// not parse is replaced by a fresh one.
#[test]
fn vit_checkpoint_stamp_skips_the_rebuild_only_while_the_hashes_match() {
    let f = image_fixture(2);
    let stamp = f.backbone.join(sherl::extract::image::STAMP_FILE);
    let ckpt = f.backbone.join("model.safetensors");
    let first = extract_images(&f, "c1", &[]);
    assert!(stamp.exists(), "the first run writes the stamp");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let s = read(&stamp);
    assert_eq!(
        s["safetensors_sha256"],
        Cache::open(&f.root.join("c1"))
            .unwrap()
            .manifest()
            .backbone
            .safetensors
            .as_ref()
            .unwrap()
            .sha256
    );
    assert_eq!(s["sizes"]["layers"], 2);

    // Trusted: the same checkpoint recorded, nothing rewritten.
    let before = std::fs::metadata(&ckpt).unwrap().modified().unwrap();
    let second = extract_images(&f, "c2", &[]);
    assert_eq!(first["examples"], second["examples"]);
    assert_eq!(
        std::fs::metadata(&ckpt).unwrap().modified().unwrap(),
        before
    );
    let m1 = Cache::open(&f.root.join("c1")).unwrap();
    let m2 = Cache::open(&f.root.join("c2")).unwrap();
    assert_eq!(
        m1.manifest().backbone.safetensors,
        m2.manifest().backbone.safetensors
    );
    assert_eq!(m1.manifest().backbone.config, m2.manifest().backbone.config);

    // A stamp for another ONNX file: the full check runs and stamps again.
    let mut other = s.clone();
    other["onnx_sha256"] = serde_json::json!("0".repeat(64));
    std::fs::write(&stamp, serde_json::to_vec(&other).unwrap()).unwrap();
    extract_images(&f, "c5", &[]);
    assert_eq!(read(&stamp), s);

    // A garbled stamp: the full check runs and writes a good one again.
    std::fs::write(&stamp, b"{not json").unwrap();
    extract_images(&f, "c3", &[]);
    assert_eq!(read(&stamp), s);

    // An edited checkpoint is refused although the stamp is there.
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&ckpt, &bytes).unwrap();
    let o = run_extract(&f, "c4", &["--device", "cpu"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("model.safetensors") && err.contains("does not hold the ViT weights"),
        "{err}"
    );
}

/// The image route honours `--device` as text does: `cuda` on a CPU-only
/// ONNX Runtime exits 2 naming the cause (it used to run on the CPU
/// silently); `auto` falls back to the CPU with one line saying why, and the
/// summary says `cpu`.
#[test]
fn image_extraction_honours_the_device() {
    let f = image_fixture(4);
    let cpu_lib = common::runtime().library().to_str().unwrap().to_owned();
    let env = [("ORT_DYLIB_PATH", cpu_lib.as_str())];
    let run = |device: &str, out: &str| run_extract(&f, out, &["--device", device], &env);
    let o = run("cuda", "c-cuda");
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("no CUDA execution provider"),
        "{}",
        common::stderr(&o)
    );
    let o = run("auto", "c-auto");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let notes = common::stderr(&o);
    assert_eq!(
        notes
            .lines()
            .filter(|l| l.contains("running on CPU"))
            .count(),
        1,
        "{notes}"
    );
    let s: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(s["device"], "cpu");
}
