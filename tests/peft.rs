//! `sherl-fit --method lora | adapter | lst` (issue 13): LoRA and adapters
//! start as the frozen backbone (checked against ONNX Runtime's last hidden
//! state), LST's inputs, gates and shapes, each method's loss falls,
//! seeded runs are reproducible, a trained run predicts, and the
//! refusals.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::json;
use sherl::backbone::BackboneDir;
use sherl::batching::{Encoded, PaddedBatch};
use sherl::cache::Cache;
use sherl::fit::batcher::Batch;
use sherl::fit::checks::{check_backbone, model_spec};
use sherl::fit::config::FitConfig;
use sherl::fit::model::Model;
use sherl::fit::nn::adapter::Placement;
use sherl::fit::nn::lora::LoraTarget;

use crate::common;
use crate::fit::{fit, fit_fixture, summary};

/// The tiny backbone's layers (tests/common/tiny.rs).
const N: usize = 3;

/// The first `count` cached examples as one padded batch: token ids, and
/// the hidden states `layers` (cache positions) as the model reads them;
/// also each example's cached `hidden_states.N` (the backbone's last)
/// mean over its tokens.
pub fn batch(cache: &Cache, count: u64, layers: &[usize]) -> (Batch, Vec<f32>) {
    let hidden = cache.manifest().backbone.hidden;
    let last = cache
        .layer_position(cache.manifest().backbone.num_layers)
        .expect("the fixture caches every layer");
    let mut encs = Vec::new();
    let mut rows: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut want = Vec::new();
    for p in 0..count {
        let mut pos = layers.to_vec();
        pos.push(last);
        let (meta, l) = cache.example(p, &pos).unwrap();
        let n = meta.len();
        let top = l.last().unwrap();
        for j in 0..hidden {
            want.push((0..n).map(|t| top[t * hidden + j]).sum::<f32>() / n as f32);
        }
        rows.push(l[..layers.len()].to_vec());
        encs.push(Encoded {
            ids: meta.ids.clone(),
            type_ids: meta.type_ids.iter().map(|&t| u32::from(t)).collect(),
        });
    }
    let refs: Vec<&Encoded> = encs.iter().collect();
    let pb = PaddedBatch::new(&refs, None);
    let s = pb.ids.ncols();
    // each requested layer as [B, S, hidden], zero at padding
    let padded: Vec<Vec<f32>> = (0..layers.len())
        .map(|li| {
            let mut v = vec![0f32; count as usize * s * hidden];
            for (b, r) in rows.iter().enumerate() {
                v[b * s * hidden..b * s * hidden + r[li].len()].copy_from_slice(&r[li]);
            }
            v
        })
        .collect();
    let ids = (0..count).map(|i| i.to_string()).collect();
    let b = Batch::from_padded(&pb, padded, hidden, ids, &Device::Cpu).unwrap();
    (b, want)
}

/// Settings from their JSON (as in a `--config` file).
fn settings(v: serde_json::Value) -> FitConfig {
    serde_json::from_value(v).unwrap()
}

pub fn open(root: &Path) -> (Cache, sherl::fit::model::Arch, sherl::backbone::Checkpoint) {
    let cache = Cache::open(&root.join("cache")).unwrap();
    let (arch, ckpt) =
        check_backbone(&cache, &BackboneDir::open(root.join("backbone")).unwrap()).unwrap();
    (cache, arch, ckpt)
}

pub fn build(
    cache: &Cache,
    arch: &sherl::fit::model::Arch,
    ckpt: &sherl::backbone::Checkpoint,
    cfg: &FitConfig,
) -> sherl::Result<Model> {
    let spec = model_spec(cfg, cache, arch)?;
    let layers = cache.manifest().settings.layers.clone();
    Model::build(spec, &layers, arch, ckpt, cfg.seed, &Device::Cpu)
}

