//! The writer side of a cache directory (FORMAT.md §1, §7): the directory
//! protocol every writer follows, in one type, [`CacheWriter`].
//!
//! 1. [`CacheWriter::check_target`]: refuse an `--out` that already holds a
//!    complete cache, before any expensive work.
//! 2. [`CacheWriter::open`]: check the directory (empty, or an interrupted
//!    extraction with the same settings when resuming), take the writer lock
//!    ([`LOCK`], an OS lock released when the process ends however it ends),
//!    check again under the lock, remove left-over temporary shards and write
//!    the pending manifest ([`PENDING`], sealed like the manifest).
//! 3. [`CacheWriter::resume_scan`]: which of this writer's shards are already
//!    sealed with these settings (kept) and which remain to be written.
//! 4. [`CacheWriter::shard`] / [`CacheWriter::record`]: one [`ShardWriter`]
//!    per remaining shard (written to a temporary file, sealed by rename).
//! 5. [`CacheWriter::finish`]: `manifest.json` (or a worker's
//!    [`PART_MANIFEST`]) written last, the pending manifest removed.
//!
//! What goes into the shards (running a backbone, batching) is the caller's
//! business: extraction drives this type.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::error::CacheError;
use super::manifest::{Manifest, ShardInfo, WorkerInfo, MANIFEST, PART_MANIFEST, PENDING};
use super::shard::{SealedShard, ShardSpec, ShardWriter};
use super::shard_file_name;
use crate::{Error, Result};

/// File that holds the writer lock of a cache directory (FORMAT.md §1, §7).
/// The file stays in the directory; readers and `sherl-cache merge` ignore
/// it, and a directory holding nothing else counts as empty.
pub const LOCK: &str = ".lock";

/// The writer lock of a cache directory: an OS advisory lock on its
/// [`LOCK`] file ([`crate::fsutil::DirLock`]), held while this value lives
/// and released by the operating system when the process ends, however it
/// ends (so a killed writer never leaves a stale lock).
pub type WriterLock = crate::fsutil::DirLock;

/// One shard this writer is responsible for: its number and the cache
/// positions of its examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSlot {
    /// Shard number.
    pub index: u32,
    /// Cache positions of its examples.
    pub examples: Range<usize>,
}

/// A cache directory being written: holds its writer lock from
/// [`CacheWriter::open`] until [`CacheWriter::finish`] (or drop).
#[derive(Debug)]
pub struct CacheWriter {
    out: PathBuf,
    manifest: Manifest,
    resume: bool,
    sealed: BTreeMap<u32, ShardInfo>,
    _lock: WriterLock,
}

fn wrap(path: &Path) -> impl FnOnce(CacheError) -> Error + '_ {
    move |source| Error::Cache {
        path: path.to_path_buf(),
        source,
    }
}

impl CacheWriter {
    /// Refuse `out` when it already holds a complete cache. Reads only; run
    /// it before expensive work (the full checks run in [`CacheWriter::open`]).
    pub fn check_target(out: &Path) -> Result<()> {
        if out.join(MANIFEST).exists() {
            return Err(wrap(out)(CacheError::AlreadyComplete));
        }
        Ok(())
    }

