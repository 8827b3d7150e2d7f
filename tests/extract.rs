//! `sherl-extract run` end to end on a tiny generated backbone and dataset:
//! cached values equal ONNX Runtime's, verify/inspect, damage detection,
//! resume after a kill, two workers merged, refusals.

use std::path::{Path, PathBuf};

use crate::common::{self, tiny};
use sherl::batching::{real_rows, PaddedBatch};
use sherl::cache::Cache;
use sherl::extract::runtime::BackboneSession;
use sherl::extract::tokenize::Encoded;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    backbone: PathBuf,
    data: PathBuf,
}

fn fixture(rows: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let backbone = root.join("backbone");
    tiny::tiny_backbone(&backbone, &tiny::TinyConfig::default(), 42);
    let data = root.join("data.csv");
    tiny::write_dataset(&data, rows, 20, 100, 8);
    Fixture {
        _tmp: tmp,
        root,
        backbone,
        data,
    }
}

fn extract_args<'a>(f: &'a Fixture, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        "--backbone",
        f.backbone.to_str().unwrap(),
        "--data",
        f.data.to_str().unwrap(),
        "--split",
        "train=0.6,valid=0.2,test=0.2",
        "--group-column",
        "group",
        "--max-len",
        "16",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn extract(f: &Fixture, out: &str, extra: &[&str]) -> std::process::Output {
    let args = extract_args(f, out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run("sherl-extract", &args, &f.root, &[])
}

fn ok(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
    let out = common::stdout(o);
    serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON summary")
}

fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// f32 cache: every cached value equals what ONNX Runtime returns for that
/// example alone (1e-5: batching pads), all layers stored with --layers all;
/// ids, labels and splits are right; verify and inspect agree.
#[test]
fn cached_values_equal_onnx_runtime() {
    let f = fixture(60);
    let s = ok(&extract(
        &f,
        "c",
        &[
            "--dtype",
            "f32",
            "--layers",
            "all",
            "--chunk-size",
            "7",
            "--examples-per-shard",
            "25",
        ],
    ));
    assert_eq!(s["examples"], 60);
    assert_eq!(s["shards_written"], 3);
    let cache = Cache::open(&f.root.join("c")).unwrap();
    let m = cache.manifest();
    assert_eq!(m.settings.layers, vec![0, 1, 2, 3]);
    assert_eq!(m.labels, vec!["a", "b", "c"]);
    assert_eq!(m.split_names, vec!["train", "valid", "test"]);
    assert_eq!(m.splits.values().sum::<u64>(), 60);

    let rt = common::runtime();
    let (mut sess, _) =
        BackboneSession::open(rt, &f.backbone.join("model.onnx"), &common::cpu()).unwrap();
    let tok =
        sherl::extract::tokenize::Tokenizer::from_file(&f.backbone.join("tokenizer.json"), 16)
            .unwrap();
    let csv = std::fs::read_to_string(&f.data).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    let mut seen_max = false;
    for pos in 0..60u64 {
        let (meta, layers) = cache.example(pos, &[0, 1, 2, 3]).unwrap();
        // id is "<stem>:<line>", line 2 = first data row
        let line: usize = meta.id.rsplit(':').next().unwrap().parse().unwrap();
        let text = rows[line - 2].split(',').next().unwrap();
        let enc = tok.encode(text, None).unwrap();
        assert_eq!(meta.ids, enc.ids, "example {pos}");
        seen_max |= meta.len() == 16;
        let label = rows[line - 2].split(',').nth(1).unwrap();
        assert_eq!(m.labels[meta.label.unwrap() as usize], label);
        let e = Encoded {
            ids: enc.ids.clone(),
            type_ids: enc.type_ids.clone(),
        };
        let b = PaddedBatch::new(&[&e], None);
        let (i, mk, t) = b.views();
        let want = sess.run(i, mk, t, &[0, 1, 2, 3]).unwrap();
        for l in 0..4 {
            common::assert_close(
                &layers[l],
                &real_rows(want[l].view(), 0, e.len()),
                1e-5,
                1e-5,
                &format!("example {pos} layer {l}"),
            );
        }
    }
    assert!(seen_max, "some example should be truncated to max-len");

    let v = ok(&common::run("sherl-cache", &["verify", "c"], &f.root, &[]));
    assert_eq!(v["ok"], true);
    let i = ok(&common::run(
        "sherl-cache",
        &["inspect", "c", "--json"],
        &f.root,
        &[],
    ));
    for key in [
        "examples",
        "tokens",
        "layers",
        "hidden",
        "dtype",
        "bytes_on_disk",
        "raw_f32_bytes",
        "splits",
    ] {
        assert!(!i[key].is_null(), "inspect --json lacks {key}");
    }
    assert_eq!(i["examples"], 60);
    assert_eq!(i["hidden"], 32);
    assert_eq!(i["dtype"], "f32");
    assert_eq!(
        i["raw_f32_bytes"],
        i["tokens"].as_u64().unwrap() * 4 * 32 * 4
    );
}

/// Default layers are what SHERL needs: 0..=N-K.
#[test]
fn default_layers_follow_late_layers() {
    let f = fixture(10);
    ok(&extract(&f, "k1", &[]));
    assert_eq!(
        Cache::open(&f.root.join("k1"))
            .unwrap()
            .manifest()
            .settings
            .layers,
        vec![0, 1, 2]
    );
    ok(&extract(&f, "k2", &["--late-layers", "2"]));
    assert_eq!(
        Cache::open(&f.root.join("k2"))
            .unwrap()
            .manifest()
            .settings
            .layers,
        vec![0, 1]
    );
    let o = extract(&f, "k9", &["--late-layers", "9"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("--late-layers 9"));
}

/// A flipped byte anywhere in a shard makes `verify` fail naming the
/// shard; a missing manifest and a newer format version are refused.
#[test]
fn damage_is_reported_with_the_shard() {
    let f = fixture(30);
    ok(&extract(&f, "c", &["--examples-per-shard", "10"]));
    let shard = f.root.join("c/shards/shard-00001.shrd");
    let good = std::fs::read(&shard).unwrap();
    let mut rng = tiny::Rng::new(3);
    for _ in 0..25 {
        let mut b = good.clone();
        let i = rng.below(b.len() as u32) as usize;
        b[i] ^= 0x40;
        std::fs::write(&shard, &b).unwrap();
        let o = common::run("sherl-cache", &["verify", "c"], &f.root, &[]);
        assert_eq!(o.status.code(), Some(2), "byte {i} flip not detected");
        assert!(
            common::stderr(&o).contains("shard-00001.shrd"),
            "{}",
            common::stderr(&o)
        );
    }
    std::fs::write(&shard, &good).unwrap();
    ok(&common::run("sherl-cache", &["verify", "c"], &f.root, &[]));
    // truncated shard
    std::fs::write(&shard, &good[..good.len() / 2]).unwrap();
    let o = common::run("sherl-cache", &["verify", "c"], &f.root, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("shard-00001.shrd"));
    std::fs::write(&shard, &good).unwrap();
    // newer manifest version
    let mpath = f.root.join("c/manifest.json");
    let manifest = std::fs::read_to_string(&mpath).unwrap();
    let (now, newer) = (
        sherl::cache::FORMAT_VERSION,
        sherl::cache::FORMAT_VERSION + 1,
    );
    let edited = manifest.replace(
        &format!("\"format_version\": {now}"),
        &format!("\"format_version\": {newer}"),
    );
    assert_ne!(edited, manifest);
    std::fs::write(&mpath, edited).unwrap();
    let o = common::run("sherl-cache", &["inspect", "c"], &f.root, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains(&format!("format version {newer}")),
        "{}",
        common::stderr(&o)
    );
    // missing manifest: not a cache
    std::fs::remove_file(&mpath).unwrap();
    let o = common::run("sherl-cache", &["verify", "c"], &f.root, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("no manifest.json"),
        "{}",
        common::stderr(&o)
    );
}

/// Kill `sherl-extract` at several moments, then `--resume`: the result is
/// byte-identical to an uninterrupted run. Resuming with other settings is
/// refused; a non-empty --out without --resume is refused.
#[test]
fn resume_after_kill_matches_uninterrupted_run() {
    let f = fixture(1500);
    let common_flags = [
        "--examples-per-shard",
        "50",
        "--max-batch",
        "2",
        "--chunk-size",
        "8",
    ];
    ok(&extract(&f, "full", &common_flags));
    let want = shard_bytes(&f.root.join("full"));
    assert_eq!(want.len(), 30);
    let mut killed_midway = 0;
    for (attempt, wait_for) in [1usize, 5, 12].iter().enumerate() {
        let out = format!("part{attempt}");
        let args = extract_args(&f, &out, &common_flags);
        let mut child = std::process::Command::new(common::bin("sherl-extract"))
            .args(&args)
            .current_dir(&f.root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let marker = f
            .root
            .join(&out)
            .join(format!("shards/shard-{wait_for:05}.shrd"));
        let start = std::time::Instant::now();
        while !marker.exists() && start.elapsed().as_secs() < 120 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if !f.root.join(&out).join("manifest.json").exists() {
            killed_midway += 1;
        }
        // without --resume: refused, nothing touched
        let o = extract(&f, &out, &common_flags);
        assert_eq!(o.status.code(), Some(2));
        assert!(
            common::stderr(&o).contains("--resume"),
            "{}",
            common::stderr(&o)
        );
        // different settings: refused
        let mut other = common_flags.to_vec();
        other.extend(["--resume", "--dtype", "bf16"]);
        let o = extract(&f, &out, &other);
        assert_eq!(o.status.code(), Some(2));
        assert!(
            common::stderr(&o).contains("different settings"),
            "{}",
            common::stderr(&o)
        );
        // resume
        let mut flags = common_flags.to_vec();
        flags.push("--resume");
        let s = ok(&extract(&f, &out, &flags));
        assert_eq!(s["examples"], 1500);
        assert_eq!(shard_bytes(&f.root.join(&out)), want, "attempt {attempt}");
        let a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(f.root.join("full/manifest.json")).unwrap())
                .unwrap();
        let b: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f.root.join(&out).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(a["shards"], b["shards"]);
        assert_eq!(a["settings_hash"], b["settings_hash"]);
        assert!(!f.root.join(&out).join("extract.pending.json").exists());
    }
    assert!(
        killed_midway >= 1,
        "no kill landed before the end; make the fixture bigger"
    );
}

/// Two workers as separate processes, merged, equal a one-worker run;
/// merging parts made with different settings is refused.
#[test]
fn two_workers_merged_equal_one_worker() {
    let f = fixture(200);
    let flags = ["--examples-per-shard", "30", "--chunk-size", "8"];
    ok(&extract(&f, "one", &flags));
    let spawn = |i: usize| {
        let mut fl = flags.to_vec();
        let spec = format!("{i}/2");
        fl.extend(["--shard-of", &spec]);
        let args = extract_args(&f, &format!("w{i}"), &fl);
        std::process::Command::new(common::bin("sherl-extract"))
            .args(&args)
            .current_dir(&f.root)
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn(0));
        let b = s.spawn(|| spawn(1));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert_eq!(ok(&a)["partial"], true);
    ok(&b);
    // a part alone is not a cache
    assert!(!f.root.join("w0/manifest.json").exists());
    let m = ok(&common::run(
        "sherl-cache",
        &["merge", "w0", "w1", "--out", "merged"],
        &f.root,
        &[],
    ));
    assert_eq!(m["examples"], 200);
    assert_eq!(
        shard_bytes(&f.root.join("merged")),
        shard_bytes(&f.root.join("one"))
    );
    ok(&common::run(
        "sherl-cache",
        &["verify", "merged"],
        &f.root,
        &[],
    ));
    let one = Cache::open(&f.root.join("one")).unwrap();
    let merged = Cache::open(&f.root.join("merged")).unwrap();
    assert_eq!(one.manifest().splits, merged.manifest().splits);
    assert_eq!(
        one.manifest().settings_hash,
        merged.manifest().settings_hash
    );
    // missing part
    let o = common::run("sherl-cache", &["merge", "w0", "--out", "m2"], &f.root, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("missing worker part"),
        "{}",
        common::stderr(&o)
    );
    // a part with other settings
    let mut fl = flags.to_vec();
    fl.extend(["--shard-of", "1/2", "--dtype", "int8"]);
    ok(&extract(&f, "w1x", &fl));
    let o = common::run(
        "sherl-cache",
        &["merge", "w0", "w1x", "--out", "m3"],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("different settings"),
        "{}",
        common::stderr(&o)
    );
}

/// The background decoder returns chunks in the requested order and the
/// same data as direct reads.
#[test]
fn background_stream_matches_direct_reads() {
    let f = fixture(80);
    ok(&extract(
        &f,
        "c",
        &["--chunk-size", "4", "--examples-per-shard", "20"],
    ));
    let cache = std::sync::Arc::new(Cache::open(&f.root.join("c")).unwrap());
    let n = cache.chunks().len();
    let order: Vec<usize> = (0..n).rev().collect();
    let streamed: Vec<_> = cache
        .stream(order.clone(), vec![0, 2], 3, 4)
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(streamed.len(), n);
    for (k, c) in streamed.into_iter().enumerate() {
        assert_eq!(c.id, order[k]);
        let direct = cache.read_chunk(order[k], &[0, 2]).unwrap();
        assert_eq!(c.meta, direct.meta);
        // streamed 16-bit layers are widened only when asked
        assert_eq!(c.into_f32().layers, direct.layers);
    }
}

/// A cache directory another process is writing (it holds the OS lock on
/// `.lock`) is refused and left unchanged; once the lock is released (as the
/// OS does when a writer dies, however it dies) the extraction proceeds. The
/// lock file stays after a run, and a directory holding only it counts as
/// empty.
#[test]
fn writer_lock_refuses_a_second_writer() {
    use sherl::cache::writer::LOCK;
    use sherl::fsutil::DirLock;
    let f = fixture(20);
    ok(&extract(&f, "done", &[]));
    // the lock file stays, unlocked: the finished cache holds no lock
    assert!(f.root.join("done").join(LOCK).exists());
    assert!(DirLock::try_acquire(&f.root.join("done"), LOCK)
        .unwrap()
        .is_some());
    let dir = f.root.join("busy");
    std::fs::create_dir_all(&dir).unwrap();
    // this test process holds the lock, like a live writer
    let held = DirLock::try_acquire(&dir, LOCK).unwrap().expect("free");
    for extra in [&["--resume"][..], &[][..]] {
        let o = extract(&f, "busy", extra);
        // exit 3: busy, as for a locked run
        assert_eq!(o.status.code(), Some(3));
        assert!(
            common::stderr(&o).contains("this cache is in use by another process"),
            "{}",
            common::stderr(&o)
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [LOCK], "a refused writer changed the directory");
    }
    // released (a killed writer's lock is released by the OS): a directory
    // holding only the lock file is empty, no --resume needed
    drop(held);
    let s = ok(&extract(&f, "busy", &[]));
    assert_eq!(s["examples"], 20);
    Cache::open(&dir).unwrap();
}

/// `sherl-cache compare`: the same examples extracted twice with different
/// batching and graph optimisation agree within f16 rounding (the check the
/// GPU route uses against a CPU extraction); an f32 cache against an f16 one
/// too, counted in f16 steps; caches of other examples are refused naming
/// the first that differs; an impossible tolerance fails with exit 1.
#[test]
fn compare_tells_equal_caches_from_different_ones() {
    let f = fixture(40);
    let (a, b, c) = (f.root.join("a"), f.root.join("b"), f.root.join("c"));
    ok(&extract(
        &f,
        a.to_str().unwrap(),
        &["--dtype", "f16", "--max-batch", "4"],
    ));
    ok(&extract(
        &f,
        b.to_str().unwrap(),
        &[
            "--dtype",
            "f16",
            "--max-batch",
            "16",
            "--graph-opt",
            "disable",
        ],
    ));
    ok(&extract(&f, c.to_str().unwrap(), &["--dtype", "f32"]));
    let compare = |x: &Path, y: &Path, extra: &[&str]| {
        let mut args = vec!["compare", x.to_str().unwrap(), y.to_str().unwrap()];
        args.extend_from_slice(extra);
        common::run("sherl-cache", &args, &f.root, &[])
    };
    for (x, y) in [(&a, &b), (&a, &c)] {
        let o = compare(x, y, &[]);
        let r = ok(&o);
        assert_eq!(r["outside"], 0, "{r}");
        assert_eq!(r["step_dtype"], "f16");
        assert!(r["examples"].as_u64().unwrap() > 0);
        assert_eq!(
            r["values"],
            r["tokens"].as_u64().unwrap() * 32 * r["layers"].as_array().unwrap().len() as u64,
            "{r}"
        );
        assert!(r["within_one_step"].as_u64() >= r["equal"].as_u64());
    }
    // f32 against its own f16 rounding: not all equal, all within one step.
    let r = ok(&compare(&c, &a, &[]));
    assert!(r["equal"].as_u64() < r["values"].as_u64(), "{r}");
    assert_eq!(r["within_one_step"], r["values"], "{r}");
    // A tolerance no rounding can meet: exit 1 and the worst element named.
    let o = compare(&c, &a, &["--steps", "0", "--atol", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::stderr(&o));
    let r: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert!(r["outside"].as_u64().unwrap() > 0);
    assert!(r["worst"]["ratio"].as_f64().unwrap() > 1.0, "{r}");
    // Other examples: refused, naming the first difference.
    let other = f.root.join("other.csv");
    tiny::write_dataset(&other, 40, 20, 100, 9);
    let d = f.root.join("d");
    let mut args = extract_args(&f, d.to_str().unwrap(), &["--dtype", "f16"]);
    let i = args.iter().position(|s| s == "--data").unwrap();
    args[i + 1] = other.to_str().unwrap().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&common::run("sherl-extract", &args, &f.root, &[]));
    let o = compare(&a, &d, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    let err = common::stderr(&o);
    assert!(
        err.contains("different examples") || err.contains("examples"),
        "{err}"
    );
}
