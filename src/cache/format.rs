//! Byte layout of a shard (`cache_schema/FORMAT.md`, normative): constants,
//! header and index encoding and decoding, and value codecs. No I/O here:
//! everything works on `&[u8]`, and every number read from disk is
//! bounds- and overflow-checked, so hostile bytes give a [`CacheError`],
//! never a panic.

use super::error::CacheError;

/// FORMAT.md §1: the 8 magic bytes every shard starts with.
pub const MAGIC: &[u8; 8] = b"SHRLCACH";
/// FORMAT.md §6: the format version this build writes (in `manifest.json`).
pub const FORMAT_VERSION: u32 = 2;
/// FORMAT.md §6: the oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// FORMAT.md §2, §6: the version written in shard headers, which names the
/// shard layout. Version 2 changed only the manifest, so shards are still
/// written as version 1 (byte-identical to a version 1 writer's) and this is
/// also the version folded into `settings_hash` (§5.1).
pub const SHARD_FORMAT_VERSION: u32 = 1;
/// FORMAT.md §2: header size in bytes.
pub const HEADER_LEN: usize = 96;
/// FORMAT.md §4: size of one index entry in bytes.
pub const INDEX_ENTRY_LEN: usize = 56;
/// Upper bound on the decoded index (sanity limit against hostile sizes).
pub const MAX_INDEX_RAW: u64 = 1 << 30;
/// Upper bound on one decoded frame (sanity limit against hostile sizes).
pub const MAX_FRAME_RAW: u64 = 1 << 34;
/// FORMAT.md §8.2: the smallest possible zstd frame (4-byte magic, 1-byte
/// frame header descriptor, 1-byte window descriptor or content size, one
/// 3-byte block header). Every frame, the index included, is at least this
/// long, so a body of `B` bytes holds at most `B / MIN_FRAME_LEN` frames.
pub const MIN_FRAME_LEN: u64 = 9;
/// FORMAT.md §8.2: the most a zstd frame can expand. A block regenerates at
/// most 128 KiB and costs at least 4 bytes (an RLE block: 3-byte header and
/// the repeated byte), so `len` compressed bytes never decode to more than
/// `len * MAX_ZSTD_RATIO` bytes. A larger size claim is a lie, refused before
/// anything is allocated for it.
pub const MAX_ZSTD_RATIO: u64 = 32_768;

/// FORMAT.md §8.2/§8.3: check the decoded size `raw_len` claimed for the zstd
/// frame `frame` before allocating for it: at most `limit`, possible for
/// `frame.len()` compressed bytes, and equal to the content size the frame
/// header records (when it records one). `what` names the frame in errors.
pub fn check_frame_size(
    frame: &[u8],
    raw_len: u64,
    limit: u64,
    what: &str,
) -> Result<(), CacheError> {
    if raw_len > limit {
        return Err(CacheError::Corrupt(format!(
            "{what} claims {raw_len} decoded bytes, more than the {limit} a shard may hold"
        )));
    }
    let possible = (frame.len() as u64).saturating_mul(MAX_ZSTD_RATIO);
    if raw_len > possible {
        return Err(CacheError::Corrupt(format!(
            "{what} claims {raw_len} decoded bytes from {} compressed bytes, more than zstd can produce ({possible})",
            frame.len()
        )));
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n != raw_len => Err(CacheError::Corrupt(format!(
            "{what}: the index says {raw_len} decoded bytes, the zstd frame header says {n}"
        ))),
        Ok(_) => Ok(()),
        Err(_) => Err(CacheError::Corrupt(format!("{what}: not a zstd frame"))),
    }
}

/// FORMAT.md §3: how hidden-state values are stored.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE half precision.
    F16,
    /// bfloat16 (truncated f32 exponent range, 8-bit mantissa), rounded to nearest even.
    Bf16,
    /// IEEE single precision (lossless).
    F32,
    /// Symmetric int8 with one f32 scale per token (max |x| / 127).
    Int8,
}

impl Dtype {
    /// Code stored in the header.
    pub fn code(self) -> u8 {
        match self {
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
            Dtype::F32 => 3,
            Dtype::Int8 => 4,
        }
    }