    /// Create `out`, or check it for `resume` (the settings of the
    /// interrupted run, in [`PENDING`], must equal `manifest`'s), take its
    /// writer lock, remove left-over temporary shards and record `manifest`
    /// (its `shards` empty; `examples` the whole cache's) as pending. A
    /// refusal changes nothing on disk: the checks run before the lock is
    /// taken, and again under the lock (another writer may have changed the
    /// directory in between).
    pub fn open(out: &Path, manifest: Manifest, resume: bool) -> Result<Self> {
        // A live writer's directory is busy, not "not empty" or resumable:
        // say so first (the lock below decides; this only picks the message).
        if crate::fsutil::DirLock::is_held(out, LOCK)? {
            return Err(locked(out));
        }
        check_out_dir(out, &manifest, resume)?;
        let lock = lock_out_dir(out)?;
        check_out_dir(out, &manifest, resume)?;
        let shards = out.join("shards");
        std::fs::create_dir_all(&shards).map_err(|e| Error::io(&shards, e))?;
        // Left-over temporary shards of a killed run are never valid.
        for entry in std::fs::read_dir(&shards).map_err(|e| Error::io(&shards, e))? {
            let p = entry.map_err(|e| Error::io(&shards, e))?.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        // Sealed like the manifest (FORMAT.md §5.2), so --resume reads it
        // with the same checks.
        manifest.write(&out.join(PENDING))?;
        Ok(CacheWriter {
            out: out.to_path_buf(),
            manifest,
            resume,
            sealed: BTreeMap::new(),
            _lock: lock,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.out
    }

    /// The pending manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The shard-wide settings every shard of this cache is written with.
    pub fn spec(&self) -> ShardSpec {
        ShardSpec::of(&self.manifest)
    }

    /// The shards this writer writes (all of them, or worker I of N's:
    /// shard k with k % N == I), with their examples' cache positions.
    pub fn slots(&self) -> Vec<ShardSlot> {
        shard_slots(&self.manifest)
    }

    /// The resume scan: with `--resume`, every slot whose shard is sealed
    /// with these settings and these examples is kept (recorded for the
    /// manifest) and the rest returned; an unreadable shard is recomputed
    /// (`note` says so), a shard sealed with other settings is refused.
    /// Without `--resume`, every slot is returned.
    pub fn resume_scan(&mut self, note: &dyn Fn(&str)) -> Result<Vec<ShardSlot>> {
        let hash = self.manifest.header_settings_hash();
        let mut todo = Vec::new();
        for slot in self.slots() {
            let rel = shard_file_name(slot.index);
            let path = self.out.join(&rel);
            if self.resume && path.exists() {
                let range = &slot.examples;
                match super::open_shard(&path) {
                    Ok(r)
                        if r.header().settings_hash == hash
                            && r.header().first_example == range.start as u64
                            && r.header().n_examples == range.len() as u64 =>
                    {
                        let bytes = std::fs::metadata(&path)
                            .map_err(|e| Error::io(&path, e))?
                            .len();
                        self.sealed.insert(
                            slot.index,
                            ShardInfo {
                                file: rel,
                                index: slot.index,
                                first_example: range.start as u64,
                                examples: range.len() as u64,
                                tokens: r.header().n_tokens,
                                bytes,
                            },
                        );
                        continue;
                    }
                    Ok(_) => return Err(wrap(&path)(CacheError::SealedWithOtherSettings)),
                    Err(e) => note(&format!(
                        "{} is unreadable ({e}); recomputing it",
                        path.display()
                    )),
                }
            }
            todo.push(slot);
        }
        Ok(todo)
    }

    /// Shards kept by [`CacheWriter::resume_scan`] or recorded so far.
    pub fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    /// Start writing `slot`'s shard (to a temporary file until sealed).
    pub fn shard(&self, slot: &ShardSlot) -> Result<ShardWriter> {
        ShardWriter::create(
            &self.out.join(shard_file_name(slot.index)),
            self.spec(),
            slot.index,
            slot.examples.start as u64,
        )
    }

    /// Record a sealed shard for the manifest.
    pub fn record(&mut self, sealed: &SealedShard) {
        self.sealed.insert(
            sealed.index,
            ShardInfo {
                file: shard_file_name(sealed.index),
                index: sealed.index,
                first_example: sealed.first_example,
                examples: sealed.examples,
                tokens: sealed.tokens,
                bytes: sealed.bytes,
            },
        );
    }

    /// Write the manifest last ([`MANIFEST`], or [`PART_MANIFEST`] for a
    /// worker, whose counts are those of its shards), remove the pending
    /// manifest and sync the directory. Returns the manifest written.
    pub fn finish(self) -> Result<Manifest> {
        let CacheWriter {
            out,
            mut manifest,
            sealed,
            ..
        } = self;
        manifest.shards = sealed.into_values().collect();
        manifest.created_at = super::manifest::now_rfc3339();
        let partial = manifest.worker.is_some();
        if partial {
            manifest.examples = manifest.shards.iter().map(|s| s.examples).sum();
            manifest.tokens = manifest.shards.iter().map(|s| s.tokens).sum();
        }
        let name = if partial { PART_MANIFEST } else { MANIFEST };
        // Sealed: from format version 2 on it carries its own checksum.
        manifest.write(&out.join(name))?;
        let pending = out.join(PENDING);
        std::fs::remove_file(&pending).map_err(|e| Error::io(&pending, e))?;
        crate::fsutil::sync_dir(&out)?;
        Ok(manifest)
    }
}

/// The shards of the cache `m` describes that its writer writes: shard k
/// holds positions `k * examples_per_shard ..` (FORMAT.md §1); a worker I of
/// N writes the shards with k % N == I.
pub fn shard_slots(m: &Manifest) -> Vec<ShardSlot> {
    shard_ranges(m.examples as usize, m.settings.examples_per_shard, m.worker)
}

/// The shards of a cache of `total` examples, `per_shard` each (FORMAT.md
/// §1), that `worker` writes (all without one).
pub fn shard_ranges(total: usize, per_shard: u64, worker: Option<WorkerInfo>) -> Vec<ShardSlot> {
    let per_shard = (per_shard as usize).max(1);
    (0..total.div_ceil(per_shard))
        .filter(|k| worker.is_none_or(|w| *k as u32 % w.count == w.index))
        .map(|k| ShardSlot {
            index: k as u32,
            examples: k * per_shard..((k + 1) * per_shard).min(total),
        })
        .collect()
}

/// Take the writer lock of `out` (created if needed), or refuse when another
/// process holds it.
fn lock_out_dir(out: &Path) -> Result<WriterLock> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    match crate::fsutil::DirLock::try_acquire(out, LOCK)? {
        Some(lock) => Ok(lock),
        None => Err(locked(out)),
    }
}

/// `out` is being written by another process (it holds the writer lock).
fn locked(out: &Path) -> Error {
    Error::Locked {
        path: out.to_path_buf(),
        what: "this cache",
        lock: out.join(LOCK),
    }
}

/// Whether `out` holds anything but the lock file.
fn has_content(out: &Path) -> Result<bool> {
    if !out.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        if entry.file_name() != LOCK {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The refusals of [`CacheWriter::open`]; reads only. Returns whether `out`
/// holds an earlier extraction to resume.
fn check_out_dir(out: &Path, manifest: &Manifest, resume: bool) -> Result<bool> {
    let pending = out.join(PENDING);
    let non_empty = has_content(out)?;
    if non_empty && !resume {
        return Err(wrap(out)(CacheError::NotEmpty));
    }
    // A directory killed before it recorded its settings holds no sealed
    // shard: nothing to keep, start it afresh.
    let sealed_shards = std::fs::read_dir(out.join("shards"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "shrd"))
        })
        .unwrap_or(false);
    if resume && non_empty && !pending.exists() && sealed_shards {
        return Err(wrap(out)(CacheError::NoPendingManifest {
            pending: PENDING,
        }));
    }
    if resume && non_empty && pending.exists() {
        let old = Manifest::read(&pending).map_err(|e| {
            wrap(out)(CacheError::CannotResume {
                reason: e.to_string(),
            })
        })?;
        let mut diffs = Vec::new();
        let a = serde_json::to_value(&old).expect("a manifest serializes");
        let b = serde_json::to_value(manifest).expect("a manifest serializes");
        for key in [
            "settings_hash",
            "settings",
            "backbone",
            "dataset",
            "labels",
            "split_names",
            "examples",
            "worker",
        ] {
            if a.get(key) != b.get(key) {
                diffs.push(key);
            }
        }
        if !diffs.is_empty() {
            return Err(wrap(out)(CacheError::ResumeMismatch {
                differs: diffs.join(", "),
            }));
        }
    }
    Ok(non_empty)
}
