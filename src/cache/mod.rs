//! The feature cache: the contract between `sherl-extract` and `sherl-fit`.
//!
//! A cache is a directory (normative spec: `cache_schema/FORMAT.md`):
//!
//! ```text
//! CACHE/
//!   manifest.json            written last, atomically: present = complete
//!   shards/shard-00000.shrd  write-once shards (header, zstd frames, index)
//!   extract.pending.json     settings of an extraction in progress (resume)
//!   .lock                    the writer's OS lock file (ignored by readers)
//! ```
//!
//! Each shard holds consecutive examples in chunks; each chunk has a
//! metadata frame (ids, split, label, token ids) and one frame per stored
//! layer with the hidden states of the chunk's real tokens only (no
//! padding). Every frame carries a CRC-32 in the index and a zstd content
//! checksum; the index is checksummed from the header, and the header
//! checksums itself. [`Cache`] maps shards read-only ([`mmap`], the crate's
//! only `unsafe`), validates them against the manifest, and decodes chunks,
//! on background threads when asked ([`Cache::stream`]).
//!
//! Every path and size read from a file is checked before it is used: shard
//! paths through [`checked_shard_path`] (the reader and
//! [`merge::merge`] share it), shard size claims against the file and the
//! manifest before anything is allocated for them (FORMAT.md §8).
//!
//! Layer numbering follows `hidden_states.i` (0 = embedding output).

pub mod error;
pub mod format;
pub mod manifest;
pub mod merge;
pub mod mmap;
pub mod shard;
pub mod writer;

use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

pub use error::CacheError;
pub use format::{Dtype, FORMAT_VERSION, OLDEST_READABLE_VERSION};
pub use manifest::Manifest;
pub use shard::{ExampleMeta, MetaBounds, ShardReader};

use mmap::MappedFile;

use crate::{Error, Result};

/// Name of the shard file with number `i`.
pub fn shard_file_name(i: u32) -> String {
    shard_file_name_u64(u64::from(i))
}

fn shard_file_name_u64(i: u64) -> String {
    format!("shards/shard-{i:05}.shrd")
}

/// FORMAT.md §1, §8.1: the path to open for shard `k` of the cache (or
/// worker part) at `dir`, given the `file` its manifest (`manifest_path`,
/// named in errors) lists. The only accepted `file` is
/// `shards/shard-NNNNN.shrd` for that `k`, so an absolute path, a `..`, a
/// path outside `shards/` or another shard's name is refused
/// ([`CacheError::UnsafePath`]) before anything is opened or written; and when
/// the file exists, it must resolve (through any symlink) to a file inside
/// `dir`.
pub fn checked_shard_path(dir: &Path, manifest_path: &Path, k: u64, file: &str) -> Result<PathBuf> {
    let expected = shard_file_name_u64(k);
    let refuse = |reason: &str| Error::Cache {
        path: manifest_path.to_path_buf(),
        source: CacheError::UnsafePath {
            file: file.to_string(),
            shard: k,
            expected: expected.clone(),
            reason: reason.to_string(),
        },
    };
    let p = Path::new(file);
    if p.is_absolute() || p.has_root() || file.starts_with(['/', '\\']) {
        return Err(refuse("an absolute path"));
    }
    if p.components().any(|c| c == Component::ParentDir)
        || file.split(['/', '\\']).any(|c| c == "..")
    {
        return Err(refuse("a path that climbs out with `..`"));
    }
    if !file.starts_with("shards/") {
        return Err(refuse("not a file under shards/"));
    }
    if file != expected {
        return Err(refuse("not the name of this shard"));
    }
    let path = dir.join(&expected);
    // A symlink (the file's or the shards directory's) must not lead out of
    // the cache directory.
    if std::fs::symlink_metadata(&path).is_ok() {
        let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
        if !real.starts_with(&root) {
            return Err(refuse(&format!(
                "it resolves (through a symlink) to {}, outside the cache directory",
                real.display()
            )));
        }
    }
    Ok(path)
}

