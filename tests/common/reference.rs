//! An independent BERT forward pass in plain Rust (f64 arithmetic, naive
//! loops, one unpadded sequence), written from the `transformers`
//! `modeling_bert.py` equations, not from sherl's exporter. It returns every
//! hidden state so the exporter can be checked layer by layer.

use super::tiny::{TinyConfig, Weights};

fn get<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w.get(name).unwrap_or_else(|| panic!("weight {name}")).1
}

/// y = x W^T + b for x `[n, din]`, W `[dout, din]`.
fn linear(x: &[f64], n: usize, din: usize, wt: &[f32], b: &[f32]) -> Vec<f64> {
    let dout = b.len();
    let mut y = vec![0f64; n * dout];
    for r in 0..n {
        for o in 0..dout {
            let mut acc = f64::from(b[o]);
            for i in 0..din {
                acc += x[r * din + i] * f64::from(wt[o * din + i]);
            }
            y[r * dout + o] = acc;
        }
    }
    y
}

fn layer_norm(x: &mut [f64], d: usize, g: &[f32], b: &[f32], eps: f64) {
    for row in x.chunks_mut(d) {
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            *v = (*v - mean) * inv * f64::from(g[i]) + f64::from(b[i]);
        }
    }
}

/// erf by Abramowitz-Stegun 7.1.26 is too coarse (1.5e-7 abs is fine for
/// f32 checks, but use a series/continued fraction for safety).
fn erf(x: f64) -> f64 {
    // High-precision erf via the complementary error function (Numerical
    // Recipes erfc Chebyshev approximation, relative error < 1.2e-7) is
    // enough for f32 comparisons at 1e-4.
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

fn act(name: &str, x: f64) -> f64 {
    match name {
        "gelu" => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        "gelu_new" => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
        "relu" => x.max(0.0),
        other => panic!("activation {other}"),
    }
}

/// MPNet's relative-position bucket of key offset `rel = j - i` (the
/// `transformers` formula, max distance 128, in f64).
fn mpnet_bucket(rel: i64, buckets: usize) -> usize {
    let half = buckets / 2;
    let n = -rel;
    let side = if n < 0 { half } else { 0 };
    let n = n.unsigned_abs() as usize;
    let exact = half / 2;
    if n < exact {
        return side + n;
    }
    let large = exact
        + ((n as f64 / exact as f64).ln() / (128.0 / exact as f64).ln() * (half - exact) as f64)
            as usize;
    side + large.min(half - 1)
}

/// All hidden states (`cfg.layers + 1`) of one sequence, each `[len * hidden]`
/// (BERT, or MPNet when `cfg.family` says so: `types` then unused).
pub fn forward(cfg: &TinyConfig, w: &Weights, ids: &[u32], types: &[u32]) -> Vec<Vec<f32>> {
    let d = cfg.hidden;
    let n = ids.len();
    let mpnet = cfg.family == "mpnet";
    let we = get(w, "embeddings.word_embeddings.weight");
    let pe = get(w, "embeddings.position_embeddings.weight");
    let off = cfg.position_offset();
    let mut x = vec![0f64; n * d];
    for t in 0..n {
        for i in 0..d {
            let typ = if mpnet {
                0.0
            } else {
                let te = get(w, "embeddings.token_type_embeddings.weight");
                f64::from(te[types[t] as usize * d + i])
            };
            x[t * d + i] =
                f64::from(we[ids[t] as usize * d + i]) + f64::from(pe[(off + t) * d + i]) + typ;
        }
    }
    layer_norm(
        &mut x,
        d,
        get(w, "embeddings.LayerNorm.weight"),
        get(w, "embeddings.LayerNorm.bias"),
        cfg.eps,
    );
    let mut states = vec![x.iter().map(|&v| v as f32).collect::<Vec<f32>>()];
    let h = cfg.heads;
    let hd = d / h;
    for l in 0..cfg.layers {
        let p = format!("encoder.layer.{l}");
        let lin = |x: &[f64], din: usize, name: &str| {
            linear(
                x,
                n,
                din,
                get(w, &format!("{p}.{}.weight", cfg.layer_name(name))),
                get(w, &format!("{p}.{}.bias", cfg.layer_name(name))),
            )
        };
        let q = lin(&x, d, "attention.self.query");
        let k = lin(&x, d, "attention.self.key");
        let v = lin(&x, d, "attention.self.value");
        let mut ctx = vec![0f64; n * d];
        for head in 0..h {
            for i in 0..n {
                let mut scores = vec![0f64; n];
                for j in 0..n {
                    let mut s = 0.0;
                    for c in 0..hd {
                        s += q[i * d + head * hd + c] * k[j * d + head * hd + c];
                    }
                    scores[j] = s / (hd as f64).sqrt();
                    if mpnet {
                        let table = get(w, "encoder.relative_attention_bias.weight");
                        let b = mpnet_bucket(j as i64 - i as i64, cfg.buckets);
                        scores[j] += f64::from(table[b * h + head]);
                    }
                }
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for j in 0..n {
                    let pj = (scores[j] - m).exp() / z;
                    for c in 0..hd {
                        ctx[i * d + head * hd + c] += pj * v[j * d + head * hd + c];
                    }
                }
            }
        }
        let mut a = lin(&ctx, d, "attention.output.dense");
        for (ai, xi) in a.iter_mut().zip(&x) {
            *ai += xi;
        }
        layer_norm(
            &mut a,
            d,
            get(
                w,
                &format!(
                    "{p}.{}.weight",
                    cfg.layer_name("attention.output.LayerNorm")
                ),
            ),
            get(
                w,
                &format!("{p}.{}.bias", cfg.layer_name("attention.output.LayerNorm")),
            ),
            cfg.eps,
        );
        let mut inter = lin(&a, d, "intermediate.dense");
        for v in inter.iter_mut() {
            *v = act(cfg.act, *v);
        }
        let mut o = lin(&inter, cfg.inter, "output.dense");
        for (oi, ai) in o.iter_mut().zip(&a) {
            *oi += ai;
        }
        layer_norm(
            &mut o,
            d,
            get(w, &format!("{p}.output.LayerNorm.weight")),
            get(w, &format!("{p}.output.LayerNorm.bias")),
            cfg.eps,
        );
        x = o;
        states.push(x.iter().map(|&v| v as f32).collect());
    }
    states
}
