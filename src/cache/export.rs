//! `sherl-cache export`: a cache's examples as NumPy `.npy` files, so that
//! any framework (the PyTorch peer of `sherl-fit` in `benches/fit_torch.py`,
//! a notebook) can read them without sherl.
//!
//! The output directory holds, for `E` examples and `T` real tokens in all:
//!
//! | file | dtype | shape | contents |
//! | --- | --- | --- | --- |
//! | `hidden_states.{i}.npy` | `<f2` (f16 cache) or `<f4` | `[T, hidden]` | the real tokens of every example, concatenated in cache order; int8 and bf16 caches are decoded to f32 |
//! | `offsets.npy` | `<i8` | `[E + 1]` | example `k` is rows `offsets[k] .. offsets[k + 1]` |
//! | `labels.npy` | `<i8` | `[E]` | index into `meta.json`'s `labels`, -1 for none |
//! | `splits.npy` | `<i8` | `[E]` | index into `meta.json`'s `split_names` |
//! | `input_ids.npy` | `<i8` | `[T]` | token ids (text caches only: image examples have none) |
//! | `token_type_ids.npy` | `<i8` | `[T]` | segment ids (text caches only) |
//! | `meta.json` | | | labels, split names, layers, hidden, dtype, settings hash, chunk starts, ids |
//!
//! The `.npy` files are written here by hand (format version 1.0: magic,
//! version, a little-endian header length, the header dictionary padded
//! with spaces and a newline to a multiple of 64 bytes, then the raw
//! little-endian values). Everything is streamed chunk by chunk in one pass
//! over the cache (the sizes are known from the manifest), into a temporary
//! directory renamed to `--out` at the end; a failed export leaves nothing.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Cache, Dtype};
use crate::{Error, Result};

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    /// The output directory.
    pub out: PathBuf,
    /// Examples written.
    pub examples: u64,
    /// Real tokens written.
    pub tokens: u64,
    /// `hidden_states` indices written.
    pub layers: Vec<usize>,
    /// NumPy dtype of the hidden states (`float16` or `float32`).
    pub dtype: String,
    /// Bytes written, all files together.
    pub bytes: u64,
}

/// `meta.json` of an export.
#[derive(Debug, Clone, Serialize)]
struct ExportMeta<'a> {
    format: &'static str,
    examples: u64,
    tokens: u64,
    labels: &'a [String],
    split_names: &'a [String],
    layers: &'a [usize],
    hidden: usize,
    backbone_layers: usize,
    dtype: &'static str,
    cache_dtype: &'static str,
    max_len: usize,
    settings_hash: &'a str,
    chunk_size: u32,
    /// Cache position of each chunk's first example (the unit sherl-fit
    /// shuffles and subsets).
    chunk_starts: Vec<u64>,
    ids: Vec<String>,
}

/// Parse a `--layers` list: comma-separated indices and inclusive ranges
/// (`0-5,6`), or `all`.
pub fn parse_layer_list(s: &str) -> std::result::Result<Option<Vec<usize>>, String> {
    let s = s.trim();
    if s == "all" {
        return Ok(None);
    }
    let bad = || format!("--layers {s:?}: expected `all` or indices and ranges such as 0-5,6");
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(Some(out))
}

