//! What several methods share (the side width and the late-layer count:
//! their flags and checks), and LoRA's checks and target parsing.

use serde::{Deserialize, Serialize};

use crate::fit::error::FitError;
use crate::fit::nn::lora::{LoraSpec, LoraTarget};
use crate::Result;

/// Largest `--side-dim` accepted: far wider than any backbone in use
/// (BERT-large is 1,024 wide); a typo such as `--side-dim 100000000` is
/// refused here instead of by the kernel's out-of-memory killer.
pub const MAX_SIDE_DIM: usize = 16_384;

/// What resolving settings on a cache needs to know.
#[derive(Debug, Clone, Copy)]
pub struct ResolveOn<'a> {
    /// Transformer layers N.
    pub layers: usize,
    /// Hidden width D.
    pub hidden: usize,
    /// Hidden-state indices the cache holds.
    pub cached: &'a [usize],
}

/// `lora_targets` from a list of names or one comma-separated string.
pub(super) fn lora_targets_de<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<LoraTarget>>, D::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    let names: Vec<String> = match Option::<Form>::deserialize(d)? {
        None => return Ok(None),
        Some(Form::One(s)) => s.split(',').map(str::to_owned).collect(),
        Some(Form::Many(v)) => v,
    };
    names
        .iter()
        .map(|n| LoraTarget::parse(n).map_err(D::Error::custom))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

/// d = D / r unless set; refused when 0.
pub(super) fn side_width(
    reduction: usize,
    side_dim: Option<usize>,
    on: &ResolveOn,
) -> Result<usize> {
    let d = side_dim.unwrap_or(on.hidden / reduction.max(1));
    if d == 0 {
        return Err(FitError::settings(format!(
            "side width {} / {reduction} is 0",
            on.hidden
        )));
    }
    Ok(d)
}

/// K between 1 and N.
pub(super) fn late_k(k: usize, n: usize) -> Result<usize> {
    if k == 0 || k > n {
        return Err(FitError::settings(format!(
            "--late-layers {k} must be between 1 and {n}"
        )));
    }
    Ok(k)
}

/// The width check every side network shares.
pub(super) fn check_width(reduction: usize, side_dim: Option<usize>) -> Result<(), String> {
    if reduction == 0 || side_dim == Some(0) {
        return Err("--reduction and --side-dim must be positive".into());
    }
    if let Some(d) = side_dim.filter(|&d| d > MAX_SIDE_DIM) {
        return Err(format!(
            "--side-dim {d}: at most {MAX_SIDE_DIM} (a side network is narrower than its backbone)"
        ));
    }
    Ok(())
}

pub(super) fn check_lora(lora: &LoraSpec) -> Result<(), String> {
    if lora.rank == 0 || lora.rank > MAX_SIDE_DIM {
        return Err(format!(
            "--lora-rank {}: must be between 1 and {MAX_SIDE_DIM}",
            lora.rank
        ));
    }
    if !lora.alpha.is_finite() || lora.alpha <= 0.0 {
        return Err(format!(
            "--lora-alpha {}: must be a positive finite number",
            lora.alpha
        ));
    }
    if !(0.0..1.0).contains(&lora.dropout) {
        return Err(format!(
            "--lora-dropout {}: must be in [0, 1)",
            lora.dropout
        ));
    }
    if lora.targets.is_empty() {
        return Err(
            "--lora-targets is empty; name at least one of q, k, v, o, ffn-in, ffn-out".into(),
        );
    }
    Ok(())
}

/// The field names of a struct, as its derived `Deserialize` knows them
/// (what a JSON object of it may hold).
pub fn field_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    use std::cell::Cell;
    struct Names<'a>(&'a Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Names<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.set(fields);
            Err(Self::Error::custom("names only"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let names = Cell::new(&[][..]);
    let _ = T::deserialize(Names(&names));
    names.get()
}

/// `--method sherl` and `late-layer`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "Late layers (sherl, late-layer)")]
pub(super) struct LateFlags {
    /// K: the backbone's last K layers form the late route.
    #[arg(long)]
    late_layers: Option<usize>,
}

/// The side networks' width.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "Side width (sherl, unipt, adapter, lst)")]
pub(super) struct WidthFlags {
    /// Reduction r: side width d = D / r.
    #[arg(long)]
    reduction: Option<usize>,
    /// Side width d (overrides --reduction).
    #[arg(long)]
    side_dim: Option<usize>,
}
