//! `sherl-fit predict` as a new user runs it: columns remembered from the
//! run's cache, standard input and plain text files read without extra
//! flags, the text shown beside each prediction, and a help that lists only
//! what predict uses.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::{self, tiny};
use crate::fit::{fit, summary};

/// A cache extracted from columns named `sentence` / `sentiment` (not the
/// reader's defaults `text` / `label`), and one SHERL run trained on it.
/// `pair`: a sentence-pair task (`sentence` + `second`).
fn trained(pair: bool) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    tiny::tiny_backbone(&root.join("backbone"), &tiny::TinyConfig::default(), 42);
    tiny::write_dataset(&root.join("plain.csv"), 60, 12, 100, 5);
    let csv = std::fs::read_to_string(root.join("plain.csv")).unwrap();
    let mut out = String::new();
    for (i, line) in csv.lines().enumerate() {
        let (text, rest) = line.split_once(',').unwrap();
        let (label, _group) = rest.split_once(',').unwrap();
        match (i, pair) {
            (0, false) => out.push_str("sentiment,sentence\n"),
            (0, true) => out.push_str("sentiment,sentence,second\n"),
            (_, false) => out.push_str(&format!("{label},{text}\n")),
            (_, true) => out.push_str(&format!("{label},{text},{text} w5\n")),
        }
    }
    std::fs::write(root.join("data.csv"), out).unwrap();
    let mut args = vec![
        "run",
        "--backbone",
        "backbone",
        "--data",
        "data.csv",
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--split",
        "train=0.6,valid=0.2,test=0.2",
        "--max-len",
        "16",
        "--device",
        "cpu",
        "--out",
        "cache",
    ];
    if pair {
        args.extend(["--text-pair-column", "second"]);
    }
    let o = common::run("sherl-extract", &args, &root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s = summary(&fit(&root, &["--epochs", "1"]));
    let run = root.join(s["run_dir"].as_str().unwrap());
    (tmp, run)
}

/// Run predict in `root` with `stdin` piped in (when given).
fn predict(root: &Path, run: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(common::bin("sherl-fit"));
    c.args(["predict", "--run"])
        .arg(run)
        .args(["--backbone", "backbone", "--device", "cpu"])
        .args(args)
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
    child.wait_with_output().unwrap()
}

/// The JSON lines of a successful predict's stdout.
fn lines(o: &Output) -> Vec<Value> {
    assert!(o.status.success(), "{}", common::stderr(o));
    common::stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The texts of `data.csv` (its second column), in file order.
fn texts(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("data.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().to_owned())
        .collect()
}

#[test]
fn predict_remembers_the_columns_and_reads_stdin_and_text_files() {
    let (tmp, run) = trained(false);
    let root = tmp.path();
    let texts = texts(root);

    // The cache's columns (`sentence`, `sentiment`) are used without flags,
    // and the true labels give an accuracy.
    let o = predict(
        root,
        &run,
        &["--data", "data.csv", "--out", "pred.jsonl"],
        None,
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let s: Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(s["examples"], 60);
    assert_eq!(s["labelled"], 60);
    assert!(s["accuracy"].is_number(), "{s}");
    let from_csv: Vec<Value> = std::fs::read_to_string(root.join("pred.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(from_csv.len(), 60);
    for (line, text) in from_csv.iter().zip(&texts) {
        assert_eq!(line["text"].as_str().unwrap(), text, "{line}");
        assert!(line["true_label"].is_string(), "{line}");
    }

    // A plain text file, one example per line (blank lines skipped, ids keep
    // the line numbers), gives the same predictions.
    let mut txt = texts.join("\n\n");
    txt.push('\n');
    std::fs::write(root.join("new.txt"), &txt).unwrap();
    let from_txt = lines(&predict(root, &run, &["--data", "new.txt"], None));
    // Standard input, with `--data -`.
    let from_stdin = lines(&predict(root, &run, &["--data", "-"], Some(&txt)));
    assert_eq!(from_txt.len(), 60);
    assert_eq!(from_stdin.len(), 60);
    for (i, ((c, t), s)) in from_csv.iter().zip(&from_txt).zip(&from_stdin).enumerate() {
        assert_eq!(t["id"], format!("new:{}", 2 * i + 1));
        assert_eq!(s["id"], format!("stdin:{}", 2 * i + 1));
        for other in [t, s] {
            assert_eq!(other["text"], c["text"]);
            assert_eq!(other["label"], c["label"]);
            assert_eq!(other["probabilities"], c["probabilities"]);
            assert!(other.get("true_label").is_none(), "{other}");
        }
    }

    // A text cut to its first characters, or left out.
    let long = "w7 w8 w9 w10 w11 w12";
    let cut = lines(&predict(
        root,
        &run,
        &["--data", "-", "--text-chars", "5"],
        Some(long),
    ));
    assert_eq!(cut[0]["text"], "w7 w8…");
    let none = lines(&predict(
        root,
        &run,
        &["--data", "-", "--text-chars", "0"],
        Some(long),
    ));
    assert!(none[0].get("text").is_none(), "{}", none[0]);

    // A label column asked for by name must be there; one taken from the run
    // need not be (new.csv has no `sentiment`).
    std::fs::write(root.join("new.csv"), "sentence\nw5 w6\n").unwrap();
    let plain = lines(&predict(root, &run, &["--data", "new.csv"], None));
    assert_eq!(plain.len(), 1);
    let o = predict(
        root,
        &run,
        &["--data", "new.csv", "--label-column", "sentiment"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("no label column named `sentiment`"),
        "{}",
        common::stderr(&o)
    );
}

#[test]
fn predict_for_a_pair_task_refuses_one_text_per_line() {
    let (tmp, run) = trained(true);
    let root = tmp.path();
    // The CSV with both columns is read with the run's columns.
    let o = predict(root, &run, &["--data", "data.csv"], None);
    let out = lines(&o);
    assert_eq!(out.len(), 60);
    assert!(out[0]["text_pair"].as_str().unwrap().ends_with("w5"));
    // Plain text cannot hold the second text: a clear error, nothing written.
    let o = predict(root, &run, &["--data", "-"], Some("w5 w6\n"));
    assert_eq!(o.status.code(), Some(2));
    let err = common::stderr(&o);
    assert!(err.contains("trained on sentence pairs"), "{err}");
    assert!(common::stdout(&o).is_empty());
}
