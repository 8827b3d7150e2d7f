//! Regression tests for the hardening issue (training, prediction, sweeps
//! and output): every refused command changes nothing on disk, runs are
//! locked, prediction labels every row and checks what it loads, errors
//! name their cause once.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common;
use crate::common::fit_predict as predict;
use crate::fit::{fit, fit_fixture, summary};

/// Files and directories under `dir`, relative, sorted (empty if absent).
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn refused(o: &std::process::Output, needle: &str) -> String {
    let err = common::stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Items 7, 8, 11, 21: bad numbers, absurd sizes and impossible layers are
/// refused before anything is written (no run directory appears).
#[test]
fn bad_settings_are_refused_before_anything_is_written() {
    let f = fit_fixture(40, 31, &[]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--grad-clip", "nan"],
            "--grad-clip NaN: must be a finite number",
        ),
        (
            &["--grad-clip", "inf"],
            "--grad-clip inf: must be a finite number",
        ),
        (&["--weight-decay", "nan"], "--weight-decay NaN"),
        (&["--weight-decay", "inf"], "--weight-decay inf"),
        (&["--lr", "inf"], "--lr inf"),
        (&["--warmup", "nan"], "--warmup NaN"),
        (&["--weight-decay", "2000"], "training cannot converge"),
        (&["--train-examples", "0"], "--train-examples 0"),
        (
            &["--side-dim", "100000000"],
            "--side-dim 100000000: at most",
        ),
        (
            &["--method", "linear-probe", "--probe-layer", "99"],
            "--probe-layer 99 does not exist",
        ),
        (&["--early-layers", "0,99"], "early route must end with"),
        (&["--early-layers", "99,2"], "hidden_states.99"),
    ];
    for (args, needle) in cases {
        let o = fit(&f.root, args);
        refused(&o, needle);
        assert!(
            tree(&f.root.join("runs")).is_empty(),
            "{args:?} left {:?}",
            tree(&f.root.join("runs"))
        );
    }
}

/// `sherl-fit run` on the fixture's cache with extra environment.
fn fit_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut a = vec![
        "run",
        "--cache",
        "cache",
        "--backbone",
        "backbone",
        "--out",
        "runs",
    ];
    a.extend_from_slice(args);
    common::run("sherl-fit", &a, root, env)
}

/// Item 11: a run whose memory estimate exceeds the budget is refused with
/// the estimate, before the model is allocated or anything is written.
#[test]
fn memory_estimate_refuses_runs_that_cannot_fit() {
    let f = fit_fixture(40, 32, &[]);
    let o = fit_env(&f.root, &[], &[("SHERL_MEMORY_LIMIT", "64M")]);
    let err = refused(&o, "this run would need about");
    assert!(err.contains("SHERL_MEMORY_LIMIT"), "{err}");
    assert!(tree(&f.root.join("runs")).is_empty());
    let o = fit_env(&f.root, &[], &[("SHERL_MEMORY_LIMIT", "lots")]);
    refused(&o, "SHERL_MEMORY_LIMIT=lots");
    // the same run under a budget it fits in trains
    summary(&fit_env(
        &f.root,
        &["--epochs", "1"],
        &[("SHERL_MEMORY_LIMIT", "8G")],
    ));
}

/// Item 6: a backbone whose config.json differs from the cache's is refused
/// by run and by predict, naming the field.
#[test]
fn a_different_backbone_config_is_refused() {
    let f = fit_fixture(40, 33, &[]);
    let s = summary(&fit(&f.root, &["--epochs", "1"]));
    let run = f.root.join(s["run_dir"].as_str().unwrap());
    let cfg_path = f.root.join("backbone/config.json");
    let original = std::fs::read(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&original).unwrap();
    cfg["hidden_act"] = serde_json::json!("relu");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let err = refused(&fit(&f.root, &["--epochs", "2"]), "hidden_act");
    assert!(
        err.contains("differs from the config.json the cache"),
        "{err}"
    );
    let err = refused(
        &predict(&f.root, run.to_str().unwrap(), "data.csv", &[]),
        "hidden_act",
    );
    assert!(err.contains("\"relu\""), "{err}");
    // heads: same weights, other attention split
    let mut cfg: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let heads = cfg["num_attention_heads"].as_u64().unwrap();
    cfg["num_attention_heads"] = serde_json::json!(if heads == 1 { 2 } else { 1 });
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    refused(&fit(&f.root, &["--epochs", "2"]), "num_attention_heads");
}

