//! The crate's only `unsafe`: read-only memory maps of sealed cache files,
//! behind a safe [`MappedFile`] (tantivy's shape: private unsafe, public
//! safe API).
#![allow(unsafe_code)]

use std::path::Path;

use crate::{Error, Result};

/// A read-only memory map of a whole file (or nothing, for an empty file,
/// which cannot be mapped).
#[derive(Debug)]
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Map `path` read-only. Only a regular file is mapped
    /// ([`crate::fsutil::open_regular`]): a FIFO would block `open()` for
    /// ever and a device such as `/dev/zero` would map as something it is
    /// not; both are refused, naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::fsutil::open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Ok(MappedFile { map: None });
        }
        // SAFETY: cache files are write-once: sherl's writer creates them
        // under a temporary name, syncs them and renames them into place,
        // and never modifies, truncates or rewrites a sealed file (FORMAT.md
        // §7). The mapping is read-only. Another process editing or
        // truncating the file while it is mapped is documented as
        // unsupported (docs/architecture.md, FORMAT.md); it could raise SIGBUS but cannot
        // make safe Rust observe a data race through `&[u8]` under the
        // write-once rule.
        let map =
            unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        #[cfg(unix)]
        if let Err(e) = map.advise(memmap2::Advice::WillNeed) {
            tracing::debug!("madvise(WILLNEED) on {}: {e}", path.display());
        }
        Ok(MappedFile { map: Some(map) })
    }
}

/// Bytes a shard reader can read from. `release` tells the source that a
/// range has been consumed for now, so a memory map can drop those pages
/// from the process (they stay in the page cache and are faulted back in on
/// the next read). This keeps a training process's resident memory bounded
/// by what it decodes, not by how much of the cache it has touched.
pub trait ByteSource: AsRef<[u8]> {
    /// The range `offset..offset + len` was consumed.
    fn release(&self, _offset: usize, _len: usize) {}
}

impl ByteSource for Vec<u8> {}

impl ByteSource for MappedFile {
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let Some(map) = &self.map {
            if offset.checked_add(len).is_none_or(|end| end > map.len()) {
                return;
            }
            // SAFETY: the map is a read-only, shared, file-backed mapping of
            // a write-once file (see `open`). MADV_DONTNEED on such a mapping
            // only drops the resident pages; the next access faults the same
            // bytes back in from the file, so any `&[u8]` borrowed from the
            // map keeps reading identical contents.
            if let Err(e) = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            } {
                tracing::debug!("madvise(DONTNEED): {e}");
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        match &self.map {
            Some(m) => m,
            None => &[],
        }
    }
}
