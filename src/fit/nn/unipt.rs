//! The UniPT side network (Diao et al., CVPR 2024), as docs/method.md §6
//! restates it: every hidden_states.0..=N projected to width d, the last as
//! anchor, each shallower one aggregated by relu'd, key-masked,
//! L1-normalised similarity to the anchor plus identity, weighted by a
//! softmax over per-layer confidences, added to the anchor through Linear +
//! LayerNorm.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::ops::{masked_mean, softmax};
use super::{Builder, LayerNorm, Linear, Projector, SideConfig};
use crate::fit::kernels::fused::{
    contiguous_f32, cpu_f32, cpu_slice, lane_sum_dot, ln_row, ln_row_backward,
};
use crate::fit::kernels::gemm::{matmul, View};
use crate::Result;

/// LayerNorm epsilon of the output block.
pub const OUT_LN_EPS: f64 = 1e-5;

/// Projectors, per-layer confidence, output block.
#[derive(Debug, Clone)]
pub struct Unipt {
    proj: Vec<Projector>,
    confidence: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

impl super::Detach for Unipt {
    fn detached(&self) -> Self {
        Unipt {
            proj: self.proj.detached(),
            confidence: self.confidence.detached(),
            out: self.out.detached(),
            out_norm: self.out_norm.detached(),
        }
    }
}

impl Unipt {
    /// Fresh parameters under `vb`'s prefix (`unipt`) for `cfg.layers`
    /// entries (hidden_states.0..=N): projectors, `confidence`, `out`,
    /// `out_ln`.
    pub fn load(mut vb: Builder, cfg: &SideConfig) -> Result<Self> {
        let d = cfg.d;
        let proj = Projector::load_all(vb.reborrow(), cfg)?;
        let confidence = vb.fresh_linear("confidence", d, 1)?;
        let out = vb.fresh_linear("out", d, d)?;
        let out_norm = vb.fresh_layer_norm("out_ln", d, OUT_LN_EPS)?;
        Ok(Unipt {
            proj,
            confidence,
            out,
            out_norm,
        })
    }

    /// # Shapes
    /// `layers`: hidden_states.0..=N, each `[B, S, D]`; `mask` `[B, S]` -> `[B, S, d]`.
    ///
    /// On the CPU with f32 tensors everything between the projectors'
    /// linear products and the output block is one fused op (`MixOp`);
    /// elsewhere (and in [`Unipt::forward_composed`]) candle ops.
    pub fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        self.forward_with(layers, mask, true)
    }

    /// [`Unipt::forward`] from candle ops only (the fused op's reference).
    pub fn forward_composed(&self, layers: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        self.forward_with(layers, mask, false)
    }

    fn forward_with(&self, layers: &[Tensor], mask: &Tensor, fused: bool) -> Result<Tensor> {
        let _span = tracing::trace_span!("unipt").entered();
        let cpu = |t: &Tensor| cpu_f32(t);
        let fused = fused
            && self.proj.len() >= 2
            && cpu(mask)
            && cpu(&self.confidence.weight)
            && cpu(&self.confidence.bias)
            && self
                .proj
                .iter()
                .all(|p| cpu(&p.norm.weight) && cpu(&p.norm.bias));
        let (anchor, agg) = if fused {
            // the linear outputs [M, B, S, d], the anchor's last; the
            // confidence head and the LayerNorms as one vector
            let y: Vec<Tensor> = layers
                .iter()
                .zip(&self.proj)
                .map(|(x, p)| p.linear.forward(x))
                .collect::<Result<_>>()?;
            let last = self.proj.len() - 1;
            let anchor = self.proj[last].norm.forward(&y[last])?;
            let mut params = vec![
                self.confidence.weight.flatten_all()?,
                self.confidence.bias.flatten_all()?,
            ];
            for p in &self.proj {
                params.push(p.norm.weight.clone());
                params.push(p.norm.bias.clone());
            }
            let eps = self.proj[last].norm.eps as f32;
            if self.proj.iter().any(|p| p.norm.eps as f32 != eps) {
                return Err(crate::fit::error::FitError::model(
                    "the projectors' LayerNorms differ in epsilon".to_string(),
                ));
            }
            let agg = Tensor::stack(&y, 0)?.apply_op3(
                &mask.contiguous()?,
                &Tensor::cat(&params, 0)?,
                MixOp { eps },
            )?;
            (anchor, agg)
        } else {
            let a = Projector::forward_all(&self.proj, layers)?;
            let agg = self.mix_composed(&a, mask)?;
            (a[a.len() - 1].clone(), agg)
        };
        let o = self.out_norm.forward(&self.out.forward(&agg)?)?;
        Ok((anchor + o)?)
    }

