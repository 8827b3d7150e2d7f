//! CPU custom ops that do less work than candle's generic backward:
//!
//! - [`FrozenMatmul`]: `x W^T` with `W` frozen (a pre-trained late layer).
//!   candle's matmul backward computes both operands' gradients; here only
//!   `dL/dx` is computed, which halves the backward products of a frozen
//!   layer and never allocates a gradient the size of its weights.
//! - [`ConstInputMatmul`]: `x W^T` with `x` a constant (cached hidden
//!   states into SHERL's and UniPT's projectors): only `dL/dW`.
//! - [`LayerNormOp`]: LayerNorm over the last axis in one pass forward and
//!   two backward, instead of about ten composed element-wise ops each way.
//! - [`MaskedMeanOp`]: the mean over real tokens (pooling, UniPT's layer
//!   summaries); candle's sum over the middle axis of `[B, S, D]` is a
//!   strided reduction that took 12 % of a UniPT step.
//!
//! Each is used only on the CPU with f32 tensors ([`cpu_f32`]); on other
//! devices [`super::linear`] and [`super::ops`] keep the composed ops. Tests
//! (below and `tests/fit.rs`) check values and gradients against the
//! composed versions and finite differences.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};

use super::gemm::View;

/// Whether `t` can take the CPU custom ops.
pub fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `x W^T` for `x` `[rows, in]` and a frozen `W` `[out, in]`; backward
/// gives `dL/dx = g W` only.
pub struct FrozenMatmul {
    /// `[out, in]`.
    pub w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "sherl-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "input")?;
        let (out, d_in) = self.w.dims2()?;
        let (storage, layout) = self.w.storage_and_layout();
        let y = product(
            x,
            View::dense(x.len() / d_in.max(1), d_in),
            cpu_slice(&storage, layout, "weight")?,
            View::dense(out, d_in).t(),
        )?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((x.len() / d_in.max(1), out)),
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.w)?))
    }
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

/// `x W^T` for a constant `x` `[rows, in]`, applied to a trained `W`
/// `[out, in]`; backward gives `dL/dW = g^T x` only.
pub struct ConstInputMatmul {
    /// `[rows, in]`.
    pub x: Tensor,
}

impl CustomOp1 for ConstInputMatmul {
    fn name(&self) -> &'static str {
        "sherl-const-input-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = contiguous_f32(s, l, "weight")?;
        let (out, d_in) = l.shape().dims2()?;
        let (rows, x_in) = self.x.dims2()?;
        if x_in != d_in {
            return Err(candle_core::Error::Msg(format!(
                "sherl matmul: input width {x_in}, weight [{out}, {d_in}]"
            )));
        }
        let (storage, layout) = self.x.storage_and_layout();
        let x = cpu_slice(&storage, layout, "input")?;
        let y = product(x, View::dense(rows, d_in), w, View::dense(out, d_in).t())?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, w: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dW = g^T x, [out, in]
        let (out, d_in) = w.dims2()?;
        let (rows, _) = self.x.dims2()?;
        let g = g.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (xs, xl) = self.x.storage_and_layout();
        let dw = product(
            cpu_slice(&gs, gl, "gradient")?,
            View::dense(rows, out).t(),
            cpu_slice(&xs, xl, "input")?,
            View::dense(rows, d_in),
        )?;
        Ok(Some(Tensor::from_vec(dw, (out, d_in), w.device())?))
    }
}

/// Mean over the real tokens: `x` `[B, S, D]`, `mask` `[B, S]` (1 real, 0
/// padding) -> `[B, D]`, `sum_s x[b, s] m[b, s] / max(sum_s m[b, s], 1)`.
/// The same operations in the same order as the composed version
/// ([`super::ops::masked_mean`]); no gradient for the mask.
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

