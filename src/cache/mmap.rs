//! The crate's only `unsafe`: read-only memory maps of sealed cache files,
//! behind a safe [`MappedFile`] (tantivy's shape: private unsafe, public
//! safe API).
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use crate::{Error, Result};

/// A read-only memory map of a whole file (or nothing, for an empty file,
/// which cannot be mapped).
#[derive(Debug)]
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Map `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Ok(MappedFile { map: None });
        }
        // SAFETY: cache files are write-once: sherl's writer creates them
        // under a temporary name, syncs them and renames them into place,
        // and never modifies, truncates or rewrites a sealed file (FORMAT.md
        // §7). The mapping is read-only. Another process editing or
        // truncating the file while it is mapped is documented as
        // unsupported (README, FORMAT.md); it could raise SIGBUS but cannot
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

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        match &self.map {
            Some(m) => m,
            None => &[],
        }
    }
}
