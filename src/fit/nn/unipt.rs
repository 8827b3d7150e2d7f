//! The UniPT side network (Diao et al., CVPR 2024), as docs/method.md §6
//! restates it: every hidden_states.0..=N projected to width d, the last as
//! anchor, each shallower one aggregated by relu'd, key-masked,
//! L1-normalised similarity to the anchor plus identity, weighted by a
//! softmax over per-layer confidences, added to the anchor through Linear +
//! LayerNorm.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::fused::{contiguous_f32, cpu_slice};
use super::gemm::{matmul, View};
use super::ops::{masked_mean, softmax};
use super::{Builder, LayerNorm, Linear, Projector};
use crate::Result;

/// LayerNorm epsilon of the output block.
const OUT_LN_EPS: f64 = 1e-5;

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
    /// Fresh parameters under `vb`'s prefix (`unipt`) for `m` entries of
    /// width `d_model`, side width `d`: projectors, `confidence`, `out`,
    /// `out_ln`.
    pub fn load(mut vb: Builder, m: usize, d_model: usize, d: usize) -> Result<Self> {
        let proj = Projector::load_all(&mut vb, m, d_model, d)?;
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
    /// On the CPU with f32 tensors each layer's aggregation is one fused op
    /// ([`AggregateOp`]); elsewhere (and in [`Unipt::forward_composed`])
    /// candle ops.
    pub fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        self.forward_with(layers, mask, true)
    }

    /// [`Unipt::forward`] from candle ops only (the fused op's reference).
    pub fn forward_composed(&self, layers: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        self.forward_with(layers, mask, false)
    }

    fn forward_with(&self, layers: &[Tensor], mask: &Tensor, fused: bool) -> Result<Tensor> {
        let _span = tracing::trace_span!("unipt").entered();
        let a = Projector::forward_all(&self.proj, layers)?;
        let n = a.len() - 1;
        let anchor = &a[n];
        let fused = fused
            && n >= 1
            && super::fused::cpu_f32(anchor)
            && super::fused::cpu_f32(mask)
            && super::fused::cpu_f32(&self.confidence.weight)
            && super::fused::cpu_f32(&self.confidence.bias);
        let agg = if fused {
            // [M, B, S, d], the anchor last; the confidence's weight and
            // bias as one [d + 1] vector
            let stacked = Tensor::stack(&a, 0)?;
            let conf = Tensor::cat(
                &[
                    self.confidence.weight.flatten_all()?,
                    self.confidence.bias.flatten_all()?,
                ],
                0,
            )?;
            stacked.apply_op3(&mask.contiguous()?, &conf, MixOp)?
        } else {
            self.mix_composed(&a, mask)?
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
/// hand-written backward. Inputs: the projected layers stacked `[M, B, S,
/// d]` (the anchor `A` last), the mask `[B, S]` (no gradient), and the
/// confidence head's weight and bias as one `[d + 1]` vector. Per sequence:
/// the masked means `m_j`; the confidences `e_j = w . (m_A * m_j) + b` and
/// their softmax `p`; for every shallower layer `X_j`,
/// `N_j = rownorm(relu(A X_j^T) * keymask)` and `N_j X_j + X_j`; the output
/// is `sum_j p_j (N_j X_j + X_j)` `[B, S, d]`.
///
/// Composed ([`Unipt::forward_composed`]) this is about 40 candle ops per
/// batch whose gradients candle sums into zero-filled tensors; here two
/// products per layer and sequence forward, four backward (the `A X^T`
/// similarity recomputed, nothing stored), and one gradient tensor.
struct MixOp;

fn mix_err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("sherl fused UniPT aggregation: {msg}"))
}

