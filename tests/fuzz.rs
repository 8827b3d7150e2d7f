//! A bounded, seeded mutation suite (the fuzz target of issue 8) for the
//! shard parser, the manifest parser and `merge`, run by `cargo test`.
//!
//! It mutates real shards (the golden ones) the way an attacker would:
//! header fields and index entries set to extreme values with every
//! checksum recomputed (so the size claims themselves are exercised, not
//! only the CRCs), frames altered with their CRC fixed, plus plain flips and
//! truncations; and manifests (paths with `..`, absolute paths, symlinks,
//! huge counts, shuffled names, forged worker fields), resealed or not.
//! For every case: no panic, no single allocation above [`ALLOC_LIMIT`]
//! (measured by a counting global allocator, so a size claim allocated
//! before it is checked fails the test), errors that name a file, and no
//! file written outside the output of a successful merge (a failed merge
//! leaves the disk as it was). Every case is reproducible from its seed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sherl::cache::format::{header_crc, HEADER_LEN, INDEX_ENTRY_LEN};
use sherl::cache::{Cache, MetaBounds, ShardReader};

use crate::cache::{copy_dir, golden, make_parts, read_json, reseal, snapshot, write_json};
use crate::common::tiny::Rng;

// ---------------------------------------------------------------------------
// The largest allocation a call makes
// ---------------------------------------------------------------------------

/// The most one allocation may ask for while parsing the small shards and
/// manifests below (a few hundred bytes each; real decoding needs a few KiB).
/// A size claim of a GiB or more allocated before it is checked fails here.
const ALLOC_LIMIT: usize = 64 << 20;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
        }
    });
}

/// The system allocator, recording the largest request made on a thread
/// while [`peak_alloc`] tracks it.
struct PeakAlloc;

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds the `GlobalAlloc` contract; the extra work only reads and writes
// const-initialised thread-locals (no allocation, no reentrancy).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Run `f` on this thread; return its result (or its panic message) and the
/// largest single allocation it asked for.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (Result<T, String>, usize) {
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    TRACKING.with(|t| t.set(false));
    let r = r.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    });
    (r, PEAK.with(|p| p.get()))
}

#[test]
fn peak_alloc_sees_a_large_allocation() {
    let (_, small) = peak_alloc(|| vec![0u8; 100]);
    let (_, big) = peak_alloc(|| Vec::<u8>::with_capacity(ALLOC_LIMIT + 1));
    assert!(small < 1000 && big > ALLOC_LIMIT, "{small} {big}");
}

// ---------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------

/// Values that make size arithmetic interesting for a file of `len` bytes.
fn interesting(rng: &mut Rng, len: u64) -> u64 {
    let pick = [
        0,
        1,
        2,
        3,
        8,
        9,
        55,
        56,
        95,
        96,
        97,
        len.saturating_sub(1),
        len,
        len + 1,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
        u64::MAX - 95,
        1 << 30,
        (1 << 30) / 56,
        (1 << 30) / 56 / 4 * 4,
        1 << 34,
        (1 << 34) + 1,
        12_900_000_000,
        806_250_000,
        1 << 62,
    ];
    match rng.below(4) {
        0 => rng.next_u64(),
        1 => rng.next_u64() % (len + 64),
        _ => pick[rng.below(pick.len() as u32) as usize],
    }
}

fn put(b: &mut [u8], at: usize, width: usize, v: u64) {
    b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

fn get(b: &[u8], at: usize, width: usize) -> u64 {
    let mut x = [0u8; 8];
    x[..width].copy_from_slice(&b[at..at + width]);
    u64::from_le_bytes(x)
}

/// Recompute the header CRC over whatever index range the header now
/// claims (when it lies in the file), as a forger would.
fn fix_header_crc(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    let (off, len) = (get(b, 72, 8), get(b, 80, 8));
    let index_crc = match off.checked_add(len) {
        Some(end) if end <= b.len() as u64 => crc32fast::hash(&b[off as usize..end as usize]),
        _ => 0,
    };
    let crc = header_crc(&b[..92], index_crc);
    b[92..96].copy_from_slice(&crc.to_le_bytes());
}

/// (offset, width) of the header fields after the magic (FORMAT.md §2).
const HEADER_FIELDS: &[(usize, usize)] = &[
    (8, 4),
    (12, 4),
    (16, 4),
    (20, 1),
    (21, 1),
    (22, 2),
    (24, 4),
    (28, 4),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 8),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 4),
];

