//! Writing one shard: chunks compressed (on any thread) by
//! [`compress_chunk`], appended in order by [`ShardWriter`] to
//! `<shard>.tmp`, then sealed (index, header, sync, rename).

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::cache::error::CacheError;
use crate::cache::format::values::{encode_half_planes, shuffle_payload};
use crate::cache::format::{
    encode_meta, encode_values, Dtype, ExampleMeta, FrameKind, Header, IndexEntry, HEADER_LEN,
    IMAGE_SHARD_FORMAT_VERSION, INDEX_ENTRY_LEN, SHARD_FORMAT_VERSION,
};
use crate::{Error, Result};

/// Shard-wide settings the writer needs.
#[derive(Debug, Clone, Copy)]
pub struct ShardSpec {
    /// Value encoding.
    pub dtype: Dtype,
    /// Byte-plane shuffle before compression.
    pub shuffle: bool,
    /// zstd level.
    pub zstd_level: i32,
    /// Number of stored layers.
    pub n_layers: u32,
    /// Hidden width.
    pub hidden: u32,
    /// Maximum tokens per example.
    pub max_len: u32,
    /// Examples per chunk.
    pub chunk_size: u32,
    /// Settings hash (first 8 bytes).
    pub settings_hash: u64,
    /// An image shard (FORMAT.md §3.1.1: image records, header version 3).
    pub image: bool,
}

impl ShardSpec {
    /// The shard-wide settings of the cache `m` describes.
    pub fn of(m: &crate::cache::Manifest) -> Self {
        let s = &m.settings;
        ShardSpec {
            dtype: s.dtype,
            shuffle: s.shuffle,
            zstd_level: s.zstd_level,
            n_layers: s.layers.len() as u32,
            hidden: m.backbone.hidden as u32,
            max_len: s.max_len as u32,
            chunk_size: s.chunk_size,
            settings_hash: m.header_settings_hash(),
            image: m.image.is_some(),
        }
    }
}

/// A chunk compressed and ready to append (produced on worker threads).
#[derive(Debug)]
pub struct CompressedChunk {
    /// Examples in the chunk.
    pub n_examples: u32,
    /// Real tokens in the chunk.
    pub n_tokens: u64,
    /// `(kind, layer position, frame bytes, raw length)`, Meta first.
    pub frames: Vec<(FrameKind, u32, Vec<u8>, u64)>,
}

/// One zstd frame (with zstd's content checksum) of `raw` at `level`: how
/// every frame of a shard, the index included, is compressed.
pub fn zstd_frame(raw: &[u8], level: i32) -> Result<Vec<u8>, CacheError> {
    let failed = |e: std::io::Error| CacheError::Compress {
        level,
        message: e.to_string(),
    };
    let mut c = zstd::bulk::Compressor::new(level).map_err(failed)?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .map_err(failed)?;
    c.compress(raw).map_err(failed)
}

/// Compress one chunk: `layers[l]` holds the chunk's real-token rows of
/// stored layer `l`, concatenated in example order (`tokens x hidden` f32).
pub fn compress_chunk(
    spec: &ShardSpec,
    meta: &[ExampleMeta],
    layers: &[Vec<f32>],
) -> Result<CompressedChunk, CacheError> {
    if let Some(e) = meta.iter().find(|e| e.image.is_some() != spec.image) {
        return Err(CacheError::Corrupt(format!(
            "example {} is a {} example in a {} shard",
            e.id,
            if spec.image { "text" } else { "image" },
            if spec.image { "image" } else { "text" }
        )));
    }
    let n_tokens: u64 = meta.iter().map(|m| m.len() as u64).sum();
    let mut frames = Vec::with_capacity(layers.len() + 1);
    let m = encode_meta(meta);
    frames.push((
        FrameKind::Meta,
        0,
        zstd_frame(&m, spec.zstd_level)?,
        m.len() as u64,
    ));
    for (l, values) in layers.iter().enumerate() {
        debug_assert_eq!(values.len() as u64, n_tokens * u64::from(spec.hidden));
        // One vectorised pass says whether every value is finite (and fits
        // f16); only a failing layer is searched for the value to report.
        let limit = if spec.dtype == Dtype::F16 {
            65504.0
        } else {
            f32::MAX
        };
        let fits = values
            .chunks(256)
            .all(|c| c.iter().fold(true, |ok, v| ok & (v.abs() <= limit)));
        if !fits {
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(CacheError::NonFinite {
                    value: *v,
                    layer: l,
                });
            }
            if let Some(v) = values.iter().find(|v| v.abs() > limit) {
                return Err(CacheError::F16Overflow {
                    value: *v,
                    layer: l,
                });
            }
        }
        let raw = match (spec.dtype, spec.shuffle) {
            // Fused fast path: vectorised f32 -> f16/bf16 conversion written
            // straight into byte planes (same bytes as encode + shuffle).
            (Dtype::F16 | Dtype::Bf16, true) => encode_half_planes(values, spec.dtype),
            _ => {
                let raw = encode_values(values, spec.hidden as usize, spec.dtype);
                if spec.shuffle {
                    shuffle_payload(&raw, n_tokens as usize, spec.dtype)
                } else {
                    raw
                }
            }
        };
        frames.push((
            FrameKind::Layer,
            l as u32,
            zstd_frame(&raw, spec.zstd_level)?,
            raw.len() as u64,
        ));
    }
    Ok(CompressedChunk {
        n_examples: meta.len() as u32,
        n_tokens,
        frames,
    })
}

