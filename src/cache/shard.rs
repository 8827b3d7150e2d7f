//! One shard: writing it (streamed to a temporary file, sealed by rename)
//! and reading it from any byte source (a memory map or a `Vec<u8>`).
//!
//! A shard holds consecutive examples of the cache, grouped in chunks of
//! `chunk_size` examples. Each chunk has one Meta frame and one Layer frame
//! per stored layer (FORMAT.md §3), so a reader fetches one layer of one
//! chunk without touching the rest.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::CacheError;
use super::format::{
    check_frame_size, decode_values, encode_values, header_crc, shuffle_bytes, shuffle_width,
    unshuffle_bytes, Dtype, FrameKind, Header, IndexEntry, HEADER_LEN, INDEX_ENTRY_LEN,
    MAX_FRAME_RAW, MAX_INDEX_RAW, MAX_ZSTD_RATIO, MIN_FRAME_LEN, SHARD_FORMAT_VERSION,
};
use super::mmap::ByteSource;
use crate::{Error, Result};

/// Metadata of one cached example (FORMAT.md §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleMeta {
    /// Position of the example in the cache (0-based, global).
    pub position: u64,
    /// The example's id (from the dataset).
    pub id: String,
    /// Index into the manifest's `split_names`.
    pub split: u32,
    /// Class id, or `None` for unlabelled data.
    pub label: Option<u32>,
    /// Token ids (special tokens included; the length is `ids.len()`).
    pub ids: Vec<u32>,
    /// Segment ids, same length as `ids`.
    pub type_ids: Vec<u8>,
}

impl ExampleMeta {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the example has no tokens (never true in a valid cache).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

const NO_LABEL: u32 = u32::MAX;

/// Encode a chunk's metadata frame payload.
pub fn encode_meta(examples: &[ExampleMeta]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in examples {
        out.extend_from_slice(&e.position.to_le_bytes());
        out.extend_from_slice(&e.split.to_le_bytes());
        out.extend_from_slice(&e.label.unwrap_or(NO_LABEL).to_le_bytes());
        out.extend_from_slice(&(e.ids.len() as u32).to_le_bytes());
        out.extend_from_slice(&(e.id.len() as u32).to_le_bytes());
        out.extend_from_slice(e.id.as_bytes());
        for id in &e.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&e.type_ids);
    }
    out
}