/// (offset, width) of the index entry fields (FORMAT.md §4).
const ENTRY_FIELDS: &[(usize, usize)] = &[
    (0, 4),
    (4, 4),
    (8, 4),
    (12, 4),
    (16, 8),
    (24, 8),
    (32, 8),
    (40, 8),
    (48, 4),
    (52, 4),
];

/// A shard split into what a forger edits.
struct Parts {
    header: Vec<u8>,
    body: Vec<u8>,
    index: Vec<u8>,
}

fn split(b: &[u8]) -> Parts {
    let off = get(b, 72, 8) as usize;
    Parts {
        header: b[..HEADER_LEN].to_vec(),
        body: b[HEADER_LEN..off].to_vec(),
        index: zstd::stream::decode_all(&b[off..]).unwrap(),
    }
}

/// Reassemble: index recompressed, header index fields and CRC recomputed.
fn join(p: &Parts, fix_entries: bool) -> Vec<u8> {
    let index = zstd::bulk::compress(&p.index, 3).unwrap();
    let mut out = p.header.clone();
    put(&mut out, 72, 8, (HEADER_LEN + p.body.len()) as u64);
    put(&mut out, 80, 8, index.len() as u64);
    if fix_entries {
        put(&mut out, 88, 4, (p.index.len() / INDEX_ENTRY_LEN) as u64);
    }
    out.extend_from_slice(&p.body);
    out.extend_from_slice(&index);
    fix_header_crc(&mut out);
    out
}

/// One mutation of the shard `good`, chosen by `rng`.
fn mutate_shard(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let len = good.len() as u64;
    let mut p = split(good);
    let n_entries = p.index.len() / INDEX_ENTRY_LEN;
    match rng.below(8) {
        // a header field, CRC recomputed
        0 | 1 => {
            let mut b = good.to_vec();
            for _ in 0..1 + rng.below(2) {
                let (at, w) = HEADER_FIELDS[rng.below(HEADER_FIELDS.len() as u32) as usize];
                put(&mut b, at, w, interesting(rng, len));
            }
            fix_header_crc(&mut b);
            b
        }
        // an index entry field, index recompressed and CRCs recomputed
        2 | 3 => {
            for _ in 0..1 + rng.below(2) {
                let i = rng.below(n_entries as u32) as usize;
                let (at, w) = ENTRY_FIELDS[rng.below(ENTRY_FIELDS.len() as u32) as usize];
                put(
                    &mut p.index,
                    i * INDEX_ENTRY_LEN + at,
                    w,
                    interesting(rng, len),
                );
            }
            join(&p, false)
        }
        // a consistent lie: one chunk's token count, its layer sizes and
        // the header's totals and max_len all agree
        4 => {
            let n_layers = get(&p.header, 24, 4) as usize;
            let hidden = get(&p.header, 28, 4);
            let dtype = sherl::cache::format::Dtype::from_code(p.header[20]).unwrap();
            let chunks = n_entries / (n_layers + 1);
            let c = rng.below(chunks as u32) as usize;
            let tokens = interesting(rng, len).max(1);
            let old = get(&p.index, c * (n_layers + 1) * INDEX_ENTRY_LEN + 16, 8);
            for slot in 0..=n_layers {
                let at = (c * (n_layers + 1) + slot) * INDEX_ENTRY_LEN;
                put(&mut p.index, at + 16, 8, tokens);
                if slot > 0 {
                    let raw = dtype.raw_len(tokens, hidden).unwrap_or(u64::MAX);
                    put(&mut p.index, at + 40, 8, raw);
                }
            }
            let total = get(&p.header, 56, 8).wrapping_sub(old).wrapping_add(tokens);
            put(&mut p.header, 56, 8, total);
            put(&mut p.header, 32, 4, u64::from(u32::MAX));
            join(&p, false)
        }
        // a frame's bytes changed, its CRC recomputed in the index
        5 => {
            let i = rng.below(n_entries as u32) as usize;
            let e = i * INDEX_ENTRY_LEN;
            let (off, flen) = (
                get(&p.index, e + 24, 8) as usize,
                get(&p.index, e + 32, 8) as usize,
            );
            let frame = &mut p.body[off - HEADER_LEN..off - HEADER_LEN + flen];
            for _ in 0..1 + rng.below(3) {
                let k = rng.below(flen as u32) as usize;
                frame[k] = rng.below(256) as u8;
            }
            let crc = crc32fast::hash(frame);
            put(&mut p.index, e + 48, 4, u64::from(crc));
            join(&p, false)
        }
        // whole entries dropped or repeated, the header's count following
        6 => {
            let i = rng.below(n_entries as u32) as usize;
            let entry = p.index[i * INDEX_ENTRY_LEN..(i + 1) * INDEX_ENTRY_LEN].to_vec();
            if rng.below(2) == 0 {
                p.index
                    .drain(i * INDEX_ENTRY_LEN..(i + 1) * INDEX_ENTRY_LEN);
            } else {
                for _ in 0..1 + rng.below(5) {
                    p.index.extend_from_slice(&entry);
                }
            }
            join(&p, true)
        }
        // no checksum fixed: flips, truncation, appended bytes
        _ => {
            let mut b = good.to_vec();
            match rng.below(3) {
                0 => {
                    let i = rng.below(b.len() as u32) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                1 => b.truncate(rng.below(b.len() as u32) as usize),
                _ => b.extend((0..1 + rng.below(64)).map(|_| rng.below(256) as u8)),
            }
            b
        }
    }
}

fn golden_shards() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (dir, n) in [("v1", 2), ("v1-int8", 2), ("v2", 2)] {
        for k in 0..n {
            let rel = format!("shards/shard-{k:05}.shrd");
            out.push((
                format!("{dir}/{rel}"),
                std::fs::read(golden(dir).join(&rel)).unwrap(),
            ));
        }
    }
    out
}

