//! Helpers shared by the integration tests: asset lookup, a seeded tiny
//! random BERT written as a Hugging Face checkpoint, an independent plain-Rust
//! forward pass to check the exporter against, and CLI runners.
#![allow(dead_code)]

pub mod reference;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The asset directory. The README's test command runs
/// `pipelines/fetch-assets.sh` first; a test never skips on a missing asset,
/// it fails saying how to fetch it.
pub fn assets_dir() -> PathBuf {
    sherl::assets::assets_dir()
}

/// An asset path that must exist.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets_dir().join(rel);
    assert!(
        p.exists(),
        "missing asset {} (run pipelines/fetch-assets.sh; the README test command does)",
        p.display()
    );
    p
}

/// The fetched MiniLM backbone directory.
pub fn minilm_dir() -> PathBuf {
    asset("backbones/all-MiniLM-L6-v2")
}

/// Load ONNX Runtime from the assets (once per test process).
pub fn runtime() -> &'static sherl::extract::runtime::Runtime {
    sherl::extract::runtime::init(None)
        .expect("ONNX Runtime from the asset directory (run pipelines/fetch-assets.sh)")
}

/// A CPU session config.
pub fn cpu() -> sherl::extract::runtime::SessionConfig {
    sherl::extract::runtime::SessionConfig {
        device: sherl::extract::runtime::Device::Cpu,
        threads: Some(2),
        opt_level: sherl::extract::runtime::OptLevel::All,
    }
}

/// Path of a built binary.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "sherl" => PathBuf::from(env!("CARGO_BIN_EXE_sherl")),
        "sherl-extract" => PathBuf::from(env!("CARGO_BIN_EXE_sherl-extract")),
        "sherl-fit" => PathBuf::from(env!("CARGO_BIN_EXE_sherl-fit")),
        "sherl-cache" => PathBuf::from(env!("CARGO_BIN_EXE_sherl-cache")),
        other => panic!("unknown binary {other}"),
    }
}

/// Run a binary with args in `cwd`; returns its output.
pub fn run(name: &str, args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin(name));
    c.args(args).current_dir(cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn binary")
}

/// Like [`run`], but a process still running after `secs` seconds is
/// killed and `None` returned, so a case that would hang (a FIFO, an endless
/// read) fails its test instead of stopping the suite. The limit is a
/// guard against hangs, not a measurement: pick it far above the normal
/// run time.
pub fn run_bounded(
    name: &str,
    args: &[&str],
    cwd: &Path,
    env: &[(&str, &str)],
    secs: u64,
) -> Option<Output> {
    let mut c = Command::new(bin(name));
    c.args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().expect("spawn binary");
    wait_bounded(child, secs)
}

/// Wait for `child` at most `secs` seconds, collecting its output; kill it
/// and return `None` past that.
pub fn wait_bounded(mut child: std::process::Child, secs: u64) -> Option<Output> {
    use std::io::Read;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut b);
        }
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match child.try_wait().expect("wait for child") {
            Some(status) => {
                return Some(Output {
                    status,
                    stdout: t_out.join().unwrap(),
                    stderr: t_err.join().unwrap(),
                });
            }
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// `sherl-fit predict` of run `run` with the fixture's `backbone` on
/// `data`, on the CPU, plus `extra` flags, in `root`.
pub fn fit_predict(root: &Path, run: &str, data: &str, extra: &[&str]) -> Output {
    let mut a = vec![
        "predict",
        "--run",
        run,
        "--backbone",
        "backbone",
        "--data",
        data,
        "--device",
        "cpu",
    ];
    a.extend_from_slice(extra);
    self::run("sherl-fit", &a, root, &[])
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert `|a - b| <= atol + rtol * |b|` elementwise, with a readable message.
pub fn assert_close(a: &[f32], b: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        assert!(
            x.is_finite() && y.is_finite(),
            "{what}: non-finite at {i}: {x} vs {y}"
        );
        if d - (atol + rtol * y.abs()) > worst.1 {
            worst = (i, d - (atol + rtol * y.abs()));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} differs: {} vs {} (atol {atol}, rtol {rtol})",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}