/// Before any step, a LoRA model (default targets, and every target) and
/// an adapter model (both placements, both non-linearities) compute the
/// frozen backbone: their pooled features are ONNX Runtime's
/// hidden_states.N (f32 cache), mean-pooled, within 1e-4; their trained
/// parameters are the updates / adapters and the head only, counted by
/// hand.
#[test]
fn lora_and_adapter_start_as_the_frozen_backbone() {
    let f = fit_fixture(30, 3, &["--layers", "all", "--dtype", "f32"]);
    let (cache, arch, ckpt) = open(&f.root);
    let (b, want) = batch(&cache, 6, &[]);
    let (d, ffn, classes) = (32usize, 64usize, 3usize);
    let head = d * classes + classes;
    let all = vec![
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::FfnIn,
        LoraTarget::FfnOut,
    ];
    let cases: Vec<(FitConfig, usize)> = vec![
        (
            // with dropout: composed updates
            settings(json!({"method": "lora", "lora_dropout": 0.1})),
            // rank 8 on q and v: A [8, 32] and B [32, 8] each
            N * 2 * (8 * d + d * 8) + head,
        ),
        (
            settings(json!({"method": "lora", "lora_rank": 2, "lora_targets": all, "seed": 7})),
            N * 2 * (4 * (d + d) + (d + ffn) + (ffn + d)) + head,
        ),
        (
            // without dropout the updates merge into the weights (fused op)
            settings(json!({"method": "lora", "lora_dropout": 0.0,
                "lora_targets": [LoraTarget::V, LoraTarget::FfnOut]})),
            N * (8 * (d + d) + 8 * (ffn + d)) + head,
        ),
        (
            settings(json!({"method": "adapter"})),
            // width 32 / 4 = 8: down 8 x 32 + 8, up 32 x 8 + 32; two per layer
            N * 2 * (8 * d + 8 + d * 8 + d) + head,
        ),
        (
            settings(
                json!({"method": "adapter", "adapter_placement": Placement::Pfeiffer,
                "adapter_activation": sherl::fit::nn::adapter::AdapterActivation::Relu,
                "side_dim": 5}),
            ),
            N * (5 * d + 5 + d * 5 + d) + head,
        ),
    ];
    for (cfg, params) in cases {
        let what = format!("{cfg:?}");
        let model = build(&cache, &arch, &ckpt, &cfg).unwrap();
        assert!(model.inputs().is_empty(), "{what}: reads token ids only");
        assert_eq!(model.params.trainable_count(), params, "{what}");
        // the backbone is loaded (frozen): embeddings and every layer
        assert!(model.params.frozen_count() > 0);
        let pooled: Vec<f32> = model
            .inference()
            .pooled(&b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        common::assert_close(&pooled, &want, 1e-4, 1e-4, &what);
    }
}

/// LST reads hidden_states.0..=N from the cache (no token ids); its N
/// gates start at 0 (mu = 1/2); its logits are [B, classes]; the trained
/// parameters are the side network and the head, counted by hand; its
/// pooled features are not the backbone's (the side network is fresh);
/// a cache without every layer is refused naming the missing one.
#[test]
fn lst_reads_every_cached_layer_with_gates_at_one_half() {
    let f = fit_fixture(30, 4, &["--layers", "all", "--dtype", "f32"]);
    let (cache, arch, ckpt) = open(&f.root);
    let cfg = settings(json!({"method": "lst"}));
    let model = build(&cache, &arch, &ckpt, &cfg).unwrap();
    assert_eq!(model.inputs(), &[0, 1, 2, 3]);
    let snap = model.params.snapshot().unwrap();
    let gate: Vec<f32> = snap["lst.gate"].to_vec1().unwrap();
    assert_eq!(gate, vec![0.0; N]);
    // side width 32 / 4 = 8, FFN 64 / 4 = 16, 4 heads of 2
    let (dm, d, fs, classes) = (32usize, 8usize, 16usize, 3usize);
    let side_layer = 4 * d * d + 4 * d + 2 * d * fs + fs + d + 4 * d;
    let want = (N + 1) * (dm * d + d) + N + N * side_layer + (d * dm + dm) + dm * classes + classes;
    assert_eq!(model.params.trainable_count(), want);
    assert!(snap.contains_key("lst.layer.2.attention.self.query.weight"));
    assert_eq!(
        snap["lst.layer.0.intermediate.dense.weight"].dims(),
        &[fs, d]
    );
    let positions: Vec<usize> = (0..=N).map(|i| cache.layer_position(i).unwrap()).collect();
    let (b, backbone) = batch(&cache, 5, &positions);
    let out = model.inference().forward(&b).unwrap();
    assert_eq!(out.logits.dims(), &[5, classes]);
    let pooled: Vec<f32> = model
        .inference()
        .pooled(&b)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(pooled.len(), backbone.len());
    assert!(pooled.iter().all(|v| v.is_finite()));
    assert!(
        pooled
            .iter()
            .zip(&backbone)
            .any(|(a, b)| (a - b).abs() > 1e-2),
        "the side network's output is its own"
    );

    // a cache without hidden_states.3: refused, naming it
    let g = fit_fixture(20, 5, &[]);
    let (cache, arch, ckpt) = open(&g.root);
    let e = build(&cache, &arch, &ckpt, &cfg).unwrap_err().to_string();
    assert!(e.contains("hidden_states.3") && e.contains("lst"), "{e}");
    let o = fit(&g.root, &["--method", "lst", "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("hidden_states.3"),
        "{}",
        common::stderr(&o)
    );
}

pub fn losses(root: &Path, s: &serde_json::Value) -> Vec<f64> {
    std::fs::read_to_string(
        root.join(s["run_dir"].as_str().unwrap())
            .join("metrics.jsonl"),
    )
    .unwrap()
    .lines()
    .map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["train_loss"].as_f64().unwrap()
    })
    .collect()
}

