//! Small filesystem helpers: atomic writes and hashing, with paths in errors.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Write `bytes` to `path` atomically: a temporary file in the same
/// directory is written, synced and renamed over `path`, so a reader (or a
/// memory map) never sees a half-written file and an existing file is never
/// truncated in place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_data().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        // Best effort: the error being returned is the one that matters.
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::debug!("could not remove {}: {e}", tmp.display());
        }
    }
    result
}

/// sha256 of a file's contents, lowercase hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::hash::hex(&h.finalize()))
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    crate::hash::sha256_hex(bytes)
}

/// fsync a directory so a rename inside it is durable (no-op off unix).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        f.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// sha256 of a file, or of a directory tree (sha256 over the sorted
/// `sha256  relative/path` lines of its files, as `sha256sum` prints them).
pub fn sha256_path(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let mut lines: Vec<String> = Vec::with_capacity(files.len());
    for f in &files {
        let rel = f.strip_prefix(path).unwrap_or(f);
        lines.push(format!("{}  ./{}\n", sha256_file(f)?, rel.display()));
    }
    lines.sort_by(|a, b| a[66..].cmp(&b[66..]));
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
    }
    Ok(crate::hash::hex(&h.finalize()))
}

/// An exclusive advisory lock on a directory, held through an open lock file
/// inside it (`flock`-style, through the standard library's `File::try_lock`).
/// The operating system releases it when the process ends, however it ends,
/// so a `kill -9` never leaves a stale lock behind and there is no pid to
/// check. The lock file itself stays: deleting it while another process
/// waits on it would let two processes hold "the" lock on different files.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl DirLock {
    /// Open (create) the lock file; its contents are never used.
    fn open(dir: &Path, name: &str) -> Result<(PathBuf, std::fs::File)> {
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok((path, file))
    }

    /// Take the lock `dir/name` (the directory must exist). `Ok(None)` when
    /// another process holds it.
    pub fn try_acquire(dir: &Path, name: &str) -> Result<Option<DirLock>> {
        let (path, file) = Self::open(dir, name)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DirLock { path, _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// Take the lock `dir/name`, waiting for its holder to release it.
    pub fn acquire(dir: &Path, name: &str) -> Result<DirLock> {
        let (path, file) = Self::open(dir, name)?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        Ok(DirLock { path, _file: file })
    }

    /// Whether another process holds `dir/name` right now (a directory or
    /// lock file that does not exist is not held). Only a hint: the holder
    /// may change the moment after.
    pub fn is_held(dir: &Path, name: &str) -> Result<bool> {
        if !dir.join(name).exists() {
            return Ok(false);
        }
        Ok(DirLock::try_acquire(dir, name)?.is_none())
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
