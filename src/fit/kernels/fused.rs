//! CPU custom ops that do less work than candle's generic backward:
//!
//! - [`LinearOp`]: `x W^T + b` on OpenBLAS, starting from the bias, with
//!   only the gradients that are needed: a frozen weight (a pre-trained
//!   late layer) gets none, a constant input (cached hidden states into
//!   SHERL's and UniPT's projectors) gets none.
//! - [`LayerNormOp`]: LayerNorm over the last axis in one pass forward and
//!   two backward, instead of about ten composed element-wise ops each way.
//! - [`MaskedMeanOp`]: the mean over real tokens (pooling, UniPT's layer
//!   summaries); candle's sum over the middle axis of `[B, S, D]` is a
//!   strided reduction that took 12 % of a UniPT step.
//!
//! Each is used only on the CPU with f32 tensors ([`cpu_f32`]); on other
//! devices [`crate::fit::nn::linear`] and [`crate::fit::nn::ops`] keep the composed ops. Tests
//! (below and `tests/fit.rs`) check values and gradients against the
//! composed versions and finite differences.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::gemm::View;

/// Whether `t` can take the CPU custom ops.
pub fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `a b` for two views of slices, into a new dense `[a.rows, b.cols]`
/// vector, through [`super::gemm`] (OpenBLAS when loaded).
fn product(a: &[f32], av: View, b: &[f32], bv: View) -> candle_core::Result<Vec<f32>> {
    let mut y = vec![0f32; av.rows * bv.cols];
    super::gemm::matmul(
        &mut y,
        View::dense(av.rows, bv.cols),
        a,
        av,
        b,
        bv,
        1.0,
        false,
        candle_core::utils::get_num_threads(),
    )?;
    Ok(y)
}

/// `x W^T + b` for `x` `[rows, in]`, `W` `[out, in]`, `b` `[out]`: the
/// product starts from the bias rows (no separate broadcast add), and the
/// backward pass computes only the gradients some variable needs, as
/// recorded when the op was built: `dL/dx = g W` (not for cached inputs),
/// `dL/dW = g^T x` (not for frozen weights), `dL/db` = column sums of `g`.
/// candle's matmul backward computes both operands' gradients, which for a
/// frozen late layer or the cached inputs of the projectors is half the
/// backward work spent on gradients nobody reads; and its products run on
/// the `gemm` crate, these on OpenBLAS when loaded.
pub struct LinearOp {
    /// Whether `x` needs a gradient.
    pub need_dx: bool,
    /// Whether `W` needs a gradient.
    pub need_dw: bool,
    /// Whether `b` needs a gradient.
    pub need_db: bool,
}

