//! The UniPT side network (Diao et al., CVPR 2024), as docs/method.md §6
//! restates it: every hidden_states.0..=N projected to width d, the last as
//! anchor, each shallower one aggregated by relu'd, key-masked,
//! L1-normalised similarity to the anchor plus identity, weighted by a
//! softmax over per-layer confidences, added to the anchor through Linear +
//! LayerNorm.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::fused::contiguous_f32;
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
        let key_mask = mask.unsqueeze(1)?; // [B, 1, S]
        let anchor_mean = masked_mean(anchor, mask)?; // [B, d]
        let mut ms = Vec::with_capacity(n);
        let mut cs = Vec::with_capacity(n);
        let fused = fused && super::fused::cpu_f32(anchor) && super::fused::cpu_f32(mask);
        for aj in &a[..n] {
            if fused {
                ms.push(anchor.contiguous()?.apply_op3(
                    &aj.contiguous()?,
                    &mask.contiguous()?,
                    AggregateOp,
                )?);
                cs.push(
                    self.confidence
                        .forward(&(&anchor_mean * masked_mean(aj, mask)?)?)?,
                );
                continue;
            }
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
        let o = self.out_norm.forward(&self.out.forward(&agg)?)?;
        Ok((anchor + o)?)
    }
}

/// One layer's aggregation in UniPT as a CPU op with a hand-written
/// backward: per sequence, `N = rownorm(relu(A X^T) * keymask)` and
/// `N X + X`, for the anchor `A` and the layer `X` (`[B, S, d]` each) and
/// the mask `[B, S]` (no gradient). Composed it is eight candle ops per
/// layer on `[B, S, S]` tensors; here two products forward and four
/// backward per sequence ([`super::gemm`]), nothing else allocated per op.
struct AggregateOp;

fn agg_err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("sherl fused UniPT aggregation: {msg}"))
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

impl CustomOp3 for AggregateOp {
    fn name(&self) -> &'static str {
        "sherl-unipt-aggregate"
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
        let (b, s, d) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, s, d] || l3.shape().dims() != [b, s] {
            return Err(agg_err("shapes do not match"));
        }
        let (a, x, m) = (
            contiguous_f32(s1, l1, "queries")?,
            contiguous_f32(s2, l2, "layers")?,
            contiguous_f32(s3, l3, "mask")?,
        );
        let mut out = x.to_vec();
        for bi in 0..b {
            let (ab, xb) = (
                &a[bi * s * d..(bi + 1) * s * d],
                &x[bi * s * d..(bi + 1) * s * d],
            );
            let (mut r, sums) = similarity(ab, xb, &m[bi * s..(bi + 1) * s], s, d)?;
            for (row, sum) in r.chunks_exact_mut(s).zip(&sums) {
                row.iter_mut().for_each(|v| *v /= sum);
            }
            let ob = &mut out[bi * s * d..(bi + 1) * s * d];
            matmul(
                ob,
                View::dense(s, d),
                &r,
                View::dense(s, s),
                xb,
                View::dense(s, d),
                1.0,
                true,
                1,
            )?;
        }
        Ok((CpuStorage::F32(out), Shape::from((b, s, d))))
    }

    fn bwd(
        &self,
        anchor: &Tensor,
        layer: &Tensor,
        mask: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, s, d) = anchor.dims3()?;
        let a = anchor.flatten_all()?.to_vec1::<f32>()?;
        let x = layer.flatten_all()?.to_vec1::<f32>()?;
        let m = mask.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut da = vec![0f32; b * s * d];
        // the identity term: dX = G + ...
        let mut dx = g.clone();
        let mut dn = vec![0f32; s * s];
        for bi in 0..b {
            let span = bi * s * d..(bi + 1) * s * d;
            let (ab, xb, gb) = (&a[span.clone()], &x[span.clone()], &g[span.clone()]);
            let keys = &m[bi * s..(bi + 1) * s];
            let (r, sums) = similarity(ab, xb, keys, s, d)?;
            let norm: Vec<f32> = r
                .chunks_exact(s)
                .zip(&sums)
                .flat_map(|(row, sum)| row.iter().map(move |v| v / sum))
                .collect();
            // dX += N^T G ; dN = G X^T
            matmul(
                &mut dx[span.clone()],
                View::dense(s, d),
                &norm,
                View::dense(s, s).t(),
                gb,
                View::dense(s, d),
                1.0,
                true,
                1,
            )?;
            matmul(
                &mut dn,
                View::dense(s, s),
                gb,
                View::dense(s, d),
                xb,
                View::dense(s, d).t(),
                1.0,
                false,
                1,
            )?;
            // through the row normalisation, relu and key mask: dP
            let mut p = vec![0f32; s * s];
            matmul(
                &mut p,
                View::dense(s, s),
                ab,
                View::dense(s, d),
                xb,
                View::dense(s, d).t(),
                1.0,
                false,
                1,
            )?;
            for i in 0..s {
                let sum = sums[i];
                let row = i * s..(i + 1) * s;
                let dot: f32 = dn[row.clone()]
                    .iter()
                    .zip(&r[row.clone()])
                    .map(|(g, v)| g * v)
                    .sum();
                let dsum = -dot / (sum * sum);
                for c in 0..s {
                    let dr = dn[i * s + c] / sum + dsum;
                    dn[i * s + c] = if p[i * s + c] > 0.0 {
                        dr * keys[c]
                    } else {
                        0.0
                    };
                }
            }
            // dA = dP X ; dX += dP^T A
            matmul(
                &mut da[span.clone()],
                View::dense(s, d),
                &dn,
                View::dense(s, s),
                xb,
                View::dense(s, d),
                1.0,
                false,
                1,
            )?;
            matmul(
                &mut dx[span.clone()],
                View::dense(s, d),
                &dn,
                View::dense(s, s).t(),
                ab,
                View::dense(s, d),
                1.0,
                true,
                1,
            )?;
        }
        let dev = anchor.device();
        Ok((
            Some(Tensor::from_vec(da, (b, s, d), dev)?),
            Some(Tensor::from_vec(dx, (b, s, d), dev)?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::{close, flat, same_grads, Draw};
    use candle_core::Device;

    /// The fused aggregation against the composed ops: the output and the
    /// gradient of every parameter (projectors, confidence, output block)
    /// within 1e-5 relative, over random draws with padding.
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
            let yf = u.forward(&layers, &mask).unwrap();
            let yc = u.forward_composed(&layers, &mask).unwrap();
            close(&flat(&yf), &flat(&yc), 1e-5, "output");
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
            same_grads(&gf, &gc, &r.vars, 1e-5, &format!("seed {seed}"));
        }
    }
}
