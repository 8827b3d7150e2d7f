//! sherl-fit report: grouping by settings minus seed, statistics checked by
//! hand, order, missing test splits, skipped run directories, the CSV, JSON
//! and Markdown files and the pictures, all on hand-made run directories
//! (no training).

use std::path::Path;

use serde_json::{json, Value};
use sherl::report::{report, ReportOptions, Stat};

/// A `config` object as `sherl-fit run` writes it (FitConfig's fields).
fn config(method: &str, lr: f64, late_trainable: bool, seed: u64) -> Value {
    json!({
        "method": method,
        "late_layers": 1,
        "late_trainable": late_trainable,
        "reduction": 4,
        "side_dim": null,
        "early_layers": null,
        "probe_layer": null,
        "pool": "mean",
        "epochs": 3,
        "lr": lr,
        "lr_pretrained": 5e-5,
        "weight_decay": 0.01,
        "warmup": 0.06,
        "batch_size": 32,
        "max_tokens_per_batch": 8192,
        "grad_clip": 1.0,
        "seed": seed,
        "dropout": 0.1,
        "shuffle_chunks": 8,
    })
}

struct FakeRun<'a> {
    id: &'a str,
    config: Value,
    cache: &'a str,
    valid: f64,
    test: Option<f64>,
    valid_f1: f64,
    test_f1: Option<f64>,
    peak_mib: u64,
    seconds_per_epoch: f64,
    layer_weights: Option<(Vec<f64>, Vec<usize>)>,
    curve: Vec<f64>,
}

impl<'a> FakeRun<'a> {
    fn new(id: &'a str, config: Value, valid: f64, test: Option<f64>) -> Self {
        FakeRun {
            id,
            config,
            cache: "c0ffee00c0ffee00c0ffee00",
            valid,
            test,
            valid_f1: valid - 0.125,
            test_f1: test.map(|t| t - 0.125),
            peak_mib: 100,
            seconds_per_epoch: 2.0,
            layer_weights: None,
            curve: vec![valid - 0.25, valid - 0.125, valid],
        }
    }

