//! Matrix products on strided views of f32 slices, for the fused CPU layer
//! ([`super::fused_layer`]): the `gemm` crate (the kernel candle's CPU
//! backend calls) behind a checked, safe interface.
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

use ::gemm::Parallelism;

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
/// views checked against their slices. `threads > 1` runs `gemm`'s own
/// rayon-parallel kernel.
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
