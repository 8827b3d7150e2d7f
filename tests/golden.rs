//! The golden caches in `cache_schema/golden/` (FORMAT.md §9): committed,
//! byte-pinned caches whose every value follows a closed-form formula.
//!
//! - [`golden_caches_read_back_exactly`]: `Cache::open` accepts them, every
//!   value equals the formula after the dtype's rounding, the metadata and the
//!   manifest are what the generator wrote, and `verify` passes.
//! - [`golden_files_are_unchanged`]: sha256 of every golden file against the
//!   list below, so nobody regenerates a golden file silently.
//! - [`spec_decoder_reads_golden`]: an independent decoder written from
//!   FORMAT.md alone (no `sherl::cache` code) reads the same values.
//! - [`current_writer_reproduces_golden_payloads`]: today's writer still
//!   writes the same headers, index entries and frame payloads (compressed
//!   bytes may differ with the zstd version; decompressed ones may not).
//! - [`flipped_byte_in_golden_shard_is_detected`],
//!   [`newer_version_is_refused_naming_both`],
//!   [`manifest_schema_matches_serde`].
//!
//! The generator is [`write_golden`], an ignored test that only writes when
//! `SHERL_WRITE_GOLDEN=1` and never overwrites an existing golden directory:
//!
//! ```sh
//! SHERL_WRITE_GOLDEN=1 cargo test --release --test it golden::write_golden -- --ignored
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sherl::cache::format::Dtype;
use sherl::cache::manifest::{
    header_settings_hash, BackboneInfo, DatasetInfo, ExtractSettings, FileInfo, ImageInfo,
    Manifest, ShardInfo,
};
use sherl::cache::shard::{compress_chunk, ExampleMeta, ImageMeta, ShardSpec, ShardWriter};
use sherl::cache::{shard_file_name, Cache, CacheError};

/// sha256 of every file under `cache_schema/golden/` (append-only: a new
/// format version adds a directory and lines here; existing lines never change).
const GOLDEN_FILES: &[(&str, &str)] = &[
    (
        "v1-int8/manifest.json",
        "2a77ffeb280c7f4324e56828ba1c2aa3500ad7505dbd2fd39719dba2970389f1",
    ),
    (
        "v1-int8/shards/shard-00000.shrd",
        "34b766505edcbda70585117a266aa43866b9dc081a3019b9a1d048fb4ba17c39",
    ),
    (
        "v1-int8/shards/shard-00001.shrd",
        "a91c9225d861c2355cce65212d8c8657f4d4c48264144a7e783abffbd5407b9b",
    ),
    (
        "v1/manifest.json",
        "5aa06db8069df977ba3a3c27f5888ab01ff50f95076961c59427c164a7af3c43",
    ),
    (
        "v1/shards/shard-00000.shrd",
        "d708991a3f176c1ee966bb966f0a34d962d802c917eae0d105dd6e09f708189d",
    ),
    (
        "v1/shards/shard-00001.shrd",
        "f24d3ea08a3c08f5058d6ad300af143a3beb01df79ccefdbe5432d05e945cfc5",
    ),
    (
        "v2/manifest.json",
        "aa1a726aa726a38559c9bade3b010ced3bc21a51453eeba056b768f7c2b6b538",
    ),
    (
        "v2/shards/shard-00000.shrd",
        "2db0fc48d84f0f0ce8f0f27d52047074bc2976814f1ef690e77668550b0de5a8",
    ),
    (
        "v2/shards/shard-00001.shrd",
        "2799427b7c9c72aa82f87242e261515b0dcaef9fef6103f5f224adcc3b81e844",
    ),
    (
        "v3/manifest.json",
        "5cb3018b75a470dfeb2fbe6f9cec350bf41b4abe361e9d1682cbf0454fb4085f",
    ),
    (
        "v3/shards/shard-00000.shrd",
        "9a28bda2e8a67e4f0395c9f711141f7c0355c710304b7a0709d2ccd459dbb700",
    ),
    (
        "v3/shards/shard-00001.shrd",
        "184b83f708359408388f0027b2aeb7af22b34cba63f20002e4569097f93373cc",
    ),
];

/// Total size limit of the golden directories (they are committed).
const GOLDEN_MAX_BYTES: u64 = 50_000;

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cache_schema/golden")
}

// ---------------------------------------------------------------------------
// The closed-form content
// ---------------------------------------------------------------------------