    /// Write the run directory like `sherl-fit run` does, with a few fields
    /// a newer sherl might add.
    fn write(&self, runs: &Path) {
        let dir = runs.join(self.id);
        std::fs::create_dir_all(&dir).unwrap();
        let seed = self.config["seed"].as_u64().unwrap();
        let method = self.config["method"].as_str().unwrap();
        let cfg = json!({
            "run_id": self.id,
            "config": self.config,
            "model": { "inputs": [0, 1, 2, 5], "side_dim": 96, "classes": 2,
                       "trainable_params": 12345, "frozen_params": 7 },
            "labels": ["fresh", "rotten"],
            "cache": { "path": "/nowhere", "settings_hash": self.cache, "layers": [0, 1, 2, 5] },
            "sherl_version": "0.1.0",
            "a_future_field": { "nested": [1, 2, 3] },
        });
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let mut lines = String::new();
        for (i, acc) in self.curve.iter().enumerate() {
            let line = json!({
                "epoch": i + 1, "train_loss": 0.5, "train_accuracy": 0.7,
                "valid_loss": 0.6, "valid_accuracy": acc, "valid_macro_f1": acc - 0.1,
                "seconds": 2.0, "eval_seconds": 0.5, "tokens_per_second": 1000.0,
                "lr": 0.001, "gate": null, "another_new_metric": 42,
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
        let (weights, layers) = match &self.layer_weights {
            Some((w, l)) => (json!(w), json!(l)),
            None => (Value::Null, Value::Null),
        };
        let summary = json!({
            "run_id": self.id,
            "method": method,
            "seed": seed,
            "valid_accuracy": self.valid,
            "test_accuracy": self.test,
            "valid_macro_f1": self.valid_f1,
            "test_macro_f1": self.test_f1,
            "best_epoch": 3,
            "epochs": 3,
            "trainable_params": 12345,
            "frozen_params": 7,
            "peak_rss_bytes": self.peak_mib * 1024 * 1024,
            "train_seconds": 3.0 * self.seconds_per_epoch,
            "seconds_per_epoch": self.seconds_per_epoch,
            "train_tokens_per_second": 1000.0,
            "layer_weights": weights,
            "layer_weight_layers": layers,
            "run_dir": dir,
            "cache": self.cache,
            "some_field_from_the_future": "ignored",
        });
        std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    }
}

/// Three groups (the valid means are exact in binary, so the tie between the
/// first two is exact):
/// - sherl lr=0.001 late_trainable=false, seeds 0..3: valid 0.75, 0.8125,
///   0.875 (mean 0.8125, sample std 0.0625), test 0.5, 0.625, 0.75 (mean
///   0.625, std 0.125), layer weights;
/// - linear-probe, one seed: valid 0.8125 (ties), test 0.75 (wins the tie);
/// - sherl lr=0.0001 late_trainable=true, seeds 0..2: valid 0.5, 0.75 (mean
///   0.625, std 0.125 * sqrt 2), no test split.
///
/// Plus a killed run, a failed run and a stray file.
fn fixture(runs: &Path) {
    let lw = |w: [f64; 3]| Some((w.to_vec(), vec![0, 1, 2]));
    let mut a0 = FakeRun::new(
        "sherl-a0",
        config("sherl", 0.001, false, 0),
        0.75,
        Some(0.5),
    );
    a0.layer_weights = lw([0.5, 0.25, 0.25]);
    a0.peak_mib = 300;
    a0.seconds_per_epoch = 1.0;
    let mut a1 = FakeRun::new(
        "sherl-a1",
        config("sherl", 0.001, false, 1),
        0.8125,
        Some(0.625),
    );
    a1.layer_weights = lw([0.25, 0.25, 0.5]);
    a1.peak_mib = 500;
    a1.seconds_per_epoch = 2.0;
    let mut a2 = FakeRun::new(
        "sherl-a2",
        config("sherl", 0.001, false, 2),
        0.875,
        Some(0.75),
    );
    a2.layer_weights = lw([0.75, 0.25, 0.0]);
    a2.peak_mib = 400;
    a2.seconds_per_epoch = 6.0;
    let lp = FakeRun::new(
        "linear-probe-p0",
        config("linear-probe", 0.001, false, 0),
        0.8125,
        Some(0.75),
    );
    let b0 = FakeRun::new("sherl-b0", config("sherl", 0.0001, true, 0), 0.5, None);
    let b1 = FakeRun::new("sherl-b1", config("sherl", 0.0001, true, 1), 0.75, None);
    for r in [&a0, &a1, &a2, &lp, &b0, &b1] {
        r.write(runs);
    }

    // Killed after two epochs: config and metrics, no summary.
    let killed = runs.join("sherl-killed");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(
        killed.join("config.json"),
        json!({ "config": config("sherl", 0.01, false, 0) }).to_string(),
    )
    .unwrap();
    std::fs::write(
        killed.join("metrics.jsonl"),
        "{\"epoch\":1,\"valid_accuracy\":0.5}\n{\"epoch\":2,\"valid_accuracy\":0.6}\n",
    )
    .unwrap();
    // Failed: error.json.
    let failed = runs.join("sherl-failed");
    std::fs::create_dir_all(&failed).unwrap();
    std::fs::write(
        failed.join("config.json"),
        json!({ "config": config("sherl", 10.0, false, 0) }).to_string(),
    )
    .unwrap();
    std::fs::write(
        failed.join("error.json"),
        json!({ "run_id": "sherl-failed", "error": "non-finite loss at step 3" }).to_string(),
    )
    .unwrap();
    std::fs::write(runs.join("sweep.jsonl"), "not a run directory\n").unwrap();
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn stat_is_mean_and_sample_std() {
    let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert!(close(s.mean, 2.5));
    // sum of squares 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert!(close(s.std.unwrap(), (5.0f64 / 3.0).sqrt()));
    assert_eq!(s.n, 4);
    let one = Stat::of(&[0.7]).unwrap();
    assert_eq!((one.mean, one.std, one.n), (0.7, None, 1));
    assert!(Stat::of(&[]).is_none());
}

#[test]
fn report_groups_by_settings_minus_seed_sorts_by_valid_and_skips_incomplete_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    fixture(&runs);
    let opts = ReportOptions::new(&runs);
    assert_eq!(opts.out, runs.join("report"));
    let r = report(&opts).unwrap();

    let labels: Vec<&str> = r.groups.iter().map(|g| g.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "linear-probe",
            "sherl late_trainable=false lr=0.001",
            "sherl late_trainable=true lr=0.0001",
        ],
        "valid-accuracy order, the tie (valid accuracy and macro-F1) broken by label"
    );

    let lp = &r.groups[0];
    assert_eq!(lp.method, "linear-probe");
    assert_eq!(lp.settings_label, "");
    assert_eq!(lp.seeds, [0]);
    assert_eq!(lp.valid_accuracy.std, None);

    let a = &r.groups[1];
    assert_eq!(a.method, "sherl");
    assert_eq!(a.seeds, [0, 1, 2]);
    assert_eq!(a.run_ids, ["sherl-a0", "sherl-a1", "sherl-a2"]);
    assert!(a.settings.get("seed").is_none(), "seed is not a setting");
    assert_eq!(a.settings["lr"], json!(0.001));
    assert!(close(a.valid_accuracy.mean, 0.8125));
    assert!(close(a.valid_accuracy.std.unwrap(), 0.0625));
    let t = a.test_accuracy.as_ref().unwrap();
    assert!(close(t.mean, 0.625) && close(t.std.unwrap(), 0.125) && t.n == 3);
    let f = a.valid_macro_f1.as_ref().unwrap();
    assert!(close(f.mean, 0.6875) && close(f.std.unwrap(), 0.0625));
    assert!(close(a.test_macro_f1.as_ref().unwrap().mean, 0.5));
    assert_eq!(a.trainable_params, Some(12345));
    assert_eq!(a.peak_memory_mib, Some(500.0), "max over seeds");
    assert_eq!(a.seconds_per_epoch, Some(3.0), "mean over seeds");
    // Curves: epoch e is valid - 0.25, - 0.125, + 0 for every seed.
    let curve: Vec<(usize, f64, usize)> = a
        .valid_accuracy_curve
        .iter()
        .map(|p| (p.epoch, p.valid_accuracy, p.n))
        .collect();
    assert_eq!(curve, [(1, 0.5625, 3), (2, 0.6875, 3), (3, 0.8125, 3)]);
    let weights: Vec<(usize, f64)> = a.layer_weights.iter().map(|w| (w.layer, w.mean)).collect();
    assert_eq!(weights, [(0, 0.5), (1, 0.25), (2, 0.25)]);

    let b = &r.groups[2];
    assert_eq!(b.seeds, [0, 1]);
    assert!(close(b.valid_accuracy.mean, 0.625));
    assert!(close(
        b.valid_accuracy.std.unwrap(),
        0.125 * std::f64::consts::SQRT_2
    ));
    assert!(b.test_accuracy.is_none() && b.test_macro_f1.is_none());

    // Skipped: the killed and the failed run, not the stray file, not the
    // report directory itself.
    let skipped: Vec<(String, &str)> = r
        .skipped
        .iter()
        .map(|(d, why)| {
            (
                d.file_name().unwrap().to_string_lossy().into_owned(),
                why.as_str(),
            )
        })
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "sherl-failed");
    assert_eq!(skipped[0].1, "failed: non-finite loss at step 3");
    assert_eq!(skipped[1].0, "sherl-killed");
    assert!(skipped[1].1.contains("no summary.json"), "{}", skipped[1].1);
    assert!(
        skipped[1].1.contains("killed after 2 epoch(s)"),
        "{}",
        skipped[1].1
    );

    // A second report over the same directory does not count RUNS/report.
    let again = report(&opts).unwrap();
    assert_eq!(again.skipped.len(), 2);
    assert_eq!(again.markdown, r.markdown);
}

#[test]
fn report_writes_csv_json_and_markdown() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    fixture(&runs);
    let out = tmp.path().join("elsewhere");
    let r = report(&ReportOptions {
        out: out.clone(),
        ..ReportOptions::new(&runs)
    })
    .unwrap();
    for name in [
        "report.csv",
        "report.json",
        "report.md",
        "learning_curves.png",
        "learning_curves.svg",
        "layer_weights.png",
        "layer_weights.svg",
    ] {
        assert!(r.files.contains(&out.join(name)), "{name} in {:?}", r.files);
        assert!(out.join(name).is_file(), "{name}");
    }
    assert!(!runs.join("report").exists(), "--out is honoured");

