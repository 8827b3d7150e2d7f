//! Unit tests of the BERT layer: the fused op against the composed layer,
//! packed weights, collected gradients, merged LoRA updates, finite
//! differences.

use super::*;
use crate::fit::nn::test_util::{close, flat};
use crate::fit::nn::Detach;
use crate::rng::SplitMix64;
use candle_core::{Device, Var};

const D: usize = 8;
const H: usize = 2;
const F: usize = 12;

/// A layer with random weights: candle variables when `trained`, plain
/// tensors (frozen) otherwise; the variables are returned.
fn layer(act: Activation, trained: bool, seed: u64) -> (BertLayer, Vec<Var>) {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(seed);
    let mut vars = Vec::new();
    let mut t = |shape: &[usize], base: f32, spread: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| base + rng.symmetric_f32(spread)).collect();
        if trained {
            let var = Var::from_vec(v, shape, &dev).unwrap();
            vars.push(var.clone());
            var.as_tensor().clone()
        } else {
            Tensor::from_vec(v, shape, &dev).unwrap()
        }
    };
    let mut lin = |i: usize, o: usize| Linear::from_parts(t(&[o, i], 0.0, 0.5), t(&[o], 0.0, 0.1));
    let (query, key, value, output) = (lin(D, D), lin(D, D), lin(D, D), lin(D, D));
    let (intermediate, out) = (lin(D, F), lin(F, D));
    let mut norm = || LayerNorm {
        weight: t(&[D], 1.0, 0.2),
        bias: t(&[D], 0.0, 0.1),
        eps: 1e-12,
    };
    let (n1, n2) = (norm(), norm());
    let mut l = BertLayer {
        attention: Attention {
            query,
            key,
            value,
            output,
            norm: n1,
        },
        intermediate,
        output: out,
        norm: n2,
        heads: H,
        act,
        attn_dropout: 0.1,
        hidden_dropout: 0.1,
        eps: 1e-12,
        packed: None,
        flat: None,
    };
    if !trained {
        l.packed = Some(Arc::new(l.flat_weights().unwrap().to_vec1().unwrap()));
    }
    (l, vars)
}

/// The gradients of the loss `sum(probe * y)`.
fn probe_grads(y: Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
    (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
}

/// A copy of the trained layer `l` with its weights packed into one
/// variable (as `load` builds a trained layer), and that variable.
fn packed_copy(l: &BertLayer) -> (BertLayer, Tensor) {
    use crate::fit::params::{Group, Params};
    let mut params = Params::new();
    let members = l
        .parts()
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("w{i}"), t.detach().copy().unwrap()))
        .collect();
    let (flat_var, views) = params.add_packed(members, Group::Pretrained).unwrap();
    let mut lp = BertLayer::assemble(views, Some(flat_var.clone()), H, 1e-12).unwrap();
    lp.act = l.act;
    (lp, flat_var)
}

/// Inputs: `x` (a variable) `[3, 5, D]`, the attention bias of a mask
/// with padding, and a probe for the loss `sum(probe * y)`.
fn inputs() -> (Var, Tensor, Tensor) {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(99);
    let (b, s) = (3, 5);
    let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.symmetric_f32(1.0)).collect() };
    let x = Var::from_vec(r(b * s * D), (b, s, D), &dev).unwrap();
    let mask = Tensor::new(
        &[
            [1f32, 1., 1., 1., 1.],
            [1., 1., 1., 0., 0.],
            [1., 0., 0., 0., 0.],
        ],
        &dev,
    )
    .unwrap();
    let probe = Tensor::from_vec(r(b * s * D), (b, s, D), &dev).unwrap();
    (x, attention_bias(&mask).unwrap(), probe)
}

