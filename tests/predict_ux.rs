//! Predict and runs as a user expects them (issue 29, item 3): `predict`
//! on an image run takes a flat folder, a single image file and image
//! paths on stdin; `--backbone` defaults to the backbone the run recorded
//! while it is there unchanged (as does `export --backbone`); `--run RUNS` on a directory of runs lists
//! them, or takes the best with `--best`; `run` ends with a line for a
//! person on stderr.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::{self, tiny};
use crate::image_cache::{extract_images, image_fixture};
use crate::vit::write_image_folders;

/// `sherl-fit` in `root` with `args`, `stdin` piped in when given, killed
/// (and the test failed) if it hangs.
fn sherl_fit(root: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(common::bin("sherl-fit"));
    c.args(args)
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().expect("spawn sherl-fit");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    common::wait_bounded(child, 300).expect("sherl-fit did not finish")
}

fn ok(o: &Output) -> &Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
    o
}

fn failed(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected a failure: {}",
        common::stdout(o)
    );
    common::stderr(o)
}

/// The JSON lines on a successful predict's stdout, by id.
fn by_id(o: &Output) -> BTreeMap<String, Value> {
    common::stdout(ok(o))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v))
        .collect()
}

fn probs(v: &Value) -> Vec<f64> {
    v["probabilities"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_f64().unwrap())
        .collect()
}

fn same_probs(a: &Value, b: &Value) {
    let (pa, pb) = (probs(a), probs(b));
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(&pb) {
        assert!((x - y).abs() < 1e-5, "{a} vs {b}");
    }
    assert_eq!(a["label"], b["label"]);
}

/// Image inputs without a table: a flat folder (hidden entries ignored,
/// a FIFO never opened, a dangling link a bad row), a single file and
/// paths on stdin, each labelled as the same image is in a folder of class
/// folders; ids are the paths as given (relative to the folder). The
/// backbone is left to the one the run recorded.
#[test]
fn predict_takes_flat_folders_single_images_and_stdin_paths() {
    let f = image_fixture(8);
    extract_images(&f, "c", &["--dtype", "f32"]);
    let fit = sherl_fit(
        &f.root,
        &[
            "run",
            "--cache",
            "c",
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--device",
            "cpu",
            "--out",
            "runs",
            "--method",
            "linear-probe",
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ],
        None,
    );
    let s: Value = serde_json::from_str(common::stdout(ok(&fit)).lines().last().unwrap()).unwrap();
    let run = s["run_dir"].as_str().unwrap().to_owned();
    write_image_folders(&f.root.join("new"), 3, 99);
    let predict = |data: &str, extra: &[&str], stdin: Option<&str>| {
        let mut a = vec!["predict", "--run", &run, "--data", data, "--device", "cpu"];
        a.extend_from_slice(extra);
        sherl_fit(&f.root, &a, stdin)
    };
    let backbone = f.backbone.to_str().unwrap();
    let reference = by_id(&predict("new", &["--backbone", backbone], None));
    assert_eq!(reference.len(), 6);

    // A flat folder: copies of the same images, a hidden one, a FIFO.
    let flat = f.root.join("flat");
    std::fs::create_dir(&flat).unwrap();
    for id in reference.keys() {
        std::fs::copy(f.root.join("new").join(id), flat.join(id.replace('/', "_"))).unwrap();
    }
    std::fs::copy(f.root.join("new/a/00.png"), flat.join(".hidden.png")).unwrap();
    let fifo = Command::new("mkfifo")
        .arg(flat.join("pipe.png"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let o = predict("flat", &[], None);
    let got = by_id(&o);
    let want: Vec<String> = reference.keys().map(|id| id.replace('/', "_")).collect();
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), want);
    for (id, line) in &reference {
        let flat_line = &got[&id.replace('/', "_")];
        same_probs(flat_line, line);
        assert!(flat_line.get("true_label").is_none(), "{flat_line}");
    }
    let err = common::stderr(&o);
    assert!(err.contains("ignored 1 entries"), "{err}");
    assert!(err.contains("the backbone the run recorded"), "{err}");

    // A single image file, its id the path as given.
    let one = by_id(&predict("flat/a_01.png", &[], None));
    assert_eq!(one.keys().collect::<Vec<_>>(), ["flat/a_01.png"]);
    same_probs(&one["flat/a_01.png"], &reference["a/01.png"]);

    // Paths on stdin, one a line (blank lines skipped).
    let lines = by_id(&predict("-", &[], Some("new/b/02.png\n\nflat/a_00.png\n")));
    assert_eq!(lines.len(), 2);
    same_probs(&lines["new/b/02.png"], &reference["b/02.png"]);
    same_probs(&lines["flat/a_00.png"], &reference["a/00.png"]);
    let err = failed(&predict(
        "-",
        &[],
        Some("new/b/02.png\nnew/b/missing.png\n"),
    ));
    assert!(
        err.contains("missing.png") && err.contains("--skip-bad-rows"),
        "{err}"
    );

    // A dangling link is a bad row: an error naming it, or skipped.
    std::os::unix::fs::symlink("gone.png", flat.join("zz.png")).unwrap();
    let err = failed(&predict("flat", &[], None));
    assert!(err.contains("zz.png") && err.contains("dangling"), "{err}");
    assert_eq!(err.matches("--skip-bad-rows").count(), 1, "{err}");
    let skipped = by_id(&predict("flat", &["--skip-bad-rows"], None));
    assert_eq!(skipped.len(), 6);
}

