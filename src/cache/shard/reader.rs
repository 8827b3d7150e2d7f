//! Reading one shard from any byte source: the header, index and layout
//! checks of FORMAT.md §8.2 before anything is allocated, then frames
//! CRC-checked and decoded on demand.

use crate::cache::error::CacheError;
use crate::cache::format::values::{unshuffle_payload, LayerValues, Planes16};
use crate::cache::format::{
    check_frame_size, decode_meta, decode_values, header_crc, ExampleMeta, FrameKind, Header,
    IndexEntry, HEADER_LEN, IMAGE_SHARD_FORMAT_VERSION, INDEX_ENTRY_LEN, MAX_FRAME_RAW,
    MAX_INDEX_RAW, MAX_ZSTD_RATIO, MIN_FRAME_LEN,
};
use crate::cache::mmap::ByteSource;
use crate::cache::Dtype;

thread_local! {
    /// This thread's zstd decompression context, made on first use: making
    /// one per frame (`zstd::bulk::decompress`) took 0.6 % of a UniPT
    /// training profile, about a third of the decompression's own time,
    /// for frames of a few hundred kilobytes.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompress one zstd frame of at most `capacity` bytes with this thread's
/// context.
fn decompress(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let dctx = match d.as_mut() {
            Some(dctx) => dctx,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        dctx.decompress(frame, capacity)
    })
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
        let raw = decompress(index, raw_len as usize)
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
                // per token, plus the ids, whose length has no limit (§3.1);
                // an image record has a 32-byte digest instead (§3.1.1)
                let meta_min = if h.format_version == IMAGE_SHARD_FORMAT_VERSION {
                    u64::from(e.n_examples) * (24 + 32)
                } else {
                    e.n_tokens
                        .saturating_mul(5)
                        .saturating_add(u64::from(e.n_examples) * 24)
                };
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
        let raw = decompress(bytes, e.raw_len as usize)
            .map_err(|err| CacheError::Corrupt(format!("{}: {err}", self.frame_name(i))))?;
        if raw.len() as u64 != e.raw_len {
            return Err(CacheError::Corrupt(format!(
                "{}: decoded length differs from the index",
                self.frame_name(i)
            )));
        }
        Ok(raw)
    }

    /// Tell the byte source that chunk `c` has been read: its whole span,
    /// the frames this reader did not decode included. This is where pages
    /// are released ([`crate::cache::Cache::read_chunk_values`] and
    /// [`ShardReader::verify_each`] call it after each chunk), not per
    /// frame: a memory map's page faults also map neighbouring pages that
    /// are already in the page cache (the kernel's fault-around), so pages
    /// of frames nobody reads (layers a method does not need) would
    /// otherwise stay resident and the process's resident memory would grow
    /// with every epoch.
    pub fn release_chunk(&self, c: usize) {
        let Some(ch) = self.chunks.get(c) else {
            return;
        };
        let frames = std::iter::once(ch.meta).chain(ch.layers.iter().copied());
        let (mut start, mut end) = (u64::MAX, 0u64);
        for e in frames.filter_map(|i| self.entries.get(i)) {
            start = start.min(e.offset);
            end = end.max(e.offset + e.len);
        }
        if start < end {
            self.bytes.release(start as usize, (end - start) as usize);
        }
    }

    /// Metadata of chunk `c`.
    pub fn chunk_meta(&self, c: usize) -> Result<Vec<ExampleMeta>, CacheError> {
        let ch = self
            .chunks
            .get(c)
            .ok_or_else(|| CacheError::Corrupt(format!("no chunk {c}")))?;
        let image = self.header.format_version == IMAGE_SHARD_FORMAT_VERSION;
        let meta = decode_meta(&self.frame(ch.meta)?, ch.n_examples as usize, image)?;
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
        Ok(self.chunk_layer_values(c, pos)?.into_f32())
    }

    /// Stored layer `pos` of chunk `c`, CRC-checked, decompressed and
    /// checked (every value finite), shuffled 16-bit frames left in their
    /// stored form ([`LayerValues`]).
    pub fn chunk_layer_values(&self, c: usize, pos: usize) -> Result<LayerValues, CacheError> {
        let ch = self
            .chunks
            .get(c)
            .ok_or_else(|| CacheError::Corrupt(format!("no chunk {c}")))?;
        let &i = ch
            .layers
            .get(pos)
            .ok_or_else(|| CacheError::Corrupt(format!("no layer position {pos}")))?;
        let mut raw = self.frame(i)?;
        let non_finite = |bad: usize| {
            CacheError::Corrupt(format!("{}: non-finite value at {bad}", self.frame_name(i)))
        };
        if self.header.shuffle && matches!(self.header.dtype, Dtype::F16 | Dtype::Bf16) {
            return Planes16::new(
                raw,
                ch.n_tokens as usize,
                self.header.hidden as usize,
                self.header.dtype,
            )?
            .map(LayerValues::Planes16)
            .map_err(non_finite);
        }
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
            return Err(non_finite(bad));
        }
        Ok(LayerValues::F32(values))
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
                self.chunk_layer_values(c, l)?;
            }
            self.release_chunk(c);
        }
        Ok(self.entries.len())
    }
}