    /// The aggregation of the projected layers `a` (anchor last) from
    /// candle ops: [`MixOp`]'s reference.
    fn mix_composed(&self, a: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        let n = a.len() - 1;
        let anchor = &a[n];
        let key_mask = mask.unsqueeze(1)?; // [B, 1, S]
        let anchor_mean = masked_mean(anchor, mask)?; // [B, d]
        let mut ms = Vec::with_capacity(n);
        let mut cs = Vec::with_capacity(n);
        for aj in &a[..n] {
            let sim = anchor
                .matmul(&aj.transpose(1, 2)?.contiguous()?)?
                .relu()?
                .broadcast_mul(&key_mask)?; // [B, S, S]
            let norm = sim.broadcast_div(&(sim.sum_keepdim(2)? + 1e-8)?)?;
            ms.push((norm.matmul(aj)? + aj)?); // W A_j with W = normalised + identity
            cs.push(
                self.confidence
                    .forward(&(&anchor_mean * masked_mean(aj, mask)?)?)?,
            ); // [B, 1]
        }
        let w = softmax(&Tensor::cat(&cs, 1)?)?; // [B, n]
        let mut agg = ms[0].broadcast_mul(&w.narrow(1, 0, 1)?.unsqueeze(2)?)?;
        for (j, m) in ms.iter().enumerate().skip(1) {
            agg = (agg + m.broadcast_mul(&w.narrow(1, j, 1)?.unsqueeze(2)?)?)?;
        }
        Ok(agg)
    }
}

/// UniPT's aggregation of all projected layers as one CPU op with a
/// hand-written backward. Inputs: the projectors' linear outputs stacked
/// `[M, B, S, d]` (the anchor's last), the mask `[B, S]` (no gradient), and
/// one vector of the confidence head's weight and bias and the projectors'
/// LayerNorm weights and biases (`[d + 1 + 2 M d]`: `w, b, g_0, beta_0,
/// ..`). Per sequence: the projected layers `X_j = LayerNorm_j(Y_j)` (the
/// anchor `A = X_{M-1}`), their masked means `m_j`; the confidences
/// `e_j = w . (m_A * m_j) + b` and their softmax `p`; for every shallower
/// layer `N_j = rownorm(relu(A X_j^T) * keymask)` and `N_j X_j + X_j`; the
/// output is `sum_j p_j (N_j X_j + X_j)` `[B, S, d]`.
///
/// Composed ([`Unipt::forward_composed`]) this is about 50 candle ops per
/// batch whose gradients candle sums into zero-filled tensors one by one;
/// here two products per layer and sequence forward, four backward (`A X^T`
/// and the LayerNorms recomputed, nothing stored), and one gradient tensor.
struct MixOp {
    /// The projectors' LayerNorm epsilon.
    eps: f32,
}

fn mix_err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("sherl fused UniPT aggregation: {msg}"))
}

/// One sequence's projected layers: `x` (`[M, S, d]`) from the linear
/// outputs `y` (`[M, B, S, d]`, sequence `bi`) and the LayerNorm parameters
/// `ln` (`g_0, beta_0, ..`).
fn project_sequence(y: &[f32], ln: &[f32], (m, b, s, d): Dims, bi: usize, eps: f32, x: &mut [f32]) {
    let (t, sd) = (b * s * d, s * d);
    for j in 0..m {
        let (g, beta) = ln[2 * j * d..2 * (j + 1) * d].split_at(d);
        let yj = &y[j * t + bi * sd..j * t + (bi + 1) * sd];
        for (yr, xr) in yj
            .chunks_exact(d)
            .zip(x[j * sd..(j + 1) * sd].chunks_exact_mut(d))
        {
            ln_row(yr, g, beta, eps, xr);
        }
    }
}

/// `(M, B, S, d)`.
type Dims = (usize, usize, usize, usize);

