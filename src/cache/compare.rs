//! Comparing two caches of the same examples value by value: is a cache
//! extracted on a GPU (or with another runtime, batch size, dtype) the same
//! as a reference one, up to the rounding of how it is stored?
//!
//! Both caches must hold the same examples in the same order (id, split,
//! label and token ids); the first one that differs is named and nothing
//! else is compared. Values are compared on the layers both caches store.
//! An element passes when `|a - b| <= steps * step + atol`, where `step` is
//! the spacing of the coarser of the two storage types at `max(|a|, |b|)`
//! (one f16 ulp for f16; the token's scale for int8): one step is what two
//! nearly equal f32 values can differ by once each is rounded to storage.

use serde::Serialize;

use super::{Cache, Dtype};
use crate::{Error, Result};

/// Tolerance of [`compare`].
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Storage steps allowed (see the module docs).
    pub steps: f32,
    /// Absolute slack added to every bound.
    pub atol: f32,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            steps: 2.0,
            atol: 1e-4,
        }
    }
}

/// The element that differs most relative to its bound.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Worst {
    /// Example id.
    pub id: String,
    /// `hidden_states` index.
    pub layer: usize,
    /// Token position in the example.
    pub token: usize,
    /// Feature index.
    pub dim: usize,
    /// Value in the first cache.
    pub a: f32,
    /// Value in the second cache.
    pub b: f32,
    /// `|a - b|` over the element's bound (above 1 fails).
    pub ratio: f32,
}

/// What [`compare`] found.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Examples compared.
    pub examples: u64,
    /// Real tokens compared.
    pub tokens: u64,
    /// `hidden_states` indices compared (stored by both).
    pub layers: Vec<usize>,
    /// Values compared.
    pub values: u64,
    /// Values exactly equal.
    pub equal: u64,
    /// Values within one storage step of each other.
    pub within_one_step: u64,
    /// Values outside the tolerance.
    pub outside: u64,
    /// Largest `|a - b|`.
    pub max_abs_diff: f32,
    /// Mean `|a - b|`.
    pub mean_abs_diff: f64,
    /// Storage type used for the steps (the coarser of the two).
    pub step_dtype: String,
    /// Steps allowed.
    pub steps: f32,
    /// Absolute slack allowed.
    pub atol: f32,
    /// The element closest to (or furthest past) its bound.
    pub worst: Option<Worst>,
}

impl CompareReport {
    /// Whether every value is within the tolerance.
    pub fn ok(&self) -> bool {
        self.outside == 0
    }
}

/// Coarseness rank: a larger one rounds more.
fn coarseness(d: Dtype) -> u8 {
    match d {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        Dtype::Bf16 => 2,
        Dtype::Int8 => 3,
    }
}

/// Spacing of `d` at magnitude `x` (`row_max`: the token's largest |value|,
/// which sets int8's scale).
fn step(d: Dtype, x: f32, row_max: f32) -> f32 {
    let x = x.abs();
    let (mantissa_bits, min_normal_exp) = match d {
        Dtype::F32 => (23, -126),
        Dtype::F16 => (10, -14),
        Dtype::Bf16 => (7, -126),
        Dtype::Int8 => return row_max / 127.0,
    };
    let e = if x > 0.0 {
        x.log2().floor() as i32
    } else {
        min_normal_exp
    };
    2f32.powi(e.max(min_normal_exp) - mantissa_bits)
}

