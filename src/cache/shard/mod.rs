//! One shard: writing it ([`writer`]: streamed to a temporary file, sealed
//! by rename) and reading it ([`reader`]: from any byte source, a memory map
//! or a `Vec<u8>`).
//!
//! A shard holds consecutive examples of the cache, grouped in chunks of
//! `chunk_size` examples. Each chunk has one Meta frame and one Layer frame
//! per stored layer (FORMAT.md §3), so a reader fetches one layer of one
//! chunk without touching the rest.

pub mod reader;
pub mod writer;

pub use super::format::{decode_meta, encode_meta, ExampleMeta, ImageMeta};
pub use reader::{ChunkEntry, MetaBounds, ShardReader};
pub use writer::{compress_chunk, CompressedChunk, SealedShard, ShardSpec, ShardWriter};