/// One sequence's masked means of its `m` projected layers `x` (`[M, S,
/// d]`) into `means` (`[M, d]`) and the softmax weights of the `m - 1`
/// shallower ones into `weights`; `prod` is scratch of `d` values.
fn mix_weights(
    x: &[f32],
    keys: &[f32],
    conf: &[f32],
    means: &mut [f32],
    weights: &mut [f32],
    prod: &mut [f32],
) {
    let d = prod.len();
    let sd = keys.len() * d;
    let count = keys.iter().sum::<f32>().max(1.0);
    for (xj, mean) in x.chunks_exact(sd).zip(means.chunks_exact_mut(d)) {
        mean.iter_mut().for_each(|v| *v = 0.0);
        for (row, &k) in xj.chunks_exact(d).zip(keys) {
            for (a, v) in mean.iter_mut().zip(row) {
                *a += v * k;
            }
        }
        mean.iter_mut().for_each(|v| *v /= count);
    }
    let n = weights.len();
    let (shallow, anchor) = means.split_at(n * d);
    let (w, bias) = conf.split_at(d);
    for (e, mj) in weights.iter_mut().zip(shallow.chunks_exact(d)) {
        prod.iter_mut()
            .zip(anchor.iter().zip(mj))
            .for_each(|(p, (a, x))| *p = a * x);
        *e = lane_sum_dot(prod, w) + bias[0];
    }
    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    weights.iter_mut().for_each(|e| *e = (*e - max).exp());
    let sum: f32 = weights.iter().sum();
    weights.iter_mut().for_each(|e| *e /= sum);
}

/// `dst += alpha R X` for one sequence: `R` `[s, s]` (`R^T` with `rt`),
/// `X` and `dst` `[s, d]`.
fn add_rx(
    dst: &mut [f32],
    r: &[f32],
    rt: bool,
    x: &[f32],
    alpha: f32,
    s: usize,
    d: usize,
) -> candle_core::Result<()> {
    let rv = if rt {
        View::dense(s, s).t()
    } else {
        View::dense(s, s)
    };
    matmul(
        dst,
        View::dense(s, d),
        r,
        rv,
        x,
        View::dense(s, d),
        alpha,
        true,
        1,
    )
}

/// `R = relu(A X^T) * keymask` into `r` (`[s, s]`) and its row sums plus
/// 1e-8 into `sums` (`[s]`), for one sequence (`a`, `x` `[s, d]`, `keys`
/// `[s]`); the buffers are the caller's, reused from sequence to sequence.
fn similarity(
    a: &[f32],
    x: &[f32],
    keys: &[f32],
    d: usize,
    r: &mut [f32],
    sums: &mut [f32],
) -> candle_core::Result<()> {
    let s = keys.len();
    matmul(
        r,
        View::dense(s, s),
        a,
        View::dense(s, d),
        x,
        View::dense(s, d).t(),
        1.0,
        false,
        1,
    )?;
    for (row, sum) in r.chunks_exact_mut(s).zip(sums.iter_mut()) {
        for (v, k) in row.iter_mut().zip(keys) {
            *v = v.max(0.0) * k;
        }
        *sum = row.iter().sum::<f32>() + 1e-8;
    }
    Ok(())
}

impl MixOp {
    /// Check the shapes; the dimensions.
    fn dims(&self, layers: &Shape, mask: &Shape, params: &Shape) -> candle_core::Result<Dims> {
        let (m, b, s, d) = layers.dims4()?;
        if m < 2 || mask.dims() != [b, s] || params.dims() != [d + 1 + 2 * m * d] {
            return Err(mix_err("shapes do not match"));
        }
        Ok((m, b, s, d))
    }
}

