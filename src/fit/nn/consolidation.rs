//! SHERL's early route: the anti-redundancy consolidation of the cached
//! intermediate layers (the restore and gate are in [`super::restore_gate`]).
//!
//! Computes docs/method.md §4, steps 1-7 (the repository's restatement of
//! the paper, with the epsilons this code adds): per-layer projectors
//! `LayerNorm_d(W_j S_j + b_j)`; per token, the shallow set `E` (all but the
//! last entry) and the guide `e` (the last entry); redundancy `r` = row sums
//! of `relu(E' E'^T)` with `E'` the rows of `E` scaled to unit L2 norm
//! (divided by norm plus 1e-8); guided weights `u = relu(w_a . (E * e) +
//! b_a) / r`,
//! L1-normalised over layers (`alpha = u / (sum |u| + 1e-8)`, no softmax);
//! `g = sum alpha_j E_j + e`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::{Builder, Linear, Projector, SideConfig};
use crate::fit::error::FitError;
use crate::fit::kernels::fused::{contiguous_f32, cpu_f32};
use crate::Result;

pub use super::linear::PROJ_LN_EPS;

/// Epsilon in the row normalisation and in the L1 normalisation.
pub const EPS: f64 = 1e-8;

/// Projectors, guided-weight scorer.
#[derive(Debug, Clone)]
pub struct Consolidation {
    proj: Vec<Projector>,
    score: Linear,
}

/// What the early route returns.
#[derive(Debug, Clone)]
pub struct Consolidated {
    /// `g`, `[B, S, d]`.
    pub g: Tensor,
    /// `alpha`, `[B, S, M-1]` (layer weights per token).
    pub alpha: Tensor,
}

impl super::Detach for Consolidation {
    fn detached(&self) -> Self {
        Consolidation {
            proj: self.proj.detached(),
            score: self.score.detached(),
        }
    }
}

impl Consolidation {
    /// Fresh parameters under `vb`'s prefix (`early`) for `cfg.layers`
    /// cached early layers: the projectors, then `score`.
    pub fn load(mut vb: Builder, cfg: &SideConfig) -> Result<Self> {
        let m = cfg.layers;
        if m < 2 {
            return Err(FitError::settings(format!(
                "SHERL's early route needs at least 2 cached layers (got {m}): re-extract with more layers"
            )));
        }
        let proj = Projector::load_all(vb.reborrow(), cfg)?;
        let score = vb.fresh_linear("score", cfg.d, 1)?;
        Ok(Consolidation { proj, score })
    }

    /// From explicit modules (for tests): one projector per entry and the
    /// guided-weight scorer `Linear(d -> 1)`.
    pub fn from_parts(proj: Vec<Projector>, score: Linear) -> Self {
        Consolidation { proj, score }
    }

    /// # Shapes
    /// `layers`: M tensors `[B, S, D]` (shallow first, guide last), `mask`
    /// `[B, S]` -> `g` `[B, S, d]` (0 at padding), `alpha` `[B, S, M-1]`.
    ///
    /// On the CPU with f32 tensors the per-token part is one fused op
    /// (`ConsolidateOp`); elsewhere it is composed from candle ops
    /// ([`Consolidation::forward_composed`]).
    pub fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Consolidated> {
        self.forward_with(layers, mask, true)
    }

    /// [`Consolidation::forward`] composed from candle ops on any device
    /// (the reference the fused op is tested against).
    pub fn forward_composed(&self, layers: &[Tensor], mask: &Tensor) -> Result<Consolidated> {
        self.forward_with(layers, mask, false)
    }