    // CSV: one row per group, best first, raw fractions, empty for null.
    let mut rd = csv::Reader::from_path(out.join("report.csv")).unwrap();
    let header: Vec<String> = rd.headers().unwrap().iter().map(String::from).collect();
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 3);
    let col = |row: usize, name: &str| -> String {
        let i = header.iter().position(|h| h == name).unwrap();
        rows[row][i].to_string()
    };
    assert_eq!(col(0, "method"), "linear-probe");
    assert_eq!(col(0, "valid_accuracy_std"), "");
    assert_eq!(col(1, "label"), "sherl late_trainable=false lr=0.001");
    assert_eq!(col(1, "seeds"), "3");
    assert_eq!(col(1, "valid_accuracy_mean"), "0.8125");
    assert_eq!(col(1, "valid_accuracy_std"), "0.0625");
    assert_eq!(col(1, "test_accuracy_mean"), "0.625");
    assert_eq!(col(1, "test_accuracy_std"), "0.125");
    assert_eq!(col(1, "trainable_params"), "12345");
    assert_eq!(col(1, "peak_memory_mib"), "500");
    assert_eq!(col(1, "seconds_per_epoch"), "3");
    assert_eq!(col(1, "run_ids"), "sherl-a0 sherl-a1 sherl-a2");
    assert_eq!(col(2, "test_accuracy_mean"), "");
    assert_eq!(col(2, "test_accuracy_n"), "0");
    let settings: Value = serde_json::from_str(&col(2, "settings_json")).unwrap();
    assert_eq!(settings["late_trainable"], json!(true));
    assert!(settings.get("seed").is_none());

    // JSON: the same groups, null test, the skipped runs.
    let doc: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let groups = doc["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3);
    assert_eq!(
        groups[1]["valid_accuracy"],
        json!({"mean": 0.8125, "std": 0.0625, "n": 3})
    );
    assert_eq!(groups[1]["seeds"], json!([0, 1, 2]));
    assert_eq!(groups[2]["test_accuracy"], Value::Null);
    assert_eq!(groups[2]["label"], "sherl late_trainable=true lr=0.0001");
    assert_eq!(doc["skipped"].as_array().unwrap().len(), 2);
    assert!(doc["note"].as_str().unwrap().contains("valid split"));

    // Markdown: returned and written, percentages, "-" for no test split,
    // the selection note, the skipped runs and the pictures.
    let md = &r.markdown;
    assert_eq!(md, &std::fs::read_to_string(out.join("report.md")).unwrap());
    assert!(md.contains("6 complete run(s) in 3 group(s); 2 run directories skipped."));
    // the groups' table (the selection table below starts with its own header)
    let lines: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| # "))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| l.starts_with("| "))
        .collect();
    assert_eq!(lines.len(), 4, "header and three rows:\n{md}");
    assert!(lines[0].contains("valid acc (%)") && lines[0].contains("test acc (%)"));
    assert_eq!(
        lines[1],
        "| 1 | linear-probe | - | 1 | 81.25 | 75.00 | 68.75 | 62.50 | 12,345 | 100 | 2.00 |"
    );
    assert_eq!(
        lines[2],
        "| 2 | sherl | late_trainable=false lr=0.001 | 3 | 81.25 ± 6.25 | 62.50 ± 12.50 | 68.75 ± 6.25 | 50.00 ± 12.50 | 12,345 | 500 | 3.00 |"
    );
    assert!(
        lines[3].starts_with("| 3 | sherl | late_trainable=true lr=0.0001 | 2 | 62.50 ± 17.68 | - | 50.00 ± 17.68 | - |"),
        "{}",
        lines[3]
    );
    assert!(md.contains("selected on the valid split only"));
    assert!(md.contains("- `sherl-failed`: failed: non-finite loss at step 3"));
    assert!(md.contains("- `sherl-killed`: incomplete"));
    assert!(md.contains("](learning_curves.png)"));
    assert!(md.contains("](layer_weights.png)"));
    assert!(md.contains("shared: `batch_size=32"), "{md}");
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is a PNG",
        path.display()
    );
    assert!(
        bytes.len() > 5_000,
        "{}: {} bytes",
        path.display(),
        bytes.len()
    );
    // IHDR: width and height are big-endian u32 at bytes 16..24.
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(w >= 800 && h >= 500, "{w}x{h}");
}

