//! The cache format: round trips for every dtype over both byte backends
//! (memory map and `Vec<u8>`), lengths 1 and max-len, a bounded property test
//! over random shapes and chunkings, a bounded fuzz of header and index
//! parsing, and the specific error for each kind of damage; hostile
//! manifests and shards (forged sizes with valid checksums, edited
//! manifests, paths out of the cache) for the reader, `verify` and `merge`
//! (the seeded mutation suite is `tests/fuzz.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::tiny::Rng;
use crate::common::{self};
use serde_json::{json, Value};
use sherl::cache::format::{Dtype, Header, IndexEntry, HEADER_LEN, INDEX_ENTRY_LEN};
use sherl::cache::mmap::MappedFile;
use sherl::cache::shard::{compress_chunk, ExampleMeta, ShardReader, ShardSpec, ShardWriter};
use sherl::cache::{Cache, CacheError, MetaBounds};

fn spec(
    dtype: Dtype,
    shuffle: bool,
    layers: u32,
    hidden: u32,
    max_len: u32,
    chunk: u32,
) -> ShardSpec {
    ShardSpec {
        dtype,
        shuffle,
        zstd_level: 1,
        n_layers: layers,
        hidden,
        max_len,
        chunk_size: chunk,
        settings_hash: 0x1234_5678_9abc_def0,
        image: false,
    }
}

/// Synthetic examples: lengths from `lens`, values from a seeded generator
/// (spread over several orders of magnitude, like activations).
struct Synth {
    meta: Vec<ExampleMeta>,
    /// values[layer][example] = len x hidden
    values: Vec<Vec<Vec<f32>>>,
}

fn synth(lens: &[usize], layers: usize, hidden: usize, seed: u64) -> Synth {
    let mut rng = Rng::new(seed);
    let meta = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| ExampleMeta {
            position: i as u64,
            id: format!("ex-{i}"),
            split: (i % 3) as u32,
            label: if i % 5 == 0 {
                None
            } else {
                Some((i % 4) as u32)
            },
            ids: (0..l).map(|t| (t * 7 + i) as u32).collect(),
            type_ids: (0..l).map(|t| u8::from(t > l / 2)).collect(),
            image: None,
        })
        .collect();
    let values = (0..layers)
        .map(|_| {
            lens.iter()
                .map(|&l| {
                    (0..l * hidden)
                        .map(|_| rng.uniform() * 4.0 * (1.0 + rng.uniform()))
                        .collect()
                })
                .collect()
        })
        .collect();
    Synth { meta, values }
}

/// Write `s` as one shard, chunked by `sp.chunk_size`; returns the bytes.
fn write(dir: &Path, sp: ShardSpec, s: &Synth) -> Vec<u8> {
    let path = dir.join("shard-00000.shrd");
    let mut w = ShardWriter::create(&path, sp, 0, 0).unwrap();
    let c = sp.chunk_size as usize;
    for start in (0..s.meta.len()).step_by(c) {
        let end = (start + c).min(s.meta.len());
        let layers: Vec<Vec<f32>> = s.values.iter().map(|l| l[start..end].concat()).collect();
        w.push(compress_chunk(&sp, &s.meta[start..end], &layers).unwrap())
            .unwrap();
    }
    let sealed = w.seal().unwrap();
    assert!(!dir.join("shard-00000.shrd.tmp").exists());
    assert_eq!(sealed.examples, s.meta.len() as u64);
    std::fs::read(&path).unwrap()
}

fn expected(v: f32, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F32 => v,
        Dtype::F16 => half::f16::from_f32(v).to_f32(),
        Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        Dtype::Int8 => v, // checked against its bound instead
    }
}

/// Read everything back through `r` and compare with `s`.
fn check<B: sherl::cache::mmap::ByteSource>(
    r: &ShardReader<B>,
    s: &Synth,
    dtype: Dtype,
    hidden: usize,
) {
    let mut k = 0;
    for c in 0..r.chunks().len() {
        let meta = r.chunk_meta(c).unwrap();
        let layers: Vec<Vec<f32>> = (0..s.values.len())
            .map(|l| r.chunk_layer(c, l).unwrap())
            .collect();
        let mut row = 0;
        for m in meta {
            assert_eq!(m, s.meta[k]);
            for (l, got) in layers.iter().enumerate() {
                let want = &s.values[l][k];
                let got = &got[row * hidden..(row + m.len()) * hidden];
                for (t, (w_row, g_row)) in want.chunks(hidden).zip(got.chunks(hidden)).enumerate() {
                    let max = w_row.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (w, g) in w_row.iter().zip(g_row) {
                        if dtype == Dtype::Int8 {
                            // stated bound: half a quantisation step, max|x| / 254
                            assert!(
                                (w - g).abs() <= max / 254.0 * 1.0001 + 1e-7,
                                "int8 {w} vs {g} (token {t})"
                            );
                        } else {
                            assert_eq!(*g, expected(*w, dtype), "{dtype:?} example {k} layer {l}");
                        }
                    }
                }
            }
            row += m.len();
            k += 1;
        }
    }
    assert_eq!(k, s.meta.len());
    r.verify().unwrap();
}

#[test]
fn round_trip_every_dtype_both_backends_lengths_1_and_max() {
    for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32, Dtype::Int8] {
        for shuffle in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let (hidden, max_len) = (24, 12);
            let s = synth(&[1, 12, 5, 1, 12, 7, 3], 3, hidden, 9);
            let sp = spec(dtype, shuffle, 3, hidden as u32, max_len, 3);
            let bytes = write(tmp.path(), sp, &s);
            // in-memory backend
            let r = ShardReader::new(bytes).unwrap();
            assert_eq!(r.chunks().len(), 3);
            check(&r, &s, dtype, hidden);
            // memory-mapped backend
            let m = MappedFile::open(&tmp.path().join("shard-00000.shrd")).unwrap();
            check(&ShardReader::new(m).unwrap(), &s, dtype, hidden);
        }
    }
}

/// A byte source that records what the reader releases.
struct Recording {
    bytes: Vec<u8>,
    released: Released,
}

type Released = std::sync::Arc<std::sync::Mutex<Vec<(usize, usize)>>>;

