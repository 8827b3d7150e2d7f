//! Reading a cache: [`Cache`] opens a cache directory (manifest checked,
//! every shard mapped and checked against it, FORMAT.md §8), decodes chunks
//! and single examples, verifies everything, and streams chunks decoded on
//! background threads ([`ChunkStream`]).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use super::check::{check_manifest, check_shard_against_manifest};
use super::error::CacheError;
use super::format::values::LayerValues;
use super::mmap::MappedFile;
use super::shard::{ExampleMeta, MetaBounds, ShardReader};
use super::{checked_shard_path, format, manifest, Manifest};
use crate::{Error, Result};

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
/// each, examples concatenated in order): f32 values from
/// [`Cache::read_chunk`], [`LayerValues`] (16-bit frames not yet widened)
/// from [`Cache::read_chunk_values`] and [`Cache::stream`].
#[derive(Debug, Clone)]
pub struct DecodedChunk<L = Vec<f32>> {
    /// Global chunk number.
    pub id: usize,
    /// Examples.
    pub meta: Vec<ExampleMeta>,
    /// Requested layers, in the order asked.
    pub layers: Vec<L>,
}

impl DecodedChunk<LayerValues> {
    /// Every layer widened to f32.
    pub fn into_f32(self) -> DecodedChunk {
        DecodedChunk {
            id: self.id,
            meta: self.meta,
            layers: self.layers.into_iter().map(LayerValues::into_f32).collect(),
        }
    }
}

impl<L> DecodedChunk<L> {
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
        Ok(self.read_chunk_values(id, positions)?.into_f32())
    }

    /// [`Cache::read_chunk`] with the layers as [`LayerValues`]: every
    /// check made, 16-bit values not yet widened (half the memory until a
    /// batch takes them).
    pub fn read_chunk_values(
        &self,
        id: usize,
        positions: &[usize],
    ) -> Result<DecodedChunk<LayerValues>> {
        let c = *self.chunks.get(id).ok_or_else(|| Error::Cache {
            path: self.dir.clone(),
            source: CacheError::NoSuchChunk {
                id,
                chunks: self.chunks.len(),
            },
        })?;
        let shard = &self.shards[c.shard];
        let meta = shard.chunk_meta(c.chunk).map_err(self.wrap(c.shard))?;
        let mut layers = Vec::with_capacity(positions.len());
        for &p in positions {
            layers.push(
                shard
                    .chunk_layer_values(c.chunk, p)
                    .map_err(self.wrap(c.shard))?,
            );
        }
        shard.release_chunk(c.chunk);
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
            return Err(Error::Cache {
                path: self.dir.clone(),
                source: CacheError::NoSuchExample {
                    position,
                    examples: self.manifest.examples,
                },
            });
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
    /// bounded by the settings, not by the cache size). Chunks come as
    /// [`Cache::read_chunk_values`] gives them.
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
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<DecodedChunk<LayerValues>>)>(depth);
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
                let r = cache.read_chunk_values(id, &positions);
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
            dir: self.dir.clone(),
            _handles: handles,
        }
    }
}

/// Iterator over chunks decoded in the background, in the requested order.
pub struct ChunkStream {
    rx: mpsc::Receiver<(usize, Result<DecodedChunk<LayerValues>>)>,
    pending: std::collections::BTreeMap<usize, Result<DecodedChunk<LayerValues>>>,
    next: usize,
    total: usize,
    dir: PathBuf,
    _handles: Vec<std::thread::JoinHandle<()>>,
}

impl Iterator for ChunkStream {
    type Item = Result<DecodedChunk<LayerValues>>;
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
                    return Some(Err(Error::Cache {
                        path: self.dir.clone(),
                        source: CacheError::DecoderStopped,
                    }));
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