#[test]
fn report_draws_png_and_svg_pictures_with_the_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    fixture(&runs);
    let r = report(&ReportOptions::new(&runs)).unwrap();
    let out = runs.join("report");
    assert_png(&out.join("learning_curves.png"));
    assert_png(&out.join("layer_weights.png"));

    let curves = std::fs::read_to_string(out.join("learning_curves.svg")).unwrap();
    assert!(curves.contains("<svg"));
    for g in &r.groups {
        assert!(
            curves.contains(&g.label),
            "{} in learning_curves.svg",
            g.label
        );
    }
    assert!(curves.contains("Valid accuracy per epoch"));

    // Layer weights: only the sherl group that has them, layers named.
    let weights = std::fs::read_to_string(out.join("layer_weights.svg")).unwrap();
    assert!(weights.contains("<svg"));
    assert!(weights.contains("sherl late_trainable=false lr=0.001"));
    assert!(!weights.contains("linear-probe"));
    assert!(!weights.contains("lr=0.0001"));
    // layers named by their index under the axis' description
    let texts = svg_texts(&weights);
    assert!(
        texts.contains(&"early layer: hidden_states index"),
        "{texts:?}"
    );
    for layer in ["0", "1", "2"] {
        assert!(texts.contains(&layer), "{layer} in {texts:?}");
    }
}

