//! Hardening, second round (issue 28): run files (config.json, summary.json, metrics.jsonl, --config) are bounded and checked.
//!
//! Every case that could hang (a FIFO, `/dev/zero`) runs through
//! [`common::run_bounded`]: a regression fails the test instead of hanging
//! the suite. The limits guard against hangs; nothing asserts on time.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::common;
use crate::fit::{fit, fit_fixture, summary};

/// Far above any normal run of these commands on the tiny fixture.
const LIMIT_S: u64 = 120;

/// Make a FIFO at `path`.
pub(crate) fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

/// `sherl-fit args` in `root`, bounded; panics (failing the test) when it
/// had to be killed.
fn fit_bounded(root: &Path, args: &[&str]) -> Output {
    common::run_bounded("sherl-fit", args, root, &[], LIMIT_S).unwrap_or_else(|| {
        panic!("sherl-fit {args:?} still running after {LIMIT_S} s: killed (it hangs)")
    })
}

/// Exit 2, no panic, and every needle in stderr.
fn refused_with(o: &Output, needles: &[&str]) -> String {
    let err = common::stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected '{n}' in: {err}");
    }
    err
}

/// Case 2: `--config` is read only if it is a regular file of bounded
/// size; a device, a FIFO, a directory and an oversized file are refused,
/// naming the file, before anything is trained.
#[test]
fn config_flag_reads_only_bounded_regular_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fifo = root.join("fifo.json");
    mkfifo(&fifo);
    std::fs::create_dir(root.join("dir.json")).unwrap();
    // sparse: one byte past the bound, no disk used
    let big = std::fs::File::create(root.join("big.json")).unwrap();
    big.set_len(sherl::fsutil::SMALL_FILE_LIMIT + 1).unwrap();
    drop(big);
    std::os::unix::fs::symlink("/dev/zero", root.join("zero.json")).unwrap();
    let cases: &[(&str, &str)] = &[
        ("/dev/zero", "a device, not a regular file"),
        ("zero.json", "a device, not a regular file"),
        ("fifo.json", "a FIFO (named pipe), not a regular file"),
        ("dir.json", "a directory, not a regular file"),
        ("big.json", "larger than the"),
    ];
    for (config, why) in cases {
        let o = fit_bounded(
            root,
            &[
                "run",
                "--cache",
                "cache",
                "--backbone",
                "backbone",
                "--out",
                "runs",
                "--config",
                config,
            ],
        );
        refused_with(&o, &[config, why]);
        assert!(!root.join("runs").exists(), "{config}");
    }
}

/// A trained tiny run: the fixture, the run directory, and `new.csv`
/// (the fixture's data) for predict.
struct TrainedRun {
    f: crate::fit::FitFixture,
    run: std::path::PathBuf,
}

fn trained_run(seed: u64) -> TrainedRun {
    let f = fit_fixture(40, seed, &[]);
    let s = summary(&fit(&f.root, &["--epochs", "1"]));
    let run = f.root.join(s["run_dir"].as_str().unwrap());
    TrainedRun { f, run }
}

fn predict(root: &Path, run: &Path, out: &str) -> Output {
    let run = run.to_str().unwrap();
    fit_bounded(
        root,
        &[
            "predict",
            "--run",
            run,
            "--backbone",
            "backbone",
            "--data",
            "data.csv",
            "--device",
            "cpu",
            "--out",
            out,
        ],
    )
}

