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
