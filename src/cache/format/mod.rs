//! Byte layout of a shard (`cache_schema/FORMAT.md`, normative): constants
//! and size checks here, the header ([`header`]), the index ([`index`]), the
//! metadata frames ([`meta`]) and the value codecs ([`values`]) in their own
//! files. No I/O here: everything works on `&[u8]`, and every number read
//! from disk is bounds- and overflow-checked, so hostile bytes give a
//! [`CacheError`], never a panic.

pub mod header;
pub mod index;
pub mod meta;
pub mod values;

pub use header::{header_crc, Header};
pub use index::{FrameKind, IndexEntry};
pub use meta::{decode_meta, encode_meta, ExampleMeta, ImageMeta};
pub use values::{decode_values, encode_values, shuffle_bytes, shuffle_width, unshuffle_bytes};

use super::error::CacheError;

/// FORMAT.md §1: the 8 magic bytes every shard starts with.
pub const MAGIC: &[u8; 8] = b"SHRLCACH";
/// FORMAT.md §6: the format version this build writes (in `manifest.json`).
pub const FORMAT_VERSION: u32 = 3;
/// FORMAT.md §6: the oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// FORMAT.md §2, §6: the version written in the headers of text shards,
/// which names the shard layout. Versions 2 and 3 did not change the text
/// layout, so text shards are still written as version 1 (byte-identical to
/// a version 1 writer's) and this is also the version folded into
/// `settings_hash` (§5.1).
pub const SHARD_FORMAT_VERSION: u32 = 1;
/// FORMAT.md §3.1.1, §6: the version in the headers of image shards, whose
/// Meta frames hold image records (no token ids). Introduced in version 3.
pub const IMAGE_SHARD_FORMAT_VERSION: u32 = 3;
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