/// A text fixture: tiny backbone, `data.csv`, a cache extracted with the
/// backbone given as the relative path `backbone`.
fn text_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tiny::tiny_backbone(&root.join("backbone"), &tiny::TinyConfig::default(), 42);
    tiny::write_dataset(&root.join("data.csv"), 60, 12, 100, 5);
    let o = common::run(
        "sherl-extract",
        &[
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
        ],
        root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    tmp
}

fn train(root: &Path, method: &str) -> (Value, String) {
    let o = sherl_fit(
        root,
        &[
            "run",
            "--cache",
            "cache",
            "--backbone",
            "backbone",
            "--out",
            "runs",
            "--method",
            method,
            "--epochs",
            "1",
        ],
        None,
    );
    let s: Value = serde_json::from_str(common::stdout(ok(&o)).lines().last().unwrap()).unwrap();
    (s, common::stderr(&o))
}

/// `run` ends with one line for a person on stderr (scores, where the run
/// is, the predict command), stdout staying the JSON line; `predict --run
/// RUNS` lists the runs, best valid accuracy first, and `--best` takes
/// that one and says so; a directory without runs says so.
#[test]
fn run_summarises_and_predict_lists_or_picks_runs() {
    let tmp = text_fixture();
    let root = tmp.path();
    let mut runs = Vec::new();
    for method in ["linear-probe", "sherl"] {
        let (s, err) = train(root, method);
        let dir = s["run_dir"].as_str().unwrap().to_owned();
        let valid = s["valid_accuracy"].as_f64().unwrap();
        let line = err.lines().last().unwrap();
        assert!(
            line.contains(&format!("{method} run {}", s["run_id"].as_str().unwrap()))
                && line.contains(&format!("valid accuracy {valid:.4}"))
                && line.contains(&format!("test {:.4}", s["test_accuracy"].as_f64().unwrap()))
                && line.contains(&format!("run in {dir}"))
                && line.contains(&format!("sherl-fit predict --run {dir} --data FILE")),
            "{line}"
        );
        runs.push((valid, dir, s["run_id"].as_str().unwrap().to_owned()));
    }
    // The listing's order: best valid accuracy first, ties by directory.
    runs.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));

    let err = failed(&sherl_fit(
        root,
        &[
            "predict", "--run", "runs", "--data", "data.csv", "--device", "cpu",
        ],
        None,
    ));
    assert!(!err.contains("No such file"), "{err}");
    assert!(
        err.contains("a directory of 2 runs") && err.contains("--best"),
        "{err}"
    );
    let first = err.find(&runs[0].2).expect("first run listed");
    let second = err.find(&runs[1].2).expect("second run listed");
    assert!(first < second, "{err}");
    assert!(err.contains(&format!("{:.4}", runs[0].0)), "{err}");

    let o = sherl_fit(
        root,
        &[
            "predict",
            "--run",
            "runs",
            "--best",
            "--data",
            "data.csv",
            "--device",
            "cpu",
            "--out",
            "best.jsonl",
        ],
        None,
    );
    let s: Value = serde_json::from_str(common::stdout(ok(&o)).lines().last().unwrap()).unwrap();
    assert_eq!(s["run_id"], runs[0].2.as_str());
    assert!(
        common::stderr(&o).contains(&format!("--best: took run {}", runs[0].2)),
        "{}",
        common::stderr(&o)
    );

    std::fs::create_dir(root.join("empty")).unwrap();
    let err = failed(&sherl_fit(
        root,
        &[
            "predict", "--run", "empty", "--data", "data.csv", "--device", "cpu",
        ],
        None,
    ));
    assert!(err.contains("no run directory"), "{err}");
}