/// One sequence's masked means of the `m` stacked layers (`means[j * d..]`)
/// and the softmax weights of the `m - 1` shallower ones (`weights`), as
/// the composed ops compute them.
#[allow(clippy::too_many_arguments)]
fn mix_weights(
    p: &[f32],
    keys: &[f32],
    conf: &[f32],
    (m, b, s, d): (usize, usize, usize, usize),
    bi: usize,
    means: &mut [f32],
    weights: &mut [f32],
) {
    let count = keys.iter().sum::<f32>().max(1.0);
    let t = b * s * d;
    for (j, mean) in means.chunks_exact_mut(d).enumerate().take(m) {
        let x = &p[j * t + bi * s * d..j * t + (bi + 1) * s * d];
        mean.iter_mut().for_each(|v| *v = 0.0);
        for (row, &k) in x.chunks_exact(d).zip(keys) {
            for (a, v) in mean.iter_mut().zip(row) {
                *a += v * k;
            }
        }
        mean.iter_mut().for_each(|v| *v /= count);
    }
    let n = m - 1;
    let (shallow, anchor) = means.split_at(n * d);
    let (w, bias) = conf.split_at(d);
    for (e, mj) in weights.iter_mut().zip(shallow.chunks_exact(d)) {
        *e = anchor
            .iter()
            .zip(mj)
            .zip(w)
            .map(|((a, x), w)| (a * x) * w)
            .sum::<f32>()
            + bias[0];
    }
    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    weights.iter_mut().for_each(|e| *e = (*e - max).exp());
    let sum: f32 = weights.iter().sum();
    weights.iter_mut().for_each(|e| *e /= sum);
}

