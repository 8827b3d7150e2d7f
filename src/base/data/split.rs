//! Seeded train/valid/test splits of one dataset: [`SplitSpec`] (parsed from
//! `train=0.8,valid=0.1,test=0.1`) and the assignment of rows, or of whole
//! groups, to splits (shuffled by [`crate::rng::SplitMix64`] with its
//! unbiased rule).
//!
//! The units (rows, or distinct group values sorted by value) are put in a
//! canonical order, shuffled by Fisher-Yates with the seed, and then cut into
//! consecutive runs, one per split: each cut is placed where the cumulative
//! row count is closest to the cumulative fraction of all rows, and every
//! split gets at least one unit. The result depends only on the data (row
//! order and group values) and the seed.

use std::collections::BTreeMap;

use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Tolerance on the sum of split fractions.
const SUM_TOLERANCE: f64 = 1e-6;

/// How to cut one dataset into named splits.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSpec {
    /// Split names and their share of the rows, in cut order; each share is
    /// `> 0` and they sum to 1 (within 1e-6).
    pub fractions: Vec<(String, f64)>,
    /// Seed of the shuffle.
    pub seed: u64,
}

impl SplitSpec {
    /// Parse `train=0.8,valid=0.1,test=0.1`.
    pub fn parse(s: &str, seed: u64) -> Result<Self> {
        let bad = |why: String| Error::setting("--split", format!("split `{s}`: {why}"));
        let mut fractions = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not NAME=FRACTION")))?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{}` is not a number", value.trim())))?;
            fractions.push((name.trim().to_owned(), value));
        }
        let spec = SplitSpec { fractions, seed };
        spec.validate().map_err(|e| match e {
            Error::Setting { message, .. } => bad(message),
            other => other,
        })?;
        Ok(spec)
    }

    /// Check names (non-empty, distinct) and fractions (finite, `> 0`,
    /// summing to 1).
    pub fn validate(&self) -> Result<()> {
        if self.fractions.is_empty() {
            return Err(Error::setting("--split", "no splits given"));
        }
        let mut sum = 0.0;
        for (i, (name, fraction)) in self.fractions.iter().enumerate() {
            if name.is_empty() {
                return Err(Error::setting("--split", "empty split name"));
            }
            if self.fractions[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::setting(
                    "--split",
                    format!("split `{name}` is given twice"),
                ));
            }
            if !(fraction.is_finite() && *fraction > 0.0) {
                return Err(Error::setting(
                    "--split",
                    format!("split `{name}` has fraction {fraction}; fractions must be > 0"),
                ));
            }
            sum += fraction;
        }
        if (sum - 1.0).abs() > SUM_TOLERANCE {
            return Err(Error::setting(
                "--split",
                format!("fractions sum to {sum}, not 1"),
            ));
        }
        Ok(())
    }
}

