//! FORMAT.md §2: the fixed-size shard header, its encoding and its CRC.

use super::{Dtype, FORMAT_VERSION, HEADER_LEN, MAGIC, OLDEST_READABLE_VERSION};
use crate::cache::error::CacheError;

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

pub(super) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}
pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::format::SHARD_FORMAT_VERSION;

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
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(CacheError::UnsupportedVersion {
                found: 4,
                oldest: 1,
                newest: 3
            })
        ));
    }
}