#[test]
fn report_without_layer_weights_skips_that_picture() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // A complete run with the fewest fields: no layer weights, no test
    // split, no metrics.jsonl, and no optional summary fields at all.
    FakeRun::new("lp0", config("linear-probe", 0.01, false, 0), 0.7, None).write(&runs);
    FakeRun::new("lp1", config("linear-probe", 0.01, false, 1), 0.6, None).write(&runs);
    let bare = runs.join("sherl-bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(
        bare.join("config.json"),
        // The cache known from config.json only.
        json!({
            "config": config("sherl", 0.001, false, 3),
            "cache": { "settings_hash": "c0ffee00c0ffee00c0ffee00" },
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        bare.join("summary.json"),
        json!({ "method": "sherl", "seed": 3, "valid_accuracy": 0.5 }).to_string(),
    )
    .unwrap();
    // A stale picture from an earlier report is removed.
    let out = runs.join("report");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("layer_weights.png"), b"old").unwrap();

    let r = report(&ReportOptions::new(&runs)).unwrap();
    assert_eq!(r.groups.len(), 2);
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    assert_eq!(r.groups[0].label, "linear-probe");
    assert_eq!(r.groups[0].seeds, [0, 1]);
    let bare = &r.groups[1];
    assert_eq!(bare.label, "sherl");
    assert_eq!(bare.run_ids, ["sherl-bare"]);
    assert!(bare.valid_macro_f1.is_none() && bare.trainable_params.is_none());
    assert!(bare.valid_accuracy_curve.is_empty() && bare.layer_weights.is_empty());
    assert!(r
        .markdown
        .contains("| 2 | sherl | - | 1 | 50.00 | - | - | - | - | - | - |"));

    assert!(!out.join("layer_weights.png").exists());
    assert!(!out.join("layer_weights.svg").exists());
    assert!(!r.markdown.contains("layer_weights"));
    assert!(r
        .files
        .iter()
        .all(|f| !f.to_string_lossy().contains("layer_weights")));
    assert_png(&out.join("learning_curves.png"));
    let svg = std::fs::read_to_string(out.join("learning_curves.svg")).unwrap();
    // plotters writes each text on its own line: "<text ...>\nLABEL\n</text>".
    assert!(svg.contains("\nlinear-probe\n"), "{svg}");
    assert!(!svg.contains("\nsherl\n"), "the sherl run has no curve");
}

#[test]
fn report_keeps_runs_on_different_caches_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let mut a = FakeRun::new("a", config("sherl", 0.001, false, 0), 0.7, Some(0.6));
    a.cache = "aaaaaaaaaaaaaaaaaaaa";
    let mut b = FakeRun::new("b", config("sherl", 0.001, false, 1), 0.8, Some(0.6));
    b.cache = "bbbbbbbbbbbbbbbbbbbb";
    a.write(&runs);
    b.write(&runs);
    let r = report(&ReportOptions::new(&runs)).unwrap();
    let labels: Vec<&str> = r.groups.iter().map(|g| g.label.as_str()).collect();
    assert_eq!(
        labels,
        ["sherl cache=bbbbbbbbbbbb", "sherl cache=aaaaaaaaaaaa"]
    );
}

