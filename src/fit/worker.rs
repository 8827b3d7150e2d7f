//! One long-lived helper thread for the second part of a CPU batch
//! ([`super::train::forward_backward`], [`super::eval::forward_in_parts`]),
//! and how a batch is cut into parts ([`step_parts`], [`part_ranges`]).
//!
//! A thread spawned per step would start each step with an empty allocator
//! heap and hand its pages back when it ends: the kernel then clears fresh
//! pages for every step (measured: 14 % of a 2-thread training profile).
//! This thread lives as long as the process, so its heap is reused.

use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use crate::fit::error::FitError;
use crate::Result;

/// Parts a training batch is split into on the CPU: two, always, so that
/// results do not depend on the thread count; on a GPU one.
pub fn step_parts(dev: &candle_core::Device) -> usize {
    if dev.is_cpu() {
        2
    } else {
        1
    }
}

/// Row ranges of `parts` near-equal consecutive parts of `n` examples (no
/// empty part).
pub fn part_ranges(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|k| (k * n / parts)..((k + 1) * n / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

type Job = Box<dyn FnOnce() + Send + 'static>;

static WORKER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

fn sender() -> Sender<Job> {
    WORKER
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            std::thread::Builder::new()
                .name("sherl-part".into())
                .spawn(move || {
                    for job in rx {
                        // A panicking job drops its result sender (the
                        // caller sees a disconnect); the thread lives on.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .expect("spawning the training helper thread");
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Run `f` on the helper thread; its result arrives on the receiver (which
/// reports a disconnect if `f` panicked).
pub fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    if let Err(e) = sender().send(job) {
        // The helper thread is gone (it cannot be, short of a panic in the
        // channel itself): run here rather than lose the work.
        (e.0)();
    }
    rx
}

/// Run the part of every range, results in range order: `prepare(range)`
/// (on the calling thread) gives the part's work; with `parallel`, every
/// part after the first runs on the helper thread while the first runs
/// here, else all run here one after the other.
pub fn map_parts<T, F>(
    ranges: &[Range<usize>],
    parallel: bool,
    prepare: impl Fn(&Range<usize>) -> F,
) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    if !parallel || ranges.len() <= 1 {
        return ranges.iter().map(|r| prepare(r)()).collect();
    }
    let pending: Vec<_> = ranges[1..].iter().map(|r| spawn(prepare(r))).collect();
    let mut out = vec![prepare(&ranges[0])()];
    for rx in pending {
        out.push(rx.recv().unwrap_or_else(|_| {
            Err(FitError::model(
                "the helper thread panicked while running a part of a batch".to_string(),
            ))
        }));
    }
    out
}