/// Items 4 and 10: predict labels every row (unknown true labels kept and
/// counted apart), and refuses weights whose checksum changed.
#[test]
fn predict_labels_every_row_and_checks_the_weights() {
    let f = fit_fixture(60, 34, &[]);
    let s = summary(&fit(&f.root, &["--epochs", "1"]));
    let run = f.root.join(s["run_dir"].as_str().unwrap());
    let run_s = run.to_str().unwrap();
    let weights = run.join("weights.safetensors");
    assert_eq!(
        s["weights_sha256"].as_str().unwrap(),
        sherl::fsutil::sha256_file(&weights).unwrap()
    );
    // the weights get the same permissions as the run's other files
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&weights), mode(&run.join("config.json")));
    // a file whose last rows carry a label the run never saw
    let text = std::fs::read_to_string(f.root.join("data.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    let label_col = header.iter().position(|h| *h == "label").unwrap();
    let n = lines.len() - 1;
    for l in lines.iter_mut().skip(n - 3) {
        let mut cells: Vec<String> = l.split(',').map(String::from).collect();
        cells[label_col] = "never-seen".into();
        *l = cells.join(",");
    }
    std::fs::write(f.root.join("new.csv"), lines.join("\n") + "\n").unwrap();
    let o = predict(&f.root, run_s, "new.csv", &["--out", "pred.jsonl"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let p: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(p["examples"], n);
    assert_eq!(p["unknown_labels"], 4);
    assert_eq!(p["labelled"], n - 4);
    let preds: Vec<serde_json::Value> = std::fs::read_to_string(f.root.join("pred.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), n);
    let unknown: Vec<_> = preds
        .iter()
        .filter(|l| l["true_label"] == "never-seen")
        .collect();
    assert_eq!(unknown.len(), 4);
    let known: Vec<_> = preds
        .iter()
        .filter(|l| l["true_label"] != "never-seen")
        .collect();
    let acc = known
        .iter()
        .filter(|l| l["label"] == l["true_label"])
        .count() as f64
        / known.len() as f64;
    assert!((p["accuracy"].as_f64().unwrap() - acc).abs() < 1e-12);
    // one flipped byte in the weights: refused, nothing written
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    let o = predict(&f.root, run_s, "new.csv", &["--out", "pred2.jsonl"]);
    let err = refused(&o, "weights.safetensors");
    assert!(err.contains("recorded in"), "{err}");
    assert!(!f.root.join("pred2.jsonl").exists());
}

/// `sherl-fit sweep` on the fixture's cache with `grid.json` into `runs`.
const SWEEP: [&str; 9] = [
    "sweep",
    "--cache",
    "cache",
    "--backbone",
    "backbone",
    "--grid",
    "grid.json",
    "--out",
    "runs",
];

/// The run ids `sweep --dry-run` plans, in order.
fn planned_ids(root: &Path) -> Vec<String> {
    let dry = common::run(
        "sherl-fit",
        &[&SWEEP[..], &["--dry-run"]].concat(),
        root,
        &[],
    );
    assert!(dry.status.success(), "{}", common::stderr(&dry));
    common::stdout(&dry)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["run_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Item 5: one process per run directory. A held lock refuses `run` with
/// exit 3 and leaves the directory untouched.
#[test]
fn a_locked_run_is_refused_and_left_alone() {
    let f = fit_fixture(40, 35, &[]);
    std::fs::write(f.root.join("grid.json"), r#"{"epochs": 1}"#).unwrap();
    let ids = planned_ids(&f.root);
    // item 21: a dry run writes nothing
    assert!(!f.root.join("runs").exists());
    let id = &ids[0];
    let dir = f.root.join("runs").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let before = tree(&dir);
    let lock = sherl::fsutil::DirLock::try_acquire(&dir, ".lock")
        .unwrap()
        .unwrap();
    let o = fit(&f.root, &["--epochs", "1"]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(
        tree(&dir),
        before
            .iter()
            .cloned()
            .chain([".lock".to_string()])
            .collect()
    );
    drop(lock);
    summary(&fit(&f.root, &["--epochs", "1"]));
}

/// Item 5: a sweep leaves a run another process holds to it, waits for it,
/// and trains it itself when the holder went away without finishing; each
/// run is trained exactly once.
#[test]
fn a_sweep_waits_for_runs_another_process_holds() {
    let f = fit_fixture(40, 36, &[]);
    std::fs::write(f.root.join("grid.json"), r#"{"seed": [0, 1], "epochs": 2}"#).unwrap();
    let ids = planned_ids(&f.root);
    assert_eq!(ids.len(), 2);
    let held = f.root.join("runs").join(&ids[0]);
    std::fs::create_dir_all(&held).unwrap();
    let lock = sherl::fsutil::DirLock::try_acquire(&held, ".lock")
        .unwrap()
        .unwrap();
    let child = std::process::Command::new(common::bin("sherl-fit"))
        .args(SWEEP)
        .current_dir(&f.root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the free run completes while the other is held
    let other = f.root.join("runs").join(&ids[1]).join("summary.json");
    while !other.exists() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!held.join("summary.json").exists());
    drop(lock);
    let o = child.wait_with_output().unwrap();
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("another process is training it"), "{err}");
    for id in &ids {
        let metrics =
            std::fs::read_to_string(f.root.join("runs").join(id).join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 2, "{id}: {metrics}");
        for l in metrics.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }
    assert_eq!(common::stdout(&o).lines().count(), 2);
}

/// Item 5: `kill -9` of a sweep takes its run processes with it, so the
/// run's lock is released and a rerun is not raced by an orphan.
#[test]
fn a_killed_sweep_takes_its_runs_with_it() {
    let f = fit_fixture(60, 37, &[]);
    std::fs::write(f.root.join("grid.json"), r#"{"epochs": 100000}"#).unwrap();
    let mut sweep = std::process::Command::new(common::bin("sherl-fit"))
        .args(SWEEP)
        .current_dir(&f.root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until the run is training (an epoch is recorded)
    let run_dir = loop {
        let found = std::fs::read_dir(f.root.join("runs")).ok().and_then(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                std::fs::read_to_string(p.join("metrics.jsonl"))
                    .is_ok_and(|m| m.lines().count() > 0)
            })
        });
        if let Some(d) = found {
            break d;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(sherl::fsutil::DirLock::is_held(&run_dir, ".lock").unwrap());
    sweep.kill().unwrap(); // SIGKILL to the sweep only, not its group
    sweep.wait().unwrap();
    // the orphaned run notices and stops: its lock comes free (this blocks
    // until it does)
    let lock = sherl::fsutil::DirLock::acquire(&run_dir, ".lock").unwrap();
    drop(lock);
    assert!(!run_dir.join("summary.json").exists());
}

/// Item 5: `report` names the metrics lines it could not read.
#[test]
fn report_names_unreadable_metrics_lines() {
    let f = fit_fixture(40, 38, &[]);
    let s = summary(&fit(&f.root, &["--epochs", "2"]));
    let metrics = f
        .root
        .join(s["run_dir"].as_str().unwrap())
        .join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("l}\n");
    std::fs::write(&metrics, text).unwrap();
    let o = common::run("sherl-fit", &["report", "runs"], &f.root, &[]);
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("could not read line(s) 3 of metrics.jsonl"),
        "{err}"
    );
}

/// Item 17: an I/O error while training names the file (the file-size
/// limit makes writing the weights fail with EFBIG, as a full disk would
/// with ENOSPC).
#[test]
fn a_write_failure_names_the_file() {
    let f = fit_fixture(40, 39, &[]);
    let exe = common::bin("sherl-fit");
    let script = format!(
        "trap '' XFSZ; ulimit -f 4; exec '{}' run --cache cache --backbone backbone --out runs --epochs 1",
        exe.display()
    );
    let o = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(&f.root)
        .output()
        .unwrap();
    let err = refused(&o, "weights.safetensors");
    assert!(err.contains("File too large"), "{err}");
}

/// Item 18: each cause is printed once.
#[test]
fn causes_are_printed_once() {
    let f = fit_fixture(30, 40, &[]);
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            "backbone",
            "--data",
            "nope.csv",
            "--device",
            "cpu",
            "--out",
            "c2",
            "--max-len",
            "16",
        ],
        &f.root,
        &[],
    );
    let err = refused(&o, "nope.csv");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    std::fs::write(f.root.join("bad.json"), "{").unwrap();
    let o = fit(&f.root, &["--config", "bad.json"]);
    let err = refused(&o, "bad.json");
    assert_eq!(err.matches("EOF while parsing").count(), 1, "{err}");
}