#[test]
fn report_fails_without_complete_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let failed = runs.join("x");
    std::fs::create_dir_all(&failed).unwrap();
    std::fs::write(failed.join("error.json"), r#"{"error": "boom"}"#).unwrap();
    let e = report(&ReportOptions::new(&runs)).unwrap_err().to_string();
    assert!(e.contains("no complete runs") && e.contains("boom"), "{e}");
    let e = report(&ReportOptions::new(tmp.path().join("missing")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

/// Like the demo (`pipelines/demo.sh`): five methods, three seeds each, valid
/// accuracy between 69 and 81 %, full-ft trained for two epochs. Seed s's
/// curve is `base + (s - 1) * delta`, so at every epoch the mean is `base`,
/// the sample std `delta`, the min `base - delta` and the max `base +
/// delta`. SHERL's five layer weights are `MEANS + (s - 1) * OFFSETS`: the
/// offsets sum to 0, so every seed's weights sum to 0.986 like the demo's.
const DEMO: [(&str, &[f64], f64); 5] = [
    ("full-ft", &[0.79, 0.805], 0.002),
    ("sherl", &[0.74, 0.765, 0.773], 0.011),
    ("unipt", &[0.72, 0.745, 0.751], 0.009),
    ("late-layer", &[0.73, 0.742, 0.747], 0.005),
    ("linear-probe", &[0.70, 0.728, 0.738], 0.006),
];
const MEANS: [f64; 5] = [0.13, 0.2, 0.21, 0.23, 0.216];
const OFFSETS: [f64; 5] = [0.01, -0.01, 0.02, -0.02, 0.0];

fn demo_fixture(runs: &Path) {
    for (method, base, delta) in DEMO {
        for seed in 0..3u64 {
            let shift = (seed as f64 - 1.0) * delta;
            let curve: Vec<f64> = base.iter().map(|b| b + shift).collect();
            let best = curve.iter().copied().fold(0.0, f64::max);
            let id = format!("{method}-s{seed}");
            let mut run = FakeRun::new(&id, config(method, 0.001, false, seed), best, Some(best));
            run.curve = curve;
            if method == "sherl" {
                let w = MEANS
                    .iter()
                    .zip(OFFSETS)
                    .map(|(m, o)| m + (seed as f64 - 1.0) * o)
                    .collect();
                run.layer_weights = Some((w, vec![0, 1, 2, 3, 4]));
            }
            run.write(runs);
        }
    }
}

/// `Y axis: A % to B %` from a picture's notes.
fn y_axis_note(svg: &str) -> (f64, f64) {
    let at = svg
        .find("Y axis: ")
        .expect("the notes say what the y axis spans")
        + 8;
    let words: Vec<&str> = svg[at..].split_whitespace().take(5).collect();
    assert_eq!(
        (words[1], words[2], words[4]),
        ("%", "to", "%,"),
        "{words:?}"
    );
    (words[0].parse().unwrap(), words[3].parse().unwrap())
}

/// The texts of an SVG (plotters writes "<text ...>\nTEXT\n</text>").
fn svg_texts(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            t.split_once('>')
                .and_then(|(_, rest)| rest.split_once("</text>"))
        })
        .map(|(text, _)| text.trim())
        .collect()
}

#[test]
fn report_carries_the_spread_over_seeds_per_epoch_and_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    fixture(&runs);
    let r = report(&ReportOptions::new(&runs)).unwrap();

    // sherl lr=0.001: the seeds' curves are valid - 0.25, - 0.125, + 0 with
    // valid 0.75, 0.8125, 0.875: sample std 0.0625 at every epoch.
    let a = &r.groups[1];
    assert_eq!(a.label, "sherl late_trainable=false lr=0.001");
    let spread: Vec<(usize, f64, f64, usize)> = a
        .valid_accuracy_curve
        .iter()
        .map(|p| (p.epoch, p.min, p.max, p.n))
        .collect();
    assert_eq!(
        spread,
        [(1, 0.5, 0.625, 3), (2, 0.625, 0.75, 3), (3, 0.75, 0.875, 3)]
    );
    for p in &a.valid_accuracy_curve {
        assert!(
            close(p.std.unwrap(), 0.0625),
            "epoch {}: {:?}",
            p.epoch,
            p.std
        );
    }
    // Layer weights [0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0.75, 0.25, 0]:
    // sample std 0.25, 0, 0.25.
    let lw: Vec<(usize, f64, f64, f64)> = a
        .layer_weights
        .iter()
        .map(|w| (w.layer, w.std.unwrap(), w.min, w.max))
        .collect();
    assert_eq!(
        lw,
        [
            (0, 0.25, 0.25, 0.75),
            (1, 0.0, 0.25, 0.25),
            (2, 0.25, 0.0, 0.5)
        ]
    );
    // One seed: no std, min = max = the value.
    let lp = &r.groups[0];
    assert_eq!(lp.seeds.len(), 1);
    for p in &lp.valid_accuracy_curve {
        assert_eq!(
            (p.std, p.min, p.max),
            (None, p.valid_accuracy, p.valid_accuracy)
        );
    }

    // report.json carries the same, null std for one seed.
    let doc: Value =
        serde_json::from_slice(&std::fs::read(runs.join("report/report.json")).unwrap()).unwrap();
    let groups = doc["groups"].as_array().unwrap();
    assert_eq!(
        groups[1]["valid_accuracy_curve"][0],
        json!({"epoch": 1, "valid_accuracy": 0.5625, "std": 0.0625, "min": 0.5, "max": 0.625, "n": 3})
    );
    assert_eq!(
        groups[1]["layer_weights"][2],
        json!({"layer": 2, "mean": 0.25, "std": 0.25, "min": 0.0, "max": 0.5, "n": 3})
    );
    assert_eq!(groups[0]["valid_accuracy_curve"][2]["std"], Value::Null);
}

