//! `sherl-fit export`: a trained run as one standalone ONNX model. ONNX
//! Runtime on the exported model, fed by the exported tokenizer as the
//! README's Python example feeds it (one padded batch), gives the
//! probabilities `sherl-fit predict` gives, within 1e-4, for every exported
//! method on the tiny BERT and MPNet fixtures; runs that fail their checks
//! are refused.

use std::path::Path;

use ndarray::{Array2, ArrayViewD};
use serde_json::Value;

use crate::common::{self, tiny};
use crate::fit::{fit, fit_fixture_with, predict_data, summary};
use sherl::extract::runtime::F32Session;

/// `sherl-fit export` of `run` into `root/out`.
pub(crate) fn export(root: &Path, run: &str, out: &str) -> std::process::Output {
    common::run(
        "sherl-fit",
        &[
            "export",
            "--run",
            run,
            "--backbone",
            "backbone",
            "--out",
            out,
        ],
        root,
        &[],
    )
}

/// The texts of the fixture's `data.csv` (first column), in file order.
pub(crate) fn texts(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("data.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect()
}

/// `[rows, width]` of `rows` padded on the right with 0.
fn padded(rows: &[Vec<u32>]) -> Array2<i64> {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let mut a = Array2::<i64>::zeros((rows.len(), width));
    for (r, row) in rows.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            a[[r, c]] = i64::from(v);
        }
    }
    a
}

/// The exported model in `dir` on `texts`, one padded batch, tokenized by
/// the exported `tokenizer.json` as it is: `[texts, classes]`.
pub(crate) fn onnx_probabilities(dir: &Path, texts: &[String], bert: bool) -> Vec<Vec<f32>> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let encs = tok.encode_batch(texts.to_vec(), true).unwrap();
    let ids = padded(
        &encs
            .iter()
            .map(|e| e.get_ids().to_vec())
            .collect::<Vec<_>>(),
    );
    let mask = padded(
        &encs
            .iter()
            .map(|e| e.get_attention_mask().to_vec())
            .collect::<Vec<_>>(),
    );
    let types = padded(
        &encs
            .iter()
            .map(|e| e.get_type_ids().to_vec())
            .collect::<Vec<_>>(),
    );
    let mut inputs: Vec<(&str, ArrayViewD<'_, i64>)> = vec![
        ("input_ids", ids.view().into_dyn()),
        ("attention_mask", mask.view().into_dyn()),
    ];
    if bert {
        inputs.push(("token_type_ids", types.view().into_dyn()));
    }
    let mut s =
        F32Session::open(common::runtime(), &dir.join("model.onnx"), &common::cpu()).unwrap();
    let out = s.run_i64(&inputs, &["logits", "probabilities"]).unwrap();
    assert_eq!(out[0].shape(), out[1].shape());
    assert_eq!(out[1].shape()[0], texts.len());
    out[1]
        .outer_iter()
        .map(|row| row.iter().copied().collect())
        .collect()
}

/// `predict`'s probabilities of run `run` on data.csv, per row in the
/// order of `labels`.
pub(crate) fn predicted(root: &Path, run: &str, labels: &[String]) -> Vec<Vec<f32>> {
    let o = predict_data(root, run);
    assert!(o.status.success(), "{}", common::stderr(&o));
    std::fs::read_to_string(root.join("pred.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            labels
                .iter()
                .map(|c| v["probabilities"][c].as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Train `method` with `extra` flags on the fixture in `root`, export it,
/// and compare ONNX Runtime on the export with predict on every row.
pub(crate) fn check_parity(root: &Path, bert: bool, method: &str, extra: &[&str]) {
    let mut args = vec!["--method", method, "--epochs", "2", "--lr", "0.003"];
    args.extend_from_slice(extra);
    let s = summary(&fit(root, &args));
    let run = s["run_dir"].as_str().unwrap().to_owned();
    let out = format!("export-{method}-{}", extra.join("_"));
    let o = export(root, &run, &out);
    assert!(o.status.success(), "{method}: {}", common::stderr(&o));
    let line: Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(line["method"], method);
    let dir = root.join(&out);
    let labels: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels.len(), line["classes"].as_u64().unwrap() as usize);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains("onnxruntime") && readme.contains(&run[run.len() - 8..]));
    let texts = texts(root);
    let got = onnx_probabilities(&dir, &texts, bert);
    let want = predicted(root, &run, &labels);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        common::assert_close(g, w, 1e-4, 0.0, &format!("{method} {extra:?} row {i}"));
    }
    // the model is not a constant: rows differ
    assert!(
        got.iter().any(|g| (g[0] - got[0][0]).abs() > 1e-6),
        "{method}: {got:?}"
    );
}

fn parity_on(cfg: &tiny::TinyConfig, bert: bool) {
    let f = fit_fixture_with(cfg, 40, 9, &["--layers", "all"]);
    check_parity(&f.root, bert, "linear-probe", &[]);
    check_parity(
        &f.root,
        bert,
        "linear-probe",
        &["--probe-layer", "1", "--pool", "cls"],
    );
    check_parity(&f.root, bert, "late-layer", &[]);
    check_parity(
        &f.root,
        bert,
        "late-layer",
        &["--late-layers", "2", "--pool", "cls"],
    );
    check_parity(&f.root, bert, "full-ft", &[]);
    check_parity(&f.root, bert, "lora", &[]);
    check_parity(
        &f.root,
        bert,
        "lora",
        &[
            "--lora-targets",
            "q,v,ffn-in,ffn-out",
            "--lora-dropout",
            "0.1",
        ],
    );
}

#[test]
fn exported_bert_runs_match_predict() {
    parity_on(&tiny::TinyConfig::default(), true);
}

#[test]
fn exported_mpnet_runs_match_predict() {
    parity_on(&tiny::TinyConfig::mpnet(), false);
}

/// An edited weights file is refused, naming why; nothing is written.
#[test]
fn export_refuses_edited_weights() {
    let f = fit_fixture_with(&tiny::TinyConfig::default(), 30, 9, &["--layers", "all"]);
    let root = &f.root;
    let s = summary(&fit(root, &["--method", "linear-probe", "--epochs", "1"]));
    let run = s["run_dir"].as_str().unwrap().to_owned();
    let weights = root.join(&run).join("weights.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();
    let o = export(root, &run, "edited");
    assert!(!o.status.success());
    let e = common::stderr(&o);
    assert!(
        e.contains("weights.safetensors") && e.contains("changed or is corrupt"),
        "{e}"
    );
    assert!(!root.join("edited").exists());
}