    fn forward_with(&self, layers: &[Tensor], mask: &Tensor, fused: bool) -> Result<Consolidated> {
        let _span = tracing::trace_span!("consolidation").entered();
        if layers.len() != self.proj.len() {
            return Err(FitError::model(format!(
                "consolidation built for {} layers, given {}",
                self.proj.len(),
                layers.len()
            )));
        }
        let (b, s, _) = layers[0].dims3()?;
        let m = layers.len();
        let f = Projector::forward_all(&self.proj, layers)?;
        let d = f[0].dim(D::Minus1)?;
        let n = b * s;
        if fused && cpu_f32(&f[0]) && cpu_f32(&self.score.weight) {
            let stacked = Tensor::stack(&f, 2)?.reshape((n, m, d))?;
            let alpha_slot = Arc::new(Mutex::new(None));
            let op = ConsolidateOp {
                mask: mask.flatten_all()?.to_vec1::<f32>()?,
                alpha: alpha_slot.clone(),
            };
            let g = stacked.apply_op3(&self.score.weight, &self.score.bias, op)?;
            let alpha = alpha_slot
                .lock()
                .map_err(|_| FitError::model("consolidation: alpha slot poisoned"))?
                .take()
                .ok_or_else(|| FitError::model("consolidation: no alpha from the fused op"))?;
            return Ok(Consolidated {
                g: g.reshape((b, s, d))?,
                alpha: Tensor::from_vec(alpha, (b, s, m - 1), g.device())?,
            });
        }
        // shallow set E [N, M-1, d], guide e [N, 1, d]
        let e_set = Tensor::stack(&f[..m - 1], 2)?.reshape((n, m - 1, d))?;
        let guide = f[m - 1].reshape((n, 1, d))?;
        // redundancy
        let norm = (e_set.sqr()?.sum_keepdim(D::Minus1)? + 1e-16)?.sqrt()?;
        let unit = e_set.broadcast_div(&(norm + EPS)?)?;
        let c = unit.matmul(&unit.transpose(1, 2)?.contiguous()?)?.relu()?; // [N, M-1, M-1]
        let r = c.sum_keepdim(D::Minus1)?.clamp(EPS, f64::MAX)?; // [N, M-1, 1]
                                                                 // guided weights
        let a = self.score.forward(&e_set.broadcast_mul(&guide)?)?; // [N, M-1, 1]
        let u = a.relu()?.div(&r)?;
        let alpha = u.broadcast_div(&(u.abs()?.sum_keepdim(1)? + EPS)?)?; // [N, M-1, 1]
        let g = (alpha.broadcast_mul(&e_set)?.sum(1)? + guide.squeeze(1)?)?; // [N, d]
        let g = g.reshape((b, s, d))?.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(Consolidated {
            g,
            alpha: alpha.reshape((b, s, m - 1))?,
        })
    }
}

/// The per-token part of the early route (from the projected entries to
/// `g`) as one CPU op with a hand-written backward pass: composed from
/// candle ops it was about twenty graph nodes over `[N, M-1, d]` tensors and
/// a batched product of `[M-1, d] x [d, M-1]` blocks per token, each node
/// allocating and, backward, zero-filling. The formulas are those of
/// [`Consolidation::forward`]'s composed path (tests compare values and
/// gradients, and finite differences).
///
/// Inputs: the projected entries `F` `[N, M, d]` (shallow first, guide
/// last), the scorer's weight `[1, d]` and bias `[1]`; output `g` `[N, d]`,
/// times the token mask. `alpha` `[N, M-1]` is left in the shared slot (it
/// is reported, never differentiated).
struct ConsolidateOp {
    /// `[N]`, 1 real, 0 padding.
    mask: Vec<f32>,
    alpha: Arc<Mutex<Option<Vec<f32>>>>,
}

/// One token's forward quantities, kept for its backward pass.
struct TokenForward {
    /// `|E_j|` (with the 1e-16 inside the root), per shallow entry.
    norm: Vec<f32>,
    /// Unit rows `u_j`, `[K, d]`.
    unit: Vec<f32>,
    /// `u_j . u_k`, `[K, K]`.
    dots: Vec<f32>,
    /// Row sums of `relu(dots)` before the clamp.
    rsum: Vec<f32>,
    /// Scores `a_j`.
    score: Vec<f32>,
    /// `v_j = relu(a_j) / r_j`.
    v: Vec<f32>,
    /// `sum_j |v_j| + EPS`.
    total: f32,
}

fn token_forward(f: &[f32], k: usize, d: usize, w: &[f32], bias: f32) -> TokenForward {
    let eps = EPS as f32;
    let guide = &f[k * d..(k + 1) * d];
    let mut t = TokenForward {
        norm: vec![0.0; k],
        unit: vec![0.0; k * d],
        dots: vec![0.0; k * k],
        rsum: vec![0.0; k],
        score: vec![0.0; k],
        v: vec![0.0; k],
        total: 0.0,
    };
    for j in 0..k {
        let e = &f[j * d..(j + 1) * d];
        let n = (e.iter().map(|x| x * x).sum::<f32>() + 1e-16).sqrt();
        t.norm[j] = n;
        for (u, x) in t.unit[j * d..(j + 1) * d].iter_mut().zip(e) {
            *u = x / (n + eps);
        }
        t.score[j] = e
            .iter()
            .zip(guide)
            .zip(w)
            .map(|((x, g), w)| x * g * w)
            .sum::<f32>()
            + bias;
    }
    for j in 0..k {
        for l in 0..k {
            let uj = &t.unit[j * d..(j + 1) * d];
            let ul = &t.unit[l * d..(l + 1) * d];
            t.dots[j * k + l] = uj.iter().zip(ul).map(|(a, b)| a * b).sum();
        }
        t.rsum[j] = t.dots[j * k..(j + 1) * k].iter().map(|c| c.max(0.0)).sum();
        t.v[j] = t.score[j].max(0.0) / t.rsum[j].max(eps);
    }
    t.total = t.v.iter().map(|v| v.abs()).sum::<f32>() + eps;
    t
}

