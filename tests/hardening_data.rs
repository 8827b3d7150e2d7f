//! Hardening, second round (issue 28): dataset inputs (folder datasets, headers, encodings).
//!
//! Every case that could hang (a FIFO, `/dev/zero`, a looping link) runs
//! through [`common::run_bounded`], so a regression fails its test instead
//! of stopping the suite.

use std::path::{Path, PathBuf};
use std::process::Output;

use sherl::data::image::{load_images, ImageOptions};
use sherl::data::{load, DatasetPlan, Format, ReadOptions, SplitSource};

use crate::common::{self, tiny};
use crate::image_cache::image_fixture;

/// Far above any normal run of these tiny fixtures: only a hang reaches it.
const LIMIT_S: u64 = 180;

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// `sherl-extract run` bounded in time; `None` (a hang) fails the caller.
fn extract(root: &Path, args: &[&str]) -> Output {
    common::run_bounded("sherl-extract", args, root, &[], LIMIT_S)
        .unwrap_or_else(|| panic!("sherl-extract {args:?} still ran after {LIMIT_S} s (a hang)"))
}

/// The manifest of the cache at `dir`.
fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
}

/// A folder dataset (text or image) with its backbone, and the flags that
/// extract it.
struct FolderFixture {
    _keep: Box<dyn std::any::Any>,
    root: PathBuf,
    data: PathBuf,
    flags: Vec<String>,
}

impl FolderFixture {
    fn text() -> FolderFixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let backbone = root.join("backbone");
        tiny::tiny_backbone(&backbone, &tiny::TinyConfig::default(), 42);
        let data = root.join("data");
        for (c, class) in ["a", "b"].iter().enumerate() {
            std::fs::create_dir_all(data.join(class)).unwrap();
            for k in 0..3 {
                std::fs::write(
                    data.join(class).join(format!("{k}.txt")),
                    format!("w{} w{} w{}\n", 4 + c, 5 + k, 9 + c * k),
                )
                .unwrap();
            }
        }
        let flags = ["--max-len", "16"].iter().map(|s| s.to_string()).collect();
        FolderFixture {
            _keep: Box::new(tmp),
            root,
            data,
            flags: [
                vec!["--backbone".to_owned(), backbone.display().to_string()],
                flags,
            ]
            .concat(),
        }
    }

    fn images() -> FolderFixture {
        let f = image_fixture(3);
        let (root, data) = (f.root.clone(), f.data.clone());
        let flags = vec![
            "--backbone".to_owned(),
            f.backbone.display().to_string(),
            "--late-layers".to_owned(),
            "1".to_owned(),
        ];
        FolderFixture {
            _keep: Box::new(f),
            root,
            data,
            flags,
        }
    }

    /// Extract into `out` with `extra` flags.
    fn extract(&self, out: &str, extra: &[&str]) -> Output {
        let mut args: Vec<&str> = vec!["run", "--data", self.data.to_str().unwrap()];
        args.extend(self.flags.iter().map(String::as_str));
        args.extend(["--device", "cpu", "--threads", "1", "--out", out]);
        args.extend_from_slice(extra);
        extract(&self.root, &args)
    }

    /// The dataset's recorded fingerprint and rows read, from a cache.
    fn fingerprint(&self, out: &str) -> (String, u64, u64) {
        let m = manifest(&self.root.join(out));
        let d = &m["dataset"];
        (
            d["files"][0]["sha256"].as_str().unwrap().to_owned(),
            d["rows_read"].as_u64().unwrap(),
            d["skipped_bad_rows"].as_u64().unwrap(),
        )
    }
}

/// Makes an entry at a path.
type MakeEntry = Box<dyn Fn(&Path)>;

/// Entries a folder reader skips, put where they hurt: each must leave the
/// extraction, its fingerprint and its row count as they are without it.
fn stray_entries(data: &Path) -> Vec<(&'static str, PathBuf, MakeEntry)> {
    vec![
        (
            "a FIFO in a class folder",
            data.join("a/pipe.txt"),
            Box::new(|p: &Path| mkfifo(p)),
        ),
        (
            "a hidden FIFO at the top",
            data.join(".pipe"),
            Box::new(|p: &Path| mkfifo(p)),
        ),
        (
            "a link to /dev/zero in a class folder",
            data.join("a/zero.png"),
            Box::new(|p: &Path| symlink("/dev/zero", p)),
        ),
        (
            "a link to the parent folder in a class folder",
            data.join("b/loop"),
            Box::new(|p: &Path| symlink("..", p)),
        ),
        (
            "a link to the dataset folder at the top",
            data.join("loop"),
            Box::new(|p: &Path| symlink(".", p)),
        ),
        (
            "a hidden file in a class folder",
            data.join("a/.notes"),
            Box::new(|p: &Path| std::fs::write(p, "not an example").unwrap()),
        ),
    ]
}