/// 20,000 seeded shard mutations: no panic, no allocation above the limit,
/// and every mutated shard either reads back or is refused.
#[test]
fn shard_mutations_are_refused_cleanly() {
    let shards = golden_shards();
    let (mut opened, mut refused_at_open, mut refused_at_read) = (0, 0, 0);
    for case in 0..20_000u64 {
        let mut rng = Rng::new(0x5EED_0000 + case);
        let (name, good) = &shards[rng.below(shards.len() as u32) as usize];
        let bytes = mutate_shard(good, &mut rng);
        let bounds = MetaBounds {
            splits: rng.below(4) as usize,
            labels: rng.below(4) as usize,
        };
        let (outcome, peak) = peak_alloc(|| match ShardReader::new(bytes) {
            Err(e) => Err(e.to_string()),
            Ok(mut r) => {
                r.set_meta_bounds(bounds);
                r.verify().map(|_| ()).map_err(|e| format!("read: {e}"))
            }
        });
        let outcome = outcome.unwrap_or_else(|p| panic!("case {case} ({name}) panicked: {p}"));
        assert!(
            peak <= ALLOC_LIMIT,
            "case {case} ({name}): an allocation of {peak} bytes ({outcome:?})"
        );
        match outcome {
            Ok(()) => opened += 1,
            Err(e) if e.starts_with("read: ") => refused_at_read += 1,
            Err(e) => {
                assert!(
                    !e.is_empty() && !e.contains("frame 18446744073709551615"),
                    "case {case}: {e}"
                );
                refused_at_open += 1
            }
        }
    }
    // The mutations reach every stage of the reader.
    eprintln!("{opened} read back, {refused_at_open} refused at open, {refused_at_read} at read");
    assert!(
        opened > 250 && refused_at_open > 5000 && refused_at_read > 500,
        "{opened} read back, {refused_at_open} refused at open, {refused_at_read} at read"
    );
}

// ---------------------------------------------------------------------------
// Manifests (the reader) and parts (merge)
// ---------------------------------------------------------------------------

const HOSTILE_PATHS: &[&str] = &[
    "../../victim.txt",
    "../victim.txt",
    "shards/../../victim.txt",
    "shards/../shards/shard-00000.shrd",
    "/etc/passwd",
    "//victim.txt",
    "\\\\victim",
    "shards\\..\\..\\victim.txt",
    "shards/shard-00001.shrd",
    "shards/shard-0.shrd",
    "shards/",
    "",
    ".",
    "shards/shard-00000.shrd/",
    "shards/shard-00000.shrd\u{0}",
    "manifest.json",
    "shards/link.shrd",
];

