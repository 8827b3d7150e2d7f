//! Matrix products on strided views of f32 slices, for the fused CPU ops
//! ([`super::fused_layer`], [`super::fused`]) behind a checked, safe
//! interface, computed by one of two kernels:
//!
//! - the `gemm` crate (the kernel candle's CPU backend calls; AVX2/FMA on
//!   x86-64 with stable Rust), always there;
//! - OpenBLAS's `sgemm` (AVX-512 kernels where the CPU has them: 134-141
//!   GFLOP/s on one core of the development machine against gemm's 86),
//!   loaded at run time from the library `pipelines/fetch-assets.sh openblas`
//!   fetches (PyPI `scipy-openblas32`) or any OpenBLAS the user names, once
//!   per process by [`init_blas`]. Each call runs on the calling thread
//!   (OpenBLAS's own threads are set to 1: sherl-fit splits batches across
//!   its threads itself).
//!
//! The two round differently, so a seeded run's numbers depend on the
//! kernel (recorded in each run's `summary.json`), and are reproducible for
//! a given one.
//!
//! Why a second place with `unsafe` (besides `cache/mmap.rs`): a fused layer
//! multiplies per-head blocks that are strided views into packed buffers
//! (`q` of head `h` is every `3D`-th row of the `qkv` buffer from column
//! `h * hd`) and accumulates products into existing buffers. Through
//! candle's tensors each of those would be a copy to a contiguous tensor, a
//! fresh output and an addition; `gemm` takes the strides and the
//! accumulation directly. `gemm::gemm` is an `unsafe fn` over raw pointers;
//! [`matmul`] checks every view against its slice (every element a view
//! names lies inside it) and that the destination view never names one
//! element twice (so `gemm`'s threads never write the same place), and
//! the borrow checker keeps the destination apart from the inputs.

#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ::gemm::Parallelism;

/// `cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
/// beta, c, ldc)` with 32-bit integers (`scipy-openblas32`).
type Sgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

/// A loaded OpenBLAS: the library (kept loaded for the process) and its
/// `sgemm`.
struct Blas {
    _lib: libloading::Library,
    sgemm: Sgemm,
    describe: String,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

const ROW_MAJOR: i32 = 101;
const COL_MAJOR: i32 = 102;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// Which matrix kernel the fused CPU ops use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlasChoice {
    /// OpenBLAS from the asset directory when it was fetched, else `gemm`.
    Auto,
    /// Always the `gemm` crate.
    Off,
    /// The OpenBLAS library at this path (an error if it does not load).
    Path(PathBuf),
}

/// Where `fetch-assets.sh openblas` puts the library.
pub fn blas_asset() -> PathBuf {
    crate::assets::assets_dir()
        .join("openblas")
        .join("0.3.34.481.3")
        .join("libscipy_openblas.so")
}

fn load_blas(path: &Path) -> Result<Blas, String> {
    // SAFETY: loading a shared library runs its initialisers; this is the
    // OpenBLAS the user named or the one fetched and checksummed by
    // fetch-assets.sh, whose initialisers only set up its kernels.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    // The first of `names` the library exports, typed as `T`.
    fn find<T: Copy>(lib: &libloading::Library, names: &[&[u8]]) -> Option<T> {
        names.iter().find_map(|n| {
            // SAFETY: every `T` asked for below is the C signature the
            // OpenBLAS headers (cblas.h, openblas_config.h) give the symbol.
            unsafe { lib.get::<T>(*n) }.ok().map(|s| *s)
        })
    }
    let sgemm: Sgemm = find(&lib, &[b"scipy_cblas_sgemm\0", b"cblas_sgemm\0"])
        .ok_or_else(|| format!("{} has no cblas_sgemm", path.display()))?;
    let set_threads: Option<unsafe extern "C" fn(i32)> = find(
        &lib,
        &[
            b"scipy_openblas_set_num_threads\0",
            b"openblas_set_num_threads\0",
        ],
    );
    let config: Option<unsafe extern "C" fn() -> *const std::ffi::c_char> = find(
        &lib,
        &[b"scipy_openblas_get_config\0", b"openblas_get_config\0"],
    );
    if let Some(set) = set_threads {
        // SAFETY: `void openblas_set_num_threads(int)`, called before any
        // product runs.
        unsafe { set(1) };
    }
    let mut describe = "OpenBLAS".to_owned();
    if let Some(get) = config {
        // SAFETY: `char *openblas_get_config(void)` returns a static
        // NUL-terminated string (checked for null before reading it).
        let p = unsafe { get() };
        if !p.is_null() {
            // SAFETY: non-null, NUL-terminated, static (see above).
            describe = unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned();
        }
    }
    Ok(Blas {
        _lib: lib,
        sgemm,
        describe: format!("{describe} ({})", path.display()),
    })
}