/// The fused op against the composed layer: outputs and every gradient
/// (input, and weights when trained) within 1e-5 relative, in training
/// mode with dropout (the same masks drawn, the generator left in the
/// same state) and in evaluation, for every activation.
/// A trained layer packed as one variable (as `load` builds it) computes
/// what the same layer with one variable per tensor does, and the
/// packed variable's gradient is their gradients in PACKED_ORDER.
#[test]
fn packed_trained_layer_equals_the_unpacked_one() {
    let (l, _) = layer(Activation::Gelu, true, 9);
    let (lp, flat_var) = packed_copy(&l);
    let (x, bias, probe) = inputs();
    let (mut g1, mut g2) = (SplitMix64::new(4), SplitMix64::new(4));
    let y = l
        .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g1))
        .unwrap();
    let yp = lp
        .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g2))
        .unwrap();
    assert_eq!(flat(&y), flat(&yp));
    let g = probe_grads(y, &probe);
    let gp = probe_grads(yp, &probe);
    let want: Vec<f32> = l
        .parts()
        .iter()
        .flat_map(|t| flat(g.get(t).unwrap()))
        .collect();
    assert_eq!(flat(gp.get(&flat_var).unwrap()), want);
    assert_eq!(flat(g.get(&x).unwrap()), flat(gp.get(&x).unwrap()));
}

/// With a gradient collector on the thread, a packed trained layer's
/// weight gradient bypasses candle's store and, merged in, equals the
/// store's own bit for bit; two parts' collections add up to the sum of
/// their stores' gradients; without a collector nothing changes.
#[test]
fn collected_weight_gradients_equal_the_stores() {
    use crate::fit::kernels::direct_grads::{Collected, Collector};
    let (l, _) = layer(Activation::Gelu, true, 12);
    let (lp, flat_var) = packed_copy(&l);
    let (x, bias, probe) = inputs();
    let run = |seed: u64, collect: bool| {
        let mut g = SplitMix64::new(seed);
        let y = lp
            .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g))
            .unwrap();
        let loss = (y * &probe).unwrap().sum_all().unwrap();
        if collect {
            let c = Collector::start();
            let grads = loss.backward().unwrap();
            (grads, c.finish().unwrap())
        } else {
            (loss.backward().unwrap(), Collected::default())
        }
    };
    let (plain, none) = run(5, false);
    assert!(none.is_empty());
    let (mut store, collected) = run(5, true);
    assert!(store.get(&flat_var).is_none(), "bypassed the store");
    assert!(!collected.is_empty());
    assert_eq!(flat(store.get(&x).unwrap()), flat(plain.get(&x).unwrap()));
    collected.merge_into(&mut store).unwrap();
    let want = flat(plain.get(&flat_var).unwrap());
    assert_eq!(flat(store.get(&flat_var).unwrap()), want);
    // two parts: in-place sum against the stores' sum
    let (other_plain, _) = run(6, false);
    let (mut summed, mut first) = run(5, true);
    let (_, second) = run(6, true);
    first.add(second).unwrap();
    first.merge_into(&mut summed).unwrap();
    let want = (plain.get(&flat_var).unwrap() + other_plain.get(&flat_var).unwrap()).unwrap();
    assert_eq!(flat(summed.get(&flat_var).unwrap()), flat(&want));
}