impl AsRef<[u8]> for Recording {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl sherl::cache::mmap::ByteSource for Recording {
    fn release(&self, offset: usize, len: usize) {
        self.released.lock().unwrap().push((offset, len));
    }
}

fn recording(bytes: Vec<u8>) -> (ShardReader<Recording>, Released) {
    let released = Released::default();
    let source = Recording {
        bytes,
        released: released.clone(),
    };
    (ShardReader::new(source).unwrap(), released)
}

fn take(released: &Released) -> Vec<(usize, usize)> {
    std::mem::take(&mut *released.lock().unwrap())
}

/// Is every range of `needles` inside the union of `ranges`?
fn covered(ranges: &[(usize, usize)], needles: &[(usize, usize)]) -> bool {
    let mut bytes = std::collections::BTreeSet::new();
    for &(o, l) in ranges {
        bytes.extend(o..o + l);
    }
    needles
        .iter()
        .all(|&(o, l)| (o..o + l).all(|b| bytes.contains(&b)))
}

/// Reading a chunk with only some of its layers, then `release_chunk`,
/// releases the frames nobody decoded too (a memory map's fault-around maps
/// their pages, which would otherwise stay resident for the whole run), and
/// nothing outside the chunks' frames.
#[test]
fn release_chunk_covers_frames_that_were_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let s = synth(&[3, 5, 2, 4, 1, 6, 2], 3, 16, 4);
    let bytes = write(tmp.path(), spec(Dtype::F16, true, 3, 16, 6, 3), &s);
    // Every frame's exact range, from the index.
    let (_, entries) = index_entries(&bytes);
    let frames: Vec<(usize, usize)> = entries
        .iter()
        .map(|e| (e.offset as usize, e.len as usize))
        .collect();
    let lo = frames.iter().map(|f| f.0).min().unwrap();
    let hi = frames.iter().map(|f| f.0 + f.1).max().unwrap();
    // A reader that needs layer 1 only.
    let (r, log) = recording(bytes);
    assert_eq!(frames.len(), r.frames());
    for c in 0..r.chunks().len() {
        r.chunk_meta(c).unwrap();
        r.chunk_layer_values(c, 1).unwrap();
    }
    let read_only = take(&log);
    assert!(
        !covered(&read_only, &frames),
        "the unread layers' frames are not released by reading"
    );
    for c in 0..r.chunks().len() {
        r.release_chunk(c);
    }
    r.release_chunk(r.chunks().len()); // no such chunk: nothing
    let by_chunk = take(&log);
    assert_eq!(by_chunk.len(), r.chunks().len());
    assert!(covered(&by_chunk, &frames));
    assert!(by_chunk.iter().all(|&(o, l)| o >= lo && o + l <= hi));
}

/// Bounded property test: random dtype, shapes, lengths and chunkings
/// (seeded, so a failure is reproducible from the printed case number).
#[test]
fn property_random_shapes_and_chunkings() {
    let mut rng = Rng::new(2024);
    for case in 0..60 {
        let dtype = [Dtype::F16, Dtype::Bf16, Dtype::F32, Dtype::Int8][rng.below(4) as usize];
        let layers = 1 + rng.below(4) as usize;
        let hidden = 1 + rng.below(40) as usize;
        let max_len = 1 + rng.below(20) as usize;
        let n = 1 + rng.below(30) as usize;
        let chunk = 1 + rng.below(9);
        let lens: Vec<usize> = (0..n)
            .map(|_| 1 + rng.below(max_len as u32) as usize)
            .collect();
        let s = synth(&lens, layers, hidden, case);
        let tmp = tempfile::tempdir().unwrap();
        let sp = spec(
            dtype,
            rng.below(2) == 1,
            layers as u32,
            hidden as u32,
            max_len as u32,
            chunk,
        );
        let bytes = write(tmp.path(), sp, &s);
        let r = ShardReader::new(bytes).unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(r.chunks().len(), n.div_ceil(chunk as usize), "case {case}");
        check(&r, &s, dtype, hidden);
    }
}

/// Ids have no length limit (FORMAT.md §3.1): a chunk of examples with
/// ids of several KiB reads back (the reader once refused a metadata frame
/// with more than 4 KiB of id per example as implausible).
#[test]
fn long_ids_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = synth(&[1, 3, 2], 1, 4, 5);
    for (i, m) in s.meta.iter_mut().enumerate() {
        m.id = format!("{i}-{}", "ü".repeat(3000 + 1000 * i));
    }
    let bytes = write(tmp.path(), spec(Dtype::F32, false, 1, 4, 4, 3), &s);
    let r = ShardReader::new(bytes).unwrap();
    check(&r, &s, Dtype::F32, 4);
}

fn small_shard() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let s = synth(&[3, 1, 4, 1, 5], 2, 8, 1);
    write(tmp.path(), spec(Dtype::F16, true, 2, 8, 8, 2), &s)
}

/// Bounded fuzz of header/index/frame parsing: random byte flips, random
/// truncations, random garbage, random header fields. Parsing and decoding
/// must return errors, never panic.
#[test]
fn fuzz_parsing_never_panics() {
    let good = small_shard();
    let mut rng = Rng::new(77);
    let exercise = |bytes: Vec<u8>| {
        if let Ok(r) = ShardReader::new(bytes) {
            // Structural checks passed: decoding must still not panic.
            let _verdict = r.verify();
        }
    };
    for _ in 0..3000 {
        let mut b = good.clone();
        match rng.below(4) {
            0 => {
                let i = rng.below(b.len() as u32) as usize;
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.truncate(rng.below(b.len() as u32) as usize),
            2 => {
                // garbage in the header fields (after the magic and version)
                for _ in 0..4 {
                    let i = 12 + rng.below(84) as usize;
                    b[i] = rng.below(256) as u8;
                }
            }
            _ => {
                b = (0..rng.below(400)).map(|_| rng.below(256) as u8).collect();
                if rng.below(2) == 0 && b.len() > 12 {
                    b[..8].copy_from_slice(b"SHRLCACH");
                    b[8..12].copy_from_slice(&1u32.to_le_bytes());
                }
            }
        }
        exercise(b);
    }
}

/// A flipped byte anywhere is detected (header CRC, index CRC or frame
/// CRC); never silently wrong numbers.
#[test]
fn every_flipped_byte_is_detected() {
    let good = small_shard();
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x10;
        let outcome = ShardReader::new(b).and_then(|r| r.verify().map(|_| ()));
        assert!(
            outcome.is_err(),
            "flipping byte {i} of {} went unnoticed",
            good.len()
        );
    }
}