/// One golden cache: its settings and its examples in cache order.
struct Golden {
    /// Directory under `cache_schema/golden/`.
    dir: &'static str,
    /// The manifest's `format_version` (shard headers say 1 in every
    /// version so far: FORMAT.md §6).
    format_version: u32,
    dtype: Dtype,
    shuffle: bool,
    zstd_level: i32,
    /// `hidden_states` indices stored, in storage order.
    layers: Vec<usize>,
    num_layers: usize,
    late_layers: usize,
    hidden: usize,
    max_len: usize,
    chunk_size: u32,
    examples_per_shard: u64,
    labels: Vec<String>,
    split_names: Vec<String>,
    /// `(split id, token length)` of each example, in cache order (split
    /// rank, then length: FORMAT.md §3.4).
    examples: Vec<(u32, usize)>,
    /// Whether examples carry labels (else every label is "none").
    labelled: bool,
    /// An image cache (version 3 on: image shards, FORMAT.md §3.1.1, and
    /// the manifest's `image`); every example then has `max_len` tokens.
    image: bool,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Examples in cache order from per-split length lists (already sorted).
fn in_cache_order(per_split: &[&[usize]]) -> Vec<(u32, usize)> {
    per_split
        .iter()
        .enumerate()
        .flat_map(|(s, lens)| lens.iter().map(move |&l| (s as u32, l)))
        .collect()
}

/// `golden/v1`: f16, byte shuffle on, a layer subset (storage position !=
/// hidden_states index), lengths 1 and max_len, 2 shards, a one-example chunk
/// at the end of each shard, a chunk that spans two splits.
fn golden_v1() -> Golden {
    Golden {
        dir: "v1",
        format_version: 1,
        dtype: Dtype::F16,
        shuffle: true,
        zstd_level: 3,
        layers: vec![0, 2, 3],
        num_layers: 4,
        late_layers: 1,
        hidden: 8,
        max_len: 6,
        chunk_size: 3,
        examples_per_shard: 7,
        labels: strings(&["neg", "pos"]),
        split_names: strings(&["train", "valid", "test"]),
        examples: in_cache_order(&[&[1, 2, 2, 4, 5, 6], &[1, 3, 6], &[2, 6]]),
        labelled: true,
        image: false,
    }
}

/// `golden/v1-int8`: int8 with the scale-only shuffle, an odd hidden size,
/// every layer, an all-zero row (scale 0), unlabelled data, a split outside
/// the known names, no checkpoint and no config (null manifest fields).
fn golden_v1_int8() -> Golden {
    Golden {
        dir: "v1-int8",
        format_version: 1,
        dtype: Dtype::Int8,
        shuffle: true,
        zstd_level: 1,
        layers: vec![0, 1, 2],
        num_layers: 2,
        late_layers: 1,
        hidden: 5,
        max_len: 4,
        chunk_size: 2,
        examples_per_shard: 3,
        labels: Vec::new(),
        split_names: strings(&["train", "dev", "holdout"]),
        examples: in_cache_order(&[&[1, 4], &[2, 3], &[4]]),
        labelled: false,
        image: false,
    }
}

/// `golden/v2`: the first format version with `manifest_sha256` (FORMAT.md
/// §5.4); bf16 without the byte shuffle, a layer subset that skips
/// `hidden_states.0`, three labels of which two are used, a split named
/// `val`, 2 shards (4 + 2 examples, chunks 2+2 and 2).
fn golden_v2() -> Golden {
    Golden {
        dir: "v2",
        format_version: 2,
        dtype: Dtype::Bf16,
        shuffle: false,
        zstd_level: 2,
        layers: vec![1, 3],
        num_layers: 3,
        late_layers: 1,
        hidden: 6,
        max_len: 5,
        chunk_size: 2,
        examples_per_shard: 4,
        labels: strings(&["a", "b", "c"]),
        split_names: strings(&["train", "val", "test"]),
        examples: in_cache_order(&[&[1, 3, 5], &[2], &[4, 5]]),
        labelled: true,
        image: false,
    }
}

/// `golden/v3`: the first image cache (FORMAT.md §3.1.1): image shards
/// (header version 3, image records with a digest and no token ids), the
/// manifest's `image` record, no tokenizer; f16 with the shuffle, 5 tokens
/// per image (CLS and a 2x2 patch grid), 2 shards (3 + 3 examples, chunks
/// 2+1 and 2+1).
fn golden_v3() -> Golden {
    Golden {
        dir: "v3",
        format_version: 3,
        dtype: Dtype::F16,
        shuffle: true,
        zstd_level: 3,
        layers: vec![0, 2],
        num_layers: 3,
        late_layers: 1,
        hidden: 4,
        max_len: 5,
        chunk_size: 2,
        examples_per_shard: 3,
        labels: strings(&["cat", "dog"]),
        split_names: strings(&["train", "valid", "test"]),
        examples: in_cache_order(&[&[5, 5, 5], &[5], &[5, 5]]),
        labelled: true,
        image: true,
    }
}

fn goldens() -> Vec<Golden> {
    vec![golden_v1(), golden_v1_int8(), golden_v2(), golden_v3()]
}

/// The digest of image example `e`: sha256 of `golden image <e>`.
fn image_digest(e: u64) -> [u8; 32] {
    Sha256::digest(format!("golden image {e}").as_bytes()).into()
}

/// The value of example `e` (cache position), token `t`, `hidden_states.layer`,
/// dimension `d`, before the dtype's rounding. Integer arithmetic, then IEEE
/// f32 divisions and products only (bit-reproducible everywhere). Token 0 of
/// example 2 is an all-zero row; the last dimension is scaled by 2^-16 so
/// that f16 rounds into its subnormal range.
fn value(e: u64, t: usize, layer: usize, d: usize, hidden: usize) -> f32 {
    if e == 2 && t == 0 {
        return 0.0;
    }
    let k = (e as usize * 7 + t * 5 + d * 3 + layer * 11) % 23;
    let v = (k as f32 - 11.0) / 7.0 * (layer + 1) as f32;
    if d == hidden - 1 {
        v / 65536.0
    } else {
        v
    }
}

/// Token ids: `[CLS]` = 101 first, `[SEP]` = 102 last (length >= 2), else
/// `1000 + 17 e + t`.
fn token_id(e: u64, t: usize, len: usize) -> u32 {
    if t == 0 {
        101
    } else if t == len - 1 {
        102
    } else {
        1000 + 17 * e as u32 + t as u32
    }
}

/// Segment ids: every third example is a text pair (second half = 1).
fn type_id(e: u64, t: usize, len: usize) -> u8 {
    u8::from(e % 3 == 1 && 2 * t >= len)
}

/// Example ids; every fifth one is non-ASCII (the id length is in bytes).
fn example_id(e: u64) -> String {
    if e % 5 == 4 {
        format!("ünï-{e}")
    } else {
        format!("ex-{e}")
    }
}

fn metas(g: &Golden) -> Vec<ExampleMeta> {
    g.examples
        .iter()
        .enumerate()
        .map(|(i, &(split, len))| {
            let e = i as u64;
            if g.image {
                return ExampleMeta {
                    position: e,
                    id: example_id(e),
                    split,
                    label: g.labelled.then_some((e % 2) as u32),
                    ids: Vec::new(),
                    type_ids: Vec::new(),
                    image: Some(ImageMeta {
                        tokens: len as u32,
                        digest: image_digest(e),
                    }),
                };
            }
            ExampleMeta {
                position: e,
                id: example_id(e),
                split,
                label: g.labelled.then_some((e % 2) as u32),
                ids: (0..len).map(|t| token_id(e, t, len)).collect(),
                type_ids: (0..len).map(|t| type_id(e, t, len)).collect(),
                image: None,
            }
        })
        .collect()
}

/// Rows `len x hidden` of example `e` for `hidden_states.layer`, unrounded.
fn rows(g: &Golden, e: u64, layer: usize) -> Vec<f32> {
    let len = g.examples[e as usize].1;
    (0..len)
        .flat_map(|t| (0..g.hidden).map(move |d| value(e, t, layer, d, g.hidden)))
        .collect()
}

/// What a reader must return for `rows` in `dtype` (FORMAT.md §3.2), exactly.
fn rounded(rows: &[f32], hidden: usize, dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => rows.to_vec(),
        Dtype::F16 => rows
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
        Dtype::Bf16 => rows
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
        Dtype::Int8 => rows
            .chunks(hidden)
            .flat_map(|row| {
                let (scale, q) = int8_row(row);
                q.into_iter().map(move |q| f32::from(q) * scale)
            })
            .collect(),
    }
}

