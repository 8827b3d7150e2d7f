//! `sherl-fit export` of sherl and unipt runs: parity with `sherl-fit predict`.
//!
//! ONNX Runtime on the exported model (one padded batch, so the backbone's
//! states at padded tokens are not the cached zeros) gives predict's
//! probabilities within 1e-4 on every row, for SHERL's settings (default,
//! two late layers, trained late layers, an early-layer subset, CLS
//! pooling, another side width) and UniPT's, on the tiny BERT and MPNet
//! fixtures; a run whose weights lack a tensor the graph needs, or hold one
//! it does not read, is refused.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::common::{self, tiny};
use crate::export_run::{check_parity, export};
use crate::fit::{fit, fit_fixture_with, summary};

fn side_parity_on(cfg: &tiny::TinyConfig, bert: bool) {
    // three layers: K = 1 reads hidden_states.0 ..= 2, K = 2 reads 0 ..= 1
    let f = fit_fixture_with(cfg, 40, 9, &["--layers", "all"]);
    let root = &f.root;
    check_parity(root, bert, "sherl", &[]);
    check_parity(root, bert, "sherl", &["--late-layers", "2"]);
    check_parity(
        root,
        bert,
        "sherl",
        &["--late-trainable", "--late-layers", "2", "--pool", "cls"],
    );
    check_parity(
        root,
        bert,
        "sherl",
        &["--early-layers", "0,2", "--side-dim", "6"],
    );
    check_parity(
        root,
        bert,
        "sherl",
        &["--early-layers", "1,2", "--pool", "cls"],
    );
    check_parity(root, bert, "unipt", &[]);
    check_parity(root, bert, "unipt", &["--pool", "cls", "--side-dim", "12"]);
}

#[test]
fn exported_bert_sherl_and_unipt_runs_match_predict() {
    side_parity_on(&tiny::TinyConfig::default(), true);
}

/// With three layers SHERL has at most two shallow entries, whose
/// redundancies are equal and cancel in the L1 normalisation: five layers
/// give four (or three) shallow entries whose redundancies differ.
#[test]
fn exported_sherl_runs_with_more_shallow_entries_match_predict() {
    let cfg = tiny::TinyConfig {
        layers: 5,
        ..Default::default()
    };
    let f = fit_fixture_with(&cfg, 40, 9, &["--layers", "all"]);
    check_parity(&f.root, true, "sherl", &[]);
    check_parity(&f.root, true, "sherl", &["--early-layers", "0,1,3,4"]);
}

#[test]
fn exported_mpnet_sherl_and_unipt_runs_match_predict() {
    side_parity_on(&tiny::TinyConfig::mpnet(), false);
}

/// Replace the weights of `run` by `edit` of them, recording the new
/// file's sha256 as the run's (so only the tensors differ).
fn edit_weights(root: &Path, run: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let dir = root.join(run);
    let path = dir.join("weights.safetensors");
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut tensors);
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let s_path = dir.join("summary.json");
    let mut s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&s_path).unwrap()).unwrap();
    s["weights_sha256"] = serde_json::json!(sherl::fsutil::sha256_file(&path).unwrap());
    std::fs::write(&s_path, serde_json::to_vec_pretty(&s).unwrap()).unwrap();
}

/// Export `run` into `out`, expecting a refusal naming all of `words`, and
/// nothing written.
fn refused(root: &Path, run: &str, out: &str, words: &[&str]) {
    let o = export(root, run, out);
    assert!(!o.status.success(), "{out}: exported");
    let e = common::stderr(&o);
    for w in words {
        assert!(e.contains(w), "{out}: {w:?} not in {e}");
    }
    assert!(!root.join(out).exists(), "{out}");
}

/// A sherl or unipt run whose weights lack a tensor its graph reads, or
/// hold one it does not, is refused, naming the tensor; the run as trained
/// exports.
#[test]
fn export_refuses_side_runs_with_missing_or_extra_tensors() {
    let f = fit_fixture_with(&tiny::TinyConfig::default(), 30, 9, &["--layers", "all"]);
    let root = &f.root;
    let edits: [(&str, &[(&str, &str)]); 2] = [
        (
            "sherl",
            &[
                ("late.gate", "early.proj.3.weight"),
                ("early.score.bias", "late.extra"),
            ],
        ),
        (
            "unipt",
            &[
                ("unipt.confidence.weight", "unipt.proj.4.bias"),
                ("unipt.out_ln.bias", "early.score.weight"),
            ],
        ),
    ];
    for (method, pairs) in edits {
        let s = summary(&fit(root, &["--method", method, "--epochs", "1"]));
        let run = s["run_dir"].as_str().unwrap().to_owned();
        let o = export(root, &run, &format!("{method}-ok"));
        assert!(o.status.success(), "{method}: {}", common::stderr(&o));
        // a copy of the run per edit, its checksums consistent
        let copy = |name: &str| -> String {
            let name = format!("{run}-{name}");
            let (from, to) = (root.join(&run), root.join(&name));
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(&from).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
            name
        };
        for &(missing, extra) in pairs {
            let lacking = copy(&format!("lacking-{missing}"));
            edit_weights(root, &lacking, |t| {
                let before = t.len();
                t.retain(|(n, _)| n != missing);
                assert_eq!(t.len(), before - 1, "{missing} not in the weights");
            });
            let out = format!("{method}-lacking-{missing}");
            refused(root, &lacking, &out, &[missing, "missing"]);

            let extended = copy(&format!("extended-{extra}"));
            edit_weights(root, &extended, |t| {
                assert!(t.iter().all(|(n, _)| n != extra), "{extra} in the weights");
                let like = t[0].1.clone();
                t.push((extra.to_string(), like));
            });
            let out = format!("{method}-extended-{extra}");
            refused(root, &extended, &out, &[extra, "does not use"]);
        }
        // a backbone weight the method does not train would replace a
        // frozen one: refused too
        let frozen = "encoder.layer.0.output.dense.bias";
        let extended = copy("extended-backbone");
        edit_weights(root, &extended, |t| {
            let like = t[0].1.clone();
            t.push((frozen.to_string(), like));
        });
        let out = format!("{method}-extended-backbone");
        refused(root, &extended, &out, &[frozen, "backbone weight"]);
    }
}