/// A frozen layer with LoRA updates (no dropout) merged into its
/// weights and run fused computes what the updates beside the
/// projections compute composed: outputs, the generator's state, and
/// the gradients of the inputs and of every `A` and `B` (1e-5
/// relative); in evaluation too.
#[test]
fn merged_lora_layer_matches_the_composed_updates() {
    use crate::fit::nn::lora::{LoraLayer, LoraUpdate};
    let (l, _) = layer(Activation::Gelu, false, 6);
    let mut rng = SplitMix64::new(21);
    let mut var = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.symmetric_f32(0.3)).collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let r = 2;
    let vars = [
        var(&[r, D]),
        var(&[D, r]),
        var(&[r, D]),
        var(&[F, r]),
        var(&[r, F]),
        var(&[D, r]),
    ];
    let up = |a: &Var, b: &Var| {
        LoraUpdate::from_parts(a.as_tensor().clone(), b.as_tensor().clone(), 4.0, 0.0)
    };
    let lora = LoraLayer::from_updates(vec![
        (Projection::Query, up(&vars[0], &vars[1])),
        (Projection::FfnIn, up(&vars[2], &vars[3])),
        (Projection::FfnOut, up(&vars[4], &vars[5])),
    ]);
    let deltas = lora
        .merged_deltas()
        .unwrap()
        .expect("no dropout: mergeable");
    let merged = l.merged(&deltas).unwrap();
    let (x, bias, probe) = inputs();
    let (mut g1, mut g2) = (SplitMix64::new(3), SplitMix64::new(3));
    let yc = l
        .forward_with(x.as_tensor(), &bias, &mut Mode::Train(&mut g1), Some(&lora))
        .unwrap();
    let ym = merged
        .forward(x.as_tensor(), &bias, &mut Mode::Train(&mut g2))
        .unwrap();
    close(&flat(&ym), &flat(&yc), 1e-5, "y");
    assert_eq!(g1.next_u64(), g2.next_u64(), "generator state");
    let gc = probe_grads(yc, &probe);
    let gm = probe_grads(ym, &probe);
    close(
        &flat(gm.get(&x).unwrap()),
        &flat(gc.get(&x).unwrap()),
        1e-5,
        "dx",
    );
    for (i, v) in vars.iter().enumerate() {
        close(
            &flat(gm.get(v).unwrap()),
            &flat(gc.get(v).unwrap()),
            1e-5,
            &format!("lora var {i}"),
        );
    }
    let ec = l
        .forward_with(
            x.as_tensor(),
            &bias,
            &mut Mode::Eval,
            Some(&lora.detached()),
        )
        .unwrap();
    let dm = l
        .merged(&lora.detached().merged_deltas().unwrap().unwrap())
        .unwrap();
    let em = dm.forward(x.as_tensor(), &bias, &mut Mode::Eval).unwrap();
    close(&flat(&em), &flat(&ec), 1e-5, "eval");
    // with dropout on an update, nothing is merged
    let drop = LoraLayer::from_updates(vec![(
        Projection::Value,
        LoraUpdate::from_parts(
            vars[0].as_tensor().clone(),
            vars[1].as_tensor().clone(),
            4.0,
            0.1,
        ),
    )]);
    assert!(drop.merged_deltas().unwrap().is_none());
}

#[test]
fn fused_layer_matches_the_composed_layer() {
    for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
        for trained in [false, true] {
            let (l, vars) = layer(act, trained, 5);
            let (x, bias, probe) = inputs();
            let (mut g1, mut g2) = (SplitMix64::new(3), SplitMix64::new(3));
            let yf = l
                .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g1))
                .unwrap();
            let yc = l
                .forward_composed(x.as_tensor(), &bias, &mut Mode::Train(&mut g2))
                .unwrap();
            let what = format!("{act:?} trained={trained}");
            close(&flat(&yf), &flat(&yc), 1e-5, &format!("{what} y"));
            assert_eq!(g1.next_u64(), g2.next_u64(), "{what}: generator state");
            let gf = probe_grads(yf, &probe);
            let gc = probe_grads(yc, &probe);
            close(
                &flat(gf.get(&x).unwrap()),
                &flat(gc.get(&x).unwrap()),
                1e-5,
                &format!("{what} dx"),
            );
            for (i, v) in vars.iter().enumerate() {
                close(
                    &flat(gf.get(v).unwrap()),
                    &flat(gc.get(v).unwrap()),
                    1e-5,
                    &format!("{what} dW{i}"),
                );
            }
            let ef = l
                .detached()
                .forward_fused(x.as_tensor(), &bias, &mut Mode::Eval)
                .unwrap();
            let ec = l
                .detached()
                .forward_composed(x.as_tensor(), &bias, &mut Mode::Eval)
                .unwrap();
            close(&flat(&ef), &flat(&ec), 1e-5, &format!("{what} eval"));
        }
    }
}