/// Without `--backbone`, predict uses the backbone the run recorded (same
/// predictions as naming it); moved away or changed, it names the
/// recorded path and asks for `--backbone`, which still works.
#[test]
fn backbone_defaults_to_the_recorded_one_while_it_is_unchanged() {
    let tmp = text_fixture();
    let root = tmp.path();
    let (s, _) = train(root, "linear-probe");
    let run = s["run_dir"].as_str().unwrap().to_owned();
    let predict = |extra: &[&str]| {
        let mut a = vec![
            "predict", "--run", &run, "--data", "data.csv", "--device", "cpu",
        ];
        a.extend_from_slice(extra);
        sherl_fit(root, &a, None)
    };
    let named = common::stdout(ok(&predict(&["--backbone", "backbone"])));
    let defaulted = common::stdout(ok(&predict(&[])));
    assert!(!named.is_empty());
    assert_eq!(named, defaulted);

    std::fs::rename(root.join("backbone"), root.join("moved")).unwrap();
    let err = failed(&predict(&[]));
    assert!(
        err.contains("backbone/model.onnx")
            && err.contains("is not there")
            && err.contains("--backbone"),
        "{err}"
    );
    assert_eq!(
        common::stdout(ok(&predict(&["--backbone", "moved"]))),
        named
    );

    // Same place, other bytes: refused, naming the recorded path.
    std::fs::create_dir(root.join("backbone")).unwrap();
    for e in std::fs::read_dir(root.join("moved")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), root.join("backbone").join(e.file_name())).unwrap();
    }
    let mut model = std::fs::read(root.join("backbone/model.onnx")).unwrap();
    model.push(0);
    std::fs::write(root.join("backbone/model.onnx"), model).unwrap();
    let err = failed(&predict(&[]));
    assert!(
        err.contains("backbone/model.onnx")
            && err.contains("has changed")
            && err.contains("--backbone"),
        "{err}"
    );
}

/// `export` without `--backbone` takes the backbone the run recorded, as
/// `predict` does: the same model as naming it; moved away, it names the
/// recorded path and asks for `--backbone`, which still works.
#[test]
fn export_backbone_defaults_to_the_recorded_one() {
    let tmp = text_fixture();
    let root = tmp.path();
    let (s, _) = train(root, "linear-probe");
    let run = s["run_dir"].as_str().unwrap().to_owned();
    let export = |out: &str, extra: &[&str]| {
        let mut a = vec!["export", "--run", &run, "--out", out];
        a.extend_from_slice(extra);
        sherl_fit(root, &a, None)
    };
    let summary = |o: &Output| -> Value {
        serde_json::from_str(common::stdout(ok(o)).lines().last().unwrap()).unwrap()
    };
    let named = summary(&export("named", &["--backbone", "backbone"]));
    let defaulted = export("defaulted", &[]);
    assert!(
        common::stderr(&defaulted).contains("the backbone the run recorded"),
        "{}",
        common::stderr(&defaulted)
    );
    let defaulted = summary(&defaulted);
    assert_eq!(named["bytes"], defaulted["bytes"]);
    let model = |dir: &str| std::fs::read(root.join(dir).join("model.onnx")).unwrap();
    assert_eq!(model("named"), model("defaulted"));

    std::fs::rename(root.join("backbone"), root.join("moved")).unwrap();
    let err = failed(&export("gone", &[]));
    assert!(
        err.contains("backbone/model.onnx")
            && err.contains("is not there")
            && err.contains("--backbone"),
        "{err}"
    );
    assert!(!root.join("gone").exists());
    summary(&export("moved-out", &["--backbone", "moved"]));
    assert_eq!(model("moved-out"), model("named"));
}
