//! Small filesystem helpers, with paths in errors: the one way the library
//! opens an input file ([`open_regular`], [`read_bounded`], [`read_text`],
//! [`read_json`]: regular files only, never a FIFO, device or directory,
//! and never more than a stated number of bytes), the one way it writes an
//! output ([`write_atomic`] and [`AtomicFile`]: a temporary file in the same
//! directory, synced, renamed over the final name), hashing and locks.
//!
//! `clippy.toml` forbids `std::fs::File::open`, `std::fs::read*`,
//! `std::fs::write` and `File::create` elsewhere in the library, so a new
//! reader cannot bypass these rules; the few places that must (memory maps
//! of shards, dataset streams, streamed shard writers) say why with an
//! `#[expect]`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Size bound of the small JSON and text files sherl reads whole: run
/// `config.json` and `summary.json`, grids, `--config` files, preprocessing
/// and backbone descriptions, label lists. Far above any real one (a run's
/// `summary.json` is a few kilobytes), far below what would hurt.
pub const SMALL_FILE_LIMIT: u64 = 64 << 20;

/// Size bound of the larger metadata sherl reads whole: cache manifests
/// (one entry per shard) and a run's `metrics.jsonl` (one line per epoch
/// and evaluation).
pub const METADATA_LIMIT: u64 = 1 << 30;

fn invalid(path: &Path, message: String) -> Error {
    Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    )
}

/// What kind of thing `meta` describes, for messages.
pub fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    if t.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if t.is_file() {
        return "a regular file";
    }
    "not a regular file"
}

/// Open `path` for reading, refusing anything but a regular file (after
/// following symbolic links): a FIFO would block in `open()` for ever, a
/// device such as `/dev/zero` never ends, a directory is a mistake. The
/// file is opened without blocking (`O_NONBLOCK`, which regular files
/// ignore) and checked through the open handle, so a FIFO put in its place
/// after a check cannot hang the caller either.
#[expect(
    clippy::disallowed_methods,
    reason = "the one place input files are opened"
)]
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(invalid(
            path,
            format!(
                "{}, not a regular file; refusing to read it",
                file_kind(&meta)
            ),
        ));
    }
    Ok(file)
}