/// A trained layer on a constant input (the late-layer baseline reads
/// cached hidden states) skips the input's gradient and gives the same
/// weight gradients, bit for bit, as on a variable input.
#[test]
fn constant_input_gets_no_gradient_and_the_same_weight_gradients() {
    let (l, vars) = layer(Activation::Gelu, true, 6);
    let (x, bias, probe) = inputs();
    let constant = x.as_tensor().detach();
    assert!(!constant.track_op());
    let (mut g1, mut g2) = (SplitMix64::new(7), SplitMix64::new(7));
    let yv = l
        .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g1))
        .unwrap();
    let yc = l
        .forward_fused(&constant, &bias, &mut Mode::Train(&mut g2))
        .unwrap();
    assert_eq!(flat(&yv), flat(&yc));
    let gv = probe_grads(yv, &probe);
    let gc = probe_grads(yc, &probe);
    assert!(gv.get(&x).is_some());
    assert!(gc.get(&constant).is_none());
    for (i, v) in vars.iter().enumerate() {
        assert_eq!(flat(gv.get(v).unwrap()), flat(gc.get(v).unwrap()), "dW{i}");
    }
}

/// The fused backward pass against central finite differences of the
/// fused forward pass (evaluation mode, f64 loss accumulation).
#[test]
fn fused_layer_gradient_by_finite_differences() {
    let (l, vars) = layer(Activation::Gelu, true, 8);
    let (x, bias, probe) = inputs();
    let loss = |xt: &Tensor| -> f64 {
        let y = l
            .detached()
            .forward_fused(xt, &bias, &mut Mode::Eval)
            .unwrap();
        flat(&y)
            .iter()
            .zip(flat(&probe))
            .map(|(a, b)| f64::from(*a) * f64::from(b))
            .sum()
    };
    let y = l
        .forward_fused(x.as_tensor(), &bias, &mut Mode::Eval)
        .unwrap();
    let g = probe_grads(y, &probe);
    let dx = flat(g.get(&x).unwrap());
    let x0 = flat(x.as_tensor());
    let h = 1e-2f32;
    for i in (0..x0.len()).step_by(7) {
        let mut a = x0.clone();
        let mut c = x0.clone();
        a[i] += h;
        c[i] -= h;
        let shape = x.as_tensor().shape().clone();
        let ta = Tensor::from_vec(a, &shape, &Device::Cpu).unwrap();
        let tc = Tensor::from_vec(c, &shape, &Device::Cpu).unwrap();
        let fd = (loss(&ta) - loss(&tc)) / (2.0 * f64::from(h));
        assert!(
            (fd - f64::from(dx[i])).abs() < 2e-2 * (1.0 + fd.abs()),
            "dx[{i}]: finite differences {fd} vs {}",
            dx[i]
        );
    }
    // one weight matrix (the intermediate one) the same way
    let w = &vars[8];
    let dw = flat(g.get(w).unwrap());
    let w0 = flat(w.as_tensor());
    for i in (0..w0.len()).step_by(11) {
        let mut vals = w0.clone();
        let base = w.as_tensor().clone();
        vals[i] += h;
        w.set(&Tensor::from_vec(vals.clone(), base.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let up = loss(x.as_tensor());
        vals[i] -= 2.0 * h;
        w.set(&Tensor::from_vec(vals, base.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let down = loss(x.as_tensor());
        w.set(&Tensor::from_vec(w0.clone(), base.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let fd = (up - down) / (2.0 * f64::from(h));
        assert!(
            (fd - f64::from(dw[i])).abs() < 2e-2 * (1.0 + fd.abs()),
            "dW1[{i}]: finite differences {fd} vs {}",
            dw[i]
        );
    }
}