/// Per row: mean and `1 / sqrt(var + eps)`, with the variance computed from
/// the centred values (two passes, as the composed version).
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A CPU tensor's contiguous f32 values, borrowed from its storage.
fn cpu_slice<'a>(s: &'a Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
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
            let (mean, rstd) = row_stats(xr, self.eps);
            for k in 0..d {
                yr[k] = (xr[k] - mean) * rstd * w[k] + b[k];
            }
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
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.to_vec1::<f32>()?;
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let d = wv.len();
        let mut dx = vec![0f32; xv.len()];
        let mut dw = vec![0f32; d];
        let mut db = vec![0f32; d];
        let mut xhat = vec![0f32; d];
        let mut dxhat = vec![0f32; d];
        for ((xr, gr), dxr) in xv
            .chunks_exact(d)
            .zip(gv.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let (mean, rstd) = row_stats(xr, self.eps);
            let (mut s1, mut s2) = (0f32, 0f32);
            for k in 0..d {
                xhat[k] = (xr[k] - mean) * rstd;
                dxhat[k] = gr[k] * wv[k];
                s1 += dxhat[k];
                s2 += dxhat[k] * xhat[k];
                dw[k] += gr[k] * xhat[k];
                db[k] += gr[k];
            }
            let (m1, m2) = (s1 / d as f32, s2 / d as f32);
            for k in 0..d {
                dxr[k] = rstd * (dxhat[k] - m1 - xhat[k] * m2);
            }
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

    /// Values and gradients of the three ops equal the composed candle ops
    /// (1e-5 relative), including through a loss that mixes them.
    #[test]
    fn ops_match_the_composed_versions() {
        let dev = Device::Cpu;
        let (rows, d_in, d_out) = (7, 12, 5);
        let xv = Var::from_vec(rand(rows * d_in, 1), (rows, d_in), &dev).unwrap();
        let wv = Var::from_vec(rand(d_out * d_in, 2), (d_out, d_in), &dev).unwrap();
        let lnw = Var::from_vec(rand(d_out, 3), d_out, &dev).unwrap();
        let lnb = Var::from_vec(rand(d_out, 4), d_out, &dev).unwrap();
        let probe = Tensor::from_vec(rand(rows * d_out, 5), (rows, d_out), &dev).unwrap();
        let frozen = Tensor::from_vec(rand(d_out * d_in, 6), (d_out, d_in), &dev).unwrap();
        let constant = Tensor::from_vec(rand(rows * d_in, 7), (rows, d_in), &dev).unwrap();

        // frozen weight: gradient reaches x only
        let fused = xv
            .as_tensor()
            .apply_op1(FrozenMatmul { w: frozen.clone() })
            .unwrap();
        let plain = xv.as_tensor().matmul(&frozen.t().unwrap()).unwrap();
        close(&fused, &plain, 1e-6, "frozen fwd");
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
        close(
            gf.get(&xv).unwrap(),
            gp.get(&xv).unwrap(),
            1e-5,
            "frozen dx",
        );

        // constant input: gradient reaches W only
        let fused = wv
            .as_tensor()
            .apply_op1(ConstInputMatmul {
                x: constant.clone(),
            })
            .unwrap();
        let plain = constant.matmul(&wv.as_tensor().t().unwrap()).unwrap();
        close(&fused, &plain, 1e-6, "const fwd");
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
        close(gf.get(&wv).unwrap(), gp.get(&wv).unwrap(), 1e-5, "const dW");

        // LayerNorm: x, weight and bias
        let pre = xv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
        let fused = pre
            .apply_op3(lnw.as_tensor(), lnb.as_tensor(), LayerNormOp { eps: 1e-5 })
            .unwrap();
        let plain =
            crate::fit::nn::ops::layer_norm_composed(&pre, lnw.as_tensor(), lnb.as_tensor(), 1e-5)
                .unwrap();
        close(&fused, &plain, 1e-5, "ln fwd");
        let loss = |y: Tensor| (y.sqr().unwrap() * &probe).unwrap().sum_all().unwrap();
        let gf = loss(fused).backward().unwrap();
        let gp = loss(plain).backward().unwrap();
        for (v, what) in [
            (&xv, "ln dx"),
            (&wv, "ln dW"),
            (&lnw, "ln dw"),
            (&lnb, "ln db"),
        ] {
            close(gf.get(v).unwrap(), gp.get(v).unwrap(), 1e-5, what);
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
