//! Differentiable functions on candle tensors, and the forward [`Mode`].
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` have no backward
//! pass, so LayerNorm and softmax are composed from basic ops here; dropout
//! masks come from our seeded generator (candle's CPU generator cannot be
//! seeded).

use candle_core::{Tensor, D};

use crate::fit::kernels::fused::{cpu_f32, LayerNormOp, MaskedMeanOp};
use crate::rng::SplitMix64;
use crate::Result;

/// LayerNorm over the last dimension (biased variance, as PyTorch): one
/// fused op on the CPU ([`LayerNormOp`]), composed elsewhere.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(x) && cpu_f32(w) && cpu_f32(b) {
        let shape = x.shape().clone();
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        let y = x.contiguous()?.reshape((rows, d))?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        )?;
        return Ok(y.reshape(shape)?);
    }
    layer_norm_composed(x, w, b, eps)
}

/// LayerNorm composed from candle ops (any device; the reference the fused
/// op is tested against).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// Whether a forward pass trains (dropout on, its masks drawn from the
/// run's dropout generator) or evaluates (dropout off, nothing drawn).
#[derive(Debug)]
pub enum Mode<'a> {
    /// Training: dropout masks from this generator.
    Train(&'a mut SplitMix64),
    /// Training on rows `first..first + b` of a batch of `batch` examples
    /// (a part of a batch split across threads): each mask is the rows'
    /// part of the mask [`Mode::Train`] would draw for the whole batch from
    /// the same generator state, which ends where the whole batch's would.
    TrainRows {
        /// The whole batch's generator.
        rng: &'a mut SplitMix64,
        /// First row of this part.
        first: usize,
        /// Examples in the whole batch.
        batch: usize,
    },
    /// Evaluation and prediction: no dropout.
    Eval,
}

/// The inverted-dropout mask (0 or `1 / (1 - p)` per element) for a tensor
/// of `shape` (rows first) in `mode`, drawn as [`dropout`] draws it; `None`
/// in [`Mode::Eval`] or for `p <= 0` (nothing drawn).
pub fn dropout_mask(shape: &[usize], p: f32, mode: &mut Mode<'_>) -> Option<Vec<f32>> {
    if p <= 0.0 {
        return None;
    }
    let n: usize = shape.iter().product();
    match mode {
        Mode::Train(rng) => Some(rng.dropout_mask(n, p)),
        Mode::TrainRows { rng, first, batch } => {
            let rows = shape.first().copied().unwrap_or(1);
            let per_row = (n / rows.max(1)) as u64;
            rng.skip(*first as u64 * per_row);
            let m = rng.dropout_mask(n, p);
            rng.skip((*batch - *first - rows) as u64 * per_row);
            Some(m)
        }
        Mode::Eval => None,
    }
}

/// Inverted dropout with probability `p` in [`Mode::Train`] (masks from its
/// generator); the identity in [`Mode::Eval`] or for `p <= 0`.
pub fn dropout(x: &Tensor, p: f32, mode: &mut Mode<'_>) -> Result<Tensor> {
    match dropout_mask(x.dims(), p, mode) {
        Some(mask) => Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?),
        None => Ok(x.clone()),
    }
}

/// Masked mean over the sequence: `x` `[B, S, D]`, `mask` `[B, S]` (1 real,
/// 0 padding) -> `[B, D]`.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) && cpu_f32(mask) {
        let (x, mask) = (x.contiguous()?, mask.contiguous()?);
        return Ok(x.apply_op2(&mask, MaskedMeanOp)?);
    }
    let m = mask.unsqueeze(2)?; // [B, S, 1]
    let sum = x.broadcast_mul(&m)?.sum(1)?; // [B, D]
    let n = m.sum(1)?.clamp(1.0, f64::MAX)?; // [B, 1]
    Ok(sum.broadcast_div(&n)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_hand_values() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 6.0]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 1.0, 2.0, 1.0], &dev).unwrap();
        let b = Tensor::new(&[0f32, 0.0, 0.0, 1.0], &dev).unwrap();
        let y: Vec<f32> = layer_norm(&x, &w, &b, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // mean 3, var (4+1+0+9)/4 = 3.5
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, -1.0 / s, 0.0, 3.0 / s + 1.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// The parts of a batch draw exactly their rows of the whole batch's
    /// mask, and leave the generator where the whole batch leaves it.
    #[test]
    fn dropout_of_parts_is_the_whole_batch_mask_cut_in_rows() {
        let dev = Device::Cpu;
        let x = Tensor::ones((5, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let start = SplitMix64::new(77);
        let mut whole_rng = start.clone();
        let whole = dropout(&x, 0.3, &mut Mode::Train(&mut whole_rng)).unwrap();
        let whole2 = dropout(&x, 0.3, &mut Mode::Train(&mut whole_rng)).unwrap();
        for (first, rows) in [(0usize, 2usize), (2, 3)] {
            let mut g = start.clone();
            let part = x.narrow(0, first, rows).unwrap();
            let mut mode = Mode::TrainRows {
                rng: &mut g,
                first,
                batch: 5,
            };
            let a = dropout(&part, 0.3, &mut mode).unwrap();
            let b = dropout(&part, 0.3, &mut mode).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&a), flat(&whole.narrow(0, first, rows).unwrap()));
            assert_eq!(flat(&b), flat(&whole2.narrow(0, first, rows).unwrap()));
            assert_eq!(g.next_u64(), whole_rng.clone().next_u64());
        }
    }

    /// The fused LayerNorm op against [`layer_norm_composed`]: values and
    /// the gradients of its input (through a product with a trained
    /// weight), weight and bias, 1e-5 relative.
    #[test]
    fn fused_layer_norm_matches_the_composed_one() {
        use crate::fit::nn::test_util::close_t as close;
        use candle_core::Var;
        let rand = |n: usize, seed: u64| -> Vec<f32> {
            let mut r = SplitMix64::new(seed);
            (0..n).map(|_| r.symmetric_f32(1.0)).collect()
        };
        let dev = Device::Cpu;
        let (rows, d_in, d_out) = (7, 12, 5);
        let xv = Var::from_vec(rand(rows * d_in, 1), (rows, d_in), &dev).unwrap();
        let wv = Var::from_vec(rand(d_out * d_in, 2), (d_out, d_in), &dev).unwrap();
        let lnw = Var::from_vec(rand(d_out, 3), d_out, &dev).unwrap();
        let lnb = Var::from_vec(rand(d_out, 4), d_out, &dev).unwrap();
        let probe = Tensor::from_vec(rand(rows * d_out, 5), (rows, d_out), &dev).unwrap();
        let pre = xv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
        let fused = pre
            .apply_op3(lnw.as_tensor(), lnb.as_tensor(), LayerNormOp { eps: 1e-5 })
            .unwrap();
        let plain = layer_norm_composed(&pre, lnw.as_tensor(), lnb.as_tensor(), 1e-5).unwrap();
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

    #[test]
    fn masked_mean_ignores_padding() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32], [3.0], [100.0]]], &dev).unwrap();
        let m = Tensor::new(&[[1f32, 1.0, 0.0]], &dev).unwrap();
        let y: Vec<f32> = masked_mean(&x, &m)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![2.0]);
    }
}