const NUMBER_FIELDS: &[&str] = &[
    "/format_version",
    "/examples",
    "/tokens",
    "/shards/0/index",
    "/shards/0/first_example",
    "/shards/0/examples",
    "/shards/0/tokens",
    "/shards/0/bytes",
    "/shards/1/index",
    "/shards/1/first_example",
    "/shards/1/examples",
    "/settings/chunk_size",
    "/settings/max_len",
    "/settings/examples_per_shard",
    "/settings/zstd_level",
    "/backbone/hidden",
    "/backbone/num_layers",
    "/worker/index",
    "/worker/count",
];

fn big_number(rng: &mut Rng) -> Value {
    let pick: [Value; 10] = [
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(u64::MAX),
        json!(-1),
        json!(1e300),
        json!("7"),
    ];
    if rng.below(3) == 0 {
        json!(rng.next_u64() % 100)
    } else {
        pick[rng.below(pick.len() as u32) as usize].clone()
    }
}

/// One edit of a manifest (or part manifest) `m`.
fn mutate_manifest(m: &mut Value, rng: &mut Rng) {
    let shards = m["shards"].as_array().map_or(0, |s| s.len());
    match rng.below(9) {
        0 | 1 => {
            let k = rng.below(shards.max(1) as u32) as usize;
            let f = HOSTILE_PATHS[rng.below(HOSTILE_PATHS.len() as u32) as usize];
            if let Some(s) = m["shards"].get_mut(k) {
                s["file"] = json!(f);
            }
        }
        2 | 3 => {
            let path = NUMBER_FIELDS[rng.below(NUMBER_FIELDS.len() as u32) as usize];
            if let Some(v) = m.pointer_mut(path) {
                *v = big_number(rng);
            }
        }
        4 => {
            // splits: moved counts, huge counts, unknown names
            let names: Vec<String> = m["splits"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            if let Some(n) = names.first() {
                m["splits"][n] = big_number(rng);
            }
            if rng.below(2) == 0 {
                m["splits"]["nowhere"] = json!(1);
            }
        }
        5 => {
            let names = m["split_names"].as_array_mut().unwrap();
            match rng.below(4) {
                0 => names.reverse(),
                1 => {
                    names.pop();
                }
                2 => names.push(names[0].clone()),
                _ => names.clear(),
            }
        }
        6 => {
            let v = match rng.below(5) {
                0 => json!([]),
                1 => json!([u64::MAX]),
                2 => json!([0, 0, 0]),
                3 => json!((0..1000).collect::<Vec<u64>>()),
                _ => json!([1, 0, 2]),
            };
            m["settings"]["layers"] = v;
        }
        7 => {
            let v = match rng.below(4) {
                0 => json!(""),
                1 => json!("é".repeat(20)),
                2 => json!("zz"),
                _ => json!("0".repeat(64)),
            };
            m["settings_hash"] = v;
        }
        _ => {
            let s = m["shards"].as_array_mut().unwrap();
            match rng.below(3) {
                0 if !s.is_empty() => {
                    let x = s[0].clone();
                    s.push(x);
                }
                1 => {
                    s.pop();
                }
                _ => s.reverse(),
            }
            m["labels"] = json!([]);
        }
    }
}

/// The error names a file or directory under `root` (or, for merge's
/// cross-part refusals, says which shard or worker is at fault).
fn names_a_place(e: &sherl::Error, root: &Path) -> bool {
    let text = e.to_string();
    match e {
        sherl::Error::Setting { .. } => !text.is_empty(),
        _ => text.contains(&*root.to_string_lossy()),
    }
}

/// A sandbox directory holding a victim file (which hostile manifests point
/// at, directly or through a symlink in the shards directory).
fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    std::fs::write(root.join("victim.txt"), "precious").unwrap();
    (tmp, root)
}