/// FORMAT.md §3.2 int8: scale = max|x| / 127 (0 for an all-zero row),
/// q = round-half-away-from-zero(x / scale) clamped to [-127, 127].
fn int8_row(row: &[f32]) -> (f32, Vec<i8>) {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
    let q = row
        .iter()
        .map(|&v| {
            if scale > 0.0 {
                (v / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        })
        .collect();
    (scale, q)
}

/// Shard `k`'s example range (FORMAT.md §3.4: fixed-size shards).
fn shard_ranges(g: &Golden) -> Vec<std::ops::Range<u64>> {
    let n = g.examples.len() as u64;
    (0..n.div_ceil(g.examples_per_shard))
        .map(|k| k * g.examples_per_shard..((k + 1) * g.examples_per_shard).min(n))
        .collect()
}

/// Chunk ranges of one shard (chunking restarts at each shard).
fn chunk_ranges(g: &Golden, shard: &std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
    let c = u64::from(g.chunk_size);
    (shard.start..shard.end)
        .step_by(c as usize)
        .map(|s| s..(s + c).min(shard.end))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The manifest the generator writes, given the sealed shards.
fn manifest(g: &Golden, shards: Vec<ShardInfo>) -> Manifest {
    let ms = metas(g);
    let mut splits = BTreeMap::new();
    for m in &ms {
        *splits
            .entry(g.split_names[m.split as usize].clone())
            .or_insert(0u64) += 1;
    }
    let file = |path: &str| FileInfo {
        path: path.to_string(),
        sha256: sha256_hex(format!("sherl golden {} {path}", g.dir).as_bytes()),
    };
    let with_checkpoint = g.labelled && !g.image;
    let image = g.image.then(|| ImageInfo {
        description: file("golden/backbone.json"),
        input: "input_image".into(),
        preprocess: json!({
            "size": 8, "resize": "longest-side-pad", "interpolation": "area",
            "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "pad_value": 0.0
        }),
        preprocess_sha256: sha256_hex(b"sherl golden recipe"),
        backbone_tokens: g.max_len,
        cls_token: true,
        patch_pool: 1,
        tokens: g.max_len,
    });
    Manifest {
        format_version: g.format_version,
        sherl_version: "0.1.0".into(),
        created_at: "2026-11-27T00:00:00Z".into(),
        settings_hash: sha256_hex(format!("sherl golden cache {}", g.dir).as_bytes()),
        manifest_sha256: None,
        settings: ExtractSettings {
            layers: g.layers.clone(),
            late_layers: g.late_layers,
            dtype: g.dtype,
            shuffle: g.shuffle,
            zstd_level: g.zstd_level,
            chunk_size: g.chunk_size,
            examples_per_shard: g.examples_per_shard,
            max_len: g.max_len,
            max_tokens_per_batch: 4096,
            max_batch: 256,
        },
        backbone: BackboneInfo {
            onnx: file("golden/model.onnx"),
            safetensors: with_checkpoint.then(|| file("golden/model.safetensors")),
            tokenizer: (!g.image).then(|| file("golden/tokenizer.json")),
            checkpoint_prefix: with_checkpoint.then(String::new),
            config: with_checkpoint.then(|| {
                json!({
                    "model_type": "bert",
                    "hidden_size": g.hidden,
                    "num_hidden_layers": g.num_layers,
                    "max_position_embeddings": 16,
                })
            }),
            num_layers: g.num_layers,
            hidden: g.hidden,
        },
        dataset: DatasetInfo {
            files: if g.labelled {
                g.split_names
                    .iter()
                    .map(|s| file(&format!("golden/{s}.jsonl")))
                    .collect()
            } else {
                vec![file("golden/data.jsonl")]
            },
            options: json!({
                "format": "jsonl",
                "has_header": true,
                "encoding": "utf8",
                "text_column": "`text`",
                "text_pair_column": null,
                "label_column": if g.labelled { json!("`label`") } else { Value::Null },
                "id_column": "`id`",
                "group_column": null,
                "skip_bad_rows": false,
                "labels": if g.labelled { json!(g.labels) } else { Value::Null },
                "split": if g.labelled {
                    json!({ "files": g.split_names })
                } else {
                    json!({ "fractions": [["train", 0.4], ["dev", 0.4], ["holdout", 0.2]], "seed": 0 })
                },
            }),
            rows_read: ms.len() as u64 + u64::from(g.labelled),
            skipped_bad_rows: 0,
            dropped_labels: if g.labelled {
                BTreeMap::from([("neutral".to_string(), 1)])
            } else {
                BTreeMap::new()
            },
        },
        labels: g.labels.clone(),
        split_names: g.split_names.clone(),
        splits,
        examples: ms.len() as u64,
        tokens: ms.iter().map(|m| m.len() as u64).sum(),
        worker: None,
        shards,
        image,
    }
    // version 2 on: with its manifest_sha256
    .sealed()
}

/// Write golden cache `g` into `dir` (which must not hold a cache yet).
fn generate(g: &Golden, dir: &Path) {
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    let ms = metas(g);
    let settings_hash = manifest(g, Vec::new()).settings_hash;
    let spec = ShardSpec {
        dtype: g.dtype,
        shuffle: g.shuffle,
        zstd_level: g.zstd_level,
        n_layers: g.layers.len() as u32,
        hidden: g.hidden as u32,
        max_len: g.max_len as u32,
        chunk_size: g.chunk_size,
        settings_hash: header_settings_hash(&settings_hash),
        image: g.image,
    };
    let mut infos = Vec::new();
    for (k, range) in shard_ranges(g).iter().enumerate() {
        let file = shard_file_name(k as u32);
        let mut w = ShardWriter::create(&dir.join(&file), spec, k as u32, range.start).unwrap();
        for c in chunk_ranges(g, range) {
            let meta = &ms[c.start as usize..c.end as usize];
            let layers: Vec<Vec<f32>> = g
                .layers
                .iter()
                .map(|&l| c.clone().flat_map(|e| rows(g, e, l)).collect())
                .collect();
            w.push(compress_chunk(&spec, meta, &layers).unwrap())
                .unwrap();
        }
        let s = w.seal().unwrap();
        infos.push(ShardInfo {
            file,
            index: s.index,
            first_example: s.first_example,
            examples: s.examples,
            tokens: s.tokens,
            bytes: s.bytes,
        });
    }
    let m = manifest(g, infos);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// The generator. Writes every golden directory that does not exist yet;
/// existing ones are never touched (golden directories are append-only).
#[test]
#[ignore = "writes cache_schema/golden/; run with SHERL_WRITE_GOLDEN=1 -- --ignored"]
fn write_golden() {
    if std::env::var("SHERL_WRITE_GOLDEN").as_deref() != Ok("1") {
        eprintln!("SHERL_WRITE_GOLDEN=1 is not set: nothing written");
        return;
    }
    for g in goldens() {
        let dir = golden_root().join(g.dir);
        if dir.exists() {
            eprintln!(
                "{} exists: left as it is (golden directories are append-only)",
                dir.display()
            );
            continue;
        }
        generate(&g, &dir);
        eprintln!("wrote {}", dir.display());
    }
}

// ---------------------------------------------------------------------------
// Reading through the library
// ---------------------------------------------------------------------------

/// The manifest the golden directory must hold (shard sizes from the files).
fn expected_manifest(g: &Golden, dir: &Path) -> Manifest {
    let mut infos = Vec::new();
    for (k, range) in shard_ranges(g).iter().enumerate() {
        let file = shard_file_name(k as u32);
        let bytes = std::fs::metadata(dir.join(&file)).unwrap().len();
        let tokens = g.examples[range.start as usize..range.end as usize]
            .iter()
            .map(|&(_, l)| l as u64)
            .sum();
        infos.push(ShardInfo {
            file,
            index: k as u32,
            first_example: range.start,
            examples: range.end - range.start,
            tokens,
            bytes,
        });
    }
    manifest(g, infos)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn golden_caches_read_back_exactly() {
    for g in goldens() {
        let dir = golden_root().join(g.dir);
        let cache = Cache::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(cache.manifest(), &expected_manifest(&g, &dir), "{}", g.dir);

        // chunk layout
        let want: Vec<(u64, u32, u64)> = shard_ranges(&g)
            .iter()
            .flat_map(|r| chunk_ranges(&g, r))
            .map(|c| {
                let tokens = (c.start..c.end)
                    .map(|e| g.examples[e as usize].1 as u64)
                    .sum();
                (c.start, (c.end - c.start) as u32, tokens)
            })
            .collect();
        let got: Vec<(u64, u32, u64)> = cache
            .chunks()
            .iter()
            .map(|c| (c.first_example, c.examples, c.tokens))
            .collect();
        assert_eq!(got, want, "{}: chunks", g.dir);

        // every example, every layer, through random access
        let positions: Vec<usize> = g
            .layers
            .iter()
            .map(|&l| cache.layer_position(l).unwrap())
            .collect();
        assert_eq!(positions, (0..g.layers.len()).collect::<Vec<_>>());
        let ms = metas(&g);
        for (e, want_meta) in ms.iter().enumerate() {
            let (meta, layers) = cache.example(e as u64, &positions).unwrap();
            assert_eq!(&meta, want_meta, "{}: example {e}", g.dir);
            for (&l, got) in g.layers.iter().zip(&layers) {
                let want = rounded(&rows(&g, e as u64, l), g.hidden, g.dtype);
                assert_eq!(
                    bits(got),
                    bits(&want),
                    "{}: example {e} hidden_states.{l}",
                    g.dir
                );
            }
        }

        // and through whole chunks
        for id in 0..cache.chunks().len() {
            let chunk = cache.read_chunk(id, &positions).unwrap();
            let first = cache.chunks()[id].first_example;
            for (p, &l) in g.layers.iter().enumerate() {
                let want: Vec<f32> = (first..first + chunk.meta.len() as u64)
                    .flat_map(|e| rounded(&rows(&g, e, l), g.hidden, g.dtype))
                    .collect();
                assert_eq!(bits(&chunk.layers[p]), bits(&want), "{}: chunk {id}", g.dir);
            }
        }

        let frames = cache.verify(|_, _| {}).unwrap();
        assert_eq!(frames, cache.chunks().len() * (g.layers.len() + 1));

        // the int8 error bound FORMAT.md §3.2 states
        if g.dtype == Dtype::Int8 {
            for e in 0..ms.len() as u64 {
                for &l in &g.layers {
                    let exact = rows(&g, e, l);
                    let got = rounded(&exact, g.hidden, g.dtype);
                    for (x, q) in exact.chunks(g.hidden).zip(got.chunks(g.hidden)) {
                        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                        for (a, b) in x.iter().zip(q) {
                            assert!((a - b).abs() <= max / 254.0 * (1.0 + 1e-6));
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Byte pinning
// ---------------------------------------------------------------------------

fn list_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap();
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn golden_files_are_unchanged() {
    let root = golden_root();
    let listed: Vec<String> = GOLDEN_FILES.iter().map(|(p, _)| p.to_string()).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "keep GOLDEN_FILES sorted");
    assert_eq!(
        list_files(&root),
        listed,
        "the files under cache_schema/golden/ differ from GOLDEN_FILES \
         (golden directories are append-only: a new format version adds golden/vN)"
    );
    let mut total = 0;
    for (rel, want) in GOLDEN_FILES {
        let bytes = std::fs::read(root.join(rel)).unwrap();
        total += bytes.len() as u64;
        assert_eq!(
            &sha256_hex(&bytes),
            want,
            "golden file {rel} changed: golden files are never regenerated \
             (a format change bumps FORMAT_VERSION and adds cache_schema/golden/vN)"
        );
    }
    assert!(total < GOLDEN_MAX_BYTES, "golden files total {total} bytes");
}

// ---------------------------------------------------------------------------
// An independent decoder, written from FORMAT.md alone
// ---------------------------------------------------------------------------

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// FORMAT.md §2: the header fields, by offset.
#[derive(Debug, PartialEq)]
struct SpecHeader {
    version: u32,
    header_len: u32,
    shard_index: u32,
    dtype: u8,
    shuffle: u8,
    n_layers: u32,
    hidden: u32,
    max_len: u32,
    chunk_size: u32,
    n_examples: u64,
    first_example: u64,
    n_tokens: u64,
    settings_hash: u64,
    index_entries: u32,
}

/// FORMAT.md §4: one index entry, with its frame decompressed.
#[derive(Debug)]
struct SpecFrame {
    kind: u32,
    layer: u32,
    chunk: u32,
    n_examples: u32,
    n_tokens: u64,
    offset: u64,
    len: u64,
    payload: Vec<u8>,
}

/// Decode one zstd frame as FORMAT.md §3 requires it: exactly one frame,
/// content checksum present (and checked by the decoder).
fn spec_zstd(frame: &[u8]) -> Vec<u8> {
    assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    assert_eq!(frame[4] & 0b100, 0b100, "Content_Checksum_flag must be set");
    assert_eq!(
        zstd::zstd_safe::find_frame_compressed_size(frame).unwrap(),
        frame.len(),
        "exactly one zstd frame"
    );
    zstd::stream::decode_all(frame).unwrap()
}

fn spec_decode(file: &[u8]) -> (SpecHeader, Vec<SpecFrame>) {
    assert_eq!(&file[0..8], b"SHRLCACH");
    assert_eq!(&file[22..24], &[0, 0], "reserved header bytes");
    let h = SpecHeader {
        version: u32_at(file, 8),
        header_len: u32_at(file, 12),
        shard_index: u32_at(file, 16),
        dtype: file[20],
        shuffle: file[21],
        n_layers: u32_at(file, 24),
        hidden: u32_at(file, 28),
        max_len: u32_at(file, 32),
        chunk_size: u32_at(file, 36),
        n_examples: u64_at(file, 40),
        first_example: u64_at(file, 48),
        n_tokens: u64_at(file, 56),
        settings_hash: u64_at(file, 64),
        index_entries: u32_at(file, 88),
    };
    assert!(
        matches!((h.version, h.header_len), (1 | 3, 96)),
        "shard layout 1 (text) or 3 (image), 96-byte header"
    );
    let (index_offset, index_len) = (u64_at(file, 72) as usize, u64_at(file, 80) as usize);
    assert_eq!(
        index_offset + index_len,
        file.len(),
        "the index ends the file"
    );
    let index = &file[index_offset..];
    // header CRC: CRC-32/IEEE over bytes 0..92, then the 4 LE bytes of the
    // index frame's CRC-32
    let index_crc = crc32fast::hash(index);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&file[..92]);
    crc.update(&index_crc.to_le_bytes());
    assert_eq!(crc.finalize(), u32_at(file, 92), "header CRC");
    let raw = spec_zstd(index);
    assert_eq!(raw.len(), h.index_entries as usize * 56);
    let mut frames = Vec::new();
    let mut expect_offset = 96u64;
    for e in raw.chunks_exact(56) {
        let (offset, len, raw_len) = (u64_at(e, 24), u64_at(e, 32), u64_at(e, 40));
        assert_eq!(offset, expect_offset, "frames tile the body");
        expect_offset += len;
        assert_eq!(&e[52..56], &[0, 0, 0, 0], "reserved index bytes");
        let bytes = &file[offset as usize..(offset + len) as usize];
        assert_eq!(crc32fast::hash(bytes), u32_at(e, 48), "frame CRC");
        let payload = spec_zstd(bytes);
        assert_eq!(payload.len() as u64, raw_len);
        frames.push(SpecFrame {
            kind: u32_at(e, 0),
            layer: u32_at(e, 4),
            chunk: u32_at(e, 8),
            n_examples: u32_at(e, 12),
            n_tokens: u64_at(e, 16),
            offset,
            len,
            payload,
        });
    }
    assert_eq!(
        expect_offset as usize, index_offset,
        "no hole before the index"
    );
    (h, frames)
}

/// FORMAT.md §3.1, and §3.1.1 for an image shard.
fn spec_meta(p: &[u8], n: usize, image: bool) -> Vec<ExampleMeta> {
    let mut at = 0;
    let mut out = Vec::new();
    for _ in 0..n {
        let position = u64_at(p, at);
        let split = u32_at(p, at + 8);
        let label = u32_at(p, at + 12);
        let len = u32_at(p, at + 16) as usize;
        let id_len = u32_at(p, at + 20) as usize;
        at += 24;
        let id = String::from_utf8(p[at..at + id_len].to_vec()).unwrap();
        at += id_len;
        if image {
            // §3.1.1: the 32-byte digest instead of token and segment ids
            let digest: [u8; 32] = p[at..at + 32].try_into().unwrap();
            at += 32;
            out.push(ExampleMeta {
                position,
                id,
                split,
                label: (label != u32::MAX).then_some(label),
                ids: Vec::new(),
                type_ids: Vec::new(),
                image: Some(ImageMeta {
                    tokens: len as u32,
                    digest,
                }),
            });
            continue;
        }
        let ids = (0..len).map(|t| u32_at(p, at + 4 * t)).collect();
        at += 4 * len;
        let type_ids = p[at..at + len].to_vec();
        at += len;
        out.push(ExampleMeta {
            position,
            id,
            split,
            label: (label != u32::MAX).then_some(label),
            ids,
            type_ids,
            image: None,
        });
    }
    assert_eq!(at, p.len(), "no trailing bytes in a Meta frame");
    out
}

/// FORMAT.md §3.3: undo the byte-plane shuffle of `bytes` (planes of `width`).
fn spec_unshuffle(bytes: &[u8], width: usize) -> Vec<u8> {
    let n = bytes.len() / width;
    let mut out = vec![0u8; bytes.len()];
    for i in 0..n {
        for p in 0..width {
            out[i * width + p] = bytes[p * n + i];
        }
    }
    out
}

/// FORMAT.md §3.2/§3.3: a Layer payload to f32 bit patterns.
fn spec_layer(p: &[u8], tokens: usize, hidden: usize, dtype: u8, shuffle: bool) -> Vec<u32> {
    match dtype {
        // f16
        1 => {
            let p = if shuffle {
                spec_unshuffle(p, 2)
            } else {
                p.to_vec()
            };
            assert_eq!(p.len(), tokens * hidden * 2);
            p.chunks_exact(2)
                .map(|b| {
                    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
                        .to_f32()
                        .to_bits()
                })
                .collect()
        }
        // int8: scales (tokens x f32), then values (tokens x hidden x i8)
        4 => {
            assert_eq!(p.len(), tokens * 4 + tokens * hidden);
            let scales = if shuffle {
                spec_unshuffle(&p[..tokens * 4], 4)
            } else {
                p[..tokens * 4].to_vec()
            };
            let q = &p[tokens * 4..];
            (0..tokens)
                .flat_map(|t| {
                    let s = f32::from_le_bytes(scales[4 * t..4 * t + 4].try_into().unwrap());
                    q[t * hidden..(t + 1) * hidden]
                        .iter()
                        .map(move |&b| (f32::from(b as i8) * s).to_bits())
                })
                .collect()
        }
        // bf16: the top 16 bits of an f32
        2 => {
            let p = if shuffle {
                spec_unshuffle(p, 2)
            } else {
                p.to_vec()
            };
            assert_eq!(p.len(), tokens * hidden * 2);
            p.chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
                .collect()
        }
        other => panic!("the goldens hold f16, bf16 and int8 only, not dtype code {other}"),
    }
}

#[test]
fn spec_decoder_reads_golden() {
    for g in goldens() {
        let dir = golden_root().join(g.dir);
        let m: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let hash = m["settings_hash"].as_str().unwrap();
        // FORMAT.md §5.4: from version 2 on, manifest_sha256 is the sha256 of
        // the compact JSON, keys sorted, of the manifest without that field.
        if g.format_version >= 2 {
            let mut rest = m.clone();
            let stored = rest
                .as_object_mut()
                .unwrap()
                .remove("manifest_sha256")
                .expect("a version 2 manifest has manifest_sha256");
            // serde_json's map keeps keys sorted: to_string is the canonical form
            assert_eq!(
                stored.as_str().unwrap(),
                sha256_hex(rest.to_string().as_bytes()),
                "{}: manifest_sha256",
                g.dir
            );
        } else {
            assert!(m.get("manifest_sha256").is_none(), "{}", g.dir);
        }
        let ms = metas(&g);
        for (k, range) in shard_ranges(&g).iter().enumerate() {
            let file = std::fs::read(dir.join(format!("shards/shard-{k:05}.shrd"))).unwrap();
            let (h, frames) = spec_decode(&file);
            let tokens: u64 = (range.start..range.end)
                .map(|e| g.examples[e as usize].1 as u64)
                .sum();
            let want = SpecHeader {
                version: if g.image { 3 } else { 1 },
                header_len: 96,
                shard_index: k as u32,
                dtype: match g.dtype {
                    Dtype::F16 => 1,
                    Dtype::Bf16 => 2,
                    Dtype::F32 => 3,
                    Dtype::Int8 => 4,
                },
                shuffle: u8::from(g.shuffle),
                n_layers: g.layers.len() as u32,
                hidden: g.hidden as u32,
                max_len: g.max_len as u32,
                chunk_size: g.chunk_size,
                n_examples: range.end - range.start,
                first_example: range.start,
                n_tokens: tokens,
                // the first 16 hex digits read as a number, stored LE
                settings_hash: u64::from_str_radix(&hash[..16], 16).unwrap(),
                index_entries: (chunk_ranges(&g, range).len() * (g.layers.len() + 1)) as u32,
            };
            assert_eq!(h, want, "{} shard {k}", g.dir);
            let per_chunk = g.layers.len() + 1;
            for (c, cr) in chunk_ranges(&g, range).iter().enumerate() {
                let fs = &frames[c * per_chunk..(c + 1) * per_chunk];
                let n = (cr.end - cr.start) as usize;
                let chunk_tokens: u64 = (cr.start..cr.end)
                    .map(|e| g.examples[e as usize].1 as u64)
                    .sum();
                for (slot, f) in fs.iter().enumerate() {
                    let (kind, layer) = if slot == 0 { (1, 0) } else { (2, slot - 1) };
                    assert_eq!(
                        (f.kind, f.layer, f.chunk, f.n_examples, f.n_tokens),
                        (kind, layer as u32, c as u32, n as u32, chunk_tokens),
                        "{} shard {k} chunk {c} slot {slot}",
                        g.dir
                    );
                }
                assert_eq!(
                    spec_meta(&fs[0].payload, n, g.image),
                    ms[cr.start as usize..cr.end as usize],
                    "{} shard {k} chunk {c}",
                    g.dir
                );
                for (p, &l) in g.layers.iter().enumerate() {
                    let got = spec_layer(
                        &fs[p + 1].payload,
                        chunk_tokens as usize,
                        g.hidden,
                        h.dtype,
                        g.shuffle,
                    );
                    let want: Vec<f32> = (cr.start..cr.end)
                        .flat_map(|e| rounded(&rows(&g, e, l), g.hidden, g.dtype))
                        .collect();
                    assert_eq!(got, bits(&want), "{} shard {k} chunk {c} layer {l}", g.dir);
                }
            }
        }
    }
}

/// Today's writer, fed the same formula, writes the same headers (up to the
/// index location and CRC), the same index entries (up to frame offsets,
/// lengths and CRCs) and the same decompressed payloads as the golden files.
/// A failure here means the writer changed the format: bump FORMAT_VERSION.
#[test]
fn current_writer_reproduces_golden_payloads() {
    for g in goldens() {
        let golden = golden_root().join(g.dir);
        let tmp = tempfile::tempdir().unwrap();
        generate(&g, tmp.path());
        let read = |d: &Path| -> Value {
            let mut m: Value =
                serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
            for s in m["shards"].as_array_mut().unwrap() {
                s["bytes"] = Value::Null; // compressed size may vary with zstd
            }
            if let Some(sum) = m.get_mut("manifest_sha256") {
                *sum = Value::Null; // it covers the sizes too
            }
            m
        };
        assert_eq!(read(tmp.path()), read(&golden), "{}: manifest", g.dir);
        Cache::open(tmp.path()).unwrap_or_else(|e| panic!("{}: {e}", g.dir));
        for k in 0..shard_ranges(&g).len() {
            let rel = format!("shards/shard-{k:05}.shrd");
            let a = std::fs::read(golden.join(&rel)).unwrap();
            let b = std::fs::read(tmp.path().join(&rel)).unwrap();
            assert_eq!(a[..72], b[..72], "{} {rel}: header bytes 0..72", g.dir);
            assert_eq!(a[88..92], b[88..92], "{} {rel}: index entries", g.dir);
            let (_, fa) = spec_decode(&a);
            let (_, fb) = spec_decode(&b);
            assert_eq!(fa.len(), fb.len());
            for (x, y) in fa.iter().zip(&fb) {
                assert_eq!(
                    (x.kind, x.layer, x.chunk, x.n_examples, x.n_tokens),
                    (y.kind, y.layer, y.chunk, y.n_examples, y.n_tokens)
                );
                assert!(x.payload == y.payload, "{} {rel}: payload differs", g.dir);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Damage and versions
// ---------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
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

fn open_and_verify(dir: &Path) -> sherl::Result<usize> {
    Cache::open(dir)?.verify(|_, _| {})
}

#[test]
fn flipped_byte_in_golden_shard_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    copy_dir(&golden_root().join("v1"), &dir);
    let shard = dir.join("shards/shard-00001.shrd");
    let good = std::fs::read(&shard).unwrap();
    open_and_verify(&dir).unwrap();

    // A byte inside the first Layer frame: the cache opens (frames are
    // checked when read), and verify names the frame.
    let (_, frames) = spec_decode(&good);
    let f = &frames[1];
    assert_eq!((f.kind, f.layer, f.chunk), (2, 0, 0));
    let mut b = good.clone();
    b[(f.offset + f.len / 2) as usize] ^= 0x01;
    std::fs::write(&shard, &b).unwrap();
    let cache = Cache::open(&dir).unwrap();
    match cache.verify(|_, _| {}) {
        Err(sherl::Error::Cache {
            path,
            source: CacheError::ChecksumMismatch { what },
        }) => {
            assert!(path.ends_with("shards/shard-00001.shrd"), "{path:?}");
            assert_eq!(what, "frame 1 (layer position 0, chunk 0)");
        }
        other => panic!("{other:?}"),
    }
    drop(cache);

    // Every single-byte flip anywhere in the shard is detected by open or verify.
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x10;
        std::fs::write(&shard, &b).unwrap();
        assert!(
            open_and_verify(&dir).is_err(),
            "flipping byte {i} of {} went unnoticed",
            good.len()
        );
    }
    std::fs::write(&shard, &good).unwrap();
    open_and_verify(&dir).unwrap();
}

#[test]
fn newer_version_is_refused_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    copy_dir(&golden_root().join("v1"), &dir);
    let manifest = dir.join("manifest.json");
    let good = std::fs::read_to_string(&manifest).unwrap();

    // a newer manifest (with a field this version does not know)
    let mut m: Value = serde_json::from_str(&good).unwrap();
    m["format_version"] = json!(4);
    m["field_from_the_future"] = json!(true);
    std::fs::write(&manifest, m.to_string()).unwrap();
    let err = Cache::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("version 4") && err.contains("versions 1 to 3") && err.contains("re-run"),
        "{err}"
    );
    std::fs::write(&manifest, &good).unwrap();

    // a newer shard header: the version is read before anything else
    let shard = dir.join("shards/shard-00000.shrd");
    let mut b = std::fs::read(&shard).unwrap();
    b[8..12].copy_from_slice(&4u32.to_le_bytes());
    std::fs::write(&shard, &b).unwrap();
    match Cache::open(&dir) {
        Err(sherl::Error::Cache {
            source:
                CacheError::UnsupportedVersion {
                    found: 4,
                    oldest: 1,
                    newest: 3,
                },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// manifest.schema.json against the serde struct
// ---------------------------------------------------------------------------

fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/$defs/").expect("local $defs refs only");
            &root["$defs"][name]
        }
        None => s,
    }
}

/// JSON types a (resolved) schema admits; empty = anything.
fn types(root: &Value, s: &Value) -> Vec<String> {
    let s = resolve(root, s);
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        return any.iter().flat_map(|b| types(root, b)).collect();
    }
    match s.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts.iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        _ if s.get("enum").is_some() => vec!["string".into()],
        _ => Vec::new(),
    }
}

/// The object branch of a schema (through `$ref` and nullable `anyOf`).
fn object_branch<'a>(root: &'a Value, s: &'a Value) -> Option<&'a Value> {
    let s = resolve(root, s);
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        return any.iter().find_map(|b| object_branch(root, b));
    }
    s.get("properties").is_some().then_some(s)
}

fn at_path<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &mut v[i],
        Err(_) => &mut v[k.as_str()],
    })
}

fn parses(v: &Value) -> bool {
    serde_json::from_value::<Manifest>(v.clone()).is_ok()
}

/// For the object schema `s` at `path` of `instance`: removing each property
/// parses iff it is not required, an unknown property is rejected iff
/// `additionalProperties` is false, wrong JSON types are rejected, null is
/// accepted iff the schema allows it, integer bounds match Rust's types; then
/// recurse into nested objects and arrays of objects.
fn check_object(root: &Value, s: &Value, instance: &Value, path: Vec<String>) {
    let props = s["properties"].as_object().unwrap();
    let required: Vec<&str> = s["required"]
        .as_array()
        .map(|r| r.iter().map(|x| x.as_str().unwrap()).collect())
        .unwrap_or_default();
    let here = {
        let mut v = instance.clone();
        at_path(&mut v, &path).clone()
    };
    let keys: Vec<&String> = here.as_object().unwrap().keys().collect();
    let mut names: Vec<&String> = props.keys().collect();
    names.sort();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort();
    assert_eq!(
        names, keys_sorted,
        "{path:?}: schema properties vs the fields the writer emits"
    );
    assert_eq!(s["additionalProperties"], json!(false), "{path:?}");
    let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = instance.clone();
        f(at_path(&mut v, &path).as_object_mut().unwrap());
        parses(&v)
    };
    assert!(
        !with(&|o| {
            o.insert("zz_unknown".into(), json!(1));
        }),
        "{path:?}: unknown field accepted"
    );
    for (name, ps) in props {
        let p = format!("{path:?}.{name}");
        assert_eq!(
            with(&|o| {
                o.remove(name);
            }),
            !required.contains(&name.as_str()),
            "{p}: required?"
        );
        let ts = types(root, ps);
        let admits = |t: &str| ts.is_empty() || ts.iter().any(|x| x == t);
        assert_eq!(
            with(&|o| {
                o.insert(name.clone(), Value::Null);
            }),
            admits("null"),
            "{p}: null"
        );
        if !admits("string") {
            assert!(!with(&|o| {
                o.insert(name.clone(), json!("x"));
            }));
        }
        if !ts.is_empty() && !admits("object") {
            assert!(!with(&|o| {
                o.insert(name.clone(), json!({}));
            }));
        }
        let rs = resolve(root, ps);
        if ts.iter().any(|t| t == "integer")
            && rs.get("const").is_none()
            && rs.get("enum").is_none()
        {
            let min = rs["minimum"].as_i64().unwrap();
            let max = &rs["maximum"];
            let set = |v: Value| {
                with(&|o| {
                    o.insert(name.clone(), v.clone());
                })
            };
            assert!(set(json!(min)), "{p}: minimum");
            assert!(!set(json!(min as i128 - 1)), "{p}: below minimum");
            assert!(set(max.clone()), "{p}: maximum");
            let above = max.as_u64().unwrap() as u128 + 1;
            let above: Value = serde_json::from_str(&above.to_string()).unwrap();
            assert!(!set(above), "{p}: above maximum");
        }
        let mut child = path.clone();
        child.push(name.clone());
        let value = here[name.as_str()].clone();
        if let Some(os) = object_branch(root, ps) {
            if value.is_object() {
                check_object(root, os, instance, child);
            }
        } else if let (Some(items), Some(first)) =
            (rs.get("items"), value.as_array().and_then(|a| a.first()))
        {
            if let (Some(os), true) = (object_branch(root, items), first.is_object()) {
                child.push("0".into());
                check_object(root, os, instance, child);
            }
        }
    }
}

#[test]
fn manifest_schema_matches_serde() {
    let schema: Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("cache_schema/manifest.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        schema["$schema"],
        json!("https://json-schema.org/draft/2020-12/schema")
    );
    let dtypes: Vec<&str> = schema["$defs"]["Dtype"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(dtypes, ["f16", "bf16", "f32", "int8"]);
    for d in [Dtype::F16, Dtype::Bf16, Dtype::F32, Dtype::Int8] {
        assert!(dtypes.contains(&serde_json::to_value(d).unwrap().as_str().unwrap()));
    }
    for g in goldens() {
        let m: Value = serde_json::from_slice(
            &std::fs::read(golden_root().join(g.dir).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert!(parses(&m));
        // The schema describes the current version; a version 1 manifest
        // lacks only manifest_sha256 (FORMAT.md §6).
        let mut m = m;
        if g.format_version < 2 {
            assert!(m.get("manifest_sha256").is_none());
            m["manifest_sha256"] = json!(sha256_hex(b"any"));
        }
        // A text cache does not write `image` (version 3: absent = null).
        if !g.image {
            assert!(m.get("image").is_none());
            m["image"] = Value::Null;
        }
        check_object(&schema, &schema, &m, Vec::new());
        // the same struct is a worker's manifest.part.json: check WorkerInfo too
        let mut part = m.clone();
        part["worker"] = json!({ "index": 1, "count": 2 });
        check_object(&schema, &schema, &part, Vec::new());
    }
}
