//! FORMAT.md §3, §4: frame kinds and the index entries that locate frames.

use super::header::{le_u32, le_u64};
use super::INDEX_ENTRY_LEN;
use crate::cache::error::CacheError;

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
