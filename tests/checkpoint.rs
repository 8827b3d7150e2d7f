//! Mid-run checkpoints: a run killed after epoch k (for several k) and run
//! again continues from its checkpoint and ends bit-identical to the run
//! that was never stopped: the same weights file, the same summary scores
//! and the same metrics lines (timing fields aside). A checkpoint that no
//! longer fits is not used, with a note, and the run trains from epoch 1.

use std::path::Path;

use serde_json::Value;

use crate::common::{self, tiny};
use crate::fit::{fit_fixture_with, summary};

/// `sherl-fit run` with `args` into `out`, aborted (as by `kill -9`) right
/// after the checkpoint of epoch `abort_after` when given.
fn run(root: &Path, out: &str, args: &[&str], abort_after: Option<usize>) -> std::process::Output {
    let mut a = vec![
        "run",
        "--cache",
        "cache",
        "--backbone",
        "backbone",
        "--out",
        out,
    ];
    a.extend_from_slice(args);
    let k = abort_after.map(|k| k.to_string());
    let env: Vec<(&str, &str)> = k
        .as_deref()
        .map(|k| ("SHERL_TEST_ABORT_AFTER_EPOCH", k))
        .into_iter()
        .collect();
    common::run("sherl-fit", &a, root, &env)
}

/// The metrics lines without the fields that measure time.
fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            for k in ["seconds", "eval_seconds", "tokens_per_second"] {
                o.remove(k);
            }
            v
        })
        .collect()
}

/// The summary's fields that do not measure time or memory.
fn outcome(s: &Value) -> Value {
    let mut v = s.clone();
    let o = v.as_object_mut().unwrap();
    for k in [
        "train_seconds",
        "seconds_per_epoch",
        "peak_rss_bytes",
        "train_memory",
        "train_tokens_per_second",
        "run_dir",
    ] {
        o.remove(k);
    }
    v
}

fn check_resume(method_args: &[&str]) {
    let f = fit_fixture_with(&tiny::TinyConfig::default(), 48, 5, &["--layers", "all"]);
    let root = &f.root;
    let mut args = vec!["--epochs", "4"];
    args.extend_from_slice(method_args);
    let whole = summary(&run(root, "whole", &args, None));
    let whole_dir = root.join(whole["run_dir"].as_str().unwrap());
    assert!(!whole_dir.join("checkpoint.json").exists());
    let whole_weights = std::fs::read(whole_dir.join("weights.safetensors")).unwrap();
    for k in 1..=3 {
        let out = format!("killed{k}");
        let o = run(root, &out, &args, Some(k));
        assert!(
            !o.status.success(),
            "{method_args:?}: the abort hook did not stop the run"
        );
        let runs: Vec<_> = std::fs::read_dir(root.join(&out)).unwrap().collect();
        assert_eq!(runs.len(), 1);
        let dir = runs.into_iter().next().unwrap().unwrap().path();
        assert!(dir.join("checkpoint.json").exists() && !dir.join("summary.json").exists());
        assert_eq!(metrics(&dir).len(), k);

        let o = run(root, &out, &args, None);
        let e = common::stderr(&o);
        let s = summary(&o);
        assert!(
            e.contains(&format!("resuming after epoch {k} of 4")),
            "{method_args:?} k={k}: {e}"
        );
        assert_eq!(outcome(&s), outcome(&whole), "{method_args:?} k={k}");
        assert_eq!(
            std::fs::read(dir.join("weights.safetensors")).unwrap(),
            whole_weights,
            "{method_args:?} k={k}: weights differ"
        );
        assert_eq!(metrics(&dir), metrics(&whole_dir), "{method_args:?} k={k}");
        assert!(!dir.join("checkpoint.json").exists());
        assert!(!dir.join("checkpoint.safetensors").exists());
    }
}

/// SHERL (dropout in the restore block and the late layer, two optimiser
/// groups with `--late-trainable`).
#[test]
fn a_killed_sherl_run_resumes_bit_identical() {
    check_resume(&["--method", "sherl", "--late-trainable"]);
}

/// LoRA (the whole backbone from token ids, the fused merged path).
#[test]
fn a_killed_lora_run_resumes_bit_identical() {
    check_resume(&["--method", "lora"]);
}

/// A checkpoint whose tensors were changed, or whose run's `config.json`
/// changed, is not used: the run says why and trains from epoch 1, and
/// still ends as the uninterrupted run.
#[test]
fn an_unusable_checkpoint_is_not_used() {
    let f = fit_fixture_with(&tiny::TinyConfig::default(), 40, 6, &["--layers", "all"]);
    let root = &f.root;
    let args = ["--method", "sherl", "--epochs", "3"];
    let whole = summary(&run(root, "whole", &args, None));

    let o = run(root, "edited", &args, Some(2));
    assert!(!o.status.success());
    let dir = std::fs::read_dir(root.join("edited"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let t = dir.join("checkpoint.safetensors");
    let mut bytes = std::fs::read(&t).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&t, bytes).unwrap();
    let o = run(root, "edited", &args, None);
    let e = common::stderr(&o);
    assert!(
        e.contains("checkpoint is not used (checkpoint.safetensors is not the file it records)"),
        "{e}"
    );
    assert_eq!(outcome(&summary(&o)), outcome(&whole));

    // the state file says another config.json
    let o = run(root, "config", &args, Some(1));
    assert!(!o.status.success());
    let dir = std::fs::read_dir(root.join("config"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let p = dir.join("checkpoint.json");
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    state["config_sha256"] = Value::String("0".repeat(64));
    std::fs::write(&p, serde_json::to_vec(&state).unwrap()).unwrap();
    let o = run(root, "config", &args, None);
    let e = common::stderr(&o);
    assert!(e.contains("written under another config.json"), "{e}");
    assert_eq!(outcome(&summary(&o)), outcome(&whole));
}