    /// Inverse of [`Dtype::code`].
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Dtype::F16,
            2 => Dtype::Bf16,
            3 => Dtype::F32,
            4 => Dtype::Int8,
            _ => return None,
        })
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::Int8 => "int8",
        }
    }

    /// Bytes per value, excluding int8's per-token scale.
    pub fn value_bytes(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Int8 => 1,
        }
    }

    /// Raw (uncompressed) bytes of `tokens` rows of width `hidden`.
    pub fn raw_len(self, tokens: u64, hidden: u64) -> Option<u64> {
        let values = tokens
            .checked_mul(hidden)?
            .checked_mul(self.value_bytes() as u64)?;
        match self {
            Dtype::Int8 => values.checked_add(tokens.checked_mul(4)?),
            _ => Some(values),
        }
    }
}

/// FORMAT.md §2: the fixed-size shard header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version of the shard.
    pub format_version: u32,
    /// Shard number (file `shard-NNNNN.shrd`).
    pub shard_index: u32,
    /// Value encoding.
    pub dtype: Dtype,
    /// Whether value bytes are split into byte planes before compression.
    pub shuffle: bool,
    /// Number of stored layers.
    pub n_layers: u32,
    /// Hidden width.
    pub hidden: u32,
    /// Maximum tokens per example.
    pub max_len: u32,
    /// Examples per chunk (the last chunk may hold fewer).
    pub chunk_size: u32,
    /// Examples in this shard.
    pub n_examples: u64,
    /// Global position of the shard's first example in the cache.
    pub first_example: u64,
    /// Total real tokens in this shard.
    pub n_tokens: u64,
    /// First 8 bytes of the settings hash (manifest `settings_hash`).
    pub settings_hash: u64,
    /// Byte offset of the index frame.
    pub index_offset: u64,
    /// Byte length of the (compressed) index frame.
    pub index_len: u64,
    /// Number of index entries.
    pub index_entries: u32,
    /// CRC-32 of the index frame's bytes.
    pub index_crc: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

impl Header {
    /// Serialize to exactly [`HEADER_LEN`] bytes (CRC included).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.shard_index.to_le_bytes());
        b[20] = self.dtype.code();
        b[21] = u8::from(self.shuffle);
        // 22..24 reserved, zero
        b[24..28].copy_from_slice(&self.n_layers.to_le_bytes());
        b[28..32].copy_from_slice(&self.hidden.to_le_bytes());
        b[32..36].copy_from_slice(&self.max_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.n_examples.to_le_bytes());
        b[48..56].copy_from_slice(&self.first_example.to_le_bytes());
        b[56..64].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[64..72].copy_from_slice(&self.settings_hash.to_le_bytes());
        b[72..80].copy_from_slice(&self.index_offset.to_le_bytes());
        b[80..88].copy_from_slice(&self.index_len.to_le_bytes());
        b[88..92].copy_from_slice(&self.index_entries.to_le_bytes());
        // The header CRC covers bytes 0..92 with the index CRC folded in.
        let crc = header_crc(&b[0..92], self.index_crc);
        b[92..96].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check the header at the start of `file` (whole shard bytes).
    pub fn decode(file: &[u8]) -> Result<(Header, u32), CacheError> {
        if file.len() < 8 || &file[0..8] != MAGIC {
            return Err(CacheError::BadMagic);
        }
        if file.len() < 16 {
            return Err(CacheError::TruncatedHeader {
                len: file.len() as u64,
            });
        }
        let version = le_u32(file, 8);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(CacheError::UnsupportedVersion {
                found: version,
                oldest: OLDEST_READABLE_VERSION,
                newest: FORMAT_VERSION,
            });
        }
        if file.len() < HEADER_LEN {
            return Err(CacheError::TruncatedHeader {
                len: file.len() as u64,
            });
        }
        let b = &file[..HEADER_LEN];
        let header_len = le_u32(b, 12);
        if header_len as usize != HEADER_LEN {
            return Err(CacheError::Corrupt(format!(
                "header length {header_len}, expected {HEADER_LEN}"
            )));
        }
        let stored_crc = le_u32(b, 92);
        Ok((
            Header {
                format_version: version,
                shard_index: le_u32(b, 16),
                dtype: Dtype::from_code(b[20])
                    .ok_or_else(|| CacheError::Corrupt(format!("unknown dtype code {}", b[20])))?,
                shuffle: match b[21] {
                    0 => false,
                    1 => true,
                    x => return Err(CacheError::Corrupt(format!("shuffle flag {x}"))),
                },
                n_layers: le_u32(b, 24),
                hidden: le_u32(b, 28),
                max_len: le_u32(b, 32),
                chunk_size: le_u32(b, 36),
                n_examples: le_u64(b, 40),
                first_example: le_u64(b, 48),
                n_tokens: le_u64(b, 56),
                settings_hash: le_u64(b, 64),
                index_offset: le_u64(b, 72),
                index_len: le_u64(b, 80),
                index_entries: le_u32(b, 88),
                index_crc: 0, // filled by the caller once the index is read
            },
            stored_crc,
        ))
    }
}