#[test]
fn report_pictures_use_percent_an_honest_axis_and_show_the_seeds_spread() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    demo_fixture(&runs);
    let r = report(&ReportOptions::new(&runs)).unwrap();
    assert_eq!(r.groups.len(), 5);
    let out = runs.join("report");
    assert_png(&out.join("learning_curves.png"));
    assert_png(&out.join("layer_weights.png"));

    // The per-epoch spread is the one built into the fixture.
    for (method, base, delta) in DEMO {
        let g = r.groups.iter().find(|g| g.method == method).unwrap();
        assert_eq!(g.valid_accuracy_curve.len(), base.len(), "{method}");
        for (p, b) in g.valid_accuracy_curve.iter().zip(base) {
            assert_eq!(p.n, 3);
            assert!((p.valid_accuracy - b).abs() < 1e-12, "{method}");
            assert!((p.std.unwrap() - delta).abs() < 1e-12, "{method}");
            assert!((p.min - (b - delta)).abs() < 1e-12, "{method}");
            assert!((p.max - (b + delta)).abs() < 1e-12, "{method}");
        }
    }
    let sherl = r.groups.iter().find(|g| g.method == "sherl").unwrap();
    let sum: f64 = sherl.layer_weights.iter().map(|w| w.mean).sum();
    assert!((sum - 0.986).abs() < 1e-12, "{sum}");
    for ((w, m), o) in sherl.layer_weights.iter().zip(MEANS).zip(OFFSETS) {
        assert!((w.mean - m).abs() < 1e-12 && (w.std.unwrap() - o.abs()).abs() < 1e-12);
    }

    // Learning curves: in %, and the axis starts at a round number well
    // below the lowest band value (mean - std) and reaches past the highest.
    let curves = std::fs::read_to_string(out.join("learning_curves.svg")).unwrap();
    let texts = svg_texts(&curves);
    assert!(texts.contains(&"valid accuracy (%)"), "{texts:?}");
    let (lowest, highest) = r
        .groups
        .iter()
        .flat_map(|g| &g.valid_accuracy_curve)
        .map(|p| {
            let sd = p.std.unwrap_or(0.0);
            (
                100.0 * (p.valid_accuracy - sd),
                100.0 * (p.valid_accuracy + sd),
            )
        })
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), (a, b)| {
            (lo.min(a), hi.max(b))
        });
    assert!((lowest - 69.4).abs() < 1e-9 && (highest - 80.7).abs() < 1e-9);
    let (y0, y1) = y_axis_note(&curves);
    assert_eq!((y0, y1), (50.0, 90.0));
    assert!(y0 % 10.0 == 0.0 && y0 <= lowest - 10.0, "{y0} vs {lowest}");
    assert!(y1 > highest && y1 <= 100.0, "{y1} vs {highest}");
    assert!(
        (highest - lowest) <= (y1 - y0) / 2.0,
        "the data fill at most half of the axis"
    );
    // The ticks are percentages and include both ends of the axis.
    for tick in ["50", "60", "70", "80", "90"] {
        assert!(texts.contains(&tick), "tick {tick} in {texts:?}");
    }
    assert!(
        !texts.iter().any(|t| t.starts_with("0.")),
        "no fraction ticks: {texts:?}"
    );
    // A band per group (all have 3 seeds), and the notes say what it is.
    assert_eq!(curves.matches("<polygon").count(), 5);
    assert!(curves.contains("mean ± 1 sample standard deviation (n − 1)"));

    // Layer weights: what the numbers are, why they sum to less than 1,
    // error bars and their meaning.
    let weights = std::fs::read_to_string(out.join("layer_weights.svg")).unwrap();
    let texts = svg_texts(&weights).join(" ");
    for phrase in [
        "mean alpha over valid tokens",
        "averaged over the valid split",
        "real tokens",
        "hidden_states layer",
        "Tokens whose weights are all zero",
        "count as zero",
        "slightly less than 1",
        "sherl (sum 0.986)",
        "Error bars: ± 1 sample standard deviation (n − 1) over seeds",
    ] {
        assert!(texts.contains(phrase), "{phrase:?} in {texts}");
    }
    // each bar's label is its index, a text of its own
    let labels = svg_texts(&weights);
    for layer in 0..5 {
        let layer = layer.to_string();
        assert!(labels.contains(&layer.as_str()), "{layer} in {labels:?}");
    }
}