/// Writes one shard to `<final>.tmp`, then seals it (sync + rename).
pub struct ShardWriter {
    spec: ShardSpec,
    shard_index: u32,
    first_example: u64,
    tmp: PathBuf,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    offset: u64,
    entries: Vec<IndexEntry>,
    chunks: u32,
    examples: u64,
    tokens: u64,
}

/// What a sealed shard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShard {
    /// Final path.
    pub path: PathBuf,
    /// Shard number.
    pub index: u32,
    /// First example position.
    pub first_example: u64,
    /// Examples.
    pub examples: u64,
    /// Real tokens.
    pub tokens: u64,
    /// File size.
    pub bytes: u64,
}

impl ShardWriter {
    /// Start shard `shard_index` at `path` (written as `path.tmp` until sealed).
    #[expect(
        clippy::disallowed_methods,
        reason = "a streamed shard written under a temporary name, its header rewritten in place, and sealed by rename (FORMAT.md §7)"
    )]
    pub fn create(
        path: &Path,
        spec: ShardSpec,
        shard_index: u32,
        first_example: u64,
    ) -> Result<Self> {
        let tmp = path.with_extension("shrd.tmp");
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, f);
        file.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(ShardWriter {
            spec,
            shard_index,
            first_example,
            tmp,
            path: path.to_path_buf(),
            file,
            offset: HEADER_LEN as u64,
            entries: Vec::new(),
            chunks: 0,
            examples: 0,
            tokens: 0,
        })
    }

    /// The shard-wide settings it writes with.
    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    /// The final path (the file is written to a `.tmp` next to it until
    /// sealed).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append a compressed chunk (chunks must arrive in order).
    pub fn push(&mut self, chunk: CompressedChunk) -> Result<()> {
        for (kind, layer, bytes, raw_len) in chunk.frames {
            self.file
                .write_all(&bytes)
                .map_err(|e| Error::io(&self.tmp, e))?;
            self.entries.push(IndexEntry {
                kind,
                layer,
                chunk: self.chunks,
                n_examples: chunk.n_examples,
                n_tokens: chunk.n_tokens,
                offset: self.offset,
                len: bytes.len() as u64,
                raw_len,
                crc: crc32fast::hash(&bytes),
            });
            self.offset += bytes.len() as u64;
        }
        self.chunks += 1;
        self.examples += u64::from(chunk.n_examples);
        self.tokens += chunk.n_tokens;
        Ok(())
    }

    /// Write the index and header, sync, and rename into place.
    pub fn seal(mut self) -> Result<SealedShard> {
        let mut raw = Vec::with_capacity(self.entries.len() * INDEX_ENTRY_LEN);
        for e in &self.entries {
            e.encode_into(&mut raw);
        }
        let index = zstd_frame(&raw, 3).map_err(|source| Error::Cache {
            path: self.tmp.clone(),
            source,
        })?;
        let index_crc = crc32fast::hash(&index);
        self.file
            .write_all(&index)
            .map_err(|e| Error::io(&self.tmp, e))?;
        let header = Header {
            format_version: if self.spec.image {
                IMAGE_SHARD_FORMAT_VERSION
            } else {
                SHARD_FORMAT_VERSION
            },
            shard_index: self.shard_index,
            dtype: self.spec.dtype,
            shuffle: self.spec.shuffle,
            n_layers: self.spec.n_layers,
            hidden: self.spec.hidden,
            max_len: self.spec.max_len,
            chunk_size: self.spec.chunk_size,
            n_examples: self.examples,
            first_example: self.first_example,
            n_tokens: self.tokens,
            settings_hash: self.spec.settings_hash,
            index_offset: self.offset,
            index_len: index.len() as u64,
            index_entries: self.entries.len() as u32,
            index_crc,
        };
        let mut f = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(&self.tmp, e))?;
        f.write_all(&header.encode())
            .map_err(|e| Error::io(&self.tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(SealedShard {
            path: self.path,
            index: self.shard_index,
            first_example: self.first_example,
            examples: self.examples,
            tokens: self.tokens,
            bytes: self.offset + index.len() as u64,
        })
    }
}
