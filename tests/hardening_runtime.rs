//! Hardening, second round (issue 28): the ONNX Runtime library, cache merges and extraction locks.
//!
//! Every case that could hang or read without end runs its binary through
//! `common::run_bounded`, so a regression fails the test instead of
//! stopping the suite.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::cache::make_parts;
use crate::common::{self, tiny};

/// Generous bound on one command: a guard against hangs, never a timing.
const LIMIT_S: u64 = 120;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

/// A tiny generated text backbone (`backbone/`) and dataset (`data.csv`).
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    tiny::tiny_backbone(&root.join("backbone"), &tiny::TinyConfig::default(), 42);
    tiny::write_dataset(&root.join("data.csv"), 12, 10, 100, 8);
    Fixture { _tmp: tmp, root }
}

/// `sherl-extract run` of the fixture into `out` (relative to the root),
/// with `extra` flags and `env`, bounded.
fn extract(f: &Fixture, out: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "run",
        "--backbone",
        "backbone",
        "--data",
        "data.csv",
        "--max-len",
        "16",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    common::run_bounded("sherl-extract", &args, &f.root, env, LIMIT_S)
        .unwrap_or_else(|| panic!("sherl-extract {args:?} did not finish in {LIMIT_S} s"))
}

/// The output failed with exit `code` (not a signal), without a panic;
/// returns stderr.
fn failed(o: &Output, code: i32) -> String {
    let err = common::stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}, got {:?} (a signal?): {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The ONNX Runtime library of the asset directory.
fn real_library() -> PathBuf {
    sherl::extract::runtime::locate_library(None)
        .expect("ONNX Runtime in the asset directory (run pipelines/fetch-assets.sh)")
}

/// Case 4: a truncated library (an interrupted copy) given by
/// `--ort-lib` or `ORT_DYLIB_PATH` is refused before it is loaded, with a
/// clear error and exit 2 instead of a SIGBUS (exit 135, nothing printed);
/// the fetched library in the asset directory is checked against the
/// checksum `pipelines/fetch-assets.sh` records, so one damaged in place
/// (same size) is refused too.
#[test]
fn a_truncated_runtime_library_is_refused_before_it_is_loaded() {
    let f = fixture();
    let lib = real_library();
    let bytes = std::fs::read(&lib).unwrap();
    let half = f.root.join("libonnxruntime.so.half");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    let half_s = half.to_str().unwrap();
    let by_flag = extract(&f, "out", &["--ort-lib", half_s], &[]);
    let by_env = extract(&f, "out", &[], &[("ORT_DYLIB_PATH", half_s)]);
    for o in [by_flag, by_env] {
        let err = failed(&o, 2);
        assert!(
            err.contains(half_s) && err.contains("truncated"),
            "expected the file and 'truncated' in: {err}"
        );
        assert!(!f.root.join("out").exists(), "a refused run wrote --out");
    }

    // The fetched library, damaged in the asset directory: truncated, and
    // one byte changed (same size, headers intact).
    let name = lib.file_name().unwrap();
    let version = lib.parent().unwrap().file_name().unwrap();
    let kind = lib.parent().unwrap().parent().unwrap().file_name().unwrap();
    let assets = f.root.join("assets");
    let dir = assets.join(kind).join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(name);
    let assets_env = [
        ("SHERL_ASSETS", assets.to_str().unwrap()),
        ("ORT_DYLIB_PATH", ""),
    ];
    std::fs::write(&copy, &bytes[..bytes.len() / 2]).unwrap();
    let err = failed(&extract(&f, "out", &[], &assets_env), 2);
    assert!(
        err.contains("truncated") && err.contains("fetch-assets.sh"),
        "{err}"
    );
    let mut damaged = bytes.clone();
    damaged[bytes.len() / 2] ^= 0x5a;
    std::fs::write(&copy, &damaged).unwrap();
    let err = failed(&extract(&f, "out", &[], &assets_env), 2);
    assert!(
        err.contains("sha256") && err.contains("fetch-assets.sh"),
        "{err}"
    );
    assert!(!f.root.join("out").exists(), "a refused run wrote --out");
}

/// Case 9: `--ort-lib NAME` without a `/` is the file NAME in the working
/// directory (the loader alone would search the system path and fail with
/// a bare "dlopen failed"); a file the loader refuses is reported with the
/// loader's own reason.
#[test]
fn a_bare_ort_lib_name_is_resolved_in_the_working_directory() {
    let f = fixture();
    std::fs::copy(real_library(), f.root.join("libort-local.so")).unwrap();
    let o = extract(&f, "out", &["--ort-lib", "libort-local.so"], &[]);
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        common::stderr(&o)
    );
    assert!(f.root.join("out/manifest.json").exists());

    // a name that is not there is named, resolved against the working directory
    let err = failed(
        &extract(&f, "out2", &["--ort-lib", "libort-absent.so"], &[]),
        2,
    );
    let resolved = f.root.join("libort-absent.so");
    assert!(
        err.contains(resolved.to_str().unwrap()) && err.contains("no such file"),
        "{err}"
    );

    // an ELF file the loader refuses (an executable): its reason is printed
    let exe = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("/bin/true");
    std::fs::copy(exe, f.root.join("notlib.so")).unwrap();
    let err = failed(&extract(&f, "out2", &["--ort-lib", "notlib.so"], &[]), 2);
    assert!(err.contains("notlib.so"), "{err}");
    assert!(
        !err.trim_end().ends_with("dlopen failed") && err.contains("dlopen failed: "),
        "the loader's reason is missing: {err}"
    );
}