/// Read a whole regular file of at most `limit` bytes (see
/// [`open_regular`]); a larger one, or one that grows past `limit` while
/// being read, is refused with its size and the bound.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_large = |n: u64| {
        invalid(
            path,
            format!(
                "{n} bytes or more, larger than the {limit} bytes sherl reads from a file of this kind; \
                 is it the right file?"
            ),
        )
    };
    if len > limit {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text; invalid UTF-8 is an error naming the
/// file and the byte offset.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    let bytes = read_bounded(path, limit)?;
    String::from_utf8(bytes).map_err(|e| {
        invalid(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Parse a small JSON file ([`SMALL_FILE_LIMIT`]) into `T`; errors name the
/// file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    read_json_limited(path, SMALL_FILE_LIMIT)
}

/// [`read_json`] with an explicit size bound.
pub fn read_json_limited<T: serde::de::DeserializeOwned>(path: &Path, limit: u64) -> Result<T> {
    let bytes = read_bounded(path, limit)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The directory a file named `path` lives in (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An output file written under a temporary name in its final directory
/// and renamed over the final name by [`AtomicFile::commit`], after an
/// fsync: a process killed before then leaves the final name as it was
/// (absent, or the previous complete file), never a cut one. Dropping it
/// uncommitted removes the temporary file. Temporary names are
/// `.<name>.<pid>.tmp`, so a leftover of a killed process is recognisable
/// (see [`remove_stale_temporaries`]).
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Start writing `path` (its directory must exist).
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place output files are created"
    )]
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let dir = parent_dir(path);
        let name = path
            .file_name()
            .ok_or_else(|| invalid(path, "not a file path".to_owned()))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    /// The final name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flush, fsync and rename over the final name, then fsync the
    /// directory so the rename survives a power cut.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.file.take().expect("committed once");
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_data().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Err(e) = sync_dir(&parent_dir(&self.path)) {
            tracing::debug!("{e}");
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            if let Err(e) = std::fs::remove_file(&self.tmp) {
                tracing::debug!("could not remove {}: {e}", self.tmp.display());
            }
        }
    }
}

/// Whether process `pid` is alive on this machine (unix; elsewhere every
/// process is assumed alive, so nothing is removed).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

/// Remove the temporaries `.<name>.<pid>.tmp` (and `.<name>.<tag>.<pid>.tmp`)
/// in `dir` that processes which no longer run left behind, for the output
/// named `name`; returns what was removed. Temporaries of live processes
/// are left alone.
pub fn remove_stale_temporaries(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!(".{name}.");
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let file_name = entry.file_name();
        let Some(n) = file_name.to_str() else {
            continue;
        };
        let Some(rest) = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else {
            continue;
        };
        let Some(pid) = rest.rsplit('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Write `bytes` to `path` atomically: a temporary file in the same
/// directory is written, synced and renamed over `path`, so a reader (or a
/// memory map) never sees a half-written file and an existing file is never
/// truncated in place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(|e| Error::io(&file.tmp, e))?;
    file.commit()
}

/// sha256 of a file's contents, lowercase hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = open_regular(path)?;
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
        #[expect(clippy::disallowed_methods, reason = "opens a directory to fsync it")]
        let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        f.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// sha256 of a file, or of a directory tree (sha256 over the sorted
/// `sha256  relative/path` lines of its files, as `sha256sum` prints them).
/// Symbolic links to files are followed; a link to a directory (which may
/// loop), a FIFO or a device in the tree is refused, naming it.
pub fn sha256_path(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let e = e.map_err(|e| Error::io(&d, e))?;
            let p = e.path();
            let t = e.file_type().map_err(|err| Error::io(&p, err))?;
            if t.is_dir() {
                stack.push(p);
                continue;
            }
            let meta = std::fs::metadata(&p).map_err(|err| Error::io(&p, err))?;
            if !meta.is_file() {
                return Err(invalid(
                    &p,
                    format!(
                        "{}{} inside {}; only regular files can be hashed",
                        if t.is_symlink() { "a link to " } else { "" },
                        file_kind(&meta),
                        path.display()
                    ),
                ));
            }
            files.push(p);
        }
    }
    sha256_listing(path, files.iter().map(PathBuf::as_path))
}

/// sha256 over the sorted `sha256  ./relative/path` lines (as `sha256sum`
/// prints them) of `files`, each a regular file under `root`: the digest of
/// a directory tree ([`sha256_path`]) and of a folder dataset's listing.
pub fn sha256_listing<'a>(root: &Path, files: impl Iterator<Item = &'a Path>) -> Result<String> {
    let mut lines: Vec<String> = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap_or(f);
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
    #[expect(
        clippy::disallowed_methods,
        reason = "a lock file is opened for its lock, never read"
    )]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_and_regular() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.json");
        std::fs::write(&f, b"{\"x\": 1}").unwrap();
        assert_eq!(read_bounded(&f, 100).unwrap().len(), 8);
        let e = read_bounded(&f, 4).unwrap_err().to_string();
        assert!(
            e.contains("a.json") && e.contains("larger than the 4 bytes"),
            "{e}"
        );
        let e = read_bounded(dir.path(), 100).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let e = read_bounded(Path::new("/dev/zero"), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device") && e.contains("/dev/zero"), "{e}");
        std::fs::write(&f, b"\xff\xfe{").unwrap();
        let e = read_text(&f, 100).unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 0"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfifo");
        let e = read_bounded(&fifo, 100).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
    }

    #[test]
    fn an_uncommitted_atomic_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        std::fs::write(&out, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&out).unwrap();
            f.write_all(b"new, cut").unwrap();
        }
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut f = AtomicFile::create(&out).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid 4194304 is above Linux's largest pid: never alive.
        let dead = dir.path().join(".out.merge.4194304.tmp");
        let live = dir
            .path()
            .join(format!(".out.merge.{}.tmp", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(&live, b"").unwrap();
        let removed = remove_stale_temporaries(dir.path(), "out").unwrap();
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists());
    }
}