/// The `.npy` (format 1.0) header for a C-order array of `descr` (`<f2`,
/// `<f4`, `<i8`) and `shape`.
pub fn npy_header(descr: &str, shape: &[u64]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + length (2) + dict + '\n', a multiple of 64
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut h = Vec::with_capacity(10 + dict.len());
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

/// One `.npy` file being written; checks at the end that exactly the
/// announced number of values came.
struct NpyWriter {
    path: PathBuf,
    w: BufWriter<File>,
    expected: u64,
    written: u64,
    bytes: u64,
}

impl NpyWriter {
    #[expect(
        clippy::disallowed_methods,
        reason = "a streamed output inside the export's temporary directory, which is renamed to --out as a whole"
    )]
    fn create(path: PathBuf, descr: &str, shape: &[u64]) -> Result<Self> {
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let h = npy_header(descr, shape);
        w.write_all(&h).map_err(|e| Error::io(&path, e))?;
        Ok(NpyWriter {
            path,
            w,
            expected: shape.iter().product(),
            written: 0,
            bytes: h.len() as u64,
        })
    }

    fn put(&mut self, bytes: &[u8], values: usize) -> Result<()> {
        self.w
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += values as u64;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn i64s(&mut self, v: impl IntoIterator<Item = i64>) -> Result<()> {
        let mut buf = Vec::new();
        let mut n = 0;
        for x in v {
            buf.extend_from_slice(&x.to_le_bytes());
            n += 1;
        }
        self.put(&buf, n)
    }

    fn finish(mut self) -> Result<u64> {
        if self.written != self.expected {
            return Err(Error::io(
                &self.path,
                std::io::Error::other(format!(
                    "wrote {} values, the header announces {}",
                    self.written, self.expected
                )),
            ));
        }
        self.w.flush().map_err(|e| Error::io(&self.path, e))?;
        let f = self
            .w
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.bytes)
    }
}