/// 600 seeded manifest edits through `Cache::open` and `verify`: no panic,
/// no large allocation, errors naming the manifest or shard, nothing written.
#[test]
fn manifest_mutations_are_refused_cleanly() {
    let (_tmp, root) = sandbox();
    let (mut ok, mut refused) = (0, 0);
    for case in 0..600u64 {
        let mut rng = Rng::new(0x3A41_0000 + case);
        let name = ["v1", "v1-int8", "v2"][rng.below(3) as usize];
        let dir = root.join("c");
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&golden(name), &dir);
        std::os::unix::fs::symlink(root.join("victim.txt"), dir.join("shards/link.shrd")).unwrap();
        let mut m = read_json(&dir.join("manifest.json"));
        for _ in 0..1 + rng.below(2) {
            mutate_manifest(&mut m, &mut rng);
        }
        if rng.below(3) != 0 {
            m = reseal(m);
        }
        write_json(&dir.join("manifest.json"), &m);
        let before = snapshot(&root);
        let (outcome, peak) = peak_alloc(|| Cache::open(&dir).and_then(|c| c.verify(|_, _| {})));
        let outcome = outcome.unwrap_or_else(|p| panic!("case {case} ({name}) panicked: {p}: {m}"));
        assert!(
            peak <= ALLOC_LIMIT,
            "case {case}: an allocation of {peak} bytes"
        );
        assert_eq!(
            snapshot(&root),
            before,
            "case {case}: a reader wrote to disk"
        );
        match outcome {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(names_a_place(&e, &root), "case {case}: {e}");
                refused += 1;
            }
        }
    }
    eprintln!("{ok} opened, {refused} refused");
    assert!(refused > 400 && ok > 0, "{ok} opened, {refused} refused");
}

/// 250 seeded edits of a worker part's manifest through `merge`: no panic,
/// no large allocation; a refused or failed merge leaves the disk exactly as
/// it was (the victim next to the parts included); a successful one yields a
/// cache that opens.
#[test]
fn part_mutations_through_merge_leave_nothing_behind() {
    let (_tmp, root) = sandbox();
    let (mut ok, mut refused) = (0, 0);
    for case in 0..250u64 {
        let mut rng = Rng::new(0x3E26_0000 + case);
        let name = ["v1", "v2"][rng.below(2) as usize];
        let parts_root = root.join("work/parts");
        let _ = std::fs::remove_dir_all(root.join("work"));
        let parts = make_parts(name, &parts_root);
        let victim_dir = &parts[0];
        std::os::unix::fs::symlink(root.join("victim.txt"), victim_dir.join("shards/link.shrd"))
            .unwrap();
        let k = rng.below(2) as usize;
        let pm = parts[k].join("manifest.part.json");
        let mut m = read_json(&pm);
        for _ in 0..1 + rng.below(2) {
            mutate_manifest(&mut m, &mut rng);
        }
        if rng.below(4) != 0 {
            m = reseal(m);
        }
        write_json(&pm, &m);
        let out = root.join("work/out/merged");
        let before = snapshot(&root);
        let (outcome, peak) = peak_alloc(|| sherl::cache::merge::merge(&parts, &out));
        let outcome = outcome.unwrap_or_else(|p| panic!("case {case} ({name}) panicked: {p}: {m}"));
        assert!(
            peak <= ALLOC_LIMIT,
            "case {case}: an allocation of {peak} bytes"
        );
        assert_eq!(std::fs::read(root.join("victim.txt")).unwrap(), b"precious");
        match outcome {
            Ok(_) => {
                Cache::open(&out).unwrap_or_else(|e| panic!("case {case}: merged, then {e}"));
                ok += 1;
            }
            Err(e) => {
                assert!(names_a_place(&e, &root), "case {case}: {e}");
                assert_eq!(
                    snapshot(&root),
                    before,
                    "case {case}: a failed merge changed the disk ({e})"
                );
                refused += 1;
            }
        }
    }
    eprintln!("{ok} merged, {refused} refused");
    assert!(refused > 150 && ok > 0, "{ok} merged, {refused} refused");
}

// ---------------------------------------------------------------------------
// Run directories and grids (issue 28)
// ---------------------------------------------------------------------------

/// Far above any normal run of a command on the tiny fixture: a guard
/// against hangs, not a measurement.
const PROCESS_LIMIT_S: u64 = 120;

/// A value that makes a reader's life interesting.
fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(1e308),
        4 => json!(""),
        5 => json!("x".repeat(1 + rng.below(5000) as usize)),
        6 => json!([]),
        7 => json!({}),
        8 => json!(true),
        9 => json!(0),
        10 => json!(["a", "a"]),
        11 => json!(-0.0),
        12 => json!("../../etc/passwd"),
        _ => big_number(rng),
    }
}