/// Case 1: what the folder reader skips, extraction's fingerprint skips
/// too, without hanging, reading for ever or following links in a loop; a
/// dangling link is a bad row (skipped and counted under --skip-bad-rows,
/// else an error naming it).
fn folder_dataset_fingerprint_covers_what_is_read(f: FolderFixture) {
    let clean = f.extract("clean", &[]);
    ok(&clean, "clean");
    let want = f.fingerprint("clean");
    // A plain tree keeps the fingerprint it had before (sha256 of the
    // `sha256sum` lines of every file), so caches keep their settings hash.
    assert_eq!(want.0, sherl::fsutil::sha256_path(&f.data).unwrap());
    // Every sub-case is tried and the failures listed together.
    let mut failures = Vec::new();
    for (i, (what, path, make)) in stray_entries(&f.data).into_iter().enumerate() {
        make(&path);
        let out = format!("stray{i}");
        let o = f.extract(&out, &[]);
        if !o.status.success() {
            failures.push(format!(
                "{what}: exit {:?}: {}",
                o.status.code(),
                common::stderr(&o)
            ));
        } else if f.fingerprint(&out) != want {
            failures.push(format!(
                "{what}: {:?} instead of {want:?}",
                f.fingerprint(&out)
            ));
        }
        std::fs::remove_file(&path).unwrap();
    }
    let dangling = f.data.join("a/gone.png");
    symlink("nowhere.png", &dangling);
    let o = f.extract("dangling", &[]);
    let err = common::stderr(&o);
    if o.status.success()
        || !(err.contains("gone.png") && err.contains("--skip-bad-rows"))
        || err.contains("panicked")
    {
        failures.push(format!(
            "a dangling link: exit {:?}: {err}",
            o.status.code()
        ));
    }
    let o = f.extract("dangling-skipped", &["--skip-bad-rows"]);
    if !o.status.success() {
        failures.push(format!(
            "a dangling link with --skip-bad-rows: exit {:?}: {}",
            o.status.code(),
            common::stderr(&o)
        ));
    } else {
        let got = f.fingerprint("dangling-skipped");
        if got != (want.0.clone(), want.1 + 1, 1) {
            failures.push(format!(
                "a dangling link with --skip-bad-rows: {got:?}, clean {want:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[test]
fn text_folder_fingerprint_covers_what_is_read() {
    folder_dataset_fingerprint_covers_what_is_read(FolderFixture::text());
}

#[test]
fn image_folder_fingerprint_covers_what_is_read() {
    folder_dataset_fingerprint_covers_what_is_read(FolderFixture::images());
}

/// Case 2 (dataset part): a FIFO or a device given as the dataset itself
/// is refused at once, naming it (standard input stays `-`).
#[test]
fn a_fifo_or_device_given_as_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fifo = root.join("rows.csv");
    mkfifo(&fifo);
    for (data, kind) in [(fifo.to_str().unwrap(), "FIFO"), ("/dev/zero", "device")] {
        let mut plan = plan(Path::new(data));
        plan.read.format = Format::Csv;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(load(&plan).map(|d| d.examples.len()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(LIMIT_S))
            .unwrap_or_else(|_| panic!("reading {data} still ran after {LIMIT_S} s (a hang)"));
        let err = got.expect_err(data).to_string();
        assert!(err.contains(data) && err.contains(kind), "{err}");
    }
}

fn plan(path: &Path) -> DatasetPlan {
    DatasetPlan {
        source: SplitSource::Single {
            path: path.to_owned(),
            split: None,
        },
        read: ReadOptions::default(),
        labels: None,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Case 10: a header naming a used column twice is refused, naming the
/// column, in CSV and TSV; in JSON Lines, a row naming a used key twice is
/// a bad row.
#[test]
fn a_column_named_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (name, bytes, column) in [
        ("a.csv", &b"text,text,label\nfirst,second,x\n"[..], "`text`"),
        ("a.tsv", b"text\tlabel\tlabel\nhello\tx\ty\n", "`label`"),
    ] {
        let path = write(d, name, bytes);
        let err = load(&plan(&path)).expect_err(name).to_string();
        assert!(
            err.contains(name) && err.contains("twice") && err.contains(column),
            "{err}"
        );
    }
    // An unused column named twice (e.g. two empty names from trailing
    // commas) is harmless.
    let path = write(d, "b.csv", b"text,label,,\nhello,x,,\n");
    assert_eq!(load(&plan(&path)).unwrap().examples.len(), 1);
    let path = write(
        d,
        "c.jsonl",
        b"{\"text\": \"first\", \"text\": \"second\", \"label\": \"x\"}\n",
    );
    let err = load(&plan(&path)).unwrap_err().to_string();
    assert!(
        err.contains("c.jsonl") && err.contains("`text`") && err.contains("twice"),
        "{err}"
    );
}

/// Case 11: a UTF-16 or UTF-32 file is named as such, with how to convert
/// it, instead of being told to try Latin-1 (which reads NUL bytes).
#[test]
fn utf16_and_utf32_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let utf16le: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(
            "text,label\nhi,x\n"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        )
        .collect();
    let utf16be: Vec<u8> = [0xFE, 0xFF]
        .into_iter()
        .chain(
            "text,label\nhi,x\n"
                .encode_utf16()
                .flat_map(u16::to_be_bytes),
        )
        .collect();
    let utf32le: Vec<u8> = [0xFF, 0xFE, 0, 0]
        .into_iter()
        .chain(
            "text,label\nhi,x\n"
                .chars()
                .flat_map(|c| (c as u32).to_le_bytes()),
        )
        .collect();
    for (name, bytes, enc) in [
        ("le.csv", &utf16le, "UTF-16"),
        ("be.csv", &utf16be, "UTF-16"),
        ("32.csv", &utf32le, "UTF-32"),
    ] {
        let path = write(d, name, bytes);
        for latin1 in [false, true] {
            let mut p = plan(&path);
            if latin1 {
                p.read.encoding = sherl::data::Encoding::Latin1;
            }
            let err = load(&p).expect_err(name).to_string();
            assert!(
                err.contains(name)
                    && err.contains(enc)
                    && err.contains("iconv")
                    && !err.contains("--encoding latin1"),
                "{err}"
            );
        }
    }
    // A UTF-16 file in a text folder dataset: a bad row saying so.
    std::fs::create_dir_all(d.join("f/a")).unwrap();
    write(&d.join("f/a"), "x.txt", &utf16le);
    let err = load(&plan(&d.join("f"))).unwrap_err().to_string();
    assert!(err.contains("x.txt") && err.contains("UTF-16"), "{err}");
}

/// A 1x1 GIF (the image crate here decodes PNG and JPEG only).
const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00\
!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

/// Case 11: a GIF among PNGs gets a message whose advice works: PNG and
/// JPEG are decoded; convert or remove the file, or skip it as a bad row
/// with `--format image-folders --skip-bad-rows` (which the CLI accepts).
#[test]
fn a_gif_among_pngs_gets_advice_that_works() {
    let f = FolderFixture::images();
    write(&f.data.join("a"), "odd.gif", GIF);
    let err = load_images(&plan(&f.data), &ImageOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("odd.gif")
            && err.contains("PNG and JPEG")
            && err.contains("--format image-folders --skip-bad-rows"),
        "{err}"
    );
    let o = f.extract("c", &["--format", "image-folders", "--skip-bad-rows"]);
    ok(&o, "the advice");
    assert_eq!(f.fingerprint("c").2, 1);
    // Without --skip-bad-rows the GIF is named, with what is decoded.
    let o = f.extract("d", &["--format", "image-folders"]);
    let err = common::stderr(&o);
    assert!(
        !o.status.success() && err.contains("odd.gif") && err.contains("PNG and JPEG"),
        "{err}"
    );
}

/// Case 11: too few `--class-names` names the flag, not a Rust field.
#[test]
fn too_few_class_names_names_the_flag() {
    let f = image_fixture(2);
    let (n, rows, cols) = (4u32, 3u32, 3u32);
    let mut images = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        images.extend(d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(n.to_be_bytes());
    for i in 0..n {
        images.extend((0..rows * cols).map(|k| ((i * 37 + k * 11) % 256) as u8));
        labels.push((i % 3) as u8);
    }
    std::fs::write(f.root.join("x-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(f.root.join("x-labels-idx1-ubyte"), &labels).unwrap();
    std::fs::write(f.root.join("classes.txt"), "shirt\nshoe\n").unwrap();
    let o = extract(
        &f.root,
        &[
            "run",
            "--backbone",
            f.backbone.to_str().unwrap(),
            "--data",
            "x-images-idx3-ubyte",
            "--class-names",
            "classes.txt",
            "--late-layers",
            "1",
            "--device",
            "cpu",
            "--out",
            "c",
        ],
    );
    let err = common::stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--class-names") && err.contains("2 classes") && !err.contains("::"),
        "{err}"
    );
}
