//! The training memory a method itself needs, measured by the allocator.
//!
//! Peak RSS counts the whole process: the runtime, the mapped cache, the
//! decoder's look-ahead, the frozen weights. To compare methods without
//! that baseline, `sherl-fit` installs [`Tracking`] as its global allocator
//! and [`train`](super::train) counts, for every training step, the bytes
//! allocated and not yet freed by the threads that run the step (the
//! forward pass, the backward pass, gradient clipping and the optimiser),
//! from the start of the step: the activations candle and the fused ops
//! keep for the backward pass, the gradients, and every temporary alive at
//! the same time. The largest such peak over the run is
//! `train_memory.step_peak_bytes`; with the trainable parameters and
//! AdamW's two moments (`3 x 4` bytes per trainable parameter,
//! `train_memory.trainable_state_bytes`) it is the method's training
//! memory. What is not counted: the batch's inputs (the cached hidden
//! states or token ids, made before the step), frozen weights, the
//! decoder threads, and allocations made by libraries outside Rust's
//! allocator (OpenBLAS's own work buffers).
//!
//! Counting is off unless a thread asks for it ([`track`]), so the decoder
//! threads and evaluation do not disturb the count; a process that does
//! not install [`Tracking`] (the library's tests, other programs) reads
//! zero and the summary says "not measured" (`None`).
//!
//! Why a third module with `unsafe` (besides `cache/mmap.rs` and
//! `fit/kernels/gemm.rs`): a global allocator is an `unsafe impl GlobalAlloc`
//! by definition. The implementation only forwards every call to the
//! wrapped allocator unchanged and adds to two atomic counters.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// A global allocator that forwards to `A` and counts the live bytes
/// allocated by threads inside [`track`].
#[derive(Debug)]
pub struct Tracking<A>(pub A);

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
}

fn on() -> bool {
    // `try_with`: a thread being torn down has no thread-locals left.
    ON.try_with(Cell::get).unwrap_or(false)
}

fn add(bytes: usize) {
    let now = LIVE.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn sub(bytes: usize) {
    LIVE.fetch_sub(bytes as i64, Ordering::Relaxed);
}

// SAFETY: every method forwards its arguments unchanged to the wrapped
// allocator, which upholds `GlobalAlloc`'s contract; the counters are
// atomics and thread-locals, which allocate nothing (`const` thread-local
// initialiser), so no call re-enters the allocator.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Tracking<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() && on() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() && on() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if on() {
            sub(layout.size());
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() && on() {
            if new_size >= layout.size() {
                add(new_size - layout.size());
            } else {
                sub(layout.size() - new_size);
            }
        }
        p
    }
}

impl<A> Tracking<A> {
    /// Mark the tracking allocator as the one in use (the binary calls this
    /// once at start-up), so that a zero count means "nothing allocated",
    /// not "not installed".
    pub fn installed(&self) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// While the returned guard lives, allocations and frees on this thread
/// are counted. Nested guards restore the previous state.
#[must_use = "counting stops when the guard is dropped"]
pub fn track() -> TrackGuard {
    let prev = ON.with(|c| c.replace(true));
    TrackGuard { prev }
}

/// See [`track`].
#[derive(Debug)]
pub struct TrackGuard {
    prev: bool,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        let prev = self.prev;
        let _ = ON.try_with(|c| c.set(prev));
    }
}

/// Start a new window: live and peak counts back to zero (call on the
/// thread that runs the step, before it starts).
pub fn window_start() {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
}

/// The largest count of live bytes since [`window_start`], or `None` when
/// the tracking allocator is not installed in this process.
pub fn window_peak() -> Option<u64> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| PEAK.load(Ordering::Relaxed).max(0) as u64)
}

/// One training step's count, from [`StepWindow::start`] (a new window,
/// counting on this thread) to [`StepWindow::finish`], which folds the
/// window's peak into the run's largest; both training loops use it.
#[derive(Debug)]
pub struct StepWindow {
    guard: TrackGuard,
}

impl StepWindow {
    /// Start counting the step on this thread.
    pub fn start() -> Self {
        window_start();
        StepWindow { guard: track() }
    }

    /// Stop counting and raise `largest` to this step's peak (left as it
    /// is when the tracking allocator is not installed).
    pub fn finish(self, largest: &mut Option<u64>) {
        drop(self.guard);
        if let Some(p) = window_peak() {
            *largest = Some(largest.unwrap_or(0).max(p));
        }
    }
}

/// Whether the tracking allocator is installed in this process.
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counting follows the guard and the window: only allocations made on
    /// a tracked thread count, the peak is the high-water mark since the
    /// window started, frees lower the live count, realloc counts the
    /// difference.
    #[test]
    fn counts_tracked_allocations_and_the_peak() {
        let a = Tracking(std::alloc::System);
        a.installed();
        let l1 = Layout::from_size_align(1000, 8).unwrap();
        let l2 = Layout::from_size_align(500, 8).unwrap();
        // SAFETY: plain allocate/free pairs of the layouts above.
        unsafe {
            let untracked = a.alloc(l1);
            window_start();
            let g = track();
            let p1 = a.alloc(l1);
            let p2 = a.alloc(l2);
            assert_eq!(window_peak(), Some(1500));
            a.dealloc(p2, l2);
            let p1 = a.realloc(p1, l1, 1200);
            assert_eq!(window_peak(), Some(1500));
            let p3 = a.alloc_zeroed(l1);
            assert_eq!(window_peak(), Some(2200));
            drop(g);
            // Not tracked any more: neither counted nor subtracted.
            a.dealloc(p3, l1);
            let p4 = a.alloc(l1);
            assert_eq!(window_peak(), Some(2200));
            a.dealloc(p4, l1);
            let g = track();
            a.dealloc(p1, Layout::from_size_align(1200, 8).unwrap());
            a.dealloc(untracked, l1);
            drop(g);
            window_start();
            assert_eq!(window_peak(), Some(0));
        }
    }
}