/// Export `cache`'s examples (the stored layers `layers`, all when `None`)
/// to `out`, which must not exist or be an empty directory.
pub fn export(cache: &Cache, out: &Path, layers: Option<&[usize]>) -> Result<ExportSummary> {
    let m = cache.manifest();
    let refuse = |message: String| Error::setting("sherl-cache export", message);
    let layers: Vec<usize> = match layers {
        None => m.settings.layers.clone(),
        Some(l) => l.to_vec(),
    };
    let mut positions = Vec::with_capacity(layers.len());
    for &l in &layers {
        let p = cache.layer_position(l).ok_or_else(|| {
            refuse(format!(
                "--layers: the cache does not store hidden_states.{l} (it stores {:?})",
                m.settings.layers
            ))
        })?;
        if positions.contains(&p) {
            return Err(refuse(format!("--layers names hidden_states.{l} twice")));
        }
        positions.push(p);
    }
    // A symbolic link --out is followed, as merge does (see there).
    let given = out;
    let out = &super::merge::output_dir(out)?;
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(out, e)),
        Ok(md) if md.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
            if entries.next().is_some() {
                return Err(refuse(format!(
                    "--out {} exists and is not empty",
                    out.display()
                )));
            }
        }
        Ok(_) => {
            return Err(refuse(format!(
                "--out {} exists and is not a directory",
                out.display()
            )))
        }
    }
    let name = out
        .file_name()
        .ok_or_else(|| refuse(format!("--out {} has no directory name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    // An export killed before its rename leaves `.<out>.export.<pid>.tmp`.
    for stale in crate::fsutil::remove_stale_temporaries(&parent, &name.to_string_lossy())? {
        tracing::warn!(
            "removed {}, left by an earlier export that did not finish (its process is gone)",
            stale.display()
        );
    }
    let tmp = parent.join(format!(
        ".{}.export.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_all(cache, &tmp, &layers, &positions).and_then(|s| {
        // An empty --out directory is replaced by the export.
        if out.is_dir() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        crate::fsutil::sync_dir(&parent)?;
        Ok(s)
    });
    match result {
        Ok(mut s) => {
            s.out = given.to_path_buf();
            Ok(s)
        }
        Err(e) => {
            if tmp.exists() {
                if let Err(also) = std::fs::remove_dir_all(&tmp) {
                    tracing::warn!("could not remove {}: {also}", tmp.display());
                }
            }
            Err(e)
        }
    }
}

fn write_all(
    cache: &Cache,
    dir: &Path,
    layers: &[usize],
    positions: &[usize],
) -> Result<ExportSummary> {
    let m = cache.manifest();
    let (examples, tokens, hidden) = (m.examples, m.tokens, m.backbone.hidden);
    let half = m.settings.dtype == Dtype::F16;
    let (descr, dtype_name) = if half {
        ("<f2", "float16")
    } else {
        ("<f4", "float32")
    };
    let mut layer_files = layers
        .iter()
        .map(|l| {
            NpyWriter::create(
                dir.join(format!("hidden_states.{l}.npy")),
                descr,
                &[tokens, hidden as u64],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut offsets = NpyWriter::create(dir.join("offsets.npy"), "<i8", &[examples + 1])?;
    let mut labels = NpyWriter::create(dir.join("labels.npy"), "<i8", &[examples])?;
    let mut splits = NpyWriter::create(dir.join("splits.npy"), "<i8", &[examples])?;
    // Image examples carry no token ids (FORMAT.md §3.1.1).
    let (mut input_ids, mut type_ids) = if m.image.is_some() {
        (None, None)
    } else {
        (
            Some(NpyWriter::create(
                dir.join("input_ids.npy"),
                "<i8",
                &[tokens],
            )?),
            Some(NpyWriter::create(
                dir.join("token_type_ids.npy"),
                "<i8",
                &[tokens],
            )?),
        )
    };
    offsets.i64s([0])?;
    let mut ids = Vec::with_capacity(examples as usize);
    let mut row = 0i64;
    let mut buf = Vec::new();
    for c in 0..cache.chunks().len() {
        let chunk = cache.read_chunk(c, positions)?;
        for (values, f) in chunk.layers.iter().zip(layer_files.iter_mut()) {
            buf.clear();
            if half {
                for &x in values {
                    buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
            } else {
                for &x in values {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
            f.put(&buf, values.len())?;
        }
        offsets.i64s(chunk.meta.iter().map(|e| {
            row += e.len() as i64;
            row
        }))?;
        labels.i64s(chunk.meta.iter().map(|e| e.label.map_or(-1, i64::from)))?;
        splits.i64s(chunk.meta.iter().map(|e| i64::from(e.split)))?;
        if let (Some(input_ids), Some(type_ids)) = (input_ids.as_mut(), type_ids.as_mut()) {
            input_ids.i64s(
                chunk
                    .meta
                    .iter()
                    .flat_map(|e| e.ids.iter().map(|&t| i64::from(t))),
            )?;
            type_ids.i64s(
                chunk
                    .meta
                    .iter()
                    .flat_map(|e| e.type_ids.iter().map(|&t| i64::from(t))),
            )?;
        }
        ids.extend(chunk.meta.into_iter().map(|e| e.id));
    }
    let mut bytes = 0;
    for f in layer_files {
        bytes += f.finish()?;
    }
    for f in [
        Some(offsets),
        Some(labels),
        Some(splits),
        input_ids,
        type_ids,
    ]
    .into_iter()
    .flatten()
    {
        bytes += f.finish()?;
    }
    let meta = ExportMeta {
        format: "sherl-cache export 1",
        examples,
        tokens,
        labels: &m.labels,
        split_names: &m.split_names,
        layers,
        hidden,
        backbone_layers: m.backbone.num_layers,
        dtype: dtype_name,
        cache_dtype: m.settings.dtype.name(),
        max_len: m.settings.max_len,
        settings_hash: &m.settings_hash,
        chunk_size: m.settings.chunk_size,
        chunk_starts: cache.chunks().iter().map(|c| c.first_example).collect(),
        ids,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::io(dir, e.into()))?;
    let meta_path = dir.join("meta.json");
    crate::fsutil::write_atomic(&meta_path, &json)?;
    bytes += json.len() as u64;
    Ok(ExportSummary {
        out: dir.to_path_buf(),
        examples,
        tokens,
        layers: layers.to_vec(),
        dtype: dtype_name.into(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_to_64_and_parses() {
        for shape in [vec![7u64], vec![123_456, 384], vec![0]] {
            let h = npy_header("<f2", &shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            let len = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(10 + len, h.len());
            assert_eq!(*h.last().unwrap(), b'\n');
        }
        let h = npy_header("<i8", &[5]);
        let text = String::from_utf8_lossy(&h[10..]);
        assert!(text.starts_with("{'descr': '<i8', 'fortran_order': False, 'shape': (5,), }"));
    }

    #[test]
    fn layer_lists() {
        assert_eq!(parse_layer_list("all").unwrap(), None);
        assert_eq!(parse_layer_list("0-2,5").unwrap(), Some(vec![0, 1, 2, 5]));
        assert!(parse_layer_list("3-1").is_err());
        assert!(parse_layer_list("x").is_err());
    }
}