/// `R = relu(A X^T) * keymask` and its row sums plus 1e-8, for one
/// sequence (`a`, `x` `[s, d]`, `keys` `[s]`).
fn similarity(
    a: &[f32],
    x: &[f32],
    keys: &[f32],
    s: usize,
    d: usize,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let mut r = vec![0f32; s * s];
    matmul(
        &mut r,
        View::dense(s, s),
        a,
        View::dense(s, d),
        x,
        View::dense(s, d).t(),
        1.0,
        false,
        1,
    )?;
    let mut sums = vec![0f32; s];
    for (row, sum) in r.chunks_exact_mut(s).zip(sums.iter_mut()) {
        for (v, k) in row.iter_mut().zip(keys) {
            *v = v.max(0.0) * k;
        }
        *sum = row.iter().sum::<f32>() + 1e-8;
    }
    Ok((r, sums))
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
        let (m, b, s, d) = l1.shape().dims4()?;
        if m < 2 || l2.shape().dims() != [b, s] || l3.shape().dims() != [d + 1] {
            return Err(mix_err("shapes do not match"));
        }
        let (p, mk, conf) = (
            contiguous_f32(s1, l1, "layers")?,
            contiguous_f32(s2, l2, "mask")?,
            contiguous_f32(s3, l3, "confidence")?,
        );
        let (n, t, sd) = (m - 1, b * s * d, s * d);
        let mut out = vec![0f32; t];
        let mut means = vec![0f32; m * d];
        let mut weights = vec![0f32; n];
        let mut mj = vec![0f32; sd];
        for bi in 0..b {
            let keys = &mk[bi * s..(bi + 1) * s];
            mix_weights(p, keys, conf, (m, b, s, d), bi, &mut means, &mut weights);
            let at = bi * sd..(bi + 1) * sd;
            let ab = &p[n * t..][at.clone()];
            let ob = &mut out[at.clone()];
            for (j, &wj) in weights.iter().enumerate() {
                let xb = &p[j * t..][at.clone()];
                let (mut r, sums) = similarity(ab, xb, keys, s, d)?;
                for (row, sum) in r.chunks_exact_mut(s).zip(&sums) {
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                // M_j = N X + X, then added with its weight, in the
                // composed order (agg = M_0 p_0, agg += M_j p_j)
                mj.copy_from_slice(xb);
                matmul(
                    &mut mj,
                    View::dense(s, d),
                    &r,
                    View::dense(s, s),
                    xb,
                    View::dense(s, d),
                    1.0,
                    true,
                    1,
                )?;
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
        conf: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, b, s, d) = layers.dims4()?;
        let (layers, mask, conf, grad) = (
            layers.contiguous()?,
            mask.contiguous()?,
            conf.contiguous()?,
            grad.contiguous()?,
        );
        let (ps, pl) = layers.storage_and_layout();
        let (ms, ml) = mask.storage_and_layout();
        let (cs, cl) = conf.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let p = cpu_slice(&ps, pl, "layers")?;
        let mk = cpu_slice(&ms, ml, "mask")?;
        let cf = cpu_slice(&cs, cl, "confidence")?;
        let g = cpu_slice(&gs, gl, "gradient")?;
        let (n, t, sd) = (m - 1, b * s * d, s * d);
        let mut dp = vec![0f32; m * t];
        let mut dconf = vec![0f32; d + 1];
        let mut means = vec![0f32; m * d];
        let mut weights = vec![0f32; n];
        let mut dweights = vec![0f32; n];
        let mut gx = vec![0f32; s * s];
        let mut dmean = vec![0f32; m * d];
        for bi in 0..b {
            let keys = &mk[bi * s..(bi + 1) * s];
            mix_weights(p, keys, cf, (m, b, s, d), bi, &mut means, &mut weights);
            let at = bi * sd..(bi + 1) * sd;
            let ab = &p[n * t..][at.clone()];
            let gb = &g[at.clone()];
            for (j, &wj) in weights.iter().enumerate() {
                let xb = &p[j * t..][at.clone()];
                let (r, sums) = similarity(ab, xb, keys, s, d)?;
                let norm: Vec<f32> = r
                    .chunks_exact(s)
                    .zip(&sums)
                    .flat_map(|(row, sum)| row.iter().map(move |v| v / sum))
                    .collect();
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
                dweights[j] = norm.iter().zip(&gx).map(|(a, b)| a * b).sum::<f32>()
                    + gb.iter().zip(xb).map(|(a, b)| a * b).sum::<f32>();
                let (dpj, dpa) = {
                    let (lo, hi) = dp.split_at_mut(n * t);
                    (&mut lo[j * t..][at.clone()], &mut hi[at.clone()])
                };
                // dX = p_j (G + N^T G)
                dpj.iter_mut().zip(gb).for_each(|(o, v)| *o += wj * v);
                matmul(
                    dpj,
                    View::dense(s, d),
                    &norm,
                    View::dense(s, s).t(),
                    gb,
                    View::dense(s, d),
                    wj,
                    true,
                    1,
                )?;
                // dN = p_j G X^T, through the row normalisation, relu and
                // key mask (R > 0 exactly where relu passed a real key)
                for i in 0..s {
                    let sum = sums[i];
                    let row = i * s..(i + 1) * s;
                    let dot: f32 = gx[row.clone()]
                        .iter()
                        .zip(&r[row.clone()])
                        .map(|(g, v)| wj * g * v)
                        .sum();
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
                matmul(
                    dpa,
                    View::dense(s, d),
                    &gx,
                    View::dense(s, s),
                    xb,
                    View::dense(s, d),
                    1.0,
                    true,
                    1,
                )?;
                matmul(
                    dpj,
                    View::dense(s, d),
                    &gx,
                    View::dense(s, s).t(),
                    ab,
                    View::dense(s, d),
                    1.0,
                    true,
                    1,
                )?;
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
                    dconf[c] += de * (anchor[c] * mj[c]);
                    dmj[c] = de * cf[c] * anchor[c];
                    danchor[c] += de * cf[c] * mj[c];
                }
                dconf[d] += de;
            }
            // the masked means' gradients, spread over the real tokens
            let count = keys.iter().sum::<f32>().max(1.0);
            for (j, dm) in dmean.chunks_exact(d).enumerate() {
                let dpj = &mut dp[j * t..][at.clone()];
                for (row, &k) in dpj.chunks_exact_mut(d).zip(keys) {
                    for (o, v) in row.iter_mut().zip(dm) {
                        *o += v / count * k;
                    }
                }
            }
        }
        let dev = layers.device();
        Ok((
            Some(Tensor::from_vec(dp, (m, b, s, d), dev)?),
            None,
            Some(Tensor::from_vec(dconf, d + 1, dev)?),
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