/// The split index of each of the examples. `groups`, when given, holds
/// each example's group value (one per example), and groups are the units;
/// otherwise each example is a unit. The error says why it cannot be done.
pub(super) fn assign(
    spec: &SplitSpec,
    groups: Option<&[&str]>,
    n_examples: usize,
) -> std::result::Result<Vec<usize>, String> {
    // Units in canonical order: sorted group values, or row order.
    let (unit_of, mut sizes): (Vec<usize>, Vec<u64>) = match groups {
        Some(groups) => {
            let mut index: BTreeMap<&str, usize> = groups.iter().map(|g| (*g, 0)).collect();
            for (i, slot) in index.values_mut().enumerate() {
                *slot = i;
            }
            let unit_of: Vec<usize> = groups.iter().map(|g| index[g]).collect();
            let mut sizes = vec![0u64; index.len()];
            for &u in &unit_of {
                sizes[u] += 1;
            }
            (unit_of, sizes)
        }
        None => ((0..n_examples).collect(), vec![1; n_examples]),
    };
    let n_splits = spec.fractions.len();
    if sizes.len() < n_splits {
        let what = if groups.is_some() { "groups" } else { "rows" };
        return Err(format!(
            "cannot make {n_splits} splits from {} {what}",
            sizes.len()
        ));
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    SplitMix64::new(spec.seed).shuffle_unbiased(&mut order);
    let ordered_sizes: Vec<u64> = order.iter().map(|&u| sizes[u]).collect();
    let fractions: Vec<f64> = spec.fractions.iter().map(|(_, f)| *f).collect();
    let cuts = cut_points(&ordered_sizes, &fractions);
    // Reuse `sizes` as each unit's split index.
    for (s, run) in cuts.windows(2).enumerate() {
        for &unit in &order[run[0]..run[1]] {
            sizes[unit] = s as u64;
        }
    }
    Ok(unit_of.iter().map(|&u| sizes[u] as usize).collect())
}

/// Boundaries `0 = b[0] < b[1] < ... < b[k] = units` cutting units of the
/// given sizes (in order) into `k = fractions.len()` runs: each inner cut
/// where the cumulative size is closest to the cumulative fraction of the
/// total (the earlier on ties), then moved so every run is non-empty. Needs
/// at least `k` units.
fn cut_points(sizes: &[u64], fractions: &[f64]) -> Vec<usize> {
    let n_units = sizes.len();
    let k = fractions.len();
    let mut prefix = Vec::with_capacity(n_units + 1);
    prefix.push(0u64);
    for &s in sizes {
        prefix.push(prefix[prefix.len() - 1] + s);
    }
    let total = prefix[n_units] as f64;
    let mut cuts = vec![0usize; k + 1];
    cuts[k] = n_units;
    let mut cumulative = 0.0;
    let mut i = 0;
    for (s, fraction) in fractions.iter().enumerate().take(k - 1) {
        cumulative += fraction;
        let target = cumulative * total;
        let distance = |i: usize| (prefix[i] as f64 - target).abs();
        while i < n_units && distance(i + 1) < distance(i) {
            i += 1;
        }
        cuts[s + 1] = i;
    }
    for s in 1..k {
        cuts[s] = cuts[s].max(cuts[s - 1] + 1);
    }
    for s in (1..k).rev() {
        cuts[s] = cuts[s].min(cuts[s + 1] - 1);
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_spec() {
        let spec = SplitSpec::parse("train=0.8, valid=0.1,test=0.1", 7).unwrap();
        assert_eq!(
            spec.fractions,
            vec![
                ("train".to_owned(), 0.8),
                ("valid".to_owned(), 0.1),
                ("test".to_owned(), 0.1)
            ]
        );
        assert_eq!(spec.seed, 7);
        assert!(SplitSpec::parse("train=1", 0).is_ok());
        for bad in [
            "",
            "train",
            "train=0.8,valid=0.1",
            "train=0.8,train=0.2",
            "train=1.2,valid=-0.2",
            "train=1,valid=0",
            "=1",
            "train=x",
            "train=0.5,valid=0.5,",
            "train=NaN",
        ] {
            let err = SplitSpec::parse(bad, 0).unwrap_err();
            assert!(
                matches!(&err, Error::Setting { setting, .. } if setting == "--split"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cuts_of_rows() {
        assert_eq!(cut_points(&[1; 10], &[0.8, 0.1, 0.1]), vec![0, 8, 9, 10]);
        assert_eq!(cut_points(&[1; 10], &[0.5, 0.5]), vec![0, 5, 10]);
        // 2.5 rows is a tie between 2 and 3: the earlier cut wins.
        assert_eq!(cut_points(&[1; 10], &[0.25, 0.75]), vec![0, 2, 10]);
        assert_eq!(cut_points(&[1; 3], &[1.0]), vec![0, 3]);
    }

    #[test]
    fn cuts_of_groups() {
        // Total 10, target 5: prefix 6 (|1|) beats 3 (|2|).
        assert_eq!(cut_points(&[3, 3, 3, 1], &[0.5, 0.5]), vec![0, 2, 4]);
        // Targets 10.8 and 11.4 both fall after unit 1; every split still
        // gets one unit.
        assert_eq!(
            cut_points(&[10, 1, 1], &[0.9, 0.05, 0.05]),
            vec![0, 1, 2, 3]
        );
        // A tiny fraction still gets its one unit.
        assert_eq!(cut_points(&[1; 4], &[0.98, 0.01, 0.01]), vec![0, 2, 3, 4]);
    }

    #[test]
    fn assign_keeps_groups_together() {
        let spec = SplitSpec::parse("a=0.5,b=0.5", 3).unwrap();
        let groups = ["x", "y", "x", "z", "y", "x", "w"];
        let splits = assign(&spec, Some(&groups), groups.len()).unwrap();
        for (i, g) in groups.iter().enumerate() {
            for (j, h) in groups.iter().enumerate() {
                if g == h {
                    assert_eq!(splits[i], splits[j]);
                }
            }
        }
        assert!(splits.contains(&0) && splits.contains(&1));
        assert_eq!(splits, assign(&spec, Some(&groups), groups.len()).unwrap());
    }

    #[test]
    fn assign_needs_enough_units() {
        let spec = SplitSpec::parse("a=0.5,b=0.3,c=0.2", 0).unwrap();
        assert!(assign(&spec, Some(&["x", "y", "x"]), 3).is_err());
        assert!(assign(&spec, None, 2).is_err());
        let splits = assign(&spec, None, 3).unwrap();
        let mut sorted = splits.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
    }
}