/// CRC-32 of the header bytes 0..92 followed by the index CRC.
pub fn header_crc(header_prefix: &[u8], index_crc: u32) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_prefix);
    h.update(&index_crc.to_le_bytes());
    h.finalize()
}

/// FORMAT.md §3: what a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Per-example metadata of one chunk.
    Meta,
    /// One stored layer of one chunk.
    Layer,
}

impl FrameKind {
    fn code(self) -> u32 {
        match self {
            FrameKind::Meta => 1,
            FrameKind::Layer => 2,
        }
    }
}

/// FORMAT.md §4: one index entry, locating one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Frame kind.
    pub kind: FrameKind,
    /// Position of the layer in the manifest's `layers` list (0 for Meta).
    pub layer: u32,
    /// Chunk number within the shard.
    pub chunk: u32,
    /// Examples in the chunk.
    pub n_examples: u32,
    /// Real tokens in the chunk.
    pub n_tokens: u64,
    /// Byte offset of the frame in the shard.
    pub offset: u64,
    /// Frame length in bytes (compressed).
    pub len: u64,
    /// Decompressed length in bytes.
    pub raw_len: u64,
    /// CRC-32 of the frame's (compressed) bytes.
    pub crc: u32,
}

impl IndexEntry {
    /// Append the entry's [`INDEX_ENTRY_LEN`] bytes.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.kind.code().to_le_bytes());
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&self.n_examples.to_le_bytes());
        out.extend_from_slice(&self.n_tokens.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }

    /// Decode entry `i` of a decoded index.
    pub fn decode(raw: &[u8], i: usize) -> Result<Self, CacheError> {
        let at = i
            .checked_mul(INDEX_ENTRY_LEN)
            .filter(|a| a + INDEX_ENTRY_LEN <= raw.len())
            .ok_or(CacheError::Overflow)?;
        let b = &raw[at..at + INDEX_ENTRY_LEN];
        let kind = match le_u32(b, 0) {
            1 => FrameKind::Meta,
            2 => FrameKind::Layer,
            k => {
                return Err(CacheError::Corrupt(format!(
                    "index entry {i}: unknown frame kind {k}"
                )))
            }
        };
        Ok(IndexEntry {
            kind,
            layer: le_u32(b, 4),
            chunk: le_u32(b, 8),
            n_examples: le_u32(b, 12),
            n_tokens: le_u64(b, 16),
            offset: le_u64(b, 24),
            len: le_u64(b, 32),
            raw_len: le_u64(b, 40),
            crc: le_u32(b, 48),
        })
    }
}

/// Split `bytes` into `width` byte planes (all first bytes, then all second
/// bytes, ...): the Blosc/HDF5 shuffle filter. `bytes.len()` must be a
/// multiple of `width`.
pub fn shuffle_bytes(bytes: &[u8], width: usize) -> Vec<u8> {
    let n = bytes.len() / width;
    let mut out = vec![0u8; bytes.len()];
    for (i, v) in bytes.chunks_exact(width).enumerate() {
        for (p, &b) in v.iter().enumerate() {
            out[p * n + i] = b;
        }
    }
    out
}

/// Inverse of [`shuffle_bytes`].
pub fn unshuffle_bytes(planes: &[u8], width: usize) -> Vec<u8> {
    let n = planes.len() / width;
    let mut out = vec![0u8; planes.len()];
    for p in 0..width {
        for i in 0..n {
            out[i * width + p] = planes[p * n + i];
        }
    }
    out
}

/// Encode `tokens x hidden` f32 values (row-major) in `dtype` (FORMAT.md §3.2).
pub fn encode_values(values: &[f32], hidden: usize, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::Bf16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::Int8 => {
            let tokens = values.len() / hidden.max(1);
            let mut scales = Vec::with_capacity(tokens * 4);
            let mut q = Vec::with_capacity(values.len());
            for row in values.chunks_exact(hidden) {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 && max.is_finite() {
                    max / 127.0
                } else {
                    0.0
                };
                scales.extend_from_slice(&scale.to_le_bytes());
                for v in row {
                    let x = if scale > 0.0 {
                        (v / scale).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    q.push(x as i8 as u8);
                }
            }
            scales.extend_from_slice(&q);
            scales
        }
    }
}

