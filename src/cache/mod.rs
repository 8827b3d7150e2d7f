//! The feature cache: the contract between `sherl-extract` and `sherl-fit`.
//!
//! A cache is a directory (normative spec: `cache_schema/FORMAT.md`):
//!
//! ```text
//! CACHE/
//!   manifest.json            written last, atomically: present = complete
//!   shards/shard-00000.shrd  write-once shards (header, zstd frames, index)
//!   extract.pending.json     settings of an extraction in progress (resume)
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
//! Layer numbering follows `hidden_states.i` (0 = embedding output).

pub mod error;
pub mod format;
pub mod manifest;
pub mod mmap;
pub mod shard;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

pub use error::CacheError;
pub use format::{Dtype, FORMAT_VERSION, OLDEST_READABLE_VERSION};
pub use manifest::Manifest;
pub use shard::{ExampleMeta, ShardReader};

use mmap::MappedFile;

use crate::{Error, Result};

/// Name of the shard file with number `i`.
pub fn shard_file_name(i: u32) -> String {
    format!("shards/shard-{i:05}.shrd")
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
    /// Open the cache at `dir`: read the manifest (version-checked), map every
    /// shard, validate its header and index, and check it against the
    /// manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "cache directory not found"),
            ));
        }
        let manifest = Manifest::read(&dir.join(manifest::MANIFEST))?;
        if manifest.worker.is_some() {
            return Err(Error::Cache {
                path: dir.to_path_buf(),
                source: CacheError::Corrupt(
                    "this is one worker's partial cache; combine parts with `sherl-cache merge`"
                        .into(),
                ),
            });
        }
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut chunks = Vec::new();
        let mut expect_first = 0u64;
        let bad = |field: &str, manifest: String, shard: String| Error::Cache {
            path: dir.join(manifest::MANIFEST),
            source: CacheError::ManifestMismatch {
                field: field.into(),
                manifest,
                shard,
            },
        };
        let mut expect_tokens = 0u64;
        for (si, info) in manifest.shards.iter().enumerate() {
            // Shard paths are fixed names inside the cache, never elsewhere.
            if info.file != shard_file_name(si as u32) || info.index as usize != si {
                return Err(bad(
                    "shards[].file",
                    info.file.clone(),
                    shard_file_name(si as u32),
                ));
            }
            expect_tokens += info.tokens;
            let path = dir.join(&info.file);
            let reader = open_shard(&path)?;
            check_shard_against_manifest(&manifest, info, reader.header(), si, expect_first)
                .map_err(|source| Error::Cache {
                    path: path.clone(),
                    source,
                })?;
            for (ci, c) in reader.chunks().iter().enumerate() {
                chunks.push(ChunkRef {
                    shard: si,
                    chunk: ci,
                    first_example: info.first_example + c.first_in_shard,
                    examples: c.n_examples,
                    tokens: c.n_tokens,
                });
            }
            expect_first += info.examples;
            shards.push(reader);
        }
        let split_total: u64 = manifest.splits.values().sum();
        if expect_tokens != manifest.tokens || split_total != manifest.examples {
            return Err(bad(
                "tokens / splits",
                format!(
                    "{} tokens, {} examples in splits",
                    manifest.tokens, split_total
                ),
                format!("{expect_tokens} tokens, {} examples", manifest.examples),
            ));
        }
        if expect_first != manifest.examples {
            return Err(Error::Cache {
                path: dir.join(manifest::MANIFEST),
                source: CacheError::ManifestMismatch {
                    field: "examples".into(),
                    manifest: manifest.examples.to_string(),
                    shard: format!("{expect_first} (sum over shards)"),
                },
            });
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
    /// invariant; `on_shard` is called after each shard.
    pub fn verify(&self, mut on_shard: impl FnMut(usize, &Path)) -> Result<usize> {
        let mut frames = 0;
        for (i, s) in self.shards.iter().enumerate() {
            frames += s.verify().map_err(self.wrap(i))?;
            on_shard(i, &self.shard_path(i));
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
    let map = MappedFile::open(path)?;
    ShardReader::new(map).map_err(|source| Error::Cache {
        path: path.to_path_buf(),
        source,
    })
}

fn check_shard_against_manifest(
    m: &Manifest,
    info: &manifest::ShardInfo,
    h: &format::Header,
    position: usize,
    expect_first: u64,
) -> std::result::Result<(), CacheError> {
    let checks: [(&str, String, String); 9] = [
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
