//! FORMAT.md §3.1: the metadata frame of a chunk (per example: position,
//! split, label, token ids, segment ids), and §3.1.1: the image record of
//! an image shard (position, split, label, token count, id, image digest;
//! no token ids).

use crate::cache::error::CacheError;

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
    /// Set for an example of an image cache (FORMAT.md §3.1.1): its token
    /// count and image digest; `ids` and `type_ids` are then empty.
    pub image: Option<ImageMeta>,
}

/// What an image example records instead of token ids (FORMAT.md §3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageMeta {
    /// Tokens the backbone produced for it (CLS and patch tokens, after
    /// `--patch-pool`).
    pub tokens: u32,
    /// sha256 of the decoded image ([`crate::data::image::Image::digest`]).
    pub digest: [u8; 32],
}

impl ExampleMeta {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        match &self.image {
            Some(m) => m.tokens as usize,
            None => self.ids.len(),
        }
    }

    /// Whether the example has no tokens (never true in a valid cache).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const NO_LABEL: u32 = u32::MAX;

/// Encode a chunk's metadata frame payload: the text record (§3.1) of an
/// example without [`ExampleMeta::image`], the image record (§3.1.1) of
/// one with it. A shard holds one kind only (the writer checks).
pub fn encode_meta(examples: &[ExampleMeta]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in examples {
        out.extend_from_slice(&e.position.to_le_bytes());
        out.extend_from_slice(&e.split.to_le_bytes());
        out.extend_from_slice(&e.label.unwrap_or(NO_LABEL).to_le_bytes());
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(&(e.id.len() as u32).to_le_bytes());
        out.extend_from_slice(e.id.as_bytes());
        match &e.image {
            Some(m) => out.extend_from_slice(&m.digest),
            None => {
                for id in &e.ids {
                    out.extend_from_slice(&id.to_le_bytes());
                }
                out.extend_from_slice(&e.type_ids);
            }
        }
    }
    out
}

/// Decode a metadata frame payload holding `n` examples: text records
/// (§3.1), or image records (§3.1.1) when `image` (a shard of the image
/// layout, header version 3).
pub fn decode_meta(raw: &[u8], n: usize, image: bool) -> Result<Vec<ExampleMeta>, CacheError> {
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
        if len == 0 {
            return Err(CacheError::Corrupt(format!("example {id} has no tokens")));
        }
        let (ids, type_ids, image) = if image {
            let digest: [u8; 32] = take(&mut at, 32)?.try_into().expect("32 bytes");
            let tokens = u32::try_from(len).map_err(|_| CacheError::Overflow)?;
            (Vec::new(), Vec::new(), Some(ImageMeta { tokens, digest }))
        } else {
            let ids = take(&mut at, len.checked_mul(4).ok_or(CacheError::Overflow)?)?
                .chunks_exact(4)
                .map(u32_at)
                .collect();
            (ids, take(&mut at, len)?.to_vec(), None)
        };
        out.push(ExampleMeta {
            position,
            id,
            split,
            label: (label != NO_LABEL).then_some(label),
            ids,
            type_ids,
            image,
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