/// Each new method (and the non-default variants) trains from the same
/// cache: the training loss falls over 4 epochs; the summary reports the
/// method, fewer trainable parameters than full fine-tuning, a peak
/// memory and seconds per epoch.
#[test]
fn new_methods_train_and_loss_falls() {
    let f = fit_fixture(90, 9, &["--layers", "all"]);
    let full = summary(&fit(&f.root, &["--method", "full-ft", "--epochs", "1"]));
    let full_params = full["trainable_params"].as_u64().unwrap();
    let runs: [&[&str]; 6] = [
        &["--method", "lora", "--lora-dropout", "0.1"],
        &["--method", "lora"],
        &[
            "--method",
            "lora",
            "--lora-targets",
            "q,k,v,o,ffn-in,ffn-out",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
        ],
        &["--method", "adapter"],
        &[
            "--method",
            "adapter",
            "--adapter-placement",
            "pfeiffer",
            "--adapter-activation",
            "relu",
        ],
        &["--method", "lst"],
    ];
    for args in runs {
        let mut a = args.to_vec();
        a.extend(["--epochs", "4", "--lr", "0.003"]);
        let s = summary(&fit(&f.root, &a));
        assert_eq!(s["method"], args[1]);
        let l = losses(&f.root, &s);
        assert_eq!(l.len(), 4);
        assert!(l[3] < l[0], "{args:?}: train loss {l:?}");
        let p = s["trainable_params"].as_u64().unwrap();
        assert!(p > 0 && p < full_params, "{args:?}: {p} vs {full_params}");
        assert!(s["peak_rss_bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(s["seconds_per_epoch"].as_f64().unwrap() > 0.0, "{s}");
    }
}

/// Same seed: identical metrics (timing aside) and weights, with one
/// thread and two (LoRA's and the adapters' dropout included); another
/// seed differs.
#[test]
fn new_methods_are_deterministic_per_seed() {
    let f = fit_fixture(60, 6, &["--layers", "all"]);
    let strip = |p: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["seconds", "eval_seconds", "tokens_per_second"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    let dir = |s: &serde_json::Value| f.root.join(s["run_dir"].as_str().unwrap());
    // lora with dropout runs composed, without it merged into the fused op
    for (method, lora_dropout) in [("lora", "0.1"), ("lora", "0"), ("adapter", ""), ("lst", "")] {
        let run = |out: &str, threads: &str, seed: &str| {
            let mut a = vec![
                "--method",
                method,
                "--epochs",
                "2",
                "--out",
                out,
                "--threads",
                threads,
                "--seed",
                seed,
            ];
            if !lora_dropout.is_empty() {
                a.extend(["--lora-dropout", lora_dropout]);
            }
            summary(&fit(&f.root, &a))
        };
        let method = format!("{method}{lora_dropout}");
        let method = method.as_str();
        let a = run(&format!("{method}-a"), "1", "0");
        let b = run(&format!("{method}-b"), "2", "0");
        assert_eq!(a["run_id"], b["run_id"]);
        let (ma, mb) = (
            strip(dir(&a).join("metrics.jsonl")),
            strip(dir(&b).join("metrics.jsonl")),
        );
        assert_eq!(ma.len(), 2);
        assert_eq!(ma, mb, "{method}");
        let wa = std::fs::read(dir(&a).join("weights.safetensors")).unwrap();
        let wb = std::fs::read(dir(&b).join("weights.safetensors")).unwrap();
        assert_eq!(wa, wb, "{method}");
        let c = run(&format!("{method}-c"), "1", "1");
        assert_ne!(strip(dir(&c).join("metrics.jsonl")), ma, "{method}");
    }
}

/// A trained run of each method predicts every row of a text file (LST's
/// hidden states through ONNX Runtime, LoRA and adapters from the token
/// ids), with an accuracy over the labelled rows.
#[test]
fn new_methods_predict() {
    let f = fit_fixture(60, 11, &["--layers", "all"]);
    for method in ["lora", "adapter", "lst"] {
        let s = summary(&fit(&f.root, &["--method", method, "--epochs", "2"]));
        let run = f.root.join(s["run_dir"].as_str().unwrap());
        let out = format!("pred-{method}.jsonl");
        let o = common::run(
            "sherl-fit",
            &[
                "predict",
                "--run",
                run.to_str().unwrap(),
                "--backbone",
                "backbone",
                "--data",
                "data.csv",
                "--out",
                &out,
                "--device",
                "cpu",
            ],
            &f.root,
            &[],
        );
        assert!(o.status.success(), "{method}: {}", common::stderr(&o));
        let p: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
        assert_eq!(p["examples"], 60, "{method}");
        let lines = std::fs::read_to_string(f.root.join(&out)).unwrap();
        assert_eq!(lines.lines().count(), 60, "{method}");
        let acc = p["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{method}: {acc}");
    }
}

/// Bad settings are refused before anything is written, with a message
/// naming the flag; lora and adapter on an image cache are refused (not
/// implemented there), lst trains on one.
#[test]
fn new_methods_refuse_clearly() {
    let f = fit_fixture(20, 12, &[]);
    let refused = |args: &[&str], needle: &str| {
        let mut a = args.to_vec();
        a.extend(["--epochs", "1", "--out", "refused"]);
        let o = fit(&f.root, &a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", common::stderr(&o));
        assert!(
            common::stderr(&o).contains(needle),
            "{args:?}: {}",
            common::stderr(&o)
        );
        assert!(!f.root.join("refused").exists(), "{args:?}");
    };
    refused(&["--method", "lora", "--lora-rank", "0"], "--lora-rank");
    refused(&["--method", "lora", "--lora-alpha=-1"], "--lora-alpha");
    refused(
        &["--method", "lora", "--lora-dropout", "1"],
        "--lora-dropout",
    );
    refused(&["--method", "lora", "--lora-targets", "q,ffn"], "ffn");
    refused(
        &["--method", "sherl", "--lora-rank", "4"],
        "--method lora only",
    );
    refused(
        &["--method", "lora", "--adapter-placement", "pfeiffer"],
        "--method adapter only",
    );
    // a config file spelling the targets as one string: accepted; a bad name: refused
    std::fs::write(
        f.root.join("ok.json"),
        r#"{"method": "lora", "lora_targets": "q,ffn-out"}"#,
    )
    .unwrap();
    std::fs::write(
        f.root.join("bad.json"),
        r#"{"method": "lora", "lora_targets": ["q", "query"]}"#,
    )
    .unwrap();
    refused(&["--config", "bad.json"], "query");
    let s = summary(&fit(&f.root, &["--config", "ok.json", "--epochs", "1"]));
    assert_eq!(s["method"], "lora");

    let img = crate::image_cache::image_fixture(10);
    crate::image_cache::extract_images(&img, "c", &["--dtype", "f32", "--layers", "all"]);
    let fit_img = |args: &[&str]| {
        let mut a = vec![
            "run",
            "--cache",
            "c",
            "--backbone",
            img.backbone.to_str().unwrap(),
            "--device",
            "cpu",
            "--out",
            "runs",
            "--epochs",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "0.003",
        ];
        a.extend_from_slice(args);
        common::run("sherl-fit", &a, &img.root, &[])
    };
    for m in ["lora", "adapter"] {
        let o = fit_img(&["--method", m]);
        assert_eq!(o.status.code(), Some(2), "{m}: {}", common::stderr(&o));
        assert!(
            common::stderr(&o).contains("image cache"),
            "{m}: {}",
            common::stderr(&o)
        );
    }
    let o = fit_img(&["--method", "lst", "--lst-init", "prune"]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("image cache"),
        "{}",
        common::stderr(&o)
    );
    let s = summary(&fit_img(&["--method", "lst"]));
    assert_eq!(s["method"], "lst");
    let l = losses(&img.root, &s);
    assert!(l[3] < l[0], "lst on images: {l:?}");
}

/// A sweep grid runs the new methods with their settings (a target set as
/// one string; an axis over target sets as a list of strings), each run's
/// config.json recording them, the trainable counts following them.
#[test]
fn new_methods_sweep_with_their_settings() {
    let f = fit_fixture(40, 13, &["--layers", "all"]);
    std::fs::write(
        f.root.join("grid.json"),
        r#"{"epochs": 1, "runs": [
            {"method": "lora", "lora_targets": "q,v"},
            {"method": "lora", "lora_targets": "q,k,v,o,ffn-in,ffn-out", "lora_rank": 2},
            {"method": "adapter", "adapter_placement": "pfeiffer"},
            {"method": "adapter"},
            {"method": "lst"}
        ]}"#,
    )
    .unwrap();
    let o = common::run(
        "sherl-fit",
        &[
            "sweep",
            "--cache",
            "cache",
            "--backbone",
            "backbone",
            "--grid",
            "grid.json",
            "--out",
            "runs",
        ],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s: Vec<serde_json::Value> = common::stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(s.len(), 5);
    let params = |i: usize| s[i]["trainable_params"].as_u64().unwrap();
    let (d, ffn, head) = (32u64, 64u64, 32 * 3 + 3);
    assert_eq!(params(0), 3 * 2 * (8 * d + d * 8) + head);
    assert_eq!(
        params(1),
        3 * 2 * (4 * (d + d) + (d + ffn) + (ffn + d)) + head
    );
    assert_eq!(params(2), 3 * (8 * d + 8 + d * 8 + d) + head);
    assert_eq!(params(3), 3 * 2 * (8 * d + 8 + d * 8 + d) + head);
    assert_eq!(s[4]["method"], "lst");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.root
                .join(s[1]["run_dir"].as_str().unwrap())
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["config"]["lora_rank"], 2);
    assert_eq!(
        cfg["config"]["lora_targets"],
        serde_json::json!(["q", "k", "v", "o", "ffn-in", "ffn-out"])
    );

    // an axis over target sets
    std::fs::write(
        f.root.join("grid2.json"),
        r#"{"epochs": 1, "method": "lora", "lora_targets": ["q,v", "o"]}"#,
    )
    .unwrap();
    let o = common::run(
        "sherl-fit",
        &[
            "sweep",
            "--cache",
            "cache",
            "--backbone",
            "backbone",
            "--grid",
            "grid2.json",
            "--out",
            "runs2",
            "--dry-run",
        ],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let plan = common::stdout(&o);
    assert_eq!(plan.lines().count(), 2, "{plan}");
    assert!(plan.contains(r#""lora_targets":["o"]"#), "{plan}");
    assert!(plan.contains(r#""lora_targets":["q","v"]"#), "{plan}");
}

/// `--lst-init prune`: at the backbone's width the side layers are the
/// backbone's layers exactly (every dimension kept, in order); narrower,
/// the pruned side network trains; a width that cannot keep the heads, an
/// image cache, and the flag with another method are refused.
#[test]
fn lst_prune_init_starts_from_the_backbone() {
    let f = fit_fixture(60, 14, &["--layers", "all"]);
    let (cache, arch, ckpt) = open(&f.root);
    let cfg = settings(json!({"method": "lst", "side_dim": 32, "lst_init": "prune"}));
    let model = build(&cache, &arch, &ckpt, &cfg).unwrap();
    let snap = model.params.snapshot().unwrap();
    let mut compared = 0;
    for (name, t) in &snap {
        let Some(rest) = name.strip_prefix("lst.layer.") else {
            continue;
        };
        let source = format!("encoder.layer.{rest}");
        let want = ckpt.tensor_f32_shaped(&source, t.dims()).unwrap();
        let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want, "{name}");
        compared += 1;
    }
    assert_eq!(compared, N * 16);

    // half the width: the residual dimensions kept are the 16 largest
    // sum_i |gamma_i| of the output LayerNorms, in index order
    let half = settings(json!({"method": "lst", "side_dim": 16, "lst_init": "prune"}));
    let model = build(&cache, &arch, &ckpt, &half).unwrap();
    let snap = model.params.snapshot().unwrap();
    let gammas: Vec<Vec<f32>> = (0..N)
        .map(|i| {
            ckpt.tensor_f32_shaped(&format!("encoder.layer.{i}.output.LayerNorm.weight"), &[32])
                .unwrap()
        })
        .collect();
    let score: Vec<f32> = (0..32)
        .map(|k| gammas.iter().map(|g| g[k].abs()).sum())
        .collect();
    let mut keep: Vec<usize> = (0..32).collect();
    keep.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    keep.truncate(16);
    keep.sort_unstable();
    for (i, g) in gammas.iter().enumerate() {
        let got: Vec<f32> = snap[&format!("lst.layer.{i}.output.LayerNorm.weight")]
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = keep.iter().map(|&k| g[k]).collect();
        assert_eq!(got, want, "layer {i}");
    }

    let s = summary(&fit(
        &f.root,
        &[
            "--method",
            "lst",
            "--lst-init",
            "prune",
            "--side-dim",
            "16",
            "--epochs",
            "4",
            "--lr",
            "0.003",
        ],
    ));
    let l = losses(&f.root, &s);
    assert!(l[3] < l[0], "{l:?}");
    let random = summary(&fit(
        &f.root,
        &["--method", "lst", "--side-dim", "16", "--epochs", "1"],
    ));
    assert_eq!(s["trainable_params"], random["trainable_params"]);

    for (args, needle) in [
        (
            &["--method", "lst", "--lst-init", "prune", "--side-dim", "6"][..],
            "multiple of 4",
        ),
        (
            &["--method", "sherl", "--lst-init", "prune"][..],
            "--method lst only",
        ),
    ] {
        let mut a = args.to_vec();
        a.extend(["--epochs", "1", "--out", "refused"]);
        let o = fit(&f.root, &a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", common::stderr(&o));
        assert!(
            common::stderr(&o).contains(needle),
            "{}",
            common::stderr(&o)
        );
    }
}