#[test]
fn specific_errors() {
    let good = small_shard();
    // wrong magic
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(ShardReader::new(b), Err(CacheError::BadMagic)));
    // newer format version
    let mut b = good.clone();
    b[8..12].copy_from_slice(&4u32.to_le_bytes());
    match ShardReader::new(b) {
        Err(CacheError::UnsupportedVersion {
            found: 4,
            oldest: 1,
            newest: 3,
        }) => {}
        other => panic!("{other:?}"),
    }
    let msg = CacheError::UnsupportedVersion {
        found: 2,
        oldest: 1,
        newest: 1,
    }
    .to_string();
    assert!(
        msg.contains("version 2") && msg.contains("1 to 1") && msg.contains("re-run sherl-extract"),
        "{msg}"
    );
    // truncated: inside the header, and inside the body
    assert!(matches!(
        ShardReader::new(good[..40].to_vec()),
        Err(CacheError::TruncatedHeader { len: 40 })
    ));
    assert!(matches!(
        ShardReader::new(good[..good.len() - 10].to_vec()),
        Err(CacheError::TruncatedIndex { .. })
    ));
    // flipped byte in a frame: checksum mismatch naming the frame
    let mut b = good.clone();
    b[sherl::cache::format::HEADER_LEN + 5] ^= 0xff;
    let r = ShardReader::new(b).unwrap();
    match r.verify() {
        Err(CacheError::ChecksumMismatch { what }) => assert!(what.contains("frame 0"), "{what}"),
        other => panic!("{other:?}"),
    }
    // flipped byte in the header: checksum mismatch
    let mut b = good.clone();
    b[30] ^= 1;
    assert!(matches!(
        ShardReader::new(b),
        Err(CacheError::ChecksumMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------
// Helpers for hostile inputs (shared with tests/fuzz.rs)
// ---------------------------------------------------------------------------

pub(crate) fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cache_schema/golden")
        .join(name)
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// Every file and directory under `root` with its bytes (None for a
/// directory; symlinks as their target): what "nothing changed on disk" compares.
pub(crate) fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(p, Some(t.to_string_lossy().as_bytes().to_vec()));
            } else if md.is_dir() {
                out.insert(p.clone(), None);
                stack.push(p);
            } else {
                out.insert(p.clone(), Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

pub(crate) fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub(crate) fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// A shard's header and index entries, decoded without a reader's checks.
fn index_entries(bytes: &[u8]) -> (Header, Vec<IndexEntry>) {
    let (h, _) = Header::decode(bytes).unwrap();
    let raw = zstd::stream::decode_all(&bytes[h.index_offset as usize..]).unwrap();
    let entries = (0..raw.len() / INDEX_ENTRY_LEN)
        .map(|i| IndexEntry::decode(&raw, i).unwrap())
        .collect();
    (h, entries)
}

/// Rewrite a shard's header and index entries, then recompute the index
/// frame, the header CRC and everything else a reader checksums: the forged
/// claims themselves are what the reader has to catch.
pub(crate) fn forge(bytes: &[u8], f: impl FnOnce(&mut Header, &mut Vec<IndexEntry>)) -> Vec<u8> {
    let (mut h, mut entries) = index_entries(bytes);
    let body = bytes[HEADER_LEN..h.index_offset as usize].to_vec();
    f(&mut h, &mut entries);
    let mut raw = Vec::new();
    for e in &entries {
        e.encode_into(&mut raw);
    }
    let index = zstd::bulk::compress(&raw, 3).unwrap();
    h.index_offset = (HEADER_LEN + body.len()) as u64;
    h.index_len = index.len() as u64;
    h.index_crc = crc32fast::hash(&index);
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&index);
    out
}

/// Like [`forge`], but only the header (the index stays as it is, and the
/// header's index_entries may now disagree with it).
pub(crate) fn forge_header(bytes: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let (mut h, _) = Header::decode(bytes).unwrap();
    h.index_crc = crc32fast::hash(&bytes[h.index_offset as usize..]);
    f(&mut h);
    let mut out = bytes.to_vec();
    out[..HEADER_LEN].copy_from_slice(&h.encode());
    out
}

/// Split a golden cache into the two worker parts `--shard-of I/2` would
/// have written (shard k in part k mod 2), under `root/p0` and `root/p1`.
pub(crate) fn make_parts(name: &str, root: &Path) -> [PathBuf; 2] {
    let src = golden(name);
    let m = read_json(&src.join("manifest.json"));
    let parts = [root.join("p0"), root.join("p1")];
    for (i, dir) in parts.iter().enumerate() {
        std::fs::create_dir_all(dir.join("shards")).unwrap();
        let mut pm = m.clone();
        let shards: Vec<Value> = m["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["index"].as_u64().unwrap() % 2 == i as u64)
            .cloned()
            .collect();
        for s in &shards {
            let f = s["file"].as_str().unwrap();
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        pm["examples"] = json!(shards
            .iter()
            .map(|s| s["examples"].as_u64().unwrap())
            .sum::<u64>());
        pm["tokens"] = json!(shards
            .iter()
            .map(|s| s["tokens"].as_u64().unwrap())
            .sum::<u64>());
        pm["shards"] = Value::Array(shards);
        pm["worker"] = json!({"index": i, "count": 2});
        write_part_manifest(dir, pm);
    }
    parts
}

/// Write `v` as `dir/manifest.part.json`, with a recomputed manifest_sha256
/// when it parses as a version 2 manifest (so the edit itself is tested, not
/// the checksum).
pub(crate) fn write_part_manifest(dir: &Path, v: Value) {
    write_json(&dir.join("manifest.part.json"), &reseal(v));
}

/// `v` with its manifest_sha256 recomputed, when it parses as a manifest of
/// version 2 or later; unchanged otherwise.
pub(crate) fn reseal(v: Value) -> Value {
    match serde_json::from_value::<sherl::cache::Manifest>(v.clone()) {
        Ok(m) if m.format_version >= 2 => serde_json::to_value(m.sealed()).unwrap(),
        _ => v,
    }
}

fn merge(root: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["merge"];
    a.extend_from_slice(args);
    common::run("sherl-cache", &a, root, &[])
}

fn assert_exit_2(o: &std::process::Output, needles: &[&str]) -> String {
    let err = common::stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

// ---------------------------------------------------------------------------
// Item 1 / 21: merge reads and writes only inside its directories, and a
// failed merge leaves nothing behind
// ---------------------------------------------------------------------------

/// The attack of issue 8 item 1: a part's manifest names
/// `../../x/victim.txt` for shard 0, where `part/../../x/victim.txt` is a
/// valid shard and `out/../../x/victim.txt` a file outside --out. Merge must
/// refuse before opening or writing anything, leave nothing behind, and
/// succeed on a retry once the part is fixed.
#[test]
fn merge_refuses_a_part_path_outside_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let parts_root = root.join("parts");
    let [p0, p1] = make_parts("v1", &parts_root);
    // part/../../x/victim.txt = root/x/victim.txt: a valid shard
    std::fs::create_dir_all(root.join("x")).unwrap();
    std::fs::copy(
        p0.join("shards/shard-00000.shrd"),
        root.join("x/victim.txt"),
    )
    .unwrap();
    // out/../../x/victim.txt = root/o/x/victim.txt: the victim
    std::fs::create_dir_all(root.join("o/x")).unwrap();
    std::fs::write(root.join("o/x/victim.txt"), "precious").unwrap();
    let out = root.join("o/a/out");
    let good = read_json(&p0.join("manifest.part.json"));
    let args = [
        p0.to_str().unwrap(),
        p1.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    for (file, why) in [
        ("../../x/victim.txt", "`..`"),
        ("shards/../../../x/victim.txt", "`..`"),
        ("/etc/passwd", "absolute"),
        ("shards/shard-00001.shrd", "not the name of this shard"),
        ("manifest.part.json", "not a file under shards/"),
    ] {
        let mut m = good.clone();
        m["shards"][0]["file"] = json!(file);
        write_part_manifest(&p0, m);
        let before = snapshot(root);
        let err = assert_exit_2(&merge(root, &args), &[file, why, "shards/shard-00000.shrd"]);
        assert!(err.contains("manifest.part.json"), "{err}");
        assert_eq!(
            snapshot(root),
            before,
            "{file}: a refused merge changed the disk"
        );
        assert_eq!(
            std::fs::read(root.join("o/x/victim.txt")).unwrap(),
            b"precious"
        );
        assert!(!out.exists() && !root.join("o/a").exists());
    }
    // A symlink leading out of the part is refused too.
    write_part_manifest(&p0, good.clone());
    let shard0 = p0.join("shards/shard-00000.shrd");
    let saved = std::fs::read(&shard0).unwrap();
    std::fs::remove_file(&shard0).unwrap();
    std::os::unix::fs::symlink(root.join("x/victim.txt"), &shard0).unwrap();
    let before = snapshot(root);
    assert_exit_2(
        &merge(root, &args),
        &["symlink", "outside the cache directory"],
    );
    assert_eq!(snapshot(root), before);
    // Fixed part: the retry works, and the result is a cache.
    std::fs::remove_file(&shard0).unwrap();
    std::fs::write(&shard0, saved).unwrap();
    let o = merge(root, &args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        std::fs::read(root.join("o/x/victim.txt")).unwrap(),
        b"precious"
    );
    Cache::open(&out).unwrap().verify(|_, _| {}).unwrap();
}

/// Issue 8 item 21 (merge): a merge that fails after the checks of the
/// manifests (here: a damaged shard) leaves no --out, no temporary directory
/// and no created parent behind; a refused merge (non-empty --out) changes
/// nothing; after repairing the part, the same command succeeds.
#[test]
fn failed_merge_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let [p0, p1] = make_parts("v1", root);
    let shard1 = p1.join("shards/shard-00001.shrd");
    let good = std::fs::read(&shard1).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40; // inside the index: header/index checksum
    std::fs::write(&shard1, &bad).unwrap();
    let out = root.join("new/dir/out");
    let args = [
        p0.to_str().unwrap(),
        p1.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let before = snapshot(root);
    assert_exit_2(
        &merge(root, &args),
        &["shard-00001.shrd", "checksum mismatch"],
    );
    assert_eq!(
        snapshot(root),
        before,
        "a failed merge left something behind"
    );
    assert!(!root.join("new").exists());

    // a refused merge: --out is not empty
    std::fs::write(&shard1, &good).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let before = snapshot(root);
    assert_exit_2(&merge(root, &args), &["must not exist or be empty"]);
    assert_eq!(snapshot(root), before);

    // retry into an empty --out: works, with a version 2 manifest
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    let o = merge(root, &args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cache = Cache::open(&out).unwrap();
    assert_eq!(
        cache.manifest().format_version,
        sherl::cache::FORMAT_VERSION
    );
    assert!(cache.manifest().manifest_sha256.is_some());
    cache.verify(|_, _| {}).unwrap();
    let entries: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries,
        ["out"],
        "no temporary directory left next to --out"
    );
    // the values are the golden cache's
    let golden = Cache::open(&golden("v1")).unwrap();
    for id in 0..golden.chunks().len() {
        let a = golden.read_chunk(id, &[0, 1, 2]).unwrap();
        let b = cache.read_chunk(id, &[0, 1, 2]).unwrap();
        assert_eq!((a.meta, a.layers), (b.meta, b.layers));
    }
}

/// Issue 8 item 19: a complete cache given as a part is named as such.
#[test]
fn merge_given_a_complete_cache_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_dir(&golden("v2"), &root.join("whole"));
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let before = snapshot(root);
    let err = assert_exit_2(
        &merge(root, &["whole", "--out", "out"]),
        &["whole", "complete cache", "manifest.part.json"],
    );
    assert!(!err.contains("no manifest.json"), "{err}");
    let err = assert_exit_2(
        &merge(root, &["empty", "--out", "out"]),
        &[
            "empty",
            "no manifest.part.json",
            "not a finished worker part",
        ],
    );
    assert!(!err.contains("no manifest.json"), "{err}");
    assert_eq!(snapshot(root), before);
}

/// Parts of a version 2 cache merge into the same cache; parts that
/// disagree (beyond the worker fields) are refused.
#[test]
fn merge_of_v2_parts_and_disagreeing_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let [p0, p1] = make_parts("v2", root);
    let args = ["p0", "p1", "--out", "out"];
    let mut m = read_json(&p1.join("manifest.part.json"));
    m["labels"] = json!(["a", "b"]);
    write_part_manifest(&p1, m);
    let before = snapshot(root);
    assert_exit_2(&merge(root, &args), &["disagree on `labels`"]);
    assert_eq!(snapshot(root), before);
    // a part edited without its checksum is refused naming the file
    let mut m = read_json(&p1.join("manifest.part.json"));
    m["labels"] = json!(["a", "b", "c"]);
    write_json(&p1.join("manifest.part.json"), &m);
    assert_exit_2(
        &merge(root, &args),
        &["p1/manifest.part.json", "manifest_sha256"],
    );
    write_part_manifest(&p1, m);
    let o = merge(root, &args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let merged = Cache::open(&root.join("out")).unwrap();
    let golden = Cache::open(&golden("v2")).unwrap();
    // The merge writes the current version (FORMAT.md §6); the rest is the
    // golden cache's.
    assert_eq!(
        merged.manifest().format_version,
        sherl::cache::FORMAT_VERSION
    );
    let strip = |m: &sherl::cache::Manifest| {
        let mut m = m.clone();
        m.created_at = String::new();
        m.manifest_sha256 = None;
        m.format_version = 0;
        m
    };
    assert_eq!(strip(merged.manifest()), strip(golden.manifest()));
    drop(p0);
}

// ---------------------------------------------------------------------------
// Item 12: size claims are checked before anything is allocated for them
// ---------------------------------------------------------------------------

/// A header claiming a 1 GiB index (checksums recomputed) is refused by the
/// check against the file size, not by a failed 1 GiB allocation.
#[test]
fn forged_index_size_is_refused_before_allocation() {
    let good = std::fs::read(golden("v1").join("shards/shard-00000.shrd")).unwrap();
    let forged = forge_header(&good, |h| {
        h.index_entries = ((1u64 << 30) / 56 / 4 * 4) as u32
    });
    match ShardReader::new(forged) {
        Err(CacheError::Corrupt(msg)) => assert!(
            msg.contains("frames") && msg.contains("body can hold at most"),
            "{msg}"
        ),
        other => panic!("{other:?}"),
    }
    // An index whose declared decoded size disagrees with its zstd frame header.
    let forged = forge(&good, |h, e| {
        e.truncate(4);
        // two chunks of 3 examples claimed; the index frame holds one chunk
        h.index_entries = 8;
        h.n_examples = 6;
    });
    match ShardReader::new(forged) {
        Err(CacheError::Corrupt(msg)) => {
            assert!(
                msg.contains("the index frame") && msg.contains("zstd frame header says"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Index entries claiming a 12.9 GB layer frame (sizes consistent with the
/// header, every checksum recomputed) are refused against the frame's
/// compressed size; a forged token count against the metadata frame's size;
/// a small lie against the zstd frame header before decoding; and in a
/// cache, all of them against the manifest before the index is even read.
#[test]
fn forged_frame_size_is_refused_before_allocation() {
    use sherl::cache::format::FrameKind;
    let dir = golden("v1");
    let good = std::fs::read(dir.join("shards/shard-00000.shrd")).unwrap();
    let (_, index) = index_entries(&good);
    let e0 = &index[0];
    // chunk 0 holds 5 tokens: a hidden width giving its layer frames 12.9 GB
    assert_eq!(e0.n_tokens, 5);
    let wide = forge(&good, |h, entries| {
        h.hidden = 1_290_000_000;
        for e in entries.iter_mut().filter(|e| e.kind == FrameKind::Layer) {
            e.raw_len = h.dtype.raw_len(e.n_tokens, u64::from(h.hidden)).unwrap();
        }
    });
    match ShardReader::new(wide.clone()) {
        Err(CacheError::Corrupt(msg)) => assert!(
            msg.contains("frame 1 claims 12900000000 decoded bytes")
                && msg.contains("more than zstd can produce"),
            "{msg}"
        ),
        other => panic!("{other:?}"),
    }
    // chunk 0 claiming 806,250,000 tokens (12.9 GB per f16 layer frame)
    let forge_tokens = |tokens: u64| {
        forge(&good, |h, entries| {
            let old = entries[0].n_tokens;
            for e in entries.iter_mut().take(h.n_layers as usize + 1) {
                e.n_tokens = tokens;
                if e.kind == FrameKind::Layer {
                    e.raw_len = h.dtype.raw_len(tokens, u64::from(h.hidden)).unwrap();
                }
            }
            h.n_tokens = h.n_tokens - old + tokens;
            h.max_len = u32::MAX;
        })
    };
    let many = forge_tokens(806_250_000);
    match ShardReader::new(many.clone()) {
        Err(CacheError::Corrupt(msg)) => {
            assert!(
                msg.contains("chunk 0") && msg.contains("806250000 tokens"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    // one token more than the frames hold: plausible sizes, but the zstd
    // frame header records the real one
    let r = ShardReader::new(forge_tokens(e0.n_tokens + 1)).unwrap();
    match r.chunk_layer(0, 0) {
        Err(CacheError::Corrupt(msg)) => assert!(
            msg.contains("frame 1 (layer position 0, chunk 0)")
                && msg.contains("zstd frame header says"),
            "{msg}"
        ),
        other => panic!("{other:?}"),
    }
    // In a cache: the header disagrees with the manifest (hidden, tokens).
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&dir, tmp.path());
    for (forged, want) in [(wide, "hidden"), (many, "tokens")] {
        std::fs::write(tmp.path().join("shards/shard-00000.shrd"), forged).unwrap();
        match Cache::open(tmp.path()) {
            Err(sherl::Error::Cache {
                path,
                source: CacheError::ManifestMismatch { field, .. },
            }) => {
                assert!(path.ends_with("shards/shard-00000.shrd"), "{path:?}");
                assert_eq!(field, want);
            }
            other => panic!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Item 15: a truncated shard names the index, not frame usize::MAX
// ---------------------------------------------------------------------------

#[test]
fn truncated_shard_says_so() {
    let good = std::fs::read(golden("v1").join("shards/shard-00001.shrd")).unwrap();
    for cut in [1, 10, good.len() / 2] {
        let err = ShardReader::new(good[..good.len() - cut].to_vec()).unwrap_err();
        assert!(matches!(err, CacheError::TruncatedIndex { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("truncated") && msg.contains("index"), "{msg}");
        assert!(!msg.contains(&usize::MAX.to_string()), "{msg}");
    }
    // a frame that lies outside the file is named by its real number
    let forged = forge(&good, |_, e| e[2].len += 1 << 40);
    match ShardReader::new(forged) {
        Err(CacheError::IndexOutOfBounds { entry: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Item 14: label and split ids are checked against the manifest
// ---------------------------------------------------------------------------

/// Labels shorter than the label ids in the shards: `verify` fails naming
/// the shard and the example, every read of such a chunk fails (so training
/// never sees the id), and `sherl-cache verify` exits 2.
#[test]
fn label_and_split_ids_are_checked_against_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    copy_dir(&golden("v1"), &dir);
    let mut m = read_json(&dir.join("manifest.json"));
    m["labels"] = json!(["neg"]); // the shards hold label ids 0 and 1
    write_json(&dir.join("manifest.json"), &m);
    let cache = Cache::open(&dir).unwrap(); // a version 1 manifest has no checksum
    match cache.verify(|_, _| {}) {
        Err(sherl::Error::Cache {
            path,
            source:
                CacheError::ManifestMismatch {
                    field,
                    manifest,
                    shard,
                },
        }) => {
            assert!(path.ends_with("shards/shard-00000.shrd"), "{path:?}");
            assert_eq!(field, "labels");
            assert_eq!(manifest, "1 labels");
            assert!(
                shard.contains("label id 1") && shard.contains("\"ex-1\""),
                "{shard}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(cache.read_chunk(0, &[0]).is_err());
    assert!(cache.example(1, &[0]).is_err());
    let positions = vec![0];
    let streamed: Vec<_> = std::sync::Arc::new(cache)
        .stream(vec![0], positions, 1, 1)
        .collect();
    assert!(streamed[0].is_err());
    let o = common::run(
        "sherl-cache",
        &["verify", dir.to_str().unwrap()],
        tmp.path(),
        &[],
    );
    assert_exit_2(&o, &["labels", "label id 1"]);

    // split ids against split_names, through the reader directly
    let bytes = std::fs::read(golden("v1").join("shards/shard-00001.shrd")).unwrap();
    let mut r = ShardReader::new(bytes).unwrap();
    r.set_meta_bounds(MetaBounds {
        splits: 2,
        labels: 2,
    });
    // shard 1 chunk 0 holds valid (1) and test (2) examples
    match r.chunk_meta(0) {
        Err(CacheError::ManifestMismatch { field, shard, .. }) => {
            assert_eq!(field, "split_names");
            assert!(shard.contains("split id 2"), "{shard}");
        }
        other => panic!("{other:?}"),
    }
    assert!(r.verify().is_err());
}

// ---------------------------------------------------------------------------
// Item 10: the manifest's content is checksummed (format version 2)
// ---------------------------------------------------------------------------

/// Each edit of issue 8 item 10 on a version 2 manifest is refused by
/// `Cache::open` and `sherl-cache verify`; on a version 1 manifest (no
/// checksum), `verify` still catches the split edits from the shards.
#[test]
fn edited_manifest_is_refused() {
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 5] = [
        ("splits, same sum", |m| {
            let a = m["splits"]["train"].as_u64().unwrap();
            let b = m["splits"]["test"].as_u64().unwrap();
            m["splits"]["train"] = json!(a - 1);
            m["splits"]["test"] = json!(b + 1);
        }),
        ("split_names order", |m| {
            let names = m["split_names"].as_array_mut().unwrap();
            names.swap(0, 1);
        }),
        ("settings.layers", |m| {
            let l = m["settings"]["layers"].as_array_mut().unwrap();
            let last = l.len() - 1;
            l[last] = json!(l[last].as_u64().unwrap() - 1);
        }),
        ("checksum removed", |m| {
            m.as_object_mut().unwrap().remove("manifest_sha256");
        }),
        ("labels", |m| {
            m["labels"] = json!(["a", "b"]);
        }),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (what, edit) in edits {
        let dir = tmp.path().join("v2");
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&golden("v2"), &dir);
        let mut m = read_json(&dir.join("manifest.json"));
        edit(&mut m);
        write_json(&dir.join("manifest.json"), &m);
        match Cache::open(&dir) {
            Err(sherl::Error::Cache { path, source }) => {
                assert!(path.ends_with("v2/manifest.json"), "{what}: {path:?}");
                let msg = source.to_string();
                assert!(msg.contains("manifest_sha256"), "{what}: {msg}");
                if what != "checksum removed" {
                    assert!(
                        matches!(source, CacheError::ManifestChecksum { .. }),
                        "{what}: {source:?}"
                    );
                }
            }
            other => panic!("{what}: {other:?}"),
        }
        let o = common::run(
            "sherl-cache",
            &["verify", dir.to_str().unwrap()],
            tmp.path(),
            &[],
        );
        assert_exit_2(&o, &["manifest.json", "manifest_sha256"]);
    }

    // Version 1: no checksum, but verify compares the splits with the shards.
    for (what, edit) in &edits[..2] {
        let dir = tmp.path().join("v1");
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&golden("v1"), &dir);
        let mut m = read_json(&dir.join("manifest.json"));
        edit(&mut m);
        write_json(&dir.join("manifest.json"), &m);
        let cache = Cache::open(&dir).unwrap();
        match cache.verify(|_, _| {}) {
            Err(sherl::Error::Cache {
                source: CacheError::ManifestMismatch { field, .. },
                ..
            }) => assert!(field.starts_with("splits["), "{what}: {field}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // A checksum in a version 1 manifest is refused (it has none).
    let dir = tmp.path().join("v1");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&golden("v1"), &dir);
    let mut m = read_json(&dir.join("manifest.json"));
    m["manifest_sha256"] = json!("00".repeat(32));
    write_json(&dir.join("manifest.json"), &m);
    let err = Cache::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("version 1") && err.contains("manifest_sha256"),
        "{err}"
    );
}

/// A version 2 cache written by today's writer reads back; the golden
/// manifests (v1 without, v2 with a checksum) read unchanged; a shard header
/// newer than its manifest is refused.
#[test]
fn shard_is_never_newer_than_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    copy_dir(&golden("v1"), &dir);
    let p = dir.join("shards/shard-00000.shrd");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, forge_header(&b, |h| h.format_version = 2)).unwrap();
    match Cache::open(&dir) {
        Err(sherl::Error::Cache {
            source: CacheError::ManifestMismatch { field, .. },
            ..
        }) => assert_eq!(field, "format_version"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Shard paths and sizes in the reader's manifest
// ---------------------------------------------------------------------------

#[test]
fn reader_refuses_shard_paths_out_of_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    copy_dir(&golden("v1"), &dir);
    let good = read_json(&dir.join("manifest.json"));
    for file in [
        "../c/shards/shard-00000.shrd",
        "/etc/passwd",
        "shards/shard-0.shrd",
    ] {
        let mut m = good.clone();
        m["shards"][0]["file"] = json!(file);
        write_json(&dir.join("manifest.json"), &m);
        match Cache::open(&dir) {
            Err(sherl::Error::Cache {
                path,
                source:
                    CacheError::UnsafePath {
                        file: f, shard: 0, ..
                    },
            }) => {
                assert!(path.ends_with("c/manifest.json"), "{path:?}");
                assert_eq!(f, file);
            }
            other => panic!("{file}: {other:?}"),
        }
    }
    write_json(&dir.join("manifest.json"), &good);
    // a symlink out of the cache directory
    std::fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
    let outside = tmp.path().join("elsewhere/s.shrd");
    std::fs::rename(dir.join("shards/shard-00000.shrd"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("shards/shard-00000.shrd")).unwrap();
    match Cache::open(&dir) {
        Err(sherl::Error::Cache {
            source: CacheError::UnsafePath { reason, .. },
            ..
        }) => assert!(reason.contains("outside the cache directory"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // a symlink inside it is fine
    std::fs::remove_file(dir.join("shards/shard-00000.shrd")).unwrap();
    std::fs::rename(&outside, dir.join("shards/real.bin")).unwrap();
    std::os::unix::fs::symlink("real.bin", dir.join("shards/shard-00000.shrd")).unwrap();
    Cache::open(&dir).unwrap().verify(|_, _| {}).unwrap();
    // the size the manifest gives must be the file's
    let mut m = good.clone();
    m["shards"][1]["bytes"] = json!(m["shards"][1]["bytes"].as_u64().unwrap() + 1);
    write_json(&dir.join("manifest.json"), &m);
    match Cache::open(&dir) {
        Err(sherl::Error::Cache {
            source: CacheError::ManifestMismatch { field, .. },
            ..
        }) => assert_eq!(field, "bytes"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Item 22: FORMAT.md states what the code does
// ---------------------------------------------------------------------------

#[test]
fn format_md_matches_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("cache_schema");
    let doc = std::fs::read_to_string(root.join("FORMAT.md")).unwrap();
    let flat = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    use sherl::cache::format as f;
    for (stmt, why) in [
        (format!("`FORMAT_VERSION = {}`", f::FORMAT_VERSION), "§6"),
        (
            format!("`OLDEST_READABLE_VERSION = {}`", f::OLDEST_READABLE_VERSION),
            "§6",
        ),
        (
            format!("`SHARD_FORMAT_VERSION = {}`", f::SHARD_FORMAT_VERSION),
            "§2, §6",
        ),
        (
            format!(
                "`IMAGE_SHARD_FORMAT_VERSION = {}`",
                f::IMAGE_SHARD_FORMAT_VERSION
            ),
            "§6",
        ),
        (format!("`MIN_FRAME_LEN` = {}", f::MIN_FRAME_LEN), "§8.2"),
        (format!("`MAX_ZSTD_RATIO` = {}", f::MAX_ZSTD_RATIO), "§8.2"),
        (
            format!("`{}`", sherl::cache::writer::LOCK),
            "§1: the lock file",
        ),
        (
            format!("`{}`", sherl::cache::manifest::CHECKSUM_FIELD),
            "§5.4",
        ),
        ("an OS advisory lock".to_string(), "§7"),
        (
            "# The sherl feature cache, format version 3".to_string(),
            "title",
        ),
    ] {
        assert!(flat.contains(&stmt), "FORMAT.md ({why}) must say {stmt:?}");
    }
    for stale in [
        "sherl takes no lock",
        "opens whatever relative path",
        "holding the writer's process id",
        "is taken over",
    ] {
        assert!(!flat.contains(stale), "FORMAT.md still says {stale:?}");
    }
    // CHANGELOG has an entry for the version written
    let log = std::fs::read_to_string(root.join("CHANGELOG.md")).unwrap();
    assert!(log.contains(&format!("## Version {}", f::FORMAT_VERSION)));
    // every golden version directory the changelog promises exists
    assert!(root.join(format!("golden/v{}", f::FORMAT_VERSION)).is_dir());
}

// ---------------------------------------------------------------------------
// sherl-cache export: the examples as NumPy .npy files
// ---------------------------------------------------------------------------

/// A parsed `.npy` file: descr, shape and the raw little-endian data.
fn read_npy(path: &Path) -> (String, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "header padded to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.ends_with('\n'));
    assert!(header.contains("'fortran_order': False"), "{header}");
    let field = |key: &str| -> &str {
        let start = header
            .find(key)
            .unwrap_or_else(|| panic!("{key} in {header}"))
            + key.len();
        &header[start..]
    };
    let descr = field("'descr': '").split('\'').next().unwrap().to_string();
    let shape_text = field("'shape': (").split(')').next().unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (descr, shape, bytes[10 + len..].to_vec())
}

fn npy_i64(path: &Path) -> (Vec<usize>, Vec<i64>) {
    let (descr, shape, data) = read_npy(path);
    assert_eq!(descr, "<i8");
    let v: Vec<i64> = data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(v.len(), shape.iter().product::<usize>());
    (shape, v)
}

fn npy_f32(path: &Path) -> (String, Vec<usize>, Vec<f32>) {
    let (descr, shape, data) = read_npy(path);
    let v: Vec<f32> = match descr.as_str() {
        "<f2" => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "<f4" => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("unexpected descr {other}"),
    };
    assert_eq!(v.len(), shape.iter().product::<usize>());
    (descr, shape, v)
}

/// A tiny cache extracted with `extra` flags, in `root/name`.
fn tiny_cache(root: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let backbone = root.join("backbone");
    if !backbone.exists() {
        common::tiny::tiny_backbone(&backbone, &common::tiny::TinyConfig::default(), 42);
        common::tiny::write_dataset(&root.join("data.csv"), 50, 20, 100, 8);
    }
    let out = root.join(name);
    let mut args = vec![
        "run",
        "--backbone",
        backbone.to_str().unwrap(),
        "--data",
        "data.csv",
        "--split",
        "train=0.6,valid=0.2,test=0.2",
        "--max-len",
        "16",
        "--chunk-size",
        "8",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = common::run("sherl-extract", &args, root, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    out
}

/// `sherl-cache export`: every array has the announced shape, and the values,
/// token ids, labels, splits and ids equal `Cache::example`'s, for an f16
/// cache (exported as float16, bit for bit) and an int8 one (decoded to
/// float32), all layers and a `--layers` subset. A non-empty `--out` and a
/// layer the cache lacks are refused, leaving nothing behind.
#[test]
fn export_writes_the_examples_as_npy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for (name, dtype, layers, descr) in
        [("f16", "f16", "all", "<f2"), ("int8", "int8", "0,2", "<f4")]
    {
        let cache_dir = tiny_cache(root, name, &["--dtype", dtype, "--layers", "all"]);
        let out = root.join(format!("{name}-npy"));
        let o = common::run(
            "sherl-cache",
            &[
                "export",
                cache_dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--layers",
                layers,
            ],
            root,
            &[],
        );
        assert!(o.status.success(), "{}", common::stderr(&o));
        let summary: Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
        let cache = Cache::open(&cache_dir).unwrap();
        let m = cache.manifest();
        let hidden = m.backbone.hidden;
        let (e, t) = (m.examples as usize, m.tokens as usize);
        assert!(e > 10 && t > e, "{e} examples, {t} tokens");
        assert_eq!(summary["examples"], e);
        let want_layers: Vec<usize> = if layers == "all" {
            m.settings.layers.clone()
        } else {
            vec![0, 2]
        };
        assert!(want_layers.len() >= 2);
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["layers"], json!(want_layers));
        assert_eq!(meta["labels"], json!(m.labels));
        assert_eq!(meta["split_names"], json!(m.split_names));
        assert_eq!(meta["hidden"], hidden);
        assert_eq!(meta["settings_hash"], m.settings_hash.as_str());
        assert_eq!(meta["cache_dtype"], dtype);
        let starts: Vec<u64> = cache.chunks().iter().map(|c| c.first_example).collect();
        assert_eq!(meta["chunk_starts"], json!(starts));
        assert!(starts.len() > 2, "several chunks: {starts:?}");

        let (shape, offsets) = npy_i64(&out.join("offsets.npy"));
        assert_eq!(shape, vec![e + 1]);
        assert_eq!((offsets[0], offsets[e]), (0, t as i64));
        let (shape, labels) = npy_i64(&out.join("labels.npy"));
        assert_eq!(shape, vec![e]);
        let (_, splits) = npy_i64(&out.join("splits.npy"));
        let (shape, ids) = npy_i64(&out.join("input_ids.npy"));
        assert_eq!(shape, vec![t]);
        let (_, types) = npy_i64(&out.join("token_type_ids.npy"));
        let positions: Vec<usize> = want_layers
            .iter()
            .map(|&l| cache.layer_position(l).unwrap())
            .collect();
        let values: Vec<Vec<f32>> = want_layers
            .iter()
            .map(|l| {
                let (d, shape, v) = npy_f32(&out.join(format!("hidden_states.{l}.npy")));
                assert_eq!(d, descr);
                assert_eq!(shape, vec![t, hidden]);
                v
            })
            .collect();
        // Layers not asked for are not written.
        let files = std::fs::read_dir(&out).unwrap().count();
        assert_eq!(files, 6 + want_layers.len());
        let mut split_seen = vec![0u64; m.split_names.len()];
        for k in 0..e {
            let (em, rows) = cache.example(k as u64, &positions).unwrap();
            let (a, b) = (offsets[k] as usize, offsets[k + 1] as usize);
            assert_eq!(b - a, em.len(), "example {k}");
            assert_eq!(meta["ids"][k], em.id.as_str());
            assert_eq!(labels[k], em.label.map_or(-1, i64::from));
            assert_eq!(splits[k], i64::from(em.split));
            split_seen[em.split as usize] += 1;
            let want_ids: Vec<i64> = em.ids.iter().map(|&x| i64::from(x)).collect();
            assert_eq!(ids[a..b], want_ids[..]);
            let want_types: Vec<i64> = em.type_ids.iter().map(|&x| i64::from(x)).collect();
            assert_eq!(types[a..b], want_types[..]);
            for (li, v) in values.iter().enumerate() {
                let got = &v[a * hidden..b * hidden];
                // f16 -> f32 -> f16 is exact, so equality holds bit for bit.
                assert!(
                    got.iter()
                        .zip(&rows[li])
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "example {k}, layer {}",
                    want_layers[li]
                );
            }
        }
        for (name, n) in m.split_names.iter().zip(split_seen) {
            assert_eq!(m.splits[name], n);
        }
        // --out exists and is not empty: refused, nothing changed or left.
        let before = std::fs::read_dir(root).unwrap().count();
        let o = common::run(
            "sherl-cache",
            &[
                "export",
                cache_dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            root,
            &[],
        );
        assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
        assert!(
            common::stderr(&o).contains("not empty"),
            "{}",
            common::stderr(&o)
        );
        assert_eq!(std::fs::read_dir(root).unwrap().count(), before);
    }
    // A layer the cache does not store: refused, nothing written.
    let cache_dir = root.join("f16");
    let out = root.join("missing-layer");
    let o = common::run(
        "sherl-cache",
        &[
            "export",
            cache_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--layers",
            "0,99",
        ],
        root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("hidden_states.99"));
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".export."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An image shard (FORMAT.md §3.1.1): 257 tokens per image and short ids,
/// so the Meta frame is far smaller than a text record of that many
/// tokens would be; header version 3; the records and values read back.
#[test]
fn image_shard_with_257_tokens_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (hidden, tokens) = (4usize, 257usize);
    let mut sp = spec(Dtype::F32, true, 1, hidden as u32, tokens as u32, 4);
    sp.image = true;
    let metas: Vec<ExampleMeta> = (0..6u64)
        .map(|i| ExampleMeta {
            position: i,
            id: format!("c/{i}.png"),
            split: 0,
            label: Some((i % 2) as u32),
            ids: Vec::new(),
            type_ids: Vec::new(),
            image: Some(sherl::cache::ImageMeta {
                tokens: tokens as u32,
                digest: [i as u8; 32],
            }),
        })
        .collect();
    let path = tmp.path().join("shard-00000.shrd");
    let mut w = ShardWriter::create(&path, sp, 0, 0).unwrap();
    for c in metas.chunks(4) {
        let values: Vec<f32> = (0..c.len() * tokens * hidden)
            .map(|v| v as f32 * 0.5)
            .collect();
        w.push(compress_chunk(&sp, c, &[values]).unwrap()).unwrap();
    }
    w.seal().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 3);
    let r = ShardReader::new(bytes).unwrap();
    let mut got = r.chunk_meta(0).unwrap();
    got.extend(r.chunk_meta(1).unwrap());
    assert_eq!(got, metas);
    r.verify().unwrap();
    // a text example in an image shard is refused by the writer
    let mut text = metas[0].clone();
    text.image = None;
    text.ids = vec![101; tokens];
    text.type_ids = vec![0; tokens];
    let values = vec![0f32; tokens * hidden];
    assert!(compress_chunk(&sp, &[text], &[values]).is_err());
}