/// Decode a metadata frame payload holding `n` examples.
pub fn decode_meta(raw: &[u8], n: usize) -> Result<Vec<ExampleMeta>, CacheError> {
    let mut at = 0usize;
    let take = |at: &mut usize, k: usize| -> Result<&[u8], CacheError> {
        let end = at.checked_add(k).ok_or(CacheError::Overflow)?;
        let s = raw
            .get(*at..end)
            .ok_or_else(|| CacheError::Corrupt("metadata frame ends early".into()))?;
        *at = end;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    // Each example takes at least 29 bytes (24-byte fixed part, one token):
    // reserve no more than the payload can hold, whatever `n` claims.
    let mut out = Vec::with_capacity(n.min(raw.len() / 29));
    for _ in 0..n {
        let position = u64::from_le_bytes(take(&mut at, 8)?.try_into().expect("8 bytes"));
        let split = u32_at(take(&mut at, 4)?);
        let label = u32_at(take(&mut at, 4)?);
        let len = u32_at(take(&mut at, 4)?) as usize;
        let id_len = u32_at(take(&mut at, 4)?) as usize;
        let id = std::str::from_utf8(take(&mut at, id_len)?)
            .map_err(|_| CacheError::Corrupt("example id is not UTF-8".into()))?
            .to_string();
        let ids = take(&mut at, len.checked_mul(4).ok_or(CacheError::Overflow)?)?
            .chunks_exact(4)
            .map(u32_at)
            .collect();
        let type_ids = take(&mut at, len)?.to_vec();
        if len == 0 {
            return Err(CacheError::Corrupt(format!("example {id} has no tokens")));
        }
        out.push(ExampleMeta {
            position,
            id,
            split,
            label: (label != NO_LABEL).then_some(label),
            ids,
            type_ids,
        });
    }
    if at != raw.len() {
        return Err(CacheError::Corrupt(format!(
            "metadata frame has {} trailing bytes",
            raw.len() - at
        )));
    }
    Ok(out)
}

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

fn zstd_frame(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(level)
        .map_err(|e| Error::Config(format!("zstd level {level}: {e}")))?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .map_err(|e| Error::Config(format!("zstd: {e}")))?;
    c.compress(raw)
        .map_err(|e| Error::Config(format!("zstd: {e}")))
}

/// Compress one chunk: `layers[l]` holds the chunk's real-token rows of
/// stored layer `l`, concatenated in example order (`tokens x hidden` f32).
pub fn compress_chunk(
    spec: &ShardSpec,
    meta: &[ExampleMeta],
    layers: &[Vec<f32>],
) -> Result<CompressedChunk> {
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
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::Runtime(format!(
                "non-finite hidden state ({v}) at stored layer position {l}: the backbone produced it"
            )));
        }
        if spec.dtype == Dtype::F16 {
            if let Some(v) = values.iter().find(|v| v.abs() > 65504.0) {
                return Err(Error::Config(format!(
                    "a hidden-state value ({v}) at stored layer position {l} exceeds the f16 range (65504); extract with --dtype bf16 or f32"
                )));
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

/// f16 or bf16 values as two byte planes (low bytes, then high bytes).
fn encode_half_planes(values: &[f32], dtype: Dtype) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    let n = values.len();
    let bits: Vec<u16> = if dtype == Dtype::F16 {
        let mut h = vec![half::f16::ZERO; n];
        h.convert_from_f32_slice(values);
        h.iter().map(|x| x.to_bits()).collect()
    } else {
        let mut h = vec![half::bf16::ZERO; n];
        h.convert_from_f32_slice(values);
        h.iter().map(|x| x.to_bits()).collect()
    };
    let mut out = vec![0u8; 2 * n];
    let (lo, hi) = out.split_at_mut(n);
    for ((l, h), b) in lo.iter_mut().zip(hi.iter_mut()).zip(&bits) {
        let [a, c] = b.to_le_bytes();
        *l = a;
        *h = c;
    }
    out
}

/// Shuffle the value bytes of a layer payload (int8: only its scales).
fn shuffle_payload(raw: &[u8], tokens: usize, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::Int8 => {
            let (scales, q) = raw.split_at(tokens * 4);
            let mut out = shuffle_bytes(scales, 4);
            out.extend_from_slice(q);
            out
        }
        _ => shuffle_bytes(raw, shuffle_width(dtype)),
    }
}