impl CustomOp3 for MixOp {
    fn name(&self) -> &'static str {
        "sherl-unipt-mix"
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
        let (m, b, s, d) = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let (y, mk, params) = (
            contiguous_f32(s1, l1, "layers")?,
            contiguous_f32(s2, l2, "mask")?,
            contiguous_f32(s3, l3, "parameters")?,
        );
        let (conf, ln) = params.split_at(d + 1);
        let (n, sd) = (m - 1, s * d);
        let mut out = vec![0f32; b * sd];
        let mut x = vec![0f32; m * sd];
        let mut means = vec![0f32; m * d];
        let mut weights = vec![0f32; n];
        let mut prod = vec![0f32; d];
        let mut mj = vec![0f32; sd];
        let (mut r, mut sums) = (vec![0f32; s * s], vec![0f32; s]);
        for bi in 0..b {
            let keys = &mk[bi * s..(bi + 1) * s];
            project_sequence(y, ln, (m, b, s, d), bi, self.eps, &mut x);
            mix_weights(&x, keys, conf, &mut means, &mut weights, &mut prod);
            let ab = &x[n * sd..];
            let ob = &mut out[bi * sd..(bi + 1) * sd];
            for (j, &wj) in weights.iter().enumerate() {
                let xb = &x[j * sd..(j + 1) * sd];
                similarity(ab, xb, keys, d, &mut r, &mut sums)?;
                for (row, sum) in r.chunks_exact_mut(s).zip(&sums) {
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                // M_j = N X + X, then added with its weight, in the
                // composed order (agg = M_0 p_0, agg += M_j p_j)
                mj.copy_from_slice(xb);
                add_rx(&mut mj, &r, false, xb, 1.0, s, d)?;
                if j == 0 {
                    ob.iter_mut().zip(&mj).for_each(|(o, v)| *o = v * wj);
                } else {
                    ob.iter_mut().zip(&mj).for_each(|(o, v)| *o += v * wj);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, s, d))))
    }

    fn bwd(
        &self,
        layers: &Tensor,
        mask: &Tensor,
        params: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, b, s, d) = self.dims(layers.shape(), mask.shape(), params.shape())?;
        let (layers, mask, params, grad) = (
            layers.contiguous()?,
            mask.contiguous()?,
            params.contiguous()?,
            grad.contiguous()?,
        );
        let (ys, yl) = layers.storage_and_layout();
        let (ms, ml) = mask.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let y = cpu_slice(&ys, yl, "layers")?;
        let mk = cpu_slice(&ms, ml, "mask")?;
        let pv = cpu_slice(&ps, pl, "parameters")?;
        let g = cpu_slice(&gs, gl, "gradient")?;
        let (conf, ln) = pv.split_at(d + 1);
        let (n, t, sd) = (m - 1, b * s * d, s * d);
        let mut dy = vec![0f32; m * t];
        let mut dparams = vec![0f32; pv.len()];
        let mut x = vec![0f32; m * sd];
        let mut dx = vec![0f32; m * sd];
        let mut means = vec![0f32; m * d];
        let mut weights = vec![0f32; n];
        let mut dweights = vec![0f32; n];
        let mut gx = vec![0f32; s * s];
        let mut norm = vec![0f32; s * s];
        let mut dmean = vec![0f32; m * d];
        let mut prod = vec![0f32; d];
        let mut scratch = vec![0f32; 2 * d];
        let (mut r, mut sums) = (vec![0f32; s * s], vec![0f32; s]);
        for bi in 0..b {
            let keys = &mk[bi * s..(bi + 1) * s];
            project_sequence(y, ln, (m, b, s, d), bi, self.eps, &mut x);
            mix_weights(&x, keys, conf, &mut means, &mut weights, &mut prod);
            dx.iter_mut().for_each(|v| *v = 0.0);
            let ab = &x[n * sd..];
            let gb = &g[bi * sd..(bi + 1) * sd];
            for (j, &wj) in weights.iter().enumerate() {
                let xb = &x[j * sd..(j + 1) * sd];
                similarity(ab, xb, keys, d, &mut r, &mut sums)?;
                for ((nrow, row), sum) in norm.chunks_exact_mut(s).zip(r.chunks_exact(s)).zip(&sums)
                {
                    nrow.iter_mut().zip(row).for_each(|(n, v)| *n = v / sum);
                }
                // G X^T: gives dN and the weight's gradient
                gx.iter_mut().for_each(|v| *v = 0.0);
                matmul(
                    &mut gx,
                    View::dense(s, s),
                    gb,
                    View::dense(s, d),
                    xb,
                    View::dense(s, d).t(),
                    1.0,
                    true,
                    1,
                )?;
                // d p_j = sum G . (N X + X) = sum N . (G X^T) + sum G . X
                dweights[j] = lane_sum_dot(&norm, &gx) + lane_sum_dot(gb, xb);
                let (dxj, dxa) = {
                    let (lo, hi) = dx.split_at_mut(n * sd);
                    (&mut lo[j * sd..(j + 1) * sd], hi)
                };
                // dX = p_j (G + N^T G)
                dxj.iter_mut().zip(gb).for_each(|(o, v)| *o += wj * v);
                add_rx(dxj, &norm, true, gb, wj, s, d)?;
                // dN = p_j G X^T, through the row normalisation, relu and
                // key mask (R > 0 exactly where relu passed a real key)
                for i in 0..s {
                    let sum = sums[i];
                    let row = i * s..(i + 1) * s;
                    let dot = wj * lane_sum_dot(&gx[row.clone()], &r[row.clone()]);
                    let dsum = -dot / (sum * sum);
                    for c in 0..s {
                        let dr = wj * gx[i * s + c] / sum + dsum;
                        gx[i * s + c] = if r[i * s + c] > 0.0 {
                            dr * keys[c]
                        } else {
                            0.0
                        };
                    }
                }
                // dA += dR X ; dX += dR^T A
                add_rx(dxa, &gx, false, xb, 1.0, s, d)?;
                add_rx(dxj, &gx, true, ab, 1.0, s, d)?;
            }
            // softmax, then the confidence head e_j = w . (m_A * m_j) + b
            let sdot: f32 = weights.iter().zip(&dweights).map(|(w, g)| w * g).sum();
            let (shallow, anchor) = means.split_at(n * d);
            let (dshallow, danchor) = dmean.split_at_mut(n * d);
            danchor.iter_mut().for_each(|v| *v = 0.0);
            for j in 0..n {
                let de = weights[j] * (dweights[j] - sdot);
                let mj = &shallow[j * d..(j + 1) * d];
                let dmj = &mut dshallow[j * d..(j + 1) * d];
                for c in 0..d {
                    dparams[c] += de * (anchor[c] * mj[c]);
                    dmj[c] = de * conf[c] * anchor[c];
                    danchor[c] += de * conf[c] * mj[c];
                }
                dparams[d] += de;
            }
            // the masked means' gradients, spread over the real tokens
            let count = keys.iter().sum::<f32>().max(1.0);
            for (dxj, dm) in dx.chunks_exact_mut(sd).zip(dmean.chunks_exact(d)) {
                for (row, &k) in dxj.chunks_exact_mut(d).zip(keys) {
                    for (o, v) in row.iter_mut().zip(dm) {
                        *o += v / count * k;
                    }
                }
            }
            // through the LayerNorms to the linear outputs
            let (_, dln) = dparams.split_at_mut(d + 1);
            for j in 0..m {
                let g_j = &ln[2 * j * d..(2 * j + 1) * d];
                let (dg, dbeta) = dln[2 * j * d..2 * (j + 1) * d].split_at_mut(d);
                let yj = &y[j * t + bi * sd..j * t + (bi + 1) * sd];
                let dyj = &mut dy[j * t + bi * sd..j * t + (bi + 1) * sd];
                for ((yr, dxr), dyr) in yj
                    .chunks_exact(d)
                    .zip(dx[j * sd..(j + 1) * sd].chunks_exact(d))
                    .zip(dyj.chunks_exact_mut(d))
                {
                    ln_row_backward(yr, g_j, dxr, self.eps, dyr, dg, dbeta, &mut scratch);
                }
            }
        }
        let dev = layers.device();
        Ok((
            Some(Tensor::from_vec(dy, (m, b, s, d), dev)?),
            None,
            Some(Tensor::from_vec(dparams, pv.len(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::{close, flat, same_grads, Draw};
    use candle_core::{DType, Device};

    /// The fused aggregation against the composed ops: the output and the
    /// gradient of every parameter (projectors, confidence, output block)
    /// within 1e-5 relative, over random draws with padding, then with an
    /// all-padding sequence added to the same draws.
    #[test]
    fn fused_unipt_matches_the_composed_ops() {
        for seed in 0..4 {
            let (m, dm, d, b, s) = (4, 6, 5, 2, 5);
            let mut r = Draw::new(seed);
            let proj = r.projectors(m, dm, d, 1e-5);
            let u = Unipt {
                proj,
                confidence: r.linear(1, d, 0.5, 0.1),
                out: r.linear(d, d, 0.5, 0.1),
                out_norm: r.layer_norm(d, 0.2, 0.1, 1e-5),
            };
            let layers: Vec<Tensor> = (0..m).map(|_| r.tensor(&[b, s, dm], 1.5)).collect();
            let mask = Tensor::new(
                &[[1f32, 1., 1., 1., 0.], [1., 1., 0., 0., 0.]],
                &Device::Cpu,
            )
            .unwrap();
            let probe = r.tensor(&[b, s, d], 1.0);
            let check = |layers: &[Tensor], mask: &Tensor, probe: &Tensor, what: &str| {
                let yf = u.forward(layers, mask).unwrap();
                let yc = u.forward_composed(layers, mask).unwrap();
                close(&flat(&yf), &flat(&yc), 1e-5, what);
                let gf = (yf * probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (yc * probe).unwrap().sum_all().unwrap().backward().unwrap();
                same_grads(&gf, &gc, &r.vars, 1e-5, what);
            };
            check(&layers, &mask, &probe, &format!("seed {seed}"));
            // a third sequence of padding only (its values do not count)
            let cat = |t: &Tensor, extra: Tensor| Tensor::cat(&[t, &extra], 0).unwrap();
            let mut more = Draw::new(seed + 100);
            let layers: Vec<Tensor> = layers
                .iter()
                .map(|l| cat(l, more.tensor(&[1, s, dm], 1.5)))
                .collect();
            let mask = cat(
                &mask,
                Tensor::zeros((1, s), DType::F32, &Device::Cpu).unwrap(),
            );
            let probe = cat(&probe, more.tensor(&[1, s, d], 1.0));
            check(
                &layers,
                &mask,
                &probe,
                &format!("seed {seed}, padding only"),
            );
        }
    }
}
