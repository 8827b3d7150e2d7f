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

use super::{Cache, DecodedChunk, Dtype, ExampleMeta};
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
    let layers = shared_layers(a, b)?;
    let pos_a: Vec<usize> = layers.iter().filter_map(|&l| a.layer_position(l)).collect();
    let pos_b: Vec<usize> = layers.iter().filter_map(|&l| b.layer_position(l)).collect();
    let (da, db) = (ma.settings.dtype, mb.settings.dtype);
    let coarse = if coarseness(da) >= coarseness(db) {
        da
    } else {
        db
    };
    let hidden = ma.backbone.hidden;
    let mut tally = Tally {
        r: CompareReport {
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
        },
        sum_abs: 0.0,
        coarse,
        tol,
    };
    // Walk both caches chunk by chunk; their chunkings may differ, so keep
    // a decoded chunk of each and move through examples one at a time.
    let mut cur_a = Cursor::new(a, &pos_a)?;
    let mut cur_b = Cursor::new(b, &pos_b)?;
    for position in 0..ma.examples {
        cur_a.load_next_example()?;
        cur_b.load_next_example()?;
        let (ea, eb) = (cur_a.example(), cur_b.example());
        if let Some(d) = example_difference(a, b, ea, eb) {
            return Err(refuse(format!(
                "the caches hold different examples: at position {position}, {d}"
            )));
        }
        let n = ea.len();
        for (li, &layer) in layers.iter().enumerate() {
            let (va, vb) = (cur_a.values(li, hidden), cur_b.values(li, hidden));
            for t in 0..n {
                let (ra, rb) = (
                    &va[t * hidden..(t + 1) * hidden],
                    &vb[t * hidden..(t + 1) * hidden],
                );
                tally.token(&ea.id, layer, t, ra, rb);
            }
        }
        tally.r.examples += 1;
        tally.r.tokens += n as u64;
        cur_a.k += 1;
        cur_b.k += 1;
    }
    let mut r = tally.r;
    r.mean_abs_diff = tally.sum_abs / r.values.max(1) as f64;
    Ok(r)
}

/// A refusal of `sherl-cache compare`.
fn refuse(message: String) -> Error {
    Error::Setting {
        setting: "sherl-cache compare".into(),
        message,
    }
}

/// The `hidden_states` indices both caches store, after checking that they
/// hold as many examples of the same width.
fn shared_layers(a: &Cache, b: &Cache) -> Result<Vec<usize>> {
    let (ma, mb) = (a.manifest(), b.manifest());
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
    Ok(layers)
}

/// How example `ea` of cache `a` differs from `eb` of `b` (id, split, label
/// or token ids), if it does.
fn example_difference(a: &Cache, b: &Cache, ea: &ExampleMeta, eb: &ExampleMeta) -> Option<String> {
    let (ma, mb) = (a.manifest(), b.manifest());
    let split_a = ma.split_names.get(ea.split as usize);
    let split_b = mb.split_names.get(eb.split as usize);
    let label_a = ea.label.and_then(|l| ma.labels.get(l as usize));
    let label_b = eb.label.and_then(|l| mb.labels.get(l as usize));
    if ea.id != eb.id {
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
    }
}

/// A walk through one cache's examples, one decoded chunk at a time.
struct Cursor<'a> {
    cache: &'a Cache,
    positions: &'a [usize],
    /// Number of the decoded chunk.
    c: usize,
    chunk: DecodedChunk,
    /// Current example within the chunk.
    k: usize,
    /// The chunk's token offsets.
    offsets: Vec<usize>,
}

impl<'a> Cursor<'a> {
    /// Decode `cache`'s first chunk (stored layers `positions`).
    fn new(cache: &'a Cache, positions: &'a [usize]) -> Result<Self> {
        let chunk = cache.read_chunk(0, positions)?;
        let offsets = chunk.offsets();
        Ok(Cursor {
            cache,
            positions,
            c: 0,
            chunk,
            k: 0,
            offsets,
        })
    }

    /// Decode the following chunks until one holds the current example.
    fn load_next_example(&mut self) -> Result<()> {
        while self.k >= self.chunk.meta.len() {
            self.c += 1;
            self.chunk = self.cache.read_chunk(self.c, self.positions)?;
            self.offsets = self.chunk.offsets();
            self.k = 0;
        }
        Ok(())
    }

    /// The current example.
    fn example(&self) -> &ExampleMeta {
        &self.chunk.meta[self.k]
    }

    /// The current example's values of compared layer `li`, `hidden` per token.
    fn values(&self, li: usize, hidden: usize) -> &[f32] {
        let (from, to) = (self.offsets[self.k], self.offsets[self.k + 1]);
        &self.chunk.layers[li][from * hidden..to * hidden]
    }
}

/// The report being built, with the running sum of `|a - b|`.
struct Tally {
    r: CompareReport,
    sum_abs: f64,
    coarse: Dtype,
    tol: Tolerance,
}

impl Tally {
    /// Count token `t` of example `id` at `layer`: its rows `ra` and `rb`.
    fn token(&mut self, id: &str, layer: usize, t: usize, ra: &[f32], rb: &[f32]) {
        let (r, tol) = (&mut self.r, self.tol);
        let row_max = ra
            .iter()
            .chain(rb)
            .fold(0f32, |m, &x| if x.abs() > m { x.abs() } else { m });
        for (dim, (&x, &y)) in ra.iter().zip(rb).enumerate() {
            let d = (x - y).abs();
            let s = step(self.coarse, x.abs().max(y.abs()), row_max);
            let bound = tol.steps * s + tol.atol;
            r.values += 1;
            self.sum_abs += f64::from(d);
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
                    id: id.to_owned(),
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