/// One chunk in the cache's global numbering.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRef {
    /// Shard number (position in the manifest's shard list).
    pub shard: usize,
    /// Chunk within the shard.
    pub chunk: usize,
    /// Cache position of the chunk's first example.
    pub first_example: u64,
    /// Examples in the chunk.
    pub examples: u32,
    /// Real tokens in the chunk.
    pub tokens: u64,
}

/// A decoded chunk: metadata and the requested layers (`tokens x hidden`
/// f32 each, examples concatenated in order).
#[derive(Debug, Clone)]
pub struct DecodedChunk {
    /// Global chunk number.
    pub id: usize,
    /// Examples.
    pub meta: Vec<ExampleMeta>,
    /// Requested layers, in the order asked.
    pub layers: Vec<Vec<f32>>,
}

impl DecodedChunk {
    /// Row offset of each example in the layer buffers, plus the total.
    pub fn offsets(&self) -> Vec<usize> {
        let mut o = Vec::with_capacity(self.meta.len() + 1);
        let mut acc = 0;
        o.push(0);
        for m in &self.meta {
            acc += m.len();
            o.push(acc);
        }
        o
    }
}

/// An open, validated cache.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<ShardReader<MappedFile>>,
    chunks: Vec<ChunkRef>,
}

impl Cache {
    /// Open the cache at `dir`: read the manifest (version-checked, and
    /// checksum-checked from format version 2 on), check it for consistency,
    /// map every shard, validate its header against the manifest, then its
    /// index and layout.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "cache directory not found"),
            ));
        }
        let manifest_path = dir.join(manifest::MANIFEST);
        let manifest = Manifest::read(&manifest_path)?;
        if manifest.worker.is_some() {
            return Err(Error::Cache {
                path: dir.to_path_buf(),
                source: CacheError::Corrupt(
                    "this is one worker's partial cache; combine parts with `sherl-cache merge`"
                        .into(),
                ),
            });
        }
        Self::assemble(dir, &manifest_path, manifest, |k, info| {
            checked_shard_path(dir, &manifest_path, k as u64, &info.file)
        })
    }

    /// Validate `manifest` (read from `manifest_path`, named in errors) and
    /// open its shards, shard `k` at `locate(k, info)`: the checks of
    /// FORMAT.md §8.1 and §8.2. `sherl-cache merge` runs it on the parts'
    /// shards before writing anything.
    pub(crate) fn assemble(
        dir: &Path,
        manifest_path: &Path,
        manifest: Manifest,
        mut locate: impl FnMut(usize, &manifest::ShardInfo) -> Result<PathBuf>,
    ) -> Result<Self> {
        let in_manifest = |source: CacheError| Error::Cache {
            path: manifest_path.to_path_buf(),
            source,
        };
        check_manifest(&manifest).map_err(in_manifest)?;
        let bounds = MetaBounds {
            splits: manifest.split_names.len(),
            labels: manifest.labels.len(),
        };
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut chunks = Vec::new();
        let mut expect_first = 0u64;
        for (si, info) in manifest.shards.iter().enumerate() {
            if info.index as usize != si {
                return Err(in_manifest(CacheError::ManifestMismatch {
                    field: format!("shards[{si}].index"),
                    manifest: info.index.to_string(),
                    shard: format!("{si} (its position in the list)"),
                }));
            }
            let path = locate(si, info)?;
            let mut reader = open_shard_checked(&path, |h| {
                check_shard_against_manifest(&manifest, info, h, si, expect_first)
            })?;
            if reader.file_len() != info.bytes {
                return Err(Error::Cache {
                    path,
                    source: CacheError::ManifestMismatch {
                        field: "bytes".into(),
                        manifest: info.bytes.to_string(),
                        shard: format!("{} (file size)", reader.file_len()),
                    },
                });
            }
            reader.set_meta_bounds(bounds);
            for (ci, c) in reader.chunks().iter().enumerate() {
                chunks.push(ChunkRef {
                    shard: si,
                    chunk: ci,
                    first_example: info.first_example + c.first_in_shard,
                    examples: c.n_examples,
                    tokens: c.n_tokens,
                });
            }
            // Cannot overflow: check_manifest summed the same numbers.
            expect_first += info.examples;
            shards.push(reader);
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            chunks,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// All chunks in cache order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Position (in the manifest's `layers`) of `hidden_states.i`.
    pub fn layer_position(&self, hidden_state: usize) -> Option<usize> {
        self.manifest
            .settings
            .layers
            .iter()
            .position(|&l| l == hidden_state)
    }

    fn shard_path(&self, shard: usize) -> PathBuf {
        self.dir.join(&self.manifest.shards[shard].file)
    }

    fn wrap(&self, shard: usize) -> impl FnOnce(CacheError) -> Error + '_ {
        move |source| Error::Cache {
            path: self.shard_path(shard),
            source,
        }
    }

    /// Decode chunk `id`: its metadata and the stored layers at `positions`.
    pub fn read_chunk(&self, id: usize, positions: &[usize]) -> Result<DecodedChunk> {
        let c = *self.chunks.get(id).ok_or_else(|| {
            Error::Config(format!(
                "chunk {id} does not exist ({} chunks)",
                self.chunks.len()
            ))
        })?;
        let shard = &self.shards[c.shard];
        let meta = shard.chunk_meta(c.chunk).map_err(self.wrap(c.shard))?;
        let mut layers = Vec::with_capacity(positions.len());
        for &p in positions {
            layers.push(shard.chunk_layer(c.chunk, p).map_err(self.wrap(c.shard))?);
        }
        Ok(DecodedChunk { id, meta, layers })
    }

    /// Random access: example at cache `position`, with the stored layers at
    /// `positions` (`len x hidden` each).
    pub fn example(
        &self,
        position: u64,
        positions: &[usize],
    ) -> Result<(ExampleMeta, Vec<Vec<f32>>)> {
        let idx = self
            .chunks
            .partition_point(|c| c.first_example + u64::from(c.examples) <= position);
        if idx >= self.chunks.len() {
            return Err(Error::Config(format!(
                "example {position} does not exist ({} examples)",
                self.manifest.examples
            )));
        }
        let chunk = self.read_chunk(idx, positions)?;
        let k = (position - self.chunks[idx].first_example) as usize;
        let offsets = chunk.offsets();
        let hidden = self.manifest.backbone.hidden;
        let layers = chunk
            .layers
            .iter()
            .map(|l| l[offsets[k] * hidden..offsets[k + 1] * hidden].to_vec())
            .collect();
        Ok((chunk.meta[k].clone(), layers))
    }

    /// Decode every frame of every shard, checking every checksum and
    /// invariant; `on_shard` is called after each shard. Beyond what every
    /// read checks (split and label ids index the manifest's lists), the
    /// examples' splits must agree with the manifest (FORMAT.md §8.4): split
    /// ids never decrease along the cache (§3.4), and each split holds the
    /// number of examples `splits` gives for its name.
    pub fn verify(&self, mut on_shard: impl FnMut(usize, &Path)) -> Result<usize> {
        let m = &self.manifest;
        let mut frames = 0;
        let mut per_split = vec![0u64; m.split_names.len()];
        let mut last_split = 0u32;
        for (i, s) in self.shards.iter().enumerate() {
            frames += s
                .verify_each(|e| {
                    if e.split < last_split {
                        return Err(CacheError::ManifestMismatch {
                            field: "split_names (cache order, FORMAT.md §3.4)".into(),
                            manifest: format!(
                                "examples ordered by split: {}",
                                m.split_names.join(", ")
                            ),
                            shard: format!(
                                "example {:?} at position {} has split id {} after split id {last_split}",
                                e.id, e.position, e.split
                            ),
                        });
                    }
                    last_split = e.split;
                    // In range: chunk_meta checked split ids against split_names.
                    per_split[e.split as usize] += 1;
                    Ok(())
                })
                .map_err(self.wrap(i))?;
            on_shard(i, &self.shard_path(i));
        }
        for (name, &n) in m.split_names.iter().zip(&per_split) {
            let listed = m.splits.get(name).copied().unwrap_or(0);
            if listed != n {
                return Err(Error::Cache {
                    path: self.dir.join(manifest::MANIFEST),
                    source: CacheError::ManifestMismatch {
                        field: format!("splits[{name:?}]"),
                        manifest: listed.to_string(),
                        shard: format!("{n} examples with that split in the shards"),
                    },
                });
            }
        }
        Ok(frames)
    }

    /// Decode `chunk_ids` in order on `threads` background threads, keeping
    /// at most `depth` decoded chunks ahead of the consumer (so memory is
    /// bounded by the settings, not by the cache size).
    pub fn stream(
        self: &Arc<Self>,
        chunk_ids: Vec<usize>,
        positions: Vec<usize>,
        threads: usize,
        depth: usize,
    ) -> ChunkStream {
        let threads = threads.max(1);
        let depth = depth.max(threads);
        let ids = Arc::new(chunk_ids);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<DecodedChunk>)>(depth);
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (cache, ids, next, tx, positions) = (
                Arc::clone(self),
                Arc::clone(&ids),
                Arc::clone(&next),
                tx.clone(),
                positions.clone(),
            );
            handles.push(std::thread::spawn(move || loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&id) = ids.get(k) else { break };
                let r = cache.read_chunk(id, &positions);
                if tx.send((k, r)).is_err() {
                    break; // consumer dropped the stream
                }
            }));
        }
        ChunkStream {
            rx,
            pending: std::collections::BTreeMap::new(),
            next: 0,
            total: ids.len(),
            _handles: handles,
        }
    }
}