/// Selection on valid only, hand-computed: two sherl settings tie on mean
/// valid accuracy (0.8125) and the tie goes to the better valid macro-F1
/// (lr=0.01: 0.8 against 0.6875), although its test accuracy is the worse
/// (0.25 against 0.625); the probe's selected setting is the better valid
/// one (lr=0.01, valid 0.625, test 0.9), not the better test one (lr=0.1,
/// test 0.95). `--select-by lr` groups by the learning rate instead, and a
/// setting no run has is refused.
#[test]
fn report_selects_on_valid_only_one_row_per_method() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let mut s0 = FakeRun::new("s0", config("sherl", 0.001, false, 0), 0.75, Some(0.5));
    s0.valid_f1 = 0.625;
    let mut s1 = FakeRun::new("s1", config("sherl", 0.001, false, 1), 0.875, Some(0.75));
    s1.valid_f1 = 0.75;
    let mut t0 = FakeRun::new("t0", config("sherl", 0.01, false, 0), 0.8125, Some(0.25));
    t0.valid_f1 = 0.8;
    let p0 = FakeRun::new(
        "p0",
        config("linear-probe", 0.01, false, 0),
        0.625,
        Some(0.9),
    );
    let p1 = FakeRun::new("p1", config("linear-probe", 0.1, false, 0), 0.5, Some(0.95));
    for r in [&s0, &s1, &t0, &p0, &p1] {
        r.write(&runs);
    }
    let r = report(&ReportOptions::new(&runs)).unwrap();
    let labels: Vec<&str> = r.groups.iter().map(|g| g.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "sherl lr=0.01",
            "sherl lr=0.001",
            "linear-probe lr=0.01",
            "linear-probe lr=0.1"
        ]
    );
    let md = &r.markdown;
    assert!(md.contains("## Selected on valid, one per method"), "{md}");
    assert!(
        md.contains("| sherl | sherl lr=0.01 | 2 | 3 | 1 | 81.25 | 25.00 |"),
        "{md}"
    );
    assert!(
        md.contains("| linear-probe | linear-probe lr=0.01 | 2 | 2 | 1 | 62.50 | 90.00 |"),
        "{md}"
    );

    let mut opts = ReportOptions::new(&runs);
    opts.select_by = "lr".into();
    let md = report(&opts).unwrap().markdown;
    assert!(md.contains("## Selected on valid, one per lr"), "{md}");
    assert!(
        md.contains("| 0.01 | sherl lr=0.01 | 2 | 2 | 1 | 81.25 |"),
        "{md}"
    );
    assert!(
        md.contains("| 0.001 | sherl lr=0.001 | 1 | 2 | 2 | 81.25 ± 8.84 |"),
        "{md}"
    );
    assert!(
        md.contains("| 0.1 | linear-probe lr=0.1 | 1 | 1 | 1 | 50.00 |"),
        "{md}"
    );

    opts.select_by = "learning_rate".into();
    let e = report(&opts).unwrap_err().to_string();
    assert!(
        e.contains("--select-by learning_rate: no run has a setting 'learning_rate'")
            && e.contains("lr"),
        "{e}"
    );
}