/// Compare caches `a` and `b` (see the module docs).
pub fn compare(a: &Cache, b: &Cache, tol: Tolerance) -> Result<CompareReport> {
    let (ma, mb) = (a.manifest(), b.manifest());
    let refuse = |message: String| Error::Setting {
        setting: "sherl-cache compare".into(),
        message,
    };
    if ma.examples != mb.examples {
        return Err(refuse(format!(
            "{} holds {} examples, {} holds {}",
            a.dir().display(),
            ma.examples,
            b.dir().display(),
            mb.examples
        )));
    }
    if ma.backbone.hidden != mb.backbone.hidden {
        return Err(refuse(format!(
            "hidden sizes differ: {} vs {}",
            ma.backbone.hidden, mb.backbone.hidden
        )));
    }
    let layers: Vec<usize> = ma
        .settings
        .layers
        .iter()
        .copied()
        .filter(|l| mb.settings.layers.contains(l))
        .collect();
    if layers.is_empty() {
        return Err(refuse(format!(
            "no layer stored by both (hidden_states {:?} vs {:?})",
            ma.settings.layers, mb.settings.layers
        )));
    }
    let pos_a: Vec<usize> = layers.iter().filter_map(|&l| a.layer_position(l)).collect();
    let pos_b: Vec<usize> = layers.iter().filter_map(|&l| b.layer_position(l)).collect();
    let (da, db) = (ma.settings.dtype, mb.settings.dtype);
    let coarse = if coarseness(da) >= coarseness(db) {
        da
    } else {
        db
    };
    let hidden = ma.backbone.hidden;
    let mut r = CompareReport {
        examples: 0,
        tokens: 0,
        layers: layers.clone(),
        values: 0,
        equal: 0,
        within_one_step: 0,
        outside: 0,
        max_abs_diff: 0.0,
        mean_abs_diff: 0.0,
        step_dtype: coarse.name().to_string(),
        steps: tol.steps,
        atol: tol.atol,
        worst: None,
    };
    let mut sum_abs = 0f64;
    // Walk both caches chunk by chunk; their chunkings may differ, so keep
    // a decoded chunk of each and move through examples one at a time.
    let (mut ca, mut cb) = (0usize, 0usize);
    let (mut chunk_a, mut chunk_b) = (a.read_chunk(0, &pos_a)?, b.read_chunk(0, &pos_b)?);
    let (mut ka, mut kb) = (0usize, 0usize);
    let (mut off_a, mut off_b) = (chunk_a.offsets(), chunk_b.offsets());
    for position in 0..ma.examples {
        while ka >= chunk_a.meta.len() {
            ca += 1;
            chunk_a = a.read_chunk(ca, &pos_a)?;
            off_a = chunk_a.offsets();
            ka = 0;
        }
        while kb >= chunk_b.meta.len() {
            cb += 1;
            chunk_b = b.read_chunk(cb, &pos_b)?;
            off_b = chunk_b.offsets();
            kb = 0;
        }
        let (ea, eb) = (&chunk_a.meta[ka], &chunk_b.meta[kb]);
        let split_a = ma.split_names.get(ea.split as usize);
        let split_b = mb.split_names.get(eb.split as usize);
        let label_a = ea.label.and_then(|l| ma.labels.get(l as usize));
        let label_b = eb.label.and_then(|l| mb.labels.get(l as usize));
        let differs = if ea.id != eb.id {
            Some(format!("ids '{}' vs '{}'", ea.id, eb.id))
        } else if split_a != split_b {
            Some(format!("splits {split_a:?} vs {split_b:?}"))
        } else if label_a != label_b {
            Some(format!("labels {label_a:?} vs {label_b:?}"))
        } else if ea.ids != eb.ids {
            Some(format!(
                "token ids differ ({} vs {} tokens)",
                ea.ids.len(),
                eb.ids.len()
            ))
        } else {
            None
        };
        if let Some(d) = differs {
            return Err(refuse(format!(
                "the caches hold different examples: at position {position}, {d}"
            )));
        }
        let n = ea.len();
        for (li, &layer) in layers.iter().enumerate() {
            let va = &chunk_a.layers[li][off_a[ka] * hidden..off_a[ka + 1] * hidden];
            let vb = &chunk_b.layers[li][off_b[kb] * hidden..off_b[kb + 1] * hidden];
            for t in 0..n {
                let (ra, rb) = (
                    &va[t * hidden..(t + 1) * hidden],
                    &vb[t * hidden..(t + 1) * hidden],
                );
                let row_max = ra
                    .iter()
                    .chain(rb)
                    .fold(0f32, |m, &x| if x.abs() > m { x.abs() } else { m });
                for (dim, (&x, &y)) in ra.iter().zip(rb).enumerate() {
                    let d = (x - y).abs();
                    let s = step(coarse, x.abs().max(y.abs()), row_max);
                    let bound = tol.steps * s + tol.atol;
                    r.values += 1;
                    sum_abs += f64::from(d);
                    if x == y || x.to_bits() == y.to_bits() {
                        r.equal += 1;
                    }
                    if d <= s {
                        r.within_one_step += 1;
                    }
                    // NaN compares false: count it outside.
                    let inside = d <= bound;
                    if !inside {
                        r.outside += 1;
                    }
                    if d > r.max_abs_diff || d.is_nan() {
                        r.max_abs_diff = d;
                    }
                    let ratio = if d.is_nan() {
                        f32::MAX
                    } else {
                        (d / bound.max(f32::MIN_POSITIVE)).min(f32::MAX)
                    };
                    if r.worst.as_ref().is_none_or(|w| ratio > w.ratio) {
                        r.worst = Some(Worst {
                            id: ea.id.clone(),
                            layer,
                            token: t,
                            dim,
                            a: x,
                            b: y,
                            ratio,
                        });
                    }
                }
            }
        }
        r.examples += 1;
        r.tokens += n as u64;
        ka += 1;
        kb += 1;
    }
    r.mean_abs_diff = sum_abs / r.values.max(1) as f64;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_the_storage_spacing() {
        // f16 at 1.0: 2^-10; at 3.0: 2^-9; below the smallest normal the
        // subnormal spacing 2^-24.
        assert_eq!(step(Dtype::F16, 1.0, 0.0), 2f32.powi(-10));
        assert_eq!(step(Dtype::F16, 3.0, 0.0), 2f32.powi(-9));
        assert_eq!(step(Dtype::F16, 1e-6, 0.0), 2f32.powi(-24));
        assert_eq!(step(Dtype::F16, 0.0, 0.0), 2f32.powi(-24));
        assert_eq!(step(Dtype::Bf16, 1.0, 0.0), 2f32.powi(-7));
        assert_eq!(step(Dtype::F32, 1.0, 0.0), f32::EPSILON);
        assert_eq!(step(Dtype::Int8, 0.3, 12.7), 0.1);
        assert!(coarseness(Dtype::F16) > coarseness(Dtype::F32));
    }
}