/// Iterator over chunks decoded in the background, in the requested order.
pub struct ChunkStream {
    rx: mpsc::Receiver<(usize, Result<DecodedChunk>)>,
    pending: std::collections::BTreeMap<usize, Result<DecodedChunk>>,
    next: usize,
    total: usize,
    _handles: Vec<std::thread::JoinHandle<()>>,
}

impl Iterator for ChunkStream {
    type Item = Result<DecodedChunk>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        loop {
            if let Some(r) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(r);
            }
            match self.rx.recv() {
                Ok((k, r)) => {
                    self.pending.insert(k, r);
                }
                Err(_) => {
                    self.next = self.total;
                    return Some(Err(Error::Config(
                        "chunk decoder threads stopped unexpectedly".into(),
                    )));
                }
            }
        }
    }
}

/// Map and validate one shard file.
pub fn open_shard(path: &Path) -> Result<ShardReader<MappedFile>> {
    open_shard_checked(path, |_| Ok(()))
}

/// Map and validate one shard file, running `check` on its header before
/// the index is read ([`ShardReader::new_checked`]).
pub fn open_shard_checked(
    path: &Path,
    check: impl FnOnce(&format::Header) -> std::result::Result<(), CacheError>,
) -> Result<ShardReader<MappedFile>> {
    let map = MappedFile::open(path)?;
    ShardReader::new_checked(map, check).map_err(|source| Error::Cache {
        path: path.to_path_buf(),
        source,
    })
}

