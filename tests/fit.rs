//! sherl-fit: the consolidation checked by hand, late-layer parity with ONNX
//! Runtime on MiniLM, overfitting 32 examples, determinism, the run
//! directory, and bad input.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::common::{self, tiny};
use sherl::fit::nn::consolidation::{Consolidation, PROJ_LN_EPS};
use sherl::fit::nn::{LayerNorm, Linear, Projector};

fn t2(v: &[f32], r: usize, c: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
}
fn t1(v: &[f32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
}

/// Scalar re-statement of docs/method.md §4 steps 1-5 for one token, f64, loops only.
fn by_hand(
    xs: &[Vec<f64>],
    proj: &[(Vec<f64>, Vec<f64>)],
    wa: &[f64],
    ba: f64,
) -> (Vec<f64>, Vec<f64>) {
    let d = proj[0].1.len();
    let din = xs[0].len();
    // F_j = LayerNorm(W_j x_j + b_j) with weight 1, bias 0, eps 1e-5
    let f: Vec<Vec<f64>> = xs
        .iter()
        .zip(proj)
        .map(|(x, (w, b))| {
            let y: Vec<f64> = (0..d)
                .map(|o| b[o] + (0..din).map(|i| w[o * din + i] * x[i]).sum::<f64>())
                .collect();
            let mean = y.iter().sum::<f64>() / d as f64;
            let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            y.iter().map(|v| (v - mean) / (var + 1e-5).sqrt()).collect()
        })
        .collect();
    let m = f.len();
    let e = &f[m - 1];
    let shallow = &f[..m - 1];
    let unit: Vec<Vec<f64>> = shallow
        .iter()
        .map(|row| {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter().map(|v| v / (n + 1e-8)).collect()
        })
        .collect();
    let r: Vec<f64> = (0..m - 1)
        .map(|i| {
            (0..m - 1)
                .map(|j| {
                    (0..d)
                        .map(|k| unit[i][k] * unit[j][k])
                        .sum::<f64>()
                        .max(0.0)
                })
                .sum()
        })
        .collect();
    let a: Vec<f64> = shallow
        .iter()
        .map(|row| ba + (0..d).map(|k| wa[k] * row[k] * e[k]).sum::<f64>())
        .collect();
    let u: Vec<f64> = a.iter().zip(&r).map(|(a, r)| a.max(0.0) / r).collect();
    let l1: f64 = u.iter().map(|v| v.abs()).sum();
    let alpha: Vec<f64> = u.iter().map(|v| v / (l1 + 1e-8)).collect();
    let g: Vec<f64> = (0..d)
        .map(|k| e[k] + (0..m - 1).map(|j| alpha[j] * shallow[j][k]).sum::<f64>())
        .collect();
    (g, alpha)
}

/// The early route on tiny inputs, checked against the formulas evaluated
/// by hand: M = 3 entries, D = 3, d = 3, two real tokens and one padded;
/// the second token's scores are all negative, so its alpha is 0 and g = e.
#[test]
fn consolidation_checked_by_hand() {
    // identity projections with small offsets, so F_j is LayerNorm(x_j + b_j)
    let eye = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let proj_w = [eye.clone(), eye.clone(), eye];
    let proj_b = [
        vec![0.0, 0.1, 0.0],
        vec![0.2, 0.0, 0.0],
        vec![0.0, 0.0, 0.0],
    ];
    let wa = vec![1.0, 1.0, 1.0];
    let ba = 0.0;
    // tokens: t0 real, t1 real (anti-aligned with the guide => negative scores), t2 padding
    let x = [
        // layer 0
        vec![
            vec![1.0, 2.0, 3.0],
            vec![3.0, 2.0, 1.0],
            vec![0.0, 0.0, 0.0],
        ],
        // layer 1
        vec![
            vec![2.0, 1.0, 3.0],
            vec![3.0, 1.0, 2.0],
            vec![0.0, 0.0, 0.0],
        ],
        // layer 2 (guide)
        vec![
            vec![1.0, 1.5, 4.0],
            vec![1.0, 2.0, 3.0],
            vec![0.0, 0.0, 0.0],
        ],
    ];
    let dev = Device::Cpu;
    let proj = (0..3)
        .map(|j| {
            let w: Vec<f32> = proj_w[j].iter().map(|&v| v as f32).collect();
            let b: Vec<f32> = proj_b[j].iter().map(|&v| v as f32).collect();
            Projector {
                linear: Linear::from_parts(t2(&w, 3, 3), t1(&b)),
                norm: LayerNorm::from_parts(
                    t1(&[1.0, 1.0, 1.0]),
                    t1(&[0.0, 0.0, 0.0]),
                    PROJ_LN_EPS,
                ),
            }
        })
        .collect();
    let c = Consolidation::from_parts(
        proj,
        Linear::from_parts(t2(&[1.0, 1.0, 1.0], 1, 3), t1(&[ba as f32])),
    );
    let layers: Vec<Tensor> = x
        .iter()
        .map(|l| {
            let flat: Vec<f32> = l.iter().flatten().map(|&v| v as f32).collect();
            Tensor::from_vec(flat, (1, 3, 3), &dev).unwrap()
        })
        .collect();
    let mask = Tensor::new(&[[1f32, 1.0, 0.0]], &dev).unwrap();
    let out = c.forward(&layers, &mask).unwrap();
    let g: Vec<Vec<Vec<f32>>> = out.g.to_vec3().unwrap();
    let alpha: Vec<Vec<Vec<f32>>> = out.alpha.to_vec3().unwrap();
    let projs: Vec<(Vec<f64>, Vec<f64>)> = (0..3)
        .map(|j| (proj_w[j].clone(), proj_b[j].clone()))
        .collect();
    for t in 0..2 {
        let xs: Vec<Vec<f64>> = (0..3).map(|j| x[j][t].clone()).collect();
        let (g_want, a_want) = by_hand(&xs, &projs, &wa, ba);
        for k in 0..3 {
            assert!(
                (f64::from(g[0][t][k]) - g_want[k]).abs() < 1e-5,
                "token {t} g[{k}]: {} vs {}",
                g[0][t][k],
                g_want[k]
            );
        }
        for j in 0..2 {
            assert!(
                (f64::from(alpha[0][t][j]) - a_want[j]).abs() < 1e-5,
                "token {t} alpha[{j}]"
            );
        }
    }
    // token 0: positive scores, weights sum to 1 (L1), not a softmax
    let s0: f32 = alpha[0][0].iter().sum();
    assert!(
        (s0 - 1.0).abs() < 1e-5 && alpha[0][0].iter().all(|&a| a > 0.0),
        "{:?}",
        alpha[0][0]
    );
    // token 1: every score is negative -> alpha = 0 and g equals the guide's projection
    assert_eq!(alpha[0][1], vec![0.0, 0.0]);
    let guide = by_hand(
        &[x[2][1].clone(), x[2][1].clone(), x[2][1].clone()],
        &projs,
        &wa,
        -1e9,
    )
    .0;
    for k in 0..3 {
        assert!((f64::from(g[0][1][k]) - guide[k]).abs() < 1e-5);
    }
    // padded token: g is exactly 0 (nothing leaks into the late route)
    assert_eq!(g[0][2], vec![0.0, 0.0, 0.0]);
    // hand-checkable redundancy: two identical shallow rows give r = 2 each
    let same = by_hand(
        &[
            vec![1.0, 0.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
        ],
        &[
            (proj_w[0].clone(), vec![0.0; 3]),
            (proj_w[0].clone(), vec![0.0; 3]),
            (proj_w[0].clone(), vec![0.0; 3]),
        ],
        &wa,
        2.0,
    );
    assert!(
        (same.1[0] - 0.5).abs() < 1e-6 && (same.1[1] - 0.5).abs() < 1e-6,
        "{:?}",
        same.1
    );
}

pub struct FitFixture {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

/// A tiny backbone and a cache made from `csv` (train/valid/test split).
pub fn fit_fixture(rows: usize, seed: u64, extra_extract: &[&str]) -> FitFixture {
    fit_fixture_with(&tiny::TinyConfig::default(), rows, seed, extra_extract)
}

/// [`fit_fixture`] with the tiny backbone `cfg` (e.g. a tiny MPNet).
pub fn fit_fixture_with(
    cfg: &tiny::TinyConfig,
    rows: usize,
    seed: u64,
    extra_extract: &[&str],
) -> FitFixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let backbone = root.join("backbone");
    tiny::tiny_backbone(&backbone, cfg, 42);
    tiny::write_dataset(&root.join("data.csv"), rows, 12, 100, seed);
    let mut args = vec![
        "run",
        "--backbone",
        "backbone",
        "--data",
        "data.csv",
        "--split",
        "train=0.6,valid=0.2,test=0.2",
        "--max-len",
        "16",
        "--device",
        "cpu",
        "--out",
        "cache",
    ];
    args.extend_from_slice(extra_extract);
    let o = common::run("sherl-extract", &args, &root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    FitFixture { _tmp: tmp, root }
}

pub fn fit(root: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["run", "--cache", "cache", "--backbone", "backbone"];
    if !args.contains(&"--out") {
        a.extend(["--out", "runs"]);
    }
    a.extend_from_slice(args);
    common::run("sherl-fit", &a, root, &[])
}

/// `sherl-fit predict` of run `run` on the fixture's `data.csv` into
/// `pred.jsonl` (CPU).
pub fn predict_data(root: &Path, run: &str) -> std::process::Output {
    common::fit_predict(root, run, "data.csv", &["--out", "pred.jsonl"])
}

pub fn summary(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
    serde_json::from_str(common::stdout(o).lines().last().unwrap()).unwrap()
}

/// Candle's late layer applied to the cached hidden_states.5 of MiniLM
/// (f32 cache) reproduces ONNX Runtime's hidden_states.6 within 1e-4.
#[test]
fn late_layer_parity_with_onnx_runtime_on_minilm() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let backbone = root.join("minilm");
    std::fs::create_dir_all(&backbone).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::minilm_dir().join(f), backbone.join(f)).unwrap();
    }
    std::fs::copy(
        crate::export::minilm_onnx_path(),
        backbone.join("model.onnx"),
    )
    .unwrap();
    let texts = [
        "a gripping, beautifully shot film",
        "dull.",
        "the plot wanders, but the performances are worth the ticket price and then some",
        "neither funny nor moving, it just sits there for two hours",
        "an instant classic",
        "i wanted to like it more than i did",
    ];
    let mut csv = String::from("text,label\n");
    for (i, t) in texts.iter().enumerate() {
        csv.push_str(&format!("\"{t}\",{}\n", i % 2));
    }
    std::fs::write(root.join("d.csv"), csv).unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            "minilm",
            "--data",
            "d.csv",
            "--layers",
            "5,6",
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--out",
            "c",
        ],
        root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cache = sherl::cache::Cache::open(&root.join("c")).unwrap();
    let dir = sherl::backbone::BackboneDir::open(&backbone).unwrap();
    let (arch, ckpt) = sherl::fit::checks::check_backbone(&cache, &dir).unwrap();
    let sherl::fit::model::Arch::Bert(cfg) = arch else {
        panic!("a text cache gives a BERT backbone")
    };
    let mut params = sherl::fit::params::Params::new();
    let mut rng = sherl::rng::SplitMix64::new(0);
    let mut vb = sherl::fit::nn::Builder::new(&mut params, &mut rng, &ckpt, &Device::Cpu);
    let layer =
        sherl::fit::nn::bert_layer::BertLayer::load(vb.pp("encoder.layer.5"), &cfg).unwrap();
    // one example at a time, and all together as a padded batch
    let mut rows5 = Vec::new();
    let mut rows6 = Vec::new();
    for p in 0..texts.len() as u64 {
        let (meta, l) = cache.example(p, &[0, 1]).unwrap();
        let n = meta.len();
        let x = Tensor::from_vec(l[0].clone(), (1, n, 384), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap();
        let bias = sherl::fit::nn::bert_layer::attention_bias(&mask).unwrap();
        let y: Vec<f32> = layer
            .forward(&x, &bias, &mut sherl::fit::nn::Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        common::assert_close(
            &y,
            &l[1],
            1e-4,
            1e-4,
            &format!("example {p} hidden_states.6"),
        );
        rows5.push((n, l[0].clone()));
        rows6.push(l[1].clone());
    }
    let s = rows5.iter().map(|r| r.0).max().unwrap();
    let b = rows5.len();
    let mut x = vec![0f32; b * s * 384];
    let mut mask = vec![0f32; b * s];
    for (i, (n, v)) in rows5.iter().enumerate() {
        x[i * s * 384..i * s * 384 + n * 384].copy_from_slice(v);
        mask[i * s..i * s + n].iter_mut().for_each(|m| *m = 1.0);
    }
    let x = Tensor::from_vec(x, (b, s, 384), &Device::Cpu).unwrap();
    let bias = sherl::fit::nn::bert_layer::attention_bias(
        &Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let y: Vec<Vec<Vec<f32>>> = layer
        .forward(&x, &bias, &mut sherl::fit::nn::Mode::Eval)
        .unwrap()
        .to_vec3()
        .unwrap();
    for (i, want) in rows6.iter().enumerate() {
        let n = rows5[i].0;
        let got: Vec<f32> = y[i][..n].iter().flatten().copied().collect();
        common::assert_close(
            &got,
            want,
            1e-4,
            1e-4,
            &format!("padded batch, example {i}"),
        );
    }
}

/// 32 examples reach 100 % training accuracy (valid = the same rows).
#[test]
fn overfits_32_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tiny::tiny_backbone(&root.join("backbone"), &tiny::TinyConfig::default(), 42);
    let mut rng = tiny::Rng::new(99);
    let mut csv = String::from("text,label\n");
    for _ in 0..32 {
        let n = 2 + rng.below(8) as usize;
        let words: Vec<String> = (0..n).map(|_| format!("w{}", 4 + rng.below(96))).collect();
        csv.push_str(&format!(
            "{},{}\n",
            words.join(" "),
            ["x", "y"][rng.below(2) as usize]
        ));
    }
    // the same rows as train and valid (ids must differ across files)
    let with_ids = |prefix: &str| -> String {
        csv.lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 {
                    format!("id,{l}")
                } else {
                    format!("{prefix}{i},{l}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    std::fs::write(root.join("train.csv"), with_ids("t")).unwrap();
    std::fs::write(root.join("valid.csv"), with_ids("v")).unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            "backbone",
            "--train",
            "train.csv",
            "--valid",
            "valid.csv",
            "--id-column",
            "id",
            "--max-len",
            "16",
            "--device",
            "cpu",
            "--out",
            "cache",
        ],
        root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = summary(&fit(
        root,
        &[
            "--epochs",
            "60",
            "--lr",
            "0.01",
            "--dropout",
            "0",
            "--batch-size",
            "8",
            "--warmup",
            "0",
            "--late-trainable",
            "--lr-pretrained",
            "0.003",
        ],
    ));
    assert_eq!(s["valid_accuracy"], 1.0, "{s}");
}

/// Same seed on CPU: identical metrics (timing fields aside), identical
/// weights; another seed differs.
#[test]
fn same_seed_same_metrics() {
    let f = fit_fixture(90, 5, &[]);
    // One thread and two: each CPU batch is cut in the same two parts
    // either way (side by side or one after the other), so the results
    // are the same to the bit.
    let a = summary(&fit(
        &f.root,
        &["--epochs", "2", "--out", "runs-a", "--threads", "1"],
    ));
    let b = summary(&fit(
        &f.root,
        &["--epochs", "2", "--out", "runs-b", "--threads", "2"],
    ));
    assert_eq!(a["run_id"], b["run_id"]);
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
    let ma = strip(dir(&a).join("metrics.jsonl"));
    let mb = strip(dir(&b).join("metrics.jsonl"));
    assert_eq!(ma.len(), 2);
    assert_eq!(ma, mb);
    let wa = std::fs::read(dir(&a).join("weights.safetensors")).unwrap();
    let wb = std::fs::read(dir(&b).join("weights.safetensors")).unwrap();
    assert_eq!(wa, wb);
    let c = summary(&fit(&f.root, &["--epochs", "2", "--seed", "1"]));
    assert_ne!(c["run_id"], a["run_id"]);
    let mc = strip(dir(&c).join("metrics.jsonl"));
    assert_ne!(ma, mc);
}

/// The run directory holds config.json, metrics.jsonl (one line per epoch),
/// weights.safetensors and summary.json equal to the last stdout line; a
/// finished run is not re-run.
/// The fused CPU ops' matrix kernel: OpenBLAS from the asset directory by
/// default (the test command fetches it), the gemm crate with `--blas off`,
/// each recorded in summary.json; both train; a library that does not load
/// is refused before anything is written.
#[test]
fn blas_kernel_is_chosen_and_recorded() {
    let f = fit_fixture(60, 9, &[]);
    let lib = common::asset("openblas/0.3.34.481.3/libscipy_openblas.so");
    let auto = summary(&fit(&f.root, &["--epochs", "1", "--out", "runs-auto"]));
    let kernel = auto["matmul"].as_str().unwrap();
    assert!(kernel.starts_with("OpenBLAS"), "{kernel}");
    assert!(kernel.contains(lib.to_str().unwrap()), "{kernel}");
    let off = summary(&fit(
        &f.root,
        &["--epochs", "1", "--out", "runs-off", "--blas", "off"],
    ));
    assert_eq!(off["matmul"], "gemm");
    // same settings, so the same run id: the kernel is a record, not a setting
    assert_eq!(off["run_id"], auto["run_id"]);
    let named = summary(&fit(
        &f.root,
        &[
            "--epochs",
            "1",
            "--out",
            "runs-named",
            "--blas",
            lib.to_str().unwrap(),
        ],
    ));
    assert_eq!(named["matmul"], auto["matmul"]);
    let bad = fit(
        &f.root,
        &[
            "--epochs",
            "1",
            "--out",
            "runs-bad",
            "--blas",
            "no-such-blas.so",
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", common::stderr(&bad));
    let err = common::stderr(&bad);
    assert!(
        err.contains("--blas no-such-blas.so") && err.contains("cannot load"),
        "{err}"
    );
    assert!(!f.root.join("runs-bad").exists());
}

#[test]
fn run_directory_and_skip_when_done() {
    let f = fit_fixture(60, 6, &[]);
    let o = fit(&f.root, &["--epochs", "3"]);
    let s = summary(&o);
    for key in [
        "run_id",
        "method",
        "valid_accuracy",
        "test_accuracy",
        "valid_macro_f1",
        "test_macro_f1",
        "trainable_params",
        "peak_rss_bytes",
        "train_seconds",
    ] {
        assert!(!s[key].is_null(), "summary lacks {key}");
    }
    assert_eq!(s["method"], "sherl");
    assert!(s["peak_rss_bytes"].as_u64().unwrap() > 0);
    let dir = PathBuf::from(s["run_dir"].as_str().unwrap());
    assert!(dir.starts_with(f.root.join("runs")) || dir.starts_with("runs"));
    let dir = f.root.join("runs").join(s["run_id"].as_str().unwrap());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["config"]["epochs"], 3);
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(on_disk, s);
    let w = candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    assert!(
        w.contains_key("head.weight")
            && w.contains_key("early.proj.0.weight")
            && w.contains_key("late.gate")
    );
    assert!(
        !w.keys().any(|k| k.starts_with("encoder.")),
        "frozen late-layer weights must not be saved"
    );
    // same settings again: not re-run, same summary
    let again = fit(&f.root, &["--epochs", "3"]);
    assert_eq!(summary(&again), s);
    assert!(common::stderr(&again).contains("already complete"));
}

/// Bad input stops with a message saying what and where.
#[test]
fn bad_input_is_refused_clearly() {
    let f = fit_fixture(40, 7, &[]);
    // a backbone whose weights differ from the cache's
    let other = f.root.join("other");
    tiny::write_backbone(
        &other,
        &tiny::TinyConfig::default(),
        &tiny::weights(&tiny::TinyConfig::default(), 43),
        "",
    );
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--cache",
            "cache",
            "--backbone",
            "other",
            "--out",
            "runs",
        ],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("differs from the one the cache"),
        "{}",
        common::stderr(&o)
    );
    // late-layer weights missing from the checkpoint (same hash check first: patch the manifest-free path by
    // using a checkpoint that lacks a tensor but is what the cache was made with)
    let g = fit_fixture(40, 8, &[]);
    let cfg = tiny::TinyConfig::default();
    let mut w = tiny::weights(&cfg, 42);
    w.remove("encoder.layer.2.output.dense.weight");
    let broken = g.root.join("broken");
    tiny::write_backbone(&broken, &cfg, &w, "");
    // rewrite the cache manifest's safetensors hash to the broken file's, as if extracted from it
    let sha = sherl::fsutil::sha256_file(&broken.join("model.safetensors")).unwrap();
    let mpath = g.root.join("cache/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["backbone"]["safetensors"]["sha256"] = serde_json::json!(sha);
    // resealed: the manifest carries a checksum of its content (FORMAT.md §5.4)
    let m: sherl::cache::Manifest = serde_json::from_value(m).unwrap();
    std::fs::write(&mpath, serde_json::to_vec(&m.sealed()).unwrap()).unwrap();
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--cache",
            "cache",
            "--backbone",
            "broken",
            "--out",
            "runs",
        ],
        &g.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("encoder.layer.2.output.dense.weight"),
        "{}",
        common::stderr(&o)
    );
    // NaN loss: stops naming epoch and step; metrics so far and error.json are kept
    let o = fit(
        &f.root,
        &[
            "--epochs",
            "2",
            "--lr",
            "1e30",
            "--grad-clip",
            "0",
            // no decay: lr x weight decay >= 1 is refused before training
            "--weight-decay",
            "0",
            // several steps per epoch: it diverges inside the first one
            "--batch-size",
            "4",
            "--out",
            "nan-runs",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = common::stderr(&o);
    assert!(
        err.contains("training loss became") && err.contains("epoch"),
        "{err}"
    );
    // it diverges in the first epoch: no weights exist, and the message says
    // so instead of pointing at a file that is not there
    assert!(
        err.contains("no epoch finished, so no weights were kept")
            && !err.contains("kept in")
            && err.contains("--lr 1000000000000000000000000000000")
            && !err.contains("--weight-decay")
            && !err.contains("--lr-pretrained"),
        "{err}"
    );
    let run = std::fs::read_dir(f.root.join("nan-runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        run.join("config.json").exists()
            && run.join("error.json").exists()
            && !run.join("summary.json").exists()
            && !run.join("weights.safetensors").exists()
    );
    // a cache without a valid split
    let h = tempfile::tempdir().unwrap();
    tiny::tiny_backbone(&h.path().join("backbone"), &cfg, 42);
    tiny::write_dataset(&h.path().join("d.csv"), 20, 5, 100, 1);
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            "backbone",
            "--data",
            "d.csv",
            "--max-len",
            "16",
            "--device",
            "cpu",
            "--out",
            "cache",
        ],
        h.path(),
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    // extraction already says so, and how to add one
    assert!(
        common::stderr(&o).contains("the cache will have no validation split (splits: train)")
            && common::stderr(&o).contains("--split train=0.8,valid=0.1,test=0.1"),
        "{}",
        common::stderr(&o)
    );
    let o = fit(h.path(), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("no examples in a 'valid' split"),
        "{}",
        common::stderr(&o)
    );
    // unknown settings in --config are refused, naming the key
    std::fs::write(f.root.join("bad.json"), r#"{"learning_rate": 0.1}"#).unwrap();
    let o = fit(&f.root, &["--config", "bad.json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("learning_rate"));
}

/// Every method trains on the same cache (training loss falls).
#[test]
fn every_method_trains_and_loss_falls() {
    let f = fit_fixture(90, 9, &["--layers", "all"]);
    for method in ["sherl", "linear-probe", "late-layer", "unipt", "full-ft"] {
        let s = summary(&fit(
            &f.root,
            &[
                "--method",
                method,
                "--epochs",
                "4",
                "--lr",
                "0.003",
                "--lr-pretrained",
                "0.0005",
            ],
        ));
        assert_eq!(s["method"], method);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(
            f.root
                .join(s["run_dir"].as_str().unwrap())
                .join("metrics.jsonl"),
        )
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let first = lines[0]["train_loss"].as_f64().unwrap();
        let last = lines[3]["train_loss"].as_f64().unwrap();
        assert!(last < first, "{method}: train loss {first} -> {last}");
    }
    // unipt needs the last layer in the cache, and says so
    let g = fit_fixture(40, 10, &[]);
    let o = fit(&g.root, &["--method", "unipt", "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("hidden_states.3"),
        "{}",
        common::stderr(&o)
    );
    // the probe on a layer that is not cached is computed through the frozen layers
    let s = summary(&fit(
        &g.root,
        &["--method", "linear-probe", "--epochs", "1"],
    ));
    assert_eq!(s["method"], "linear-probe");
}

/// `train_memory` in the summary: the trainable state is 12 bytes per
/// trainable parameter, the step peak is counted by sherl-fit's allocator,
/// and the methods order as their backward passes do: the probe keeps
/// almost nothing, the late layer one layer's activations, full
/// fine-tuning every layer's.
#[test]
fn train_memory_is_counted_and_orders_the_methods() {
    let f = fit_fixture(60, 11, &["--layers", "all"]);
    let mut peaks = Vec::new();
    for method in ["linear-probe", "late-layer", "full-ft"] {
        let s = summary(&fit(&f.root, &["--method", method, "--epochs", "1"]));
        let tm = &s["train_memory"];
        let state = tm["trainable_state_bytes"].as_u64().unwrap();
        let peak = tm["step_peak_bytes"].as_u64().unwrap();
        assert_eq!(
            state,
            12 * s["trainable_params"].as_u64().unwrap(),
            "{method}"
        );
        assert_eq!(
            tm["total_bytes"].as_u64().unwrap(),
            state + peak,
            "{method}"
        );
        assert!(peak > 0, "{method}: {tm}");
        peaks.push((method, peak));
    }
    assert!(
        peaks[0].1 < peaks[1].1 && peaks[1].1 < peaks[2].1,
        "step peaks should grow probe < late layer < full-ft: {peaks:?}"
    );
}

/// `predict` labels new texts through ONNX Runtime + the trained modules,
/// agrees with the cache-based evaluation, and refuses another backbone.
#[test]
fn predict_labels_new_texts_and_refuses_other_backbones() {
    let f = fit_fixture(60, 11, &[]);
    let s = summary(&fit(&f.root, &["--epochs", "2"]));
    let run = f.root.join(s["run_dir"].as_str().unwrap());
    let run_s = run.to_str().unwrap();
    let o = predict_data(&f.root, run_s);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let p: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(p["examples"], 60);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(f.root.join("pred.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60);
    for l in &lines {
        let probs = l["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 3);
        let total: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let best = probs
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(l["label"].as_str().unwrap(), best);
        assert!(l["true_label"].is_string());
    }
    // the accuracy over the whole file is consistent with the per-line labels
    let acc = lines
        .iter()
        .filter(|l| l["label"] == l["true_label"])
        .count() as f64
        / 60.0;
    assert!((p["accuracy"].as_f64().unwrap() - acc).abs() < 1e-12);
    // without labels: no accuracy
    let o = common::run(
        "sherl-fit",
        &[
            "predict",
            "--run",
            run_s,
            "--backbone",
            "backbone",
            "--data",
            "data.csv",
            "--no-labels",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o).lines().count(), 60);
    // a different tokenizer: refused before anything is written
    let tok = f.root.join("backbone/tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&tok).unwrap()).unwrap();
    t["normalizer"] = serde_json::Value::Null;
    std::fs::write(&tok, serde_json::to_vec(&t).unwrap()).unwrap();
    let o = common::run(
        "sherl-fit",
        &[
            "predict",
            "--run",
            run_s,
            "--backbone",
            "backbone",
            "--data",
            "data.csv",
            "--out",
            "pred2.jsonl",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("differs from the tokenizer"),
        "{}",
        common::stderr(&o)
    );
    assert!(!f.root.join("pred2.jsonl").exists());
}
