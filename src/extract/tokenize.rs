//! Tokenization with the backbone's own `tokenizer.json` (Hugging Face
//! `tokenizers`), with padding switched off and truncation set by us.
//!
//! Some shipped `tokenizer.json` files turn on fixed padding (MiniLM's pads
//! every text to 128 tokens); sherl batches by length and pads per batch, so
//! padding is always disabled here.

use std::path::Path;

use tokenizers::{
    Tokenizer as HfTokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

/// Default maximum sequence length, special tokens included.
pub const DEFAULT_MAX_LEN: usize = 128;

pub use crate::batching::Encoded;

/// A tokenizer with padding off and truncation at `max_len`.
pub struct Tokenizer {
    inner: HfTokenizer,
    max_len: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl Tokenizer {
    /// Load `tokenizer.json`; `max_len` counts special tokens and must be >= 3
    /// (room for `[CLS]`, `[SEP]` and one token; pairs need one more).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer.json not found in the backbone directory",
                ),
            ));
        }
        let bytes = crate::fsutil::read_bounded(path, crate::backbone::TOKENIZER_FILE_LIMIT)?;
        let mut inner = HfTokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::configure(&mut inner, max_len)?;
        Ok(Tokenizer { inner, max_len })
    }

    fn configure(inner: &mut HfTokenizer, max_len: usize) -> Result<()> {
        if max_len < 4 {
            return Err(Error::setting(
                "--max-len",
                format!("--max-len {max_len} is too small (minimum 4)"),
            ));
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(())
    }

    /// The tokenizer as `tokenizer.json` text, with the padding (off) and
    /// truncation (at [`Self::max_len`]) it encodes with.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The truncation length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Encode one text, or a text pair, with special tokens, truncated.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoded> {
        let enc = match pair {
            None => self.inner.encode(text, true),
            Some(p) => self.inner.encode((text, p), true),
        }
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
