//! Helpers shared by the unit tests of the fused ops: flattening, relative
//! comparison, random trained projectors, and gradient-by-gradient checks.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::{LayerNorm, Linear, Projector};
use crate::rng::SplitMix64;

/// All values of `t`, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `a` and `b` agree element by element within `tol` relative
/// (`|x - y| <= tol * (1 + max(|x|, |y|))`).
pub fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// [`close`] on two tensors.
pub fn close_t(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    close(&flat(a), &flat(b), tol, what)
}

/// Random values and trainable variables from one seeded generator; every
/// variable made is kept in `vars` (in creation order) for gradient checks.
pub struct Draw {
    rng: SplitMix64,
    pub vars: Vec<Var>,
}

impl Draw {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            vars: Vec::new(),
        }
    }

    /// `n` values uniform in `[-scale, scale]`.
    pub fn vals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.symmetric_f32(scale)).collect()
    }

    /// A constant tensor of random values.
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.vals(n, scale), shape, &Device::Cpu).unwrap()
    }

    /// A trainable variable of random values around `offset`.
    pub fn var(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n = shape.iter().product();
        let v = self.vals(n, scale).iter().map(|x| x + offset).collect();
        let x = Var::from_vec(v, shape, &Device::Cpu).unwrap();
        self.vars.push(x.clone());
        x.as_tensor().clone()
    }

    /// A trainable linear map `d_in -> d_out`.
    pub fn linear(&mut self, d_out: usize, d_in: usize, w: f32, b: f32) -> Linear {
        Linear::from_parts(self.var(&[d_out, d_in], w, 0.0), self.var(&[d_out], b, 0.0))
    }

    /// A trainable LayerNorm of width `d` with weights near 1.
    pub fn layer_norm(&mut self, d: usize, w: f32, b: f32, eps: f64) -> LayerNorm {
        LayerNorm::from_parts(self.var(&[d], w, 1.0), self.var(&[d], b, 0.0), eps)
    }

    /// `m` trainable projectors `dm -> d` (linear + LayerNorm).
    pub fn projectors(&mut self, m: usize, dm: usize, d: usize, eps: f64) -> Vec<Projector> {
        (0..m)
            .map(|_| Projector {
                linear: self.linear(d, dm, 0.6, 0.2),
                norm: self.layer_norm(d, 0.3, 0.2, eps),
            })
            .collect()
    }
}

/// Both gradient stores hold a gradient for the same variables, equal within
/// `tol` relative.
pub fn same_grads(a: &GradStore, b: &GradStore, vars: &[Var], tol: f32, what: &str) {
    for (i, v) in vars.iter().enumerate() {
        match (a.get(v), b.get(v)) {
            (Some(x), Some(y)) => close_t(x, y, tol, &format!("{what} param {i}")),
            (x, y) => assert_eq!(x.is_some(), y.is_some(), "{what} param {i}"),
        }
    }
}