fn unshuffle_payload(raw: &[u8], tokens: usize, dtype: Dtype) -> Result<Vec<u8>, CacheError> {
    match dtype {
        Dtype::Int8 => {
            let split = tokens
                .checked_mul(4)
                .filter(|&s| s <= raw.len())
                .ok_or(CacheError::Overflow)?;
            let (scales, q) = raw.split_at(split);
            let mut out = unshuffle_bytes(scales, 4);
            out.extend_from_slice(q);
            Ok(out)
        }
        _ => {
            let w = shuffle_width(dtype);
            if !raw.len().is_multiple_of(w) {
                return Err(CacheError::Corrupt(
                    "layer frame length is not a multiple of the value size".into(),
                ));
            }
            Ok(unshuffle_bytes(raw, w))
        }
    }
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
        let index = zstd_frame(&raw, 3)?;
        let index_crc = crc32fast::hash(&index);
        self.file
            .write_all(&index)
            .map_err(|e| Error::io(&self.tmp, e))?;
        let header = Header {
            format_version: SHARD_FORMAT_VERSION,
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

/// Location of one chunk inside a shard.
#[derive(Debug, Clone)]
pub struct ChunkEntry {
    /// Examples in the chunk.
    pub n_examples: u32,
    /// Real tokens in the chunk.
    pub n_tokens: u64,
    /// Position (within the shard) of the chunk's first example.
    pub first_in_shard: u64,
    /// Index entry of the Meta frame.
    pub meta: usize,
    /// Index entries of the Layer frames, by stored-layer position.
    pub layers: Vec<usize>,
}

/// How many split names and labels the manifest has: the metadata's split
/// and label ids must index them (FORMAT.md §8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaBounds {
    /// `len(split_names)`.
    pub splits: usize,
    /// `len(labels)`.
    pub labels: usize,
}

/// A validated shard over any byte source.
#[derive(Debug)]
pub struct ShardReader<B> {
    bytes: B,
    header: Header,
    entries: Vec<IndexEntry>,
    chunks: Vec<ChunkEntry>,
    bounds: Option<MetaBounds>,
}

impl<B: ByteSource> ShardReader<B> {
    /// Validate the header, the index and the frame layout (not the frame
    /// contents: [`ShardReader::verify`] does that).
    pub fn new(bytes: B) -> Result<Self, CacheError> {
        Self::new_checked(bytes, |_| Ok(()))
    }

    /// Like [`ShardReader::new`], with `check` run on the header as soon as
    /// its checksum has been verified and before the index is decompressed:
    /// a reader that knows what the shard must hold (the manifest) refuses a
    /// header that disagrees before allocating anything its size claims ask
    /// for.
    pub fn new_checked(
        bytes: B,
        check: impl FnOnce(&Header) -> Result<(), CacheError>,
    ) -> Result<Self, CacheError> {
        let file = bytes.as_ref();
        let file_len = file.len() as u64;
        let (mut header, stored_crc) = Header::decode(file)?;
        let end = header
            .index_offset
            .checked_add(header.index_len)
            .ok_or(CacheError::Overflow)?;
        if end > file_len {
            return Err(CacheError::TruncatedIndex {
                offset: header.index_offset,
                len: header.index_len,
                file_len,
            });
        }
        if header.index_offset < HEADER_LEN as u64 {
            return Err(CacheError::Corrupt(format!(
                "the index offset {} lies inside the {HEADER_LEN}-byte header",
                header.index_offset
            )));
        }
        if end != file_len {
            return Err(CacheError::Corrupt(format!(
                "{} bytes after the index (the index must end the file)",
                file_len - end
            )));
        }
        let index = &file[header.index_offset as usize..end as usize];
        let index_crc = crc32fast::hash(index);
        if header_crc(&file[..92], index_crc) != stored_crc {
            // Either the header or the index bytes changed.
            return Err(CacheError::ChecksumMismatch {
                what: "header or index".into(),
            });
        }
        header.index_crc = index_crc;
        check(&header)?;
        let raw_len = Self::check_header_claims(&header)?;
        check_frame_size(index, raw_len, MAX_INDEX_RAW, "the index frame")?;
        let raw = zstd::bulk::decompress(index, raw_len as usize)
            .map_err(|e| CacheError::Corrupt(format!("index frame: {e}")))?;
        if raw.len() as u64 != raw_len {
            return Err(CacheError::Corrupt(
                "index length disagrees with the header".into(),
            ));
        }
        let entries: Vec<IndexEntry> = (0..header.index_entries as usize)
            .map(|i| IndexEntry::decode(&raw, i))
            .collect::<Result<_, _>>()?;
        let chunks = Self::layout(&header, &entries, file_len)?;
        Ok(ShardReader {
            bytes,
            header,
            entries,
            chunks,
            bounds: None,
        })
    }

    /// FORMAT.md §8.2: the header's size claims against each other and the
    /// file, before anything is allocated for them. Returns the decoded size
    /// of the index.
    fn check_header_claims(h: &Header) -> Result<u64, CacheError> {
        if h.n_layers == 0 || h.hidden == 0 || h.chunk_size == 0 {
            return Err(CacheError::Corrupt(
                "zero layers, hidden size or chunk size".into(),
            ));
        }
        let entries = u64::from(h.index_entries);
        let per_chunk = u64::from(h.n_layers) + 1;
        if !entries.is_multiple_of(per_chunk) {
            return Err(CacheError::Corrupt(format!(
                "{entries} index entries is not a multiple of {per_chunk} (meta + layers)"
            )));
        }
        // Frames tile the body and none is shorter than the smallest zstd frame.
        let body = h.index_offset - HEADER_LEN as u64;
        if entries > body / MIN_FRAME_LEN {
            return Err(CacheError::Corrupt(format!(
                "the header claims {entries} frames, but the {body}-byte body can hold at most {} (a zstd frame takes at least {MIN_FRAME_LEN} bytes)",
                body / MIN_FRAME_LEN
            )));
        }
        // Every chunk holds 1..=chunk_size examples of 1..=max_len tokens.
        let chunks = entries / per_chunk;
        let min_chunks = h.n_examples.div_ceil(u64::from(h.chunk_size));
        if chunks > h.n_examples || chunks < min_chunks {
            return Err(CacheError::Corrupt(format!(
                "the header claims {chunks} chunks for {} examples in chunks of at most {}",
                h.n_examples, h.chunk_size
            )));
        }
        let max_tokens = h
            .n_examples
            .checked_mul(u64::from(h.max_len))
            .ok_or(CacheError::Overflow)?;
        if h.n_tokens < h.n_examples || h.n_tokens > max_tokens {
            return Err(CacheError::Corrupt(format!(
                "the header claims {} tokens for {} examples of at most {} tokens",
                h.n_tokens, h.n_examples, h.max_len
            )));
        }
        entries
            .checked_mul(INDEX_ENTRY_LEN as u64)
            .ok_or(CacheError::Overflow)
    }

    /// Check the frame layout: frames tile the body with no holes, chunk
    /// numbering is contiguous, each chunk has Meta then every layer, the
    /// counts add up to the header's, and no frame claims a decoded size its
    /// bytes cannot hold.
    fn layout(
        h: &Header,
        entries: &[IndexEntry],
        file_len: u64,
    ) -> Result<Vec<ChunkEntry>, CacheError> {
        let per_chunk = h.n_layers as usize + 1;
        let mut expect_offset = HEADER_LEN as u64;
        let mut chunks = Vec::with_capacity(entries.len() / per_chunk);
        let (mut examples, mut tokens) = (0u64, 0u64);
        for (i, e) in entries.iter().enumerate() {
            let end = e.offset.checked_add(e.len).ok_or(CacheError::Overflow)?;
            if end > file_len {
                return Err(CacheError::IndexOutOfBounds {
                    entry: i,
                    offset: e.offset,
                    len: e.len,
                    file_len,
                });
            }
            if e.offset != expect_offset {
                return Err(CacheError::Corrupt(format!(
                    "frame {i} starts at {}, expected {expect_offset} (frames must tile the body)",
                    e.offset
                )));
            }
            if e.len < MIN_FRAME_LEN {
                return Err(CacheError::Corrupt(format!(
                    "frame {i} is {} bytes long, shorter than any zstd frame",
                    e.len
                )));
            }
            expect_offset = end;
            let c = (i / per_chunk) as u32;
            let slot = i % per_chunk;
            let ok_kind = match slot {
                0 => e.kind == FrameKind::Meta && e.layer == 0,
                s => e.kind == FrameKind::Layer && e.layer as usize == s - 1,
            };
            if !ok_kind || e.chunk != c {
                return Err(CacheError::Corrupt(format!(
                    "frame {i} is out of order (chunk {}, layer {})",
                    e.chunk, e.layer
                )));
            }
            if e.raw_len > MAX_FRAME_RAW {
                return Err(CacheError::Overflow);
            }
            // The size claim against the frame's own bytes (zstd's maximum
            // expansion), so reading it never allocates more than it can hold.
            let possible = e.len.saturating_mul(MAX_ZSTD_RATIO);
            if e.raw_len > possible {
                return Err(CacheError::Corrupt(format!(
                    "frame {i} claims {} decoded bytes from {} compressed bytes, more than zstd can produce ({possible})",
                    e.raw_len, e.len
                )));
            }
            if slot == 0 {
                if e.n_examples == 0 || e.n_examples > h.chunk_size {
                    return Err(CacheError::Corrupt(format!(
                        "chunk {c} holds {} examples",
                        e.n_examples
                    )));
                }
                let max_tokens = u64::from(e.n_examples) * u64::from(h.max_len);
                if e.n_tokens < u64::from(e.n_examples) || e.n_tokens > max_tokens {
                    return Err(CacheError::Corrupt(format!(
                        "chunk {c}: {} tokens for {} examples of at most {} tokens",
                        e.n_tokens, e.n_examples, h.max_len
                    )));
                }
                // 24 bytes per example plus token ids (4 B) and type ids (1 B)
                // per token, plus the ids, whose length has no limit (§3.1)
                let meta_min = e
                    .n_tokens
                    .saturating_mul(5)
                    .saturating_add(u64::from(e.n_examples) * 24);
                if e.raw_len < meta_min {
                    return Err(CacheError::Corrupt(format!(
                        "chunk {c}: a metadata frame of {} bytes cannot hold {} examples of {} tokens",
                        e.raw_len, e.n_examples, e.n_tokens
                    )));
                }
                chunks.push(ChunkEntry {
                    n_examples: e.n_examples,
                    n_tokens: e.n_tokens,
                    first_in_shard: examples,
                    meta: i,
                    layers: Vec::with_capacity(h.n_layers as usize),
                });
                examples += u64::from(e.n_examples);
                tokens = tokens.checked_add(e.n_tokens).ok_or(CacheError::Overflow)?;
            } else {
                let ch = chunks.last_mut().expect("slot 0 pushed the chunk");
                if e.n_examples != ch.n_examples || e.n_tokens != ch.n_tokens {
                    return Err(CacheError::Corrupt(format!(
                        "frame {i}: counts differ within chunk {c}"
                    )));
                }
                let want = h
                    .dtype
                    .raw_len(e.n_tokens, u64::from(h.hidden))
                    .ok_or(CacheError::Overflow)?;
                if e.raw_len != want {
                    return Err(CacheError::Corrupt(format!(
                        "frame {i}: raw length {} expected {want}",
                        e.raw_len
                    )));
                }
                ch.layers.push(i);
            }
        }
        if expect_offset != h.index_offset {
            return Err(CacheError::Corrupt(
                "frames do not reach the index (hole before the index)".into(),
            ));
        }
        if examples != h.n_examples || tokens != h.n_tokens {
            return Err(CacheError::Corrupt(format!(
                "chunks hold {examples} examples / {tokens} tokens, header says {} / {}",
                h.n_examples, h.n_tokens
            )));
        }
        Ok(chunks)
    }

    /// From now on, check every decoded split id against `bounds.splits` and
    /// every label id against `bounds.labels` (the manifest's `split_names`
    /// and `labels`; [`crate::cache::Cache::open`] sets them).
    pub fn set_meta_bounds(&mut self, bounds: MetaBounds) {
        self.bounds = Some(bounds);
    }

    /// Length of the shard file in bytes.
    pub fn file_len(&self) -> u64 {
        self.bytes.as_ref().len() as u64
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.entries.len()
    }

    fn frame_name(&self, i: usize) -> String {
        let e = &self.entries[i];
        match e.kind {
            FrameKind::Meta => format!("frame {i} (metadata, chunk {})", e.chunk),
            FrameKind::Layer => {
                format!("frame {i} (layer position {}, chunk {})", e.layer, e.chunk)
            }
        }
    }

    /// Borrow, CRC-check and decompress frame `i`.
    pub fn frame(&self, i: usize) -> Result<Vec<u8>, CacheError> {
        let e = self
            .entries
            .get(i)
            .ok_or_else(|| CacheError::Corrupt(format!("no frame {i}")))?;
        let bytes = &self.bytes.as_ref()[e.offset as usize..(e.offset + e.len) as usize];
        if crc32fast::hash(bytes) != e.crc {
            return Err(CacheError::ChecksumMismatch {
                what: self.frame_name(i),
            });
        }
        check_frame_size(bytes, e.raw_len, MAX_FRAME_RAW, &self.frame_name(i))?;
        let raw = zstd::bulk::decompress(bytes, e.raw_len as usize)
            .map_err(|err| CacheError::Corrupt(format!("{}: {err}", self.frame_name(i))))?;
        self.bytes.release(e.offset as usize, e.len as usize);
        if raw.len() as u64 != e.raw_len {
            return Err(CacheError::Corrupt(format!(
                "{}: decoded length differs from the index",
                self.frame_name(i)
            )));
        }
        Ok(raw)
    }

    /// Metadata of chunk `c`.
    pub fn chunk_meta(&self, c: usize) -> Result<Vec<ExampleMeta>, CacheError> {
        let ch = self
            .chunks
            .get(c)
            .ok_or_else(|| CacheError::Corrupt(format!("no chunk {c}")))?;
        let meta = decode_meta(&self.frame(ch.meta)?, ch.n_examples as usize)?;
        let tokens: u64 = meta.iter().map(|m| m.len() as u64).sum();
        if tokens != ch.n_tokens {
            return Err(CacheError::Corrupt(format!(
                "chunk {c}: metadata lengths sum to {tokens}, index says {}",
                ch.n_tokens
            )));
        }
        if let Some(m) = meta.iter().find(|m| m.len() > self.header.max_len as usize) {
            return Err(CacheError::Corrupt(format!(
                "example {} is longer than max_len",
                m.id
            )));
        }
        if let Some(b) = self.bounds {
            for m in &meta {
                let at = || format!("example {:?} at position {}, chunk {c}", m.id, m.position);
                if m.split as usize >= b.splits {
                    return Err(CacheError::ManifestMismatch {
                        field: "split_names".into(),
                        manifest: format!("{} split names", b.splits),
                        shard: format!("split id {} ({})", m.split, at()),
                    });
                }
                if let Some(l) = m.label.filter(|&l| l as usize >= b.labels) {
                    return Err(CacheError::ManifestMismatch {
                        field: "labels".into(),
                        manifest: format!("{} labels", b.labels),
                        shard: format!("label id {l} ({})", at()),
                    });
                }
            }
        }
        Ok(meta)
    }

    /// Stored layer `pos` of chunk `c` as f32, `tokens x hidden` row-major.
    pub fn chunk_layer(&self, c: usize, pos: usize) -> Result<Vec<f32>, CacheError> {
        let ch = self
            .chunks
            .get(c)
            .ok_or_else(|| CacheError::Corrupt(format!("no chunk {c}")))?;
        let &i = ch
            .layers
            .get(pos)
            .ok_or_else(|| CacheError::Corrupt(format!("no layer position {pos}")))?;
        let mut raw = self.frame(i)?;
        if self.header.shuffle {
            raw = unshuffle_payload(&raw, ch.n_tokens as usize, self.header.dtype)?;
        }
        let values = decode_values(
            &raw,
            ch.n_tokens as usize,
            self.header.hidden as usize,
            self.header.dtype,
        )?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(CacheError::Corrupt(format!(
                "{}: non-finite value at {bad}",
                self.frame_name(i)
            )));
        }
        Ok(values)
    }

    /// Decode every frame and check every checksum and invariant. Returns
    /// the number of frames checked.
    pub fn verify(&self) -> Result<usize, CacheError> {
        self.verify_each(|_| Ok(()))
    }

    /// [`ShardReader::verify`], handing every decoded example to `on_example`
    /// (in order) for the checks only the caller can make.
    pub fn verify_each(
        &self,
        mut on_example: impl FnMut(&ExampleMeta) -> Result<(), CacheError>,
    ) -> Result<usize, CacheError> {
        let mut expect_pos = self.header.first_example;
        for c in 0..self.chunks.len() {
            let meta = self.chunk_meta(c)?;
            for m in &meta {
                if m.position != expect_pos {
                    return Err(CacheError::Corrupt(format!(
                        "chunk {c}: example position {} where {expect_pos} was expected",
                        m.position
                    )));
                }
                on_example(m)?;
                expect_pos += 1;
            }
            for l in 0..self.chunks[c].layers.len() {
                self.chunk_layer(c, l)?;
            }
        }
        Ok(self.entries.len())
    }
}