/// A random place in `v` (a key of an object or an element of an array, at
/// any depth), given to `f` as its parent and key/index.
fn edit_somewhere(v: &mut Value, rng: &mut Rng, f: &mut dyn FnMut(&mut Value, &mut Rng)) {
    let descend = rng.below(3) != 0;
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m
                .keys()
                .nth(rng.below(m.len() as u32) as usize)
                .unwrap()
                .clone();
            let child = m.get_mut(&key).unwrap();
            if descend && (child.is_object() || child.is_array()) {
                edit_somewhere(child, rng, f)
            } else {
                f(v, rng)
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len() as u32) as usize;
            if descend && (a[i].is_object() || a[i].is_array()) {
                edit_somewhere(&mut a[i], rng, f)
            } else {
                f(v, rng)
            }
        }
        _ => f(v, rng),
    }
}

/// Replace, remove or duplicate one member of the container `v`.
fn edit_member(v: &mut Value, rng: &mut Rng) {
    let op = rng.below(3);
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m
                .keys()
                .nth(rng.below(m.len() as u32) as usize)
                .unwrap()
                .clone();
            match op {
                0 => {
                    m.remove(&key);
                }
                _ => {
                    m.insert(key, odd_value(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len() as u32) as usize;
            match op {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.push(x);
                }
                _ => {
                    let j = rng.below(a.len() as u32) as usize;
                    a.swap(i, j);
                    if i == j {
                        a[i] = odd_value(rng);
                    }
                }
            }
        }
        other => *other = odd_value(rng),
    }
}

/// A mutated copy of a JSON file's bytes: byte-level damage (cuts, flips,
/// insertions, an empty file, a byte-order mark) or a structural edit
/// (a member replaced with an odd value, removed or duplicated; `labels`
/// reordered, duplicated or renamed; a checksum changed).
fn mutate_json(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = good.to_vec();
    match rng.below(10) {
        0 => b.truncate(rng.below(b.len() as u32 + 1) as usize),
        1 => {
            let i = rng.below(b.len() as u32) as usize;
            b[i] ^= 1 << rng.below(8);
        }
        2 => {
            let i = rng.below(b.len() as u32 + 1) as usize;
            let junk: &[&[u8]] = &[
                b"\xff\xfe",
                b"\0",
                b"{",
                b"]",
                b",",
                b"\"",
                b"\xc3",
                b"1e999",
            ];
            b.splice(
                i..i,
                junk[rng.below(junk.len() as u32) as usize].iter().copied(),
            );
        }
        3 => b.clear(),
        4 => {
            let mut v: Value = serde_json::from_slice(good).unwrap();
            if let Some(labels) = v.get_mut("labels").and_then(Value::as_array_mut) {
                match rng.below(4) {
                    0 => labels.reverse(),
                    1 if labels.len() > 1 => labels[1] = labels[0].clone(),
                    2 => labels[0] = json!("renamed"),
                    _ => {
                        labels.pop();
                    }
                }
            } else {
                for k in ["weights_sha256", "config_sha256"] {
                    if v.get(k).is_some() && rng.below(2) == 0 {
                        v[k] = json!("0".repeat(64));
                    }
                }
            }
            b = serde_json::to_vec_pretty(&v).unwrap();
        }
        _ => {
            let mut v: Value = serde_json::from_slice(good).unwrap();
            for _ in 0..1 + rng.below(3) {
                edit_somewhere(&mut v, rng, &mut edit_member);
            }
            b = serde_json::to_vec_pretty(&v).unwrap();
        }
    }
    b
}

/// A mutated copy of `metrics.jsonl`: lines dropped, duplicated, garbled,
/// cut, a very long line, NUL bytes.
fn mutate_jsonl(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let text = String::from_utf8(good.to_vec()).unwrap();
    let mut lines: Vec<Vec<u8>> = text.lines().map(|l| l.as_bytes().to_vec()).collect();
    let i = rng.below(lines.len() as u32) as usize;
    match rng.below(7) {
        0 => {
            lines.remove(i);
        }
        1 => {
            let l = lines[i].clone();
            lines.push(l);
        }
        2 => lines[i] = mutate_json(&lines[i], rng),
        3 => lines[i] = vec![b'9'; (1 << 20) + rng.below(1 << 20) as usize],
        4 => lines[i] = vec![0; 1 + rng.below(64) as usize],
        5 => {
            let cut = rng.below(lines[i].len() as u32) as usize;
            lines[i].truncate(cut);
        }
        _ => lines[i].extend_from_slice(b"\xff\xfe"),
    }
    let mut out = lines.join(&b"\n"[..]);
    if rng.below(2) == 0 {
        out.push(b'\n');
    }
    out
}