/// Picks the matrix kernel for this process (the first call decides; later
/// calls return the kernel already chosen). Returns what it is, e.g.
/// `"gemm"` or `"OpenBLAS 0.3.34 ... (path)"`; an error when a named
/// library does not load.
pub fn init_blas(choice: &BlasChoice) -> Result<String, String> {
    let mut failure = None;
    let chosen = BLAS.get_or_init(|| match choice {
        BlasChoice::Off => None,
        BlasChoice::Auto => {
            let p = blas_asset();
            if p.is_file() {
                match load_blas(&p) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        failure = Some(e);
                        None
                    }
                }
            } else {
                None
            }
        }
        BlasChoice::Path(p) => match load_blas(p) {
            Ok(b) => Some(b),
            Err(e) => {
                failure = Some(e);
                None
            }
        },
    });
    match (failure, choice) {
        (Some(e), BlasChoice::Path(_)) => Err(e),
        (Some(e), _) => {
            tracing::warn!("OpenBLAS not used: {e}");
            Ok(kernel_name(chosen))
        }
        (None, _) => Ok(kernel_name(chosen)),
    }
}

fn kernel_name(b: &Option<Blas>) -> String {
    match b {
        Some(b) => b.describe.clone(),
        None => "gemm".to_owned(),
    }
}

/// The kernel in use (`gemm` until [`init_blas`] picks OpenBLAS).
pub fn kernel() -> String {
    match BLAS.get() {
        Some(b) => kernel_name(b),
        None => "gemm".to_owned(),
    }
}

/// A `rows x cols` matrix inside a slice: element `(i, j)` is at
/// `offset + i * rs + j * cs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Step between rows.
    pub rs: usize,
    /// Step between columns.
    pub cs: usize,
}

impl View {
    /// Row-major `rows x cols` at `offset`, rows `ld` apart.
    pub fn rows(offset: usize, rows: usize, cols: usize, ld: usize) -> View {
        View {
            offset,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }

    /// A dense row-major `rows x cols` matrix at 0.
    pub fn dense(rows: usize, cols: usize) -> View {
        View::rows(0, rows, cols, cols)
    }

    /// The transpose (same elements).
    pub fn t(self) -> View {
        View {
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the largest index the view names (`offset` when empty).
    fn end(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(self.offset);
        }
        let last_row = (self.rows - 1).checked_mul(self.rs)?;
        let last_col = (self.cols - 1).checked_mul(self.cs)?;
        self.offset
            .checked_add(last_row)?
            .checked_add(last_col)?
            .checked_add(1)
    }

    /// Whether no two elements share an index: one stride steps over a
    /// whole run of the other.
    fn injective(&self) -> bool {
        if self.rows <= 1 && self.cols <= 1 {
            return true;
        }
        if self.rows <= 1 {
            return self.cs >= 1;
        }
        if self.cols <= 1 {
            return self.rs >= 1;
        }
        (self.cs >= 1 && self.rs >= self.cols.saturating_mul(self.cs))
            || (self.rs >= 1 && self.cs >= self.rows.saturating_mul(self.rs))
    }

    fn fits(&self, len: usize) -> bool {
        self.end().is_some_and(|e| e <= len)
            && isize::try_from(self.rs).is_ok()
            && isize::try_from(self.cs).is_ok()
    }
}

fn bad(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("sherl gemm: {msg}"))
}

/// `dst = alpha * a b` (or `dst += alpha * a b` with `accumulate`), the
/// views checked against their slices, with the process's kernel
/// ([`init_blas`]). `threads > 1` runs `gemm`'s own rayon-parallel kernel
/// (OpenBLAS runs on the calling thread).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    dv: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    let blas = BLAS.get().and_then(|b| b.as_ref());
    matmul_on(blas, dst, dv, a, av, b, bv, alpha, accumulate, threads)
}