/// Case 11: `ORT_DYLIB_PATH` (or `--ort-lib`) naming a directory without a
/// library in it says so, instead of "no such file ... (tried: )".
#[test]
fn a_library_directory_without_a_library_says_so() {
    let f = fixture();
    std::fs::create_dir(f.root.join("empty")).unwrap();
    let empty = f.root.join("empty");
    let empty_s = empty.to_str().unwrap();
    for o in [
        extract(&f, "out", &[], &[("ORT_DYLIB_PATH", empty_s)]),
        extract(&f, "out", &["--ort-lib", "empty"], &[]),
    ] {
        let err = failed(&o, 2);
        assert!(
            err.contains(empty_s) && err.contains("a directory with no libonnxruntime"),
            "{err}"
        );
        assert!(
            !err.contains("(tried: )") && !err.contains("no such file"),
            "{err}"
        );
    }
}

/// Case 11: a second extraction into an `--out` that a live extraction is
/// writing (it holds the lock, has written its pending manifest and is
/// writing a shard) is told that another process is writing it, exit 3 (as
/// a locked run), with or without `--resume`, and changes nothing there.
#[test]
fn an_extraction_racing_a_live_one_is_told_it_is_busy() {
    use sherl::cache::writer::LOCK;
    use sherl::fsutil::DirLock;
    let f = fixture();
    let dir = f.root.join("busy");
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    // this test process holds the lock, like the live writer
    let held = DirLock::try_acquire(&dir, LOCK).unwrap().expect("free");
    std::fs::write(dir.join("extract.pending.json"), b"{}").unwrap();
    std::fs::write(dir.join("shards/shard-00000.shrd.tmp"), b"partial").unwrap();
    let before = crate::cache::snapshot(&dir);
    for extra in [&[][..], &["--resume"][..]] {
        let err = failed(&extract(&f, "busy", extra, &[]), 3);
        assert!(err.contains("in use by another process"), "{err}");
        assert!(!err.contains("pass --resume"), "{err}");
        assert_eq!(
            crate::cache::snapshot(&dir),
            before,
            "a refused writer changed the live writer's directory"
        );
    }
    drop(held);
}