fn op_err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("sherl fused consolidation: {msg}"))
}

impl CustomOp3 for ConsolidateOp {
    fn name(&self) -> &'static str {
        "sherl-consolidation"
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
        let (n, m, d) = l1.shape().dims3()?;
        let f = contiguous_f32(s1, l1, "entries")?;
        let w = contiguous_f32(s2, l2, "score weight")?;
        let b = contiguous_f32(s3, l3, "score bias")?;
        if m < 2 || w.len() != d || b.len() != 1 || self.mask.len() != n {
            return Err(op_err("shapes do not match"));
        }
        let k = m - 1;
        let mut g = vec![0f32; n * d];
        let mut alpha = vec![0f32; n * k];
        for t in 0..n {
            let ft = &f[t * m * d..(t + 1) * m * d];
            let fw = token_forward(ft, k, d, w, b[0]);
            let gt = &mut g[t * d..(t + 1) * d];
            gt.copy_from_slice(&ft[k * d..]);
            for j in 0..k {
                let a = fw.v[j] / fw.total;
                alpha[t * k + j] = a;
                for (y, x) in gt.iter_mut().zip(&ft[j * d..(j + 1) * d]) {
                    *y += a * x;
                }
            }
            let mk = self.mask[t];
            for y in gt.iter_mut() {
                *y *= mk;
            }
        }
        *self
            .alpha
            .lock()
            .map_err(|_| op_err("alpha slot poisoned"))? = Some(alpha);
        Ok((CpuStorage::F32(g), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        f: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _g: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, m, d) = f.dims3()?;
        let k = m - 1;
        let eps = EPS as f32;
        let fv = f.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let bias = b.flatten_all()?.to_vec1::<f32>()?[0];
        let gv = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut df = vec![0f32; n * m * d];
        let mut dw = vec![0f32; d];
        let mut db = 0f32;
        let (mut dalpha, mut dv, mut du) = (vec![0f32; k], vec![0f32; k], vec![0f32; k * d]);
        for t in 0..n {
            let mk = self.mask[t];
            if mk == 0.0 {
                continue; // g is 0 there whatever the entries: no gradient
            }
            let ft = &fv[t * m * d..(t + 1) * m * d];
            let fw = token_forward(ft, k, d, &wv, bias);
            let gt: Vec<f32> = gv[t * d..(t + 1) * d].iter().map(|x| x * mk).collect();
            let dft = &mut df[t * m * d..(t + 1) * m * d];
            // g = sum_j alpha_j E_j + e
            for (o, x) in dft[k * d..].iter_mut().zip(&gt) {
                *o += x;
            }
            for j in 0..k {
                let a = fw.v[j] / fw.total;
                let e = &ft[j * d..(j + 1) * d];
                dalpha[j] = e.iter().zip(&gt).map(|(x, y)| x * y).sum();
                for (o, y) in dft[j * d..(j + 1) * d].iter_mut().zip(&gt) {
                    *o += a * y;
                }
            }
            // alpha = v / (sum |v| + eps)
            let dot: f32 = dalpha.iter().zip(&fw.v).map(|(a, v)| a * v).sum();
            for j in 0..k {
                let sign = if fw.v[j] > 0.0 {
                    1.0
                } else if fw.v[j] < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                dv[j] = dalpha[j] / fw.total - sign * dot / (fw.total * fw.total);
            }
            // v = relu(a) / max(rsum, eps)
            du.iter_mut().for_each(|x| *x = 0.0);
            let guide = &ft[k * d..];
            for j in 0..k {
                let r = fw.rsum[j].max(eps);
                let da = if fw.score[j] > 0.0 { dv[j] / r } else { 0.0 };
                let dr = -dv[j] * fw.score[j].max(0.0) / (r * r);
                // the clamp passes the gradient where rsum >= eps
                let drs = if fw.rsum[j] >= eps { dr } else { 0.0 };
                // rsum_j = sum_l relu(u_j . u_l)
                for l in 0..k {
                    if fw.dots[j * k + l] > 0.0 {
                        for c in 0..d {
                            du[j * d + c] += drs * fw.unit[l * d + c];
                            du[l * d + c] += drs * fw.unit[j * d + c];
                        }
                    }
                }
                // score a_j = w . (E_j * e) + b
                db += da;
                let e = &ft[j * d..(j + 1) * d];
                for c in 0..d {
                    dw[c] += da * e[c] * guide[c];
                    dft[j * d + c] += da * wv[c] * guide[c];
                    dft[k * d + c] += da * wv[c] * e[c];
                }
            }
            // u_j = E_j / (|E_j| + eps)
            for j in 0..k {
                let e = &ft[j * d..(j + 1) * d];
                let n_j = fw.norm[j];
                let den = n_j + eps;
                let due: f32 = du[j * d..(j + 1) * d]
                    .iter()
                    .zip(e)
                    .map(|(a, b)| a * b)
                    .sum();
                let coef = due / (den * den * n_j);
                for c in 0..d {
                    dft[j * d + c] += du[j * d + c] / den - coef * e[c];
                }
            }
        }
        let dev = f.device();
        Ok((
            Some(Tensor::from_vec(df, (n, m, d), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(vec![db], b.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::{close, flat, same_grads, Draw};
    use candle_core::{Device, Var};

    /// Random trained projectors and scorer (variables), 4 entries of width
    /// 6 into 5, two sequences of 4 tokens with padding.
    fn setup(seed: u64) -> (Consolidation, Vec<Var>, Vec<Tensor>, Tensor, Tensor) {
        let (m, dm, d, b, s) = (4, 6, 5, 2, 4);
        let mut r = Draw::new(seed);
        let proj = r.projectors(m, dm, d, PROJ_LN_EPS);
        let score = Linear::from_parts(r.var(&[1, d], 1.0, 0.0), r.var(&[1], 0.3, 0.0));
        let layers = (0..m).map(|_| r.tensor(&[b, s, dm], 1.5)).collect();
        let mask = Tensor::new(&[[1f32, 1., 1., 0.], [1., 1., 0., 0.]], &Device::Cpu).unwrap();
        let probe = r.tensor(&[b, s, d], 1.0);
        (
            Consolidation::from_parts(proj, score),
            r.vars,
            layers,
            mask,
            probe,
        )
    }

    /// The fused op against the composed ops: `g`, `alpha` and the gradient
    /// of every parameter (projectors and scorer) within 1e-5 relative, for
    /// several random draws (positive and negative scores, padding).
    #[test]
    fn fused_consolidation_matches_the_composed_ops() {
        for seed in 0..6 {
            let (c, vars, layers, mask, probe) = setup(seed);
            let a = c.forward(&layers, &mask).unwrap();
            let b = c.forward_composed(&layers, &mask).unwrap();
            close(&flat(&a.g), &flat(&b.g), 1e-5, "g");
            close(&flat(&a.alpha), &flat(&b.alpha), 1e-5, "alpha");
            let ga = (a.g * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (b.g * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            same_grads(&ga, &gb, &vars, 1e-5, &format!("seed {seed}"));
        }
    }

    /// The fused backward pass against central finite differences of the
    /// fused forward pass, for the scorer's weight (whose gradient runs
    /// through every branch: scores, redundancy-free path, L1 weights).
    #[test]
    fn fused_consolidation_gradient_by_finite_differences() {
        let (c, vars, layers, mask, probe) = setup(3);
        let score_w = &vars[vars.len() - 2];
        let loss = || -> f64 {
            let g = c.forward(&layers, &mask).unwrap().g;
            flat(&g)
                .iter()
                .zip(flat(&probe))
                .map(|(a, b)| f64::from(*a) * f64::from(b))
                .sum()
        };
        let g = c.forward(&layers, &mask).unwrap().g;
        let grads = (g * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let dw = flat(grads.get(score_w).unwrap());
        let w0 = flat(score_w.as_tensor());
        let h = 1e-3f32;
        for i in 0..w0.len() {
            let mut v = w0.clone();
            v[i] += h;
            score_w
                .set(&Tensor::from_vec(v.clone(), (1, w0.len()), &Device::Cpu).unwrap())
                .unwrap();
            let up = loss();
            v[i] -= 2.0 * h;
            score_w
                .set(&Tensor::from_vec(v, (1, w0.len()), &Device::Cpu).unwrap())
                .unwrap();
            let down = loss();
            score_w
                .set(&Tensor::from_vec(w0.clone(), (1, w0.len()), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (up - down) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(dw[i])).abs() < 1e-2 * (1.0 + fd.abs()),
                "dw[{i}]: finite differences {fd} vs {}",
                dw[i]
            );
        }
    }
}