fn read_value(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn write_value(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Case 6: `config.json` is checksummed with the weights: reordered
/// labels (which would swap the classes) and duplicated labels (which would
/// merge two) are refused, naming the file; an old run without the
/// checksum is checked against its cache's labels instead, and duplicated
/// names are refused even there.
#[test]
fn edited_config_labels_are_refused() {
    let t = trained_run(281);
    let root = &t.f.root;
    let config = t.run.join("config.json");
    let original = std::fs::read(&config).unwrap();
    let s = read_value(&t.run.join("summary.json"));
    assert_eq!(
        s["config_sha256"].as_str(),
        Some(sherl::fsutil::sha256_bytes(&original).as_str()),
        "summary.json records config.json's sha256"
    );
    let o = predict(root, &t.run, "base.jsonl");
    assert!(o.status.success(), "{}", common::stderr(&o));

    // labels reordered: refused, naming config.json, nothing written
    let mut c = read_value(&config);
    c["labels"].as_array_mut().unwrap().reverse();
    write_value(&config, &c);
    let o = predict(root, &t.run, "swapped.jsonl");
    refused_with(&o, &["config.json", "changed since the run"]);
    assert!(!root.join("swapped.jsonl").exists());

    // labels duplicated: refused, naming the label
    let mut c: Value = serde_json::from_slice(&original).unwrap();
    let first = c["labels"][0].clone();
    c["labels"][1] = first.clone();
    write_value(&config, &c);
    refused_with(&predict(root, &t.run, "dup.jsonl"), &["config.json"]);

    // An old run (no config_sha256 in summary.json): duplicated names are
    // refused outright ...
    let summary_path = t.run.join("summary.json");
    let mut old = s.clone();
    old.as_object_mut().unwrap().remove("config_sha256");
    write_value(&summary_path, &old);
    let o = predict(root, &t.run, "dup_old.jsonl");
    refused_with(&o, &["config.json", "twice", first.as_str().unwrap()]);
    // ... reordered labels are caught against the cache the run recorded ...
    let mut c: Value = serde_json::from_slice(&original).unwrap();
    c["labels"].as_array_mut().unwrap().reverse();
    write_value(&config, &c);
    let o = predict(root, &t.run, "swapped_old.jsonl");
    refused_with(&o, &["config.json", "manifest.json"]);
    // ... and the unedited old run still predicts, as before, with a note.
    std::fs::write(&config, &original).unwrap();
    let o = predict(root, &t.run, "old.jsonl");
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        std::fs::read(root.join("old.jsonl")).unwrap(),
        std::fs::read(root.join("base.jsonl")).unwrap()
    );
}

/// Case 7: `report` reads `metrics.jsonl` only if it is a regular file,
/// bounded: a link to `/dev/zero` and a FIFO are named in a warning and
/// the run is still reported (from its summary); the same for an
/// unfinished run, which only counts its epochs.
#[test]
fn report_refuses_metrics_that_are_not_regular_files() {
    let t = trained_run(282);
    let root = &t.f.root;
    let metrics = t.run.join("metrics.jsonl");
    let good = fit_bounded(root, &["report", "runs"]);
    assert!(good.status.success(), "{}", common::stderr(&good));
    for (kind, why) in [
        ("zero", "a device, not a regular file"),
        ("fifo", "a FIFO (named pipe), not a regular file"),
    ] {
        std::fs::remove_file(&metrics).unwrap();
        match kind {
            "zero" => std::os::unix::fs::symlink("/dev/zero", &metrics).unwrap(),
            _ => mkfifo(&metrics),
        }
        let o = fit_bounded(root, &["report", "runs"]);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{kind}: {err}");
        assert!(
            err.contains("metrics.jsonl") && err.contains(why),
            "{kind}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            common::stdout(&o).contains("sherl"),
            "{kind}: the run is reported"
        );
        // an unfinished run with such a metrics.jsonl: skipped, not hung
        let unfinished = root.join("runs").join("unfinished");
        std::fs::create_dir_all(&unfinished).unwrap();
        std::fs::copy(t.run.join("config.json"), unfinished.join("config.json")).unwrap();
        let m = unfinished.join("metrics.jsonl");
        let _ = std::fs::remove_file(&m);
        match kind {
            "zero" => std::os::unix::fs::symlink("/dev/zero", &m).unwrap(),
            _ => mkfifo(&m),
        }
        let o = fit_bounded(root, &["report", "runs"]);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{kind}: {err}");
        assert!(err.contains("skipped"), "{kind}: {err}");
    }
}

/// Case 2 for the run's own files: `config.json` and `summary.json` that
/// are FIFOs or links to `/dev/zero` are refused by predict and report,
/// naming them; an oversized one too.
#[test]
fn run_files_that_are_not_regular_files_are_refused() {
    let t = trained_run(283);
    let root = &t.f.root;
    for name in ["config.json", "summary.json"] {
        let p = t.run.join(name);
        let saved = std::fs::read(&p).unwrap();
        for kind in ["zero", "fifo", "big"] {
            std::fs::remove_file(&p).unwrap();
            match kind {
                "zero" => std::os::unix::fs::symlink("/dev/zero", &p).unwrap(),
                "fifo" => mkfifo(&p),
                _ => std::fs::File::create(&p)
                    .unwrap()
                    .set_len(sherl::fsutil::SMALL_FILE_LIMIT + 1)
                    .unwrap(),
            }
            let o = predict(root, &t.run, "p.jsonl");
            refused_with(&o, &[name]);
            assert!(!root.join("p.jsonl").exists());
            let o = fit_bounded(root, &["report", "runs"]);
            let err = common::stderr(&o);
            assert!(!err.contains("panicked"), "{err}");
            assert!(err.contains(name), "{name} {kind}: {err}");
        }
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, saved).unwrap();
    }
}

/// Case 6 for retrieval runs: `search` reads `config.json` through the
/// same check, so an edited one (here its recorded caption cache swapped
/// for the image cache) is refused naming it, and a FIFO in its place does
/// not hang.
#[test]
fn search_refuses_an_edited_retrieval_config() {
    let f = crate::retrieval::retrieval_fixture();
    let root = &f.root;
    let o = fit_bounded(
        root,
        &[
            "run",
            "--task",
            "retrieval",
            "--image-cache",
            "img",
            "--text-cache",
            "txt",
            "--image-backbone",
            "vit",
            "--text-backbone",
            "bert",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--joint-dim",
            "16",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--out",
            "runs",
        ],
    );
    let s = summary(&o);
    let run = root.join(s["run_dir"].as_str().unwrap());
    let run_s = run.to_str().unwrap().to_owned();
    let search = |extra: &[&str]| {
        let mut a = vec![
            "search",
            "--image-backbone",
            "vit",
            "--text-backbone",
            "bert",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--run",
            &run_s,
            "--text",
            "w15 w50",
        ];
        a.extend_from_slice(extra);
        fit_bounded(root, &a)
    };
    let o = search(&[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let config = run.join("config.json");
    let original = std::fs::read(&config).unwrap();
    let mut c: Value = serde_json::from_slice(&original).unwrap();
    c["retrieval"]["joint_dim"] = 8.into();
    write_value(&config, &c);
    refused_with(&search(&[]), &["config.json", "changed since the run"]);
    std::fs::remove_file(&config).unwrap();
    mkfifo(&config);
    refused_with(&search(&[]), &["config.json", "FIFO"]);
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&config, &original).unwrap();
    let o = search(&[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
}