/// The worker parts of golden cache `v2` under `root`, and `sherl-cache
/// merge` of them into `out`, bounded.
fn merge(root: &Path, parts: &[PathBuf], out: &str) -> Output {
    let mut args = vec!["merge".to_string()];
    args.extend(parts.iter().map(|p| p.to_str().unwrap().to_string()));
    args.extend(["--out".to_string(), out.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run_bounded("sherl-cache", &args, root, &[], LIMIT_S)
        .unwrap_or_else(|| panic!("sherl-cache {args:?} did not finish in {LIMIT_S} s"))
}

/// Case 11: `merge --out LINK`, LINK a symbolic link to an empty
/// directory, merges into the directory the link names (where a
/// `sherl-extract run --out LINK` would write too), leaving the link a link.
#[cfg(unix)]
#[test]
fn merge_into_a_link_to_an_empty_directory_writes_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let parts = make_parts("v2", &root.join("parts"));
    std::fs::create_dir(root.join("target")).unwrap();
    std::os::unix::fs::symlink("target", root.join("link")).unwrap();
    let o = merge(root, &parts, "link");
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        common::stderr(&o)
    );
    assert!(std::fs::symlink_metadata(root.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    sherl::cache::Cache::open(&root.join("target")).unwrap();
    // a link to a directory that is not empty is refused as any such --out
    let err = failed(&merge(root, &parts, "link"), 2);
    assert!(err.contains("must not exist or be empty"), "{err}");
    // a dangling link says where it points
    std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
    let err = failed(&merge(root, &parts, "dangling"), 2);
    assert!(err.contains("nowhere"), "{err}");
    assert!(!root.join("nowhere").exists());
}

/// Case 8: the temporary directory a killed merge left next to `--out`
/// (`.<out>.merge.<pid>.tmp`, its process gone) is removed by the next
/// merge, which says so; one whose process lives is left alone.
#[test]
fn a_killed_merges_temporary_is_removed_by_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let parts = make_parts("v2", &root.join("parts"));
    // 4194304 is above Linux's largest pid: never a live process.
    let stale = root.join(".out.merge.4194304.tmp");
    std::fs::create_dir_all(stale.join("shards")).unwrap();
    std::fs::write(stale.join("shards/shard-00000.shrd"), vec![0u8; 4096]).unwrap();
    let live = root.join(format!(".out.merge.{}.tmp", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("x"), b"x").unwrap();
    let o = merge(root, &parts, "out");
    let err = common::stderr(&o);
    assert!(o.status.success(), "exit {:?}: {err}", o.status);
    assert!(!stale.exists(), "the stale temporary is still there");
    assert!(
        err.contains(".out.merge.4194304.tmp") && err.contains("removed"),
        "the removal is not mentioned: {err}"
    );
    assert!(
        live.join("x").exists(),
        "a live process's temporary was removed"
    );
    sherl::cache::Cache::open(&root.join("out")).unwrap();
}

/// `mkfifo path`.
#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Case 2: cache manifests (complete, part and pending) and shards are
/// read as regular files only: a FIFO in their place is refused naming it
/// (it used to block `open()` for ever), and a device is never mapped as
/// a shard (`/dev/zero` mapped as an empty file).
#[cfg(unix)]
#[test]
fn cache_files_that_are_not_regular_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cache = |name: &str| {
        let dir = root.join(name);
        crate::cache::copy_dir(&crate::cache::golden("v2"), &dir);
        dir
    };
    let inspect = |dir: &Path| {
        common::run_bounded(
            "sherl-cache",
            &["inspect", dir.to_str().unwrap()],
            root,
            &[],
            LIMIT_S,
        )
        .expect("sherl-cache inspect hung")
    };

    // manifest.json
    let dir = cache("fifo-manifest");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    mkfifo(&dir.join("manifest.json"));
    let err = failed(&inspect(&dir), 2);
    assert!(
        err.contains("manifest.json") && err.contains("FIFO"),
        "{err}"
    );

    // a shard
    let dir = cache("fifo-shard");
    let shard = dir.join("shards/shard-00000.shrd");
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let err = failed(&inspect(&dir), 2);
    assert!(
        err.contains("shard-00000.shrd") && err.contains("FIFO"),
        "{err}"
    );

    // a worker part's manifest
    let parts = make_parts("v2", &root.join("parts"));
    let part = parts[1].join("manifest.part.json");
    std::fs::remove_file(&part).unwrap();
    mkfifo(&part);
    let err = failed(&merge(root, &parts, "merged"), 2);
    assert!(
        err.contains("manifest.part.json") && err.contains("FIFO"),
        "{err}"
    );
    assert!(!root.join("merged").exists());

    // the memory map itself refuses a device instead of mapping nothing
    let e = sherl::cache::mmap::MappedFile::open(Path::new("/dev/zero"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/dev/zero") && e.contains("a device"), "{e}");
}