impl LinearOp {
    /// The op for these operands (gradients for those that track them).
    pub fn for_operands(x: &Tensor, w: &Tensor, b: &Tensor) -> Self {
        LinearOp {
            need_dx: x.track_op(),
            need_dw: w.track_op(),
            need_db: b.track_op(),
        }
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "sherl-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "input")?;
        let w = contiguous_f32(s2, l2, "weight")?;
        let b = contiguous_f32(s3, l3, "bias")?;
        let (rows, d_in) = l1.shape().dims2()?;
        let (out, w_in) = l2.shape().dims2()?;
        if w_in != d_in || b.len() != out {
            return Err(candle_core::Error::Msg(format!(
                "sherl linear: input {:?}, weight {:?}, bias {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )));
        }
        let mut y = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        super::gemm::matmul(
            &mut y,
            View::dense(rows, out),
            x,
            View::dense(rows, d_in),
            w,
            View::dense(out, d_in).t(),
            1.0,
            true,
            candle_core::utils::get_num_threads(),
        )?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, d_in) = x.dims2()?;
        let (out, _) = w.dims2()?;
        let g = g.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let gv = cpu_slice(&gs, gl, "gradient")?;
        let dev = x.device();
        let dx = if self.need_dx {
            let (ws, wl) = w.storage_and_layout();
            let wv = cpu_slice(&ws, wl, "weight")?;
            let dx = product(gv, View::dense(rows, out), wv, View::dense(out, d_in))?;
            Some(Tensor::from_vec(dx, (rows, d_in), dev)?)
        } else {
            None
        };
        let dw = if self.need_dw {
            let (xs, xl) = x.storage_and_layout();
            let xv = cpu_slice(&xs, xl, "input")?;
            let dw = product(gv, View::dense(rows, out).t(), xv, View::dense(rows, d_in))?;
            Some(Tensor::from_vec(dw, (out, d_in), dev)?)
        } else {
            None
        };
        let db = if self.need_db {
            let mut db = vec![0f32; out];
            for row in gv.chunks_exact(out) {
                for (d, v) in db.iter_mut().zip(row) {
                    *d += v;
                }
            }
            Some(Tensor::from_vec(db, out, dev)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Mean over the real tokens: `x` `[B, S, D]`, `mask` `[B, S]` (1 real, 0
/// padding) -> `[B, D]`, `sum_s x[b, s] m[b, s] / max(sum_s m[b, s], 1)`.
/// The same operations in the same order as the composed version
/// ([`crate::fit::nn::ops::masked_mean`]); no gradient for the mask.
pub struct MaskedMeanOp;

/// Per sequence, `max(sum of the mask, 1)`.
fn mask_counts(m: &[f32], b: usize, s: usize) -> Vec<f32> {
    (0..b)
        .map(|i| m[i * s..(i + 1) * s].iter().sum::<f32>().max(1.0))
        .collect()
}

impl CustomOp2 for MaskedMeanOp {
    fn name(&self) -> &'static str {
        "sherl-masked-mean"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "input")?;
        let m = contiguous_f32(s2, l2, "mask")?;
        let (b, s, d) = l1.shape().dims3()?;
        if l2.shape().dims2()? != (b, s) {
            return Err(candle_core::Error::Msg(format!(
                "sherl masked mean: mask {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            )));
        }
        let n = mask_counts(m, b, s);
        let mut y = vec![0f32; b * d];
        for i in 0..b {
            let acc = &mut y[i * d..(i + 1) * d];
            for t in 0..s {
                let w = m[i * s + t];
                let row = &x[(i * s + t) * d..(i * s + t + 1) * d];
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v * w;
                }
            }
            for a in acc.iter_mut() {
                *a /= n[i];
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        mask: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, s, d) = x.dims3()?;
        let mask = mask.contiguous()?;
        let g = g.contiguous()?;
        let (ms, ml) = mask.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let m = cpu_slice(&ms, ml, "mask")?;
        let gv = cpu_slice(&gs, gl, "gradient")?;
        let n = mask_counts(m, b, s);
        let mut dx = vec![0f32; b * s * d];
        for i in 0..b {
            let gi: Vec<f32> = gv[i * d..(i + 1) * d].iter().map(|v| v / n[i]).collect();
            for t in 0..s {
                let w = m[i * s + t];
                let row = &mut dx[(i * s + t) * d..(i * s + t + 1) * d];
                for (o, v) in row.iter_mut().zip(&gi) {
                    *o = v * w;
                }
            }
        }
        Ok((Some(Tensor::from_vec(dx, (b, s, d), x.device())?), None))
    }
}

/// LayerNorm over the last axis of `x` `[rows, d]` with weight and bias
/// `[d]`: `y = (x - mean) / sqrt(var + eps) * w + b`, biased variance.
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f32,
}

/// One row of [`LayerNormOp`]: `y = (x - mean) / sqrt(var + eps) * w + b`.
#[inline(always)]
pub(crate) fn ln_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let (mean, rstd) = row_stats(x, eps);
    for k in 0..x.len() {
        y[k] = (x[k] - mean) * rstd * w[k] + b[k];
    }
}

/// One row of [`LayerNormOp`]'s backward: writes `dx` for the row's
/// gradient `g`, adds to the weight's and bias's gradients `dw`, `db`;
/// `scratch` holds `2 d` values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn ln_row_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    scratch: &mut [f32],
) {
    let d = x.len();
    let (xhat, dxhat) = scratch.split_at_mut(d);
    let (mean, rstd) = row_stats(x, eps);
    for k in 0..d {
        xhat[k] = (x[k] - mean) * rstd;
        dxhat[k] = g[k] * w[k];
        dw[k] += g[k] * xhat[k];
        db[k] += g[k];
    }
    let (s1, s2) = (lane_sum(dxhat, |t| t), lane_sum_dot(dxhat, xhat));
    let (m1, m2) = (s1 / d as f32, s2 / d as f32);
    for k in 0..d {
        dx[k] = rstd * (dxhat[k] - m1 - xhat[k] * m2);
    }
}

/// Per row: mean and `1 / sqrt(var + eps)`, with the variance computed from
/// the centred values (two passes, as the composed version).
#[inline(always)]
pub(crate) fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |x| x) / n;
    let var = lane_sum(row, |x| (x - mean) * (x - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Lanes of the sums below: enough independent partial sums for the
/// compiler to keep two AVX registers busy.
const LANES: usize = 16;

/// `sum f(v[k])` with [`LANES`] partial sums added in a fixed order: the
/// loop vectorises (a single running sum cannot: each addition waits for
/// the previous one), and the result is the same on every run.
#[inline(always)]
pub(crate) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for &x in chunks.remainder() {
        s += f(x);
    }
    s
}

/// `sum a[k] b[k]` with [`LANES`] partial sums (see [`lane_sum`]).
#[inline(always)]
pub(crate) fn lane_sum_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len() / LANES * LANES;
    for (ac, bc) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ac[i] * bc[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for k in n..a.len() {
        s += a[k] * b[k];
    }
    s
}

/// `(sum a[k] g[k], sum a[k] g[k] x[k])`, the two sums of a LayerNorm
/// backward, with [`LANES`] partial sums each (see [`lane_sum`]).
#[inline(always)]
pub(crate) fn lane_sums_ln_back(a: &[f32], g: &[f32], x: &[f32]) -> (f32, f32) {
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let n = a.len() / LANES * LANES;
    for ((ac, gc), xc) in a[..n]
        .chunks_exact(LANES)
        .zip(g[..n].chunks_exact(LANES))
        .zip(x[..n].chunks_exact(LANES))
    {
        for i in 0..LANES {
            let t = ac[i] * gc[i];
            s1[i] += t;
            s2[i] += t * xc[i];
        }
    }
    let (mut t1, mut t2) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
    for k in n..a.len() {
        let t = a[k] * g[k];
        t1 += t;
        t2 += t * x[k];
    }
    (t1, t2)
}

/// A CPU tensor's contiguous f32 values, borrowed from its storage.
pub(crate) fn cpu_slice<'a>(
    s: &'a Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(cs) => contiguous_f32(cs, l, what),
        _ => Err(candle_core::Error::Msg(format!(
            "sherl fused op: {what} is not on the CPU"
        ))),
    }
}

/// The contiguous `f32` data of a CPU storage under `l`; every fused op reads
/// its inputs through this.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::Msg(format!(
            "sherl fused op: {what} must be contiguous"
        ))),
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sherl-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "x")?;
        let w = contiguous_f32(s2, l2, "weight")?;
        let b = contiguous_f32(s3, l3, "bias")?;
        let d = w.len();
        if d == 0 || x.len() % d != 0 || b.len() != d {
            return Err(candle_core::Error::Msg(format!(
                "sherl-layer-norm: x of {} values, weight {d}, bias {}",
                x.len(),
                b.len()
            )));
        }
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            ln_row(xr, w, b, self.eps, yr);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = x.shape().clone();
        // borrowed from the tensors' storage (no copies)
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let xv = cpu_slice(&xs, xl, "input")?;
        let wv = cpu_slice(&ws, wl, "weight")?;
        let gv = cpu_slice(&gs, gl, "gradient")?;
        let d = wv.len();
        let mut dx = vec![0f32; xv.len()];
        let mut dw = vec![0f32; d];
        let mut db = vec![0f32; d];
        let mut scratch = vec![0f32; 2 * d];
        for ((xr, gr), dxr) in xv
            .chunks_exact(d)
            .zip(gv.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            ln_row_backward(xr, wv, gr, self.eps, dxr, &mut dw, &mut db, &mut scratch);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, shape, dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
            Some(Tensor::from_vec(db, d, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::close_t as close;
    use candle_core::Device;
    use candle_core::Var;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| r.symmetric_f32(1.0)).collect()
    }

    /// The fused masked mean against the composed ops: values and the
    /// input's gradient, with padding and an all-padding row.
    #[test]
    fn masked_mean_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let (b, s, d) = (3, 4, 5);
        let x = Var::from_vec(rand(b * s * d, 11), (b, s, d), &dev).unwrap();
        let mask = Tensor::new(
            &[[1f32, 1., 1., 0.], [1., 0., 0., 0.], [0., 0., 0., 0.]],
            &dev,
        )
        .unwrap();
        let probe = Tensor::from_vec(rand(b * d, 12), (b, d), &dev).unwrap();
        let yf = x.as_tensor().apply_op2(&mask, MaskedMeanOp).unwrap();
        let m = mask.unsqueeze(2).unwrap();
        let yc = x
            .as_tensor()
            .broadcast_mul(&m)
            .unwrap()
            .sum(1)
            .unwrap()
            .broadcast_div(&m.sum(1).unwrap().clamp(1.0, f64::MAX).unwrap())
            .unwrap();
        close(&yf, &yc, 1e-6, "mean");
        let gf = (yf * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (yc * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), 1e-6, "dx");
    }

    /// Values and gradients of the linear op equal the composed candle ops
    /// (1e-5 relative) for a frozen weight, a constant input and both
    /// trained (LayerNorm's fused op is checked against the composed one in
    /// [`crate::fit::nn::ops`]).
    #[test]
    fn linear_op_matches_the_composed_version() {
        let dev = Device::Cpu;
        let (rows, d_in, d_out) = (7, 12, 5);
        let xv = Var::from_vec(rand(rows * d_in, 1), (rows, d_in), &dev).unwrap();
        let wv = Var::from_vec(rand(d_out * d_in, 2), (d_out, d_in), &dev).unwrap();
        let probe = Tensor::from_vec(rand(rows * d_out, 5), (rows, d_out), &dev).unwrap();
        let frozen = Tensor::from_vec(rand(d_out * d_in, 6), (d_out, d_in), &dev).unwrap();
        let constant = Tensor::from_vec(rand(rows * d_in, 7), (rows, d_in), &dev).unwrap();

        // x W^T + b in the three cases: frozen weight (gradient reaches x
        // only), constant input (W and b only), both trained
        let bias = Var::from_vec(rand(d_out, 8), d_out, &dev).unwrap();
        let cases = [
            (xv.as_tensor().clone(), frozen.clone(), "frozen"),
            (constant.clone(), wv.as_tensor().clone(), "const"),
            (xv.as_tensor().clone(), wv.as_tensor().clone(), "trained"),
        ];
        for (x, w, what) in cases {
            let b = bias.as_tensor();
            let op = LinearOp::for_operands(&x, &w, b);
            assert_eq!((op.need_dx, op.need_dw), (x.track_op(), w.track_op()));
            let fused = x.apply_op3(&w, b, op).unwrap();
            let plain = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
            close(&fused, &plain, 1e-6, &format!("{what} fwd"));
            let gf = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (plain * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (v, name) in [(&xv, "dx"), (&wv, "dW"), (&bias, "db")] {
                match (gf.get(v), gp.get(v)) {
                    (Some(a), Some(b)) => close(a, b, 1e-5, &format!("{what} {name}")),
                    (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what} {name}"),
                }
            }
        }
    }

    /// LayerNorm's hand-written backward against central finite differences
    /// in f64 of the same formula.
    #[test]
    fn layer_norm_gradient_by_finite_differences() {
        let dev = Device::Cpu;
        let (rows, d) = (3, 6);
        let x0 = rand(rows * d, 11);
        let w0 = rand(d, 12);
        let b0 = rand(d, 13);
        let probe = rand(rows * d, 14);
        let eps = 1e-5f64;
        // loss(x) = sum(probe * LN(x))^2-free linear probe, in f64
        let loss = |x: &[f64]| -> f64 {
            let mut l = 0.0;
            for r in 0..rows {
                let row = &x[r * d..(r + 1) * d];
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                for k in 0..d {
                    let y =
                        (row[k] - mean) / (var + eps).sqrt() * f64::from(w0[k]) + f64::from(b0[k]);
                    l += y * f64::from(probe[r * d + k]);
                }
            }
            l
        };
        let xv = Var::from_vec(x0.clone(), (rows, d), &dev).unwrap();
        let w = Tensor::from_vec(w0.clone(), d, &dev).unwrap();
        let b = Tensor::from_vec(b0.clone(), d, &dev).unwrap();
        let p = Tensor::from_vec(probe.clone(), (rows, d), &dev).unwrap();
        let y = xv
            .as_tensor()
            .apply_op3(&w, &b, LayerNormOp { eps: eps as f32 })
            .unwrap();
        let g = (y * p).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g
            .get(&xv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x64: Vec<f64> = x0.iter().map(|&v| f64::from(v)).collect();
        let h = 1e-5;
        for i in 0..x64.len() {
            let (mut a, mut c) = (x64.clone(), x64.clone());
            a[i] += h;
            c[i] -= h;
            let fd = (loss(&a) - loss(&c)) / (2.0 * h);
            assert!(
                (fd - f64::from(dx[i])).abs() < 1e-3 * (1.0 + fd.abs()),
                "dx[{i}]: finite differences {fd} vs {}",
                dx[i]
            );
        }
    }
}