/// [`matmul`] with an explicit kernel: OpenBLAS when given (for products
/// it can express), else the `gemm` crate.
#[allow(clippy::too_many_arguments)]
fn matmul_on(
    blas: Option<&Blas>,
    dst: &mut [f32],
    dv: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    if av.rows != dv.rows || bv.cols != dv.cols || av.cols != bv.rows {
        return Err(bad(format!(
            "shapes {}x{} = {}x{} . {}x{}",
            dv.rows, dv.cols, av.rows, av.cols, bv.rows, bv.cols
        )));
    }
    if !dv.fits(dst.len()) || !av.fits(a.len()) || !bv.fits(b.len()) {
        return Err(bad(format!(
            "a view reaches past its slice: dst {dv:?} of {}, a {av:?} of {}, b {bv:?} of {}",
            dst.len(),
            a.len(),
            b.len()
        )));
    }
    if !dv.injective() {
        return Err(bad(format!(
            "destination view {dv:?} names an element twice"
        )));
    }
    if dv.rows == 0 || dv.cols == 0 {
        return Ok(());
    }
    if av.cols == 0 {
        if !accumulate {
            for i in 0..dv.rows {
                for j in 0..dv.cols {
                    dst[dv.offset + i * dv.rs + j * dv.cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    if let Some(blas) = blas {
        if let Some(call) = blas_call(dv, av, bv) {
            // SAFETY: `call` describes exactly the views checked above
            // (`fits`: every element inside its slice; dims and leading
            // dimensions in i32 range), the destination is a unique borrow
            // no input aliases; with beta 0 BLAS does not read `dst`.
            unsafe {
                (blas.sgemm)(
                    call.order,
                    call.ta,
                    call.tb,
                    call.m,
                    call.n,
                    call.k,
                    alpha,
                    a.as_ptr().add(av.offset),
                    call.lda,
                    b.as_ptr().add(bv.offset),
                    call.ldb,
                    if accumulate { 1.0 } else { 0.0 },
                    dst.as_mut_ptr().add(dv.offset),
                    call.ldc,
                );
            }
            return Ok(());
        }
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // Strides fit in isize (checked by `fits`).
    let s = |x: usize| x as isize;
    // SAFETY: every element each view names lies inside its slice (`fits`:
    // offset + (rows-1) rs + (cols-1) cs < len, computed without overflow),
    // so every pointer gemm forms from base + i * rs + j * cs stays in
    // bounds; the destination is a unique borrow that no input aliases, and
    // its view is injective, so no two of gemm's writes (possibly from
    // different threads) hit the same element. With `read_dst` false gemm
    // writes `beta * a b` without reading `dst`; with true, `alpha' * dst +
    // beta * a b` with alpha' = 1.
    unsafe {
        ::gemm::gemm(
            dv.rows,
            dv.cols,
            av.cols,
            dst.as_mut_ptr().add(dv.offset),
            s(dv.cs),
            s(dv.rs),
            accumulate,
            a.as_ptr().add(av.offset),
            s(av.cs),
            s(av.rs),
            b.as_ptr().add(bv.offset),
            s(bv.cs),
            s(bv.rs),
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// A product's arguments in BLAS terms.
struct BlasCall {
    order: i32,
    ta: i32,
    tb: i32,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
}

/// The BLAS form of `dst = a b` on these views, when every view has a unit
/// stride in one direction (else `None`: the gemm crate takes any strides).
fn blas_call(dv: View, av: View, bv: View) -> Option<BlasCall> {
    let i = |x: usize| i32::try_from(x).ok();
    // In row-major order a matrix is plain with column stride 1 (leading
    // dimension = row stride) or transposed with row stride 1.
    let (order, ldc) = if dv.cs == 1 && dv.rs >= dv.cols.max(1) {
        (ROW_MAJOR, dv.rs)
    } else if dv.rs == 1 && dv.cs >= dv.rows.max(1) {
        (COL_MAJOR, dv.cs)
    } else {
        return None;
    };
    let operand = |v: View| -> Option<(i32, usize)> {
        let (major, minor, cols, rows) = if order == ROW_MAJOR {
            (v.rs, v.cs, v.cols, v.rows)
        } else {
            (v.cs, v.rs, v.rows, v.cols)
        };
        if minor == 1 && major >= cols.max(1) {
            Some((NO_TRANS, major))
        } else if major == 1 && minor >= rows.max(1) {
            Some((TRANS, minor))
        } else {
            None
        }
    };
    let (ta, lda) = operand(av)?;
    let (tb, ldb) = operand(bv)?;
    Some(BlasCall {
        order,
        ta,
        tb,
        m: i(dv.rows)?,
        n: i(dv.cols)?,
        k: i(av.cols)?,
        lda: i(lda)?,
        ldb: i(ldb)?,
        ldc: i(ldc)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], av: View, b: &[f32], bv: View) -> Vec<f32> {
        let mut out = vec![0f32; av.rows * bv.cols];
        for i in 0..av.rows {
            for j in 0..bv.cols {
                let mut acc = 0f32;
                for k in 0..av.cols {
                    acc +=
                        a[av.offset + i * av.rs + k * av.cs] * b[bv.offset + k * bv.rs + j * bv.cs];
                }
                out[i * bv.cols + j] = acc;
            }
        }
        out
    }

    #[test]
    fn strided_products_match_the_naive_loop() {
        let a: Vec<f32> = (0..60).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..60).map(|i| (i as f32 * 0.11).cos()).collect();
        // a: 3x4 block at offset 2 with rows 10 apart; b: transposed view
        let av = View::rows(2, 3, 4, 10);
        let bv = View::rows(5, 5, 4, 6).t(); // 4x5
        let want = naive(&a, av, &b, bv);
        for threads in [1, 2] {
            let mut dst = vec![1f32; 15];
            matmul(
                &mut dst,
                View::dense(3, 5),
                &a,
                av,
                &b,
                bv,
                1.0,
                false,
                threads,
            )
            .unwrap();
            for (x, y) in dst.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
            // accumulate with a scale, into a column-major destination
            let mut dst = vec![1f32; 15];
            matmul(
                &mut dst,
                View::dense(5, 3).t(),
                &a,
                av,
                &b,
                bv,
                0.5,
                true,
                threads,
            )
            .unwrap();
            for i in 0..3 {
                for j in 0..5 {
                    let got = dst[j * 3 + i];
                    let w = 1.0 + 0.5 * want[i * 5 + j];
                    assert!((got - w).abs() < 1e-5, "{got} vs {w}");
                }
            }
        }
    }

    /// OpenBLAS (the fetched library, loaded here without touching the
    /// process's kernel) gives the naive products for every layout the
    /// fused ops use: row- and column-major destinations, transposed and
    /// strided operands (a head's block of a packed `qkv` buffer),
    /// accumulation with a scale; a layout BLAS cannot express (no unit
    /// stride) falls back to gemm.
    #[test]
    fn openblas_products_match_the_naive_loop() {
        let path = blas_asset();
        assert!(
            path.is_file(),
            "missing {} ({})",
            path.display(),
            crate::assets::FETCH_HINT
        );
        let blas = load_blas(&path).unwrap();
        let a: Vec<f32> = (0..400).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..400).map(|i| (i as f32 * 0.11).cos()).collect();
        let cases = [
            // plain row-major
            (View::dense(7, 5), View::dense(5, 9)),
            // a head's block: rows 3*8 apart from column 2; b transposed
            (View::rows(2, 6, 4, 24), View::rows(1, 9, 4, 4).t()),
            // a transposed, b a strided block
            (View::dense(5, 7).t(), View::rows(3, 5, 9, 11)),
            // no unit stride anywhere in a: gemm fallback
            (
                View {
                    offset: 0,
                    rows: 4,
                    cols: 3,
                    rs: 7,
                    cs: 2,
                },
                View::dense(3, 5),
            ),
        ];
        for (av, bv) in cases {
            assert!(av.fits(a.len()) && bv.fits(b.len()), "{av:?} {bv:?}");
            let want = naive(&a, av, &b, bv);
            let (m, n) = (av.rows, bv.cols);
            for (dv, acc, alpha) in [
                (View::dense(m, n), false, 1.0f32),
                (View::dense(n, m).t(), true, 0.5),
                (View::rows(1, m, n, n + 3), true, 2.0),
            ] {
                let len = dv.end().unwrap();
                let mut dst = vec![1f32; len];
                matmul_on(Some(&blas), &mut dst, dv, &a, av, &b, bv, alpha, acc, 1).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let got = dst[dv.offset + i * dv.rs + j * dv.cs];
                        let w = if acc { 1.0 } else { 0.0 } + alpha * want[i * n + j];
                        assert!((got - w).abs() < 1e-4, "{av:?} {bv:?} {dv:?}: {got} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn views_outside_their_slice_or_overlapping_are_refused() {
        let a = vec![0f32; 12];
        let b = vec![0f32; 12];
        let mut dst = vec![0f32; 9];
        // a reaches index 12
        let e = matmul(
            &mut dst,
            View::dense(3, 3),
            &a,
            View::rows(1, 3, 4, 4),
            &b,
            View::dense(4, 3),
            1.0,
            false,
            1,
        );
        assert!(e.is_err());
        // shapes disagree
        let e = matmul(
            &mut dst,
            View::dense(3, 3),
            &a,
            View::dense(3, 4),
            &b,
            View::dense(3, 4),
            1.0,
            false,
            1,
        );
        assert!(e.is_err());
        // destination rows overlap
        let e = matmul(
            &mut dst,
            View::rows(0, 3, 3, 2),
            &a,
            View::dense(3, 4),
            &b,
            View::dense(4, 3),
            1.0,
            false,
            1,
        );
        assert!(e.is_err());
        let ok = matmul(
            &mut dst,
            View::dense(3, 3),
            &a,
            View::dense(3, 4),
            &b,
            View::dense(4, 3),
            1.0,
            false,
            1,
        );
        assert!(ok.is_ok());
    }
}
