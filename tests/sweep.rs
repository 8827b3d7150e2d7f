//! `sherl-fit sweep` and `report` on the tiny fixture: every run of a grid
//! trains from one cache, a killed sweep resumes without redoing finished
//! runs, `--worker I/M` splits the grid exactly, and the report compares
//! the methods.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common;
use crate::fit::fit_fixture;

fn sweep(root: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec![
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
    a.extend_from_slice(args);
    common::run("sherl-fit", &a, root, &[])
}

fn finished(root: &Path) -> BTreeSet<String> {
    let Ok(dir) = std::fs::read_dir(root.join("runs")) else {
        return BTreeSet::new();
    };
    dir.map(|e| e.unwrap().path())
        .filter(|p| p.join("summary.json").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn sweep_runs_every_setting_and_reports() {
    let f = fit_fixture(60, 21, &["--layers", "all"]);
    std::fs::write(
        f.root.join("grid.json"),
        r#"{"method": ["sherl", "linear-probe", "unipt"], "seed": [0, 1], "epochs": 2}"#,
    )
    .unwrap();
    let o = sweep(&f.root, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let out = common::stdout(&o);
    // stdout is one JSON line per run and nothing else (`| jq` works)
    let summaries: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(summaries.len(), 6);
    assert_eq!(finished(&f.root).len(), 6);
    // the table at the end, on stderr, names every method
    let err = common::stderr(&o);
    // progress over the whole sweep, in epochs, with an ETA
    assert!(
        err.contains("sweep: 12/12 epochs (100%), ETA 0m00s"),
        "{err}"
    );
    // each run's log is kept and holds its epochs
    for s in &summaries {
        let id = s["run_id"].as_str().unwrap();
        let log =
            std::fs::read_to_string(f.root.join("runs/.sweep").join(format!("{id}.log"))).unwrap();
        assert!(log.contains("epoch 2:"), "{id}: {log}");
    }
    assert!(err.contains("| method"), "{err}");
    for m in ["sherl", "linear-probe", "unipt"] {
        assert!(err.contains(&format!("| {m}")), "{err}");
    }
    let r = common::run("sherl-fit", &["report", "runs"], &f.root, &[]);
    assert!(r.status.success(), "{}", common::stderr(&r));
    let report = f.root.join("runs/report");
    for file in [
        "report.csv",
        "report.json",
        "learning_curves.png",
        "learning_curves.svg",
        "layer_weights.png",
        "layer_weights.svg",
    ] {
        assert!(report.join(file).exists(), "{file}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert!(json.to_string().contains("unipt"));
    // again: nothing to do
    let o = sweep(&f.root, &[]);
    assert!(o.status.success());
    assert!(
        common::stderr(&o).contains("6 already done"),
        "{}",
        common::stderr(&o)
    );
}

/// Kill the sweep (and its run processes) midway, restart: finished runs
/// are not redone and the rest complete.
#[test]
fn killed_sweep_resumes_without_redoing_finished_runs() {
    let f = fit_fixture(120, 22, &[]);
    std::fs::write(
        f.root.join("grid.json"),
        r#"{"seed": [0, 1, 2, 3], "epochs": 20}"#,
    )
    .unwrap();
    let mut cmd = std::process::Command::new(common::bin("sherl-fit"));
    cmd.args([
        "sweep",
        "--cache",
        "cache",
        "--backbone",
        "backbone",
        "--grid",
        "grid.json",
        "--out",
        "runs",
    ])
    .current_dir(&f.root)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let start = std::time::Instant::now();
    while finished(&f.root).is_empty() && start.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
    let before = finished(&f.root);
    assert!(
        !before.is_empty() && before.len() < 4,
        "kill should land midway: {before:?}"
    );
    let stamps: Vec<_> = before
        .iter()
        .map(|id| {
            std::fs::metadata(f.root.join("runs").join(id).join("summary.json"))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    let o = sweep(&f.root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains(&format!("{} already done", before.len())),
        "{}",
        common::stderr(&o)
    );
    assert_eq!(finished(&f.root).len(), 4);
    for (id, t) in before.iter().zip(stamps) {
        let now = std::fs::metadata(f.root.join("runs").join(id).join("summary.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(now, t, "{id} was redone");
    }
}

/// `--worker I/M` partitions cover every run exactly once.
#[test]
fn worker_partitions_cover_the_grid_once() {
    let f = fit_fixture(30, 23, &[]);
    std::fs::write(
        f.root.join("grid.json"),
        r#"{"seed": [0, 1, 2, 3, 4], "lr": [0.001, 0.01]}"#,
    )
    .unwrap();
    let ids = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["--dry-run"];
        a.extend_from_slice(args);
        let o = sweep(&f.root, &a);
        assert!(o.status.success(), "{}", common::stderr(&o));
        common::stdout(&o)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["run_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let all: BTreeSet<String> = ids(&[]).into_iter().collect();
    assert_eq!(all.len(), 10);
    for m in [2, 3, 4] {
        let mut seen = Vec::new();
        for i in 0..m {
            seen.extend(ids(&["--worker", &format!("{i}/{m}")]));
        }
        assert_eq!(seen.len(), 10, "M={m}");
        assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), all);
    }
}

/// `sweep --task retrieval`: the grid varies a tower's method and the loss
/// (the joint width fixed), every run trains from the two caches, a second
/// sweep finds them done, and the report ranks the retrieval groups by valid
/// rsum with Recall@K both ways, rsum, parameters, memory and seconds per
/// epoch (mean over the seeds, equal to the runs' own summaries).
#[test]
fn retrieval_sweep_varies_the_towers_and_the_report_ranks_them() {
    let f = crate::retrieval::retrieval_fixture();
    std::fs::write(
        f.root.join("grid.json"),
        r#"{"image_method": ["linear-probe", "full-ft"], "text_method": "linear-probe",
            "loss": ["infonce", "hinge"], "joint_dim": 16, "seed": [0, 1], "epochs": 1,
            "batch_size": 8}"#,
    )
    .unwrap();
    let args = [
        "sweep",
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
        "--grid",
        "grid.json",
        "--out",
        "runs",
        "--device",
        "cpu",
    ];
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let o = common::run("sherl-fit", &dry, &f.root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let planned: Vec<serde_json::Value> = common::stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(planned.len(), 8);
    assert_eq!(planned[0]["retrieval"]["image_method"], "linear-probe");
    assert_eq!(planned[0]["retrieval"]["joint_dim"], 16);
    assert!(!f.root.join("runs").exists(), "a dry run writes nothing");

    let mut run = args.to_vec();
    run.extend(["--jobs", "2"]);
    let o = common::run("sherl-fit", &run, &f.root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let summaries: Vec<serde_json::Value> = common::stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(summaries.len(), 8);
    let ids: BTreeSet<&str> = summaries
        .iter()
        .map(|s| s["run_id"].as_str().unwrap())
        .collect();
    let want: BTreeSet<&str> = planned
        .iter()
        .map(|p| p["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, want, "each run has the id the plan gave it");
    for s in &summaries {
        assert_eq!(s["task"], "retrieval");
        assert_eq!(s["joint_dim"], 16);
        assert_eq!(s["text_method"], "linear-probe");
    }
    // The sweep's report went to stderr.
    assert!(
        common::stderr(&o).contains("## Retrieval"),
        "{}",
        common::stderr(&o)
    );
    // Nothing left to run.
    let o = common::run("sherl-fit", &run, &f.root, &[]);
    assert!(o.status.success());
    assert!(
        common::stdout(&o).trim().is_empty(),
        "{}",
        common::stdout(&o)
    );

    let r = sherl::report::report(&sherl::report::ReportOptions::new(f.root.join("runs"))).unwrap();
    assert!(r.groups.is_empty());
    assert_eq!(r.retrieval_groups.len(), 4);
    for w in r.retrieval_groups.windows(2) {
        assert!(w[0].valid_rsum.mean >= w[1].valid_rsum.mean);
    }
    for g in &r.retrieval_groups {
        assert_eq!(g.seeds.len(), 2);
        let loss = g.settings["loss"].as_str().unwrap();
        assert!(g.label.contains(&format!("loss={loss}")), "{}", g.label);
        let mine: Vec<&serde_json::Value> = summaries
            .iter()
            .filter(|s| g.run_ids.iter().any(|id| s["run_id"] == id.as_str()))
            .collect();
        assert_eq!(mine.len(), 2);
        let mean = |f: &dyn Fn(&serde_json::Value) -> f64| (f(mine[0]) + f(mine[1])) / 2.0;
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        close(
            g.valid_rsum.mean,
            mean(&|s| s["valid_rsum"].as_f64().unwrap()),
        );
        close(
            g.test_rsum.as_ref().unwrap().mean,
            mean(&|s| s["test_rsum"].as_f64().unwrap()),
        );
        for k in 0..3 {
            close(
                g.test_i2t[k].as_ref().unwrap().mean,
                mean(&|s| s["test"]["i2t"][k].as_f64().unwrap()),
            );
            close(
                g.test_t2i[k].as_ref().unwrap().mean,
                mean(&|s| s["test"]["t2i"][k].as_f64().unwrap()),
            );
        }
        assert_eq!(g.trainable_params, mine[0]["trainable_params"].as_u64());
        assert!(g.peak_memory_mib.unwrap() > 0.0);
        assert!(g.seconds_per_epoch.unwrap() > 0.0);
    }
    let full = r
        .retrieval_groups
        .iter()
        .find(|g| g.method == "full-ft+linear-probe")
        .unwrap();
    let probe = r
        .retrieval_groups
        .iter()
        .find(|g| g.method == "linear-probe+linear-probe")
        .unwrap();
    assert!(full.trainable_params > probe.trainable_params);
    let md = std::fs::read_to_string(f.root.join("runs/report/report.md")).unwrap();
    assert!(
        md.contains("## Retrieval") && md.contains("test t2i R@1"),
        "{md}"
    );
    assert!(
        md.contains("| full-ft+linear-probe | loss=hinge | 2 |"),
        "{md}"
    );
    let csv = std::fs::read_to_string(f.root.join("runs/report/retrieval.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.lines().next().unwrap().contains("test_i2t_r1_mean"));

    // Each run wrote its test queries' top images; the report draws the
    // best group's.
    for s in &summaries {
        let dir = f.root.join(s["run_dir"].as_str().unwrap());
        let ex: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(dir.join("examples.json")).unwrap()).unwrap();
        assert_eq!(ex.len(), 4, "4 test images, one query each");
        for q in &ex {
            let top = q["top"].as_array().unwrap();
            assert_eq!(top.len(), 4);
            let rank = q["rank"].as_u64().unwrap();
            assert!((1..=4).contains(&rank), "{q}");
            if rank == 1 {
                assert_eq!(top[0]["id"], q["image_id"], "{q}");
            }
            assert!(q["caption"].as_str().unwrap().starts_with('w'), "{q}");
            assert!(top[0]["image"].as_str().unwrap().ends_with(".png"), "{q}");
        }
    }
    let pic = f.root.join("runs/report/retrieval_examples.png");
    let img = image::open(&pic).unwrap().to_rgb8();
    assert!(
        img.width() > 500 && img.height() > 400,
        "{:?}",
        img.dimensions()
    );
    // the green frame of a right image is drawn somewhere (the fixture's
    // images are not that green)
    assert!(img.pixels().any(|p| p.0 == [44, 160, 44]));
    let svg = std::fs::read_to_string(f.root.join("runs/report/retrieval_examples.svg")).unwrap();
    assert_eq!(svg.matches("data:image/png;base64,").count(), 16);
    assert!(
        svg.contains(&r.retrieval_groups[0].label),
        "the best group's picture"
    );
    assert!(md.contains("(retrieval_examples.png)"), "{md}");

    // The inputs of one task only.
    let o = common::run(
        "sherl-fit",
        &[
            "sweep",
            "--task",
            "retrieval",
            "--cache",
            "img",
            "--backbone",
            "vit",
            "--grid",
            "grid.json",
            "--out",
            "r2",
        ],
        &f.root,
        &[],
    );
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("not --cache and --backbone"),
        "{}",
        common::stderr(&o)
    );
    // A retrieval grid with `method`.
    std::fs::write(f.root.join("bad.json"), r#"{"method": ["sherl"]}"#).unwrap();
    let mut bad = args.to_vec();
    bad[12] = "bad.json";
    bad.push("--dry-run");
    let o = common::run("sherl-fit", &bad, &f.root, &[]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("not method"),
        "{}",
        common::stderr(&o)
    );
}