/// Decode values written by [`encode_values`] into f32.
pub fn decode_values(
    raw: &[u8],
    tokens: usize,
    hidden: usize,
    dtype: Dtype,
) -> Result<Vec<f32>, CacheError> {
    let expect = dtype
        .raw_len(tokens as u64, hidden as u64)
        .ok_or(CacheError::Overflow)?;
    if raw.len() as u64 != expect {
        return Err(CacheError::Corrupt(format!(
            "layer frame holds {} bytes, expected {expect} for {tokens} tokens x {hidden} ({})",
            raw.len(),
            dtype.name()
        )));
    }
    Ok(match dtype {
        Dtype::F32 => crate::le::f32s(raw),
        Dtype::F16 => crate::le::f16s(raw),
        Dtype::Bf16 => crate::le::bf16s(raw),
        Dtype::Int8 => {
            let (scales, q) = raw.split_at(tokens * 4);
            let mut out = Vec::with_capacity(tokens * hidden);
            for (t, s) in scales.chunks_exact(4).enumerate() {
                let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                out.extend(
                    q[t * hidden..(t + 1) * hidden]
                        .iter()
                        .map(|&b| f32::from(b as i8) * s),
                );
            }
            out
        }
    })
}

/// Width in bytes of the planes the shuffle filter uses for `dtype` (1 = no
/// shuffle: int8 values are single bytes).
pub fn shuffle_width(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F16 | Dtype::Bf16 => 2,
        Dtype::F32 => 4,
        Dtype::Int8 => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_crc() {
        let h = Header {
            format_version: SHARD_FORMAT_VERSION,
            shard_index: 3,
            dtype: Dtype::Int8,
            shuffle: true,
            n_layers: 6,
            hidden: 384,
            max_len: 128,
            chunk_size: 64,
            n_examples: 1000,
            first_example: 3000,
            n_tokens: 31000,
            settings_hash: 0xdead_beef_0123_4567,
            index_offset: 12345,
            index_len: 678,
            index_entries: 112,
            index_crc: 0xabcdef01,
        };
        let b = h.encode();
        let (mut d, crc) = Header::decode(&b).unwrap();
        assert_eq!(crc, header_crc(&b[..92], h.index_crc));
        d.index_crc = h.index_crc;
        assert_eq!(d, h);
    }

    #[test]
    fn header_errors() {
        assert!(matches!(
            Header::decode(b"NOTACACHE"),
            Err(CacheError::BadMagic)
        ));
        let mut b = Header {
            format_version: SHARD_FORMAT_VERSION,
            shard_index: 0,
            dtype: Dtype::F16,
            shuffle: false,
            n_layers: 1,
            hidden: 8,
            max_len: 8,
            chunk_size: 4,
            n_examples: 1,
            first_example: 0,
            n_tokens: 1,
            settings_hash: 0,
            index_offset: 96,
            index_len: 0,
            index_entries: 0,
            index_crc: 0,
        }
        .encode();
        assert!(matches!(
            Header::decode(&b[..50]),
            Err(CacheError::TruncatedHeader { len: 50 })
        ));
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(CacheError::UnsupportedVersion {
                found: 3,
                oldest: 1,
                newest: 2
            })
        ));
    }

    #[test]
    fn shuffle_is_invertible() {
        let v: Vec<u8> = (0..=255).collect();
        for w in [1, 2, 4] {
            let s = shuffle_bytes(&v, w);
            assert_eq!(unshuffle_bytes(&s, w), v);
        }
        assert_eq!(shuffle_bytes(&[1, 2, 3, 4], 2), vec![1, 3, 2, 4]);
    }

    #[test]
    fn int8_bound_holds() {
        let vals: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let enc = encode_values(&vals, 16, Dtype::Int8);
        let dec = decode_values(&enc, 4, 16, Dtype::Int8).unwrap();
        for (row_v, row_d) in vals.chunks(16).zip(dec.chunks(16)) {
            let max = row_v.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in row_v.iter().zip(row_d) {
                assert!((a - b).abs() <= max / 254.0 + 1e-6, "{a} vs {b}");
            }
        }
        // zero rows stay zero
        let z = encode_values(&[0.0; 8], 8, Dtype::Int8);
        assert_eq!(decode_values(&z, 1, 8, Dtype::Int8).unwrap(), vec![0.0; 8]);
    }

    #[test]
    fn decode_rejects_wrong_sizes() {
        assert!(decode_values(&[0u8; 10], 2, 4, Dtype::F16).is_err());
    }
}