/// FORMAT.md §8.1: the manifest's own consistency, before any shard is
/// opened: every count sums without overflow and agrees, split names are
/// distinct and name every split counted, stored layers are distinct hidden
/// states of the backbone.
fn check_manifest(m: &Manifest) -> std::result::Result<(), CacheError> {
    let bad = |what: String| Err(CacheError::BadManifest(what));
    let s = &m.settings;
    if s.chunk_size == 0 || s.examples_per_shard == 0 || s.max_len == 0 || m.backbone.hidden == 0 {
        return bad(
            "settings.chunk_size, settings.examples_per_shard, settings.max_len and backbone.hidden must be positive".into(),
        );
    }
    if s.layers.is_empty() {
        return bad("settings.layers is empty".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for &l in &s.layers {
        if l > m.backbone.num_layers {
            return bad(format!(
                "settings.layers holds {l}, but the backbone has hidden_states.0..={}",
                m.backbone.num_layers
            ));
        }
        if !seen.insert(l) {
            return bad(format!("settings.layers holds {l} twice"));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for n in &m.split_names {
        if !names.insert(n) {
            return bad(format!("split_names holds {n:?} twice"));
        }
    }
    if let Some(n) = m.splits.keys().find(|n| !names.contains(n)) {
        return bad(format!("splits counts {n:?}, which is not in split_names"));
    }
    fn sum(mut it: impl Iterator<Item = u64>, what: &str) -> std::result::Result<u64, CacheError> {
        it.try_fold(0u64, |a, b| a.checked_add(b))
            .ok_or_else(|| CacheError::BadManifest(format!("{what} overflow when summed")))
    }
    let split_total = sum(m.splits.values().copied(), "splits")?;
    let examples = sum(m.shards.iter().map(|x| x.examples), "shards[].examples")?;
    let tokens = sum(m.shards.iter().map(|x| x.tokens), "shards[].tokens")?;
    let mismatch = |field: &str, manifest: u64, shards: String| {
        Err(CacheError::ManifestMismatch {
            field: field.into(),
            manifest: manifest.to_string(),
            shard: shards,
        })
    };
    if examples != m.examples {
        return mismatch(
            "examples",
            m.examples,
            format!("{examples} (sum over shards)"),
        );
    }
    if split_total != m.examples {
        return mismatch(
            "examples",
            m.examples,
            format!("{split_total} (sum over splits)"),
        );
    }
    if tokens != m.tokens {
        return mismatch("tokens", m.tokens, format!("{tokens} (sum over shards)"));
    }
    Ok(())
}

fn check_shard_against_manifest(
    m: &Manifest,
    info: &manifest::ShardInfo,
    h: &format::Header,
    position: usize,
    expect_first: u64,
) -> std::result::Result<(), CacheError> {
    if h.format_version > m.format_version {
        return Err(CacheError::ManifestMismatch {
            field: "format_version".into(),
            manifest: m.format_version.to_string(),
            shard: format!(
                "{} (a shard is never newer than its manifest)",
                h.format_version
            ),
        });
    }
    let checks: [(&str, String, String); 11] = [
        (
            "shard index",
            position.to_string(),
            h.shard_index.to_string(),
        ),
        (
            "settings_hash",
            format!("{:016x}", m.short_hash()),
            format!("{:016x}", h.settings_hash),
        ),
        (
            "dtype",
            m.settings.dtype.name().into(),
            h.dtype.name().into(),
        ),
        (
            "layers",
            m.settings.layers.len().to_string(),
            h.n_layers.to_string(),
        ),
        (
            "hidden",
            m.backbone.hidden.to_string(),
            h.hidden.to_string(),
        ),
        (
            "first_example",
            expect_first.to_string(),
            h.first_example.to_string(),
        ),
        (
            "examples",
            info.examples.to_string(),
            h.n_examples.to_string(),
        ),
        ("tokens", info.tokens.to_string(), h.n_tokens.to_string()),
        (
            "shuffle",
            m.settings.shuffle.to_string(),
            h.shuffle.to_string(),
        ),
        (
            "max_len",
            m.settings.max_len.to_string(),
            h.max_len.to_string(),
        ),
        (
            "chunk_size",
            m.settings.chunk_size.to_string(),
            h.chunk_size.to_string(),
        ),
    ];
    for (field, manifest, shard) in checks {
        if manifest != shard {
            return Err(CacheError::ManifestMismatch {
                field: field.into(),
                manifest,
                shard,
            });
        }
    }
    if info.first_example != expect_first {
        return Err(CacheError::ManifestMismatch {
            field: "first_example (manifest order)".into(),
            manifest: info.first_example.to_string(),
            shard: expect_first.to_string(),
        });
    }
    Ok(())
}