/// A mutated copy of `weights.safetensors`: cut, a flipped bit, a forged
/// header length, a forged header, empty.
fn mutate_weights(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = good.to_vec();
    match rng.below(5) {
        0 => b.truncate(rng.below(b.len() as u32) as usize),
        1 => {
            let i = rng.below(b.len() as u32) as usize;
            b[i] ^= 1 << rng.below(8);
        }
        2 => {
            let v = interesting(rng, b.len() as u64);
            put(&mut b, 0, 8, v);
        }
        3 => {
            // a header byte changed (shapes, offsets, dtypes are text)
            let n = (get(&b, 0, 8) as usize).min(b.len() - 8);
            let i = 8 + rng.below(n as u32) as usize;
            b[i] = b"0123456789,[]{}\"x"[rng.below(17) as usize];
        }
        _ => b.clear(),
    }
    b
}

/// `sherl-fit args` in `root`, bounded; fails the test when it hangs or
/// panics, and returns its exit code, stdout and stderr.
fn fit_cli(root: &Path, args: &[&str], case: &str) -> (i32, String, String) {
    let o = crate::common::run_bounded("sherl-fit", args, root, &[], PROCESS_LIMIT_S)
        .unwrap_or_else(|| {
            panic!("{case}: sherl-fit {args:?} hung (killed after {PROCESS_LIMIT_S} s)")
        });
    let err = crate::common::stderr(&o);
    let code = o
        .status
        .code()
        .unwrap_or_else(|| panic!("{case}: sherl-fit {args:?} killed by a signal: {err}"));
    assert!(
        code != 101 && !err.contains("panicked"),
        "{case}: sherl-fit {args:?} panicked: {err}"
    );
    (code, crate::common::stdout(&o), err)
}

/// The run files the suite mutates, and how.
const RUN_FILES: [&str; 4] = [
    "config.json",
    "summary.json",
    "metrics.jsonl",
    "weights.safetensors",
];

/// 64 seeded edits of a trained tiny run's files (`config.json`,
/// `summary.json`, `metrics.jsonl`, `weights.safetensors`), each followed
/// by `predict`, `report` and a second `sherl-fit run` of the same
/// settings (which finds the run finished): never a panic or a hang; a
/// refusal names the file; a prediction that succeeds on a run with its
/// checksums is exactly the unedited run's. A third of the cases first
/// strip the checksums from `summary.json` (a run of an older sherl), so
/// the edits reach the parsers: there only "no panic, no hang" holds.
#[test]
fn run_dir_mutations_are_refused_cleanly() {
    use crate::fit::{fit, fit_fixture, summary};
    let f = fit_fixture(40, 2801, &[]);
    let root = &f.root;
    let s = summary(&fit(root, &["--epochs", "2"]));
    let run_rel = PathBuf::from(s["run_dir"].as_str().unwrap());
    let run_id = run_rel.file_name().unwrap().to_owned();
    let good = root.join(&run_rel);
    let predict_args = |run: &Path, out: &str| -> Vec<String> {
        [
            "predict",
            "--run",
            run.to_str().unwrap(),
            "--backbone",
            "backbone",
            "--data",
            "data.csv",
            "--device",
            "cpu",
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    let args = predict_args(&good, "base.jsonl");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = fit_cli(root, &args, "baseline");
    assert_eq!(code, 0, "{err}");
    let base = std::fs::read(root.join("base.jsonl")).unwrap();
    let (mut ok, mut refused) = (0, 0);
    for case in 0..64u64 {
        let mut rng = Rng::new(0x28_0000 + case);
        let name = RUN_FILES[case as usize % RUN_FILES.len()];
        let out = root.join(format!("fz{case}"));
        let dir = out.join(&run_id);
        crate::cache::copy_dir(&good, &dir);
        let old = rng.below(3) == 0;
        if old {
            let p = dir.join("summary.json");
            let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("weights_sha256");
            v.as_object_mut().unwrap().remove("config_sha256");
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        }
        let p = dir.join(name);
        let before = std::fs::read(&p).unwrap();
        let after = match name {
            "metrics.jsonl" => mutate_jsonl(&before, &mut rng),
            "weights.safetensors" => mutate_weights(&before, &mut rng),
            _ => mutate_json(&before, &mut rng),
        };
        std::fs::write(&p, &after).unwrap();
        let label = format!("case {case} ({name}{})", if old { ", old run" } else { "" });

        let pred = format!("fz{case}.jsonl");
        let args = predict_args(&dir, &pred);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = fit_cli(root, &args, &label);
        if code == 0 {
            ok += 1;
            if !old {
                let got = std::fs::read(root.join(&pred)).unwrap();
                assert!(
                    got == base,
                    "{label}: predicted other labels than the unedited run, exit 0: {err}\n{}",
                    String::from_utf8_lossy(&got[..got.len().min(600)])
                );
            }
        } else {
            refused += 1;
            eprintln!("{label}: {}", err.lines().last().unwrap_or(""));
            assert_eq!(code, 2, "{label}: {err}");
            assert!(
                RUN_FILES.iter().any(|n| err.contains(n)) || err.contains(&*dir.to_string_lossy()),
                "{label}: the refusal names no run file: {err}"
            );
            assert!(
                !root.join(&pred).exists(),
                "{label}: refused, yet wrote {pred}"
            );
        }

        let out_s = out.to_str().unwrap();
        let (code, _, err) = fit_cli(
            root,
            &["report", out_s, "--out", &format!("{out_s}-report")],
            &label,
        );
        assert!(
            code == 0 || code == 2 && err.contains(name),
            "{label}: report exit {code}: {err}"
        );

        let (code, stdout, err) = fit_cli(
            root,
            &[
                "run",
                "--cache",
                "cache",
                "--backbone",
                "backbone",
                "--epochs",
                "2",
                "--out",
                out_s,
            ],
            &label,
        );
        if name == "summary.json" {
            assert!(
                code == 0 || err.contains("summary.json"),
                "{label}: run exit {code}: {err}"
            );
        } else {
            assert_eq!(code, 0, "{label}: {err}");
            assert!(
                stdout.contains(s["run_id"].as_str().unwrap()),
                "{label}: {stdout}"
            );
        }
    }
    eprintln!("{ok} predicted, {refused} refused");
    assert!(refused > 25 && ok > 5, "{ok} predicted, {refused} refused");
}

/// 60 seeded edits of a sweep grid through `sweep --dry-run`: never a
/// panic or a hang; a refusal is exit 2 with a message. (The grid's
/// parser is `sherl::fit::sweep`; the edits keep the number of runs small,
/// so this exercises parsing and validation, not expansion limits.)
#[test]
fn grid_mutations_are_refused_cleanly() {
    let f = crate::fit::fit_fixture(40, 2802, &[]);
    let root = &f.root;
    // both forms of a grid: list-valued axes, and an explicit list of runs
    let axes = serde_json::to_vec_pretty(&json!({
        "epochs": 1,
        "method": ["sherl", "adapter"],
        "seed": [0, 1],
        "lr": [0.001, 0.01],
        "side_dim": 8
    }))
    .unwrap();
    let listed = serde_json::to_vec_pretty(&json!({
        "epochs": 1,
        "runs": [
            {"method": "sherl", "side_dim": 8, "seed": 0},
            {"method": "linear-probe", "lr": 0.01, "seed": 3}
        ]
    }))
    .unwrap();
    let dry_run = |grid: &str, label: &str| {
        fit_cli(
            root,
            &[
                "sweep",
                "--cache",
                "cache",
                "--backbone",
                "backbone",
                "--grid",
                grid,
                "--out",
                "runs",
                "--dry-run",
            ],
            label,
        )
    };
    for (name, good) in [("axes.json", &axes), ("listed.json", &listed)] {
        std::fs::write(root.join(name), good).unwrap();
        let (code, _, err) = dry_run(name, name);
        assert_eq!(code, 0, "{name}: {err}");
    }
    let (mut ok, mut refused) = (0, 0);
    for case in 0..60u64 {
        let mut rng = Rng::new(0x28_1000 + case);
        let grid = format!("grid{case}.json");
        let good = if case % 2 == 0 { &axes } else { &listed };
        std::fs::write(root.join(&grid), mutate_json(good, &mut rng)).unwrap();
        let label = format!("grid case {case}");
        let (code, _, err) = dry_run(&grid, &label);
        if code == 0 {
            ok += 1;
        } else {
            refused += 1;
            assert_eq!(code, 2, "{label}: {err}");
            assert!(err.trim().len() > 10, "{label}: no message: {err}");
        }
    }
    eprintln!("{ok} planned, {refused} refused");
    assert!(refused > 10 && ok > 5, "{ok} planned, {refused} refused");
}
