//! Classification metrics: loss, accuracy and macro-F1, accumulated over
//! batches.

/// Running totals for one split.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    loss_sum: f64,
    n: u64,
    /// confusion[true][pred]
    confusion: Vec<Vec<u64>>,
}

impl Tally {
    /// Empty tally for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Tally {
            loss_sum: 0.0,
            n: 0,
            confusion: vec![vec![0; classes]; classes],
        }
    }

    /// Add a batch: mean loss over it, predicted and true classes.
    pub fn add(&mut self, mean_loss: f64, preds: &[u32], labels: &[u32]) {
        self.loss_sum += mean_loss * preds.len() as f64;
        self.n += preds.len() as u64;
        for (&p, &t) in preds.iter().zip(labels) {
            self.confusion[t as usize][p as usize] += 1;
        }
    }

    /// Examples seen.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Mean loss per example.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.n.max(1) as f64
    }

    /// Fraction correct.
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.confusion.len())
            .map(|i| self.confusion[i][i])
            .sum();
        correct as f64 / self.n.max(1) as f64
    }

    /// Unweighted mean of per-class F1 over the classes that occur in the
    /// labels or the predictions (scikit-learn's default).
    pub fn macro_f1(&self) -> f64 {
        let k = self.confusion.len();
        let mut f1s = Vec::new();
        for c in 0..k {
            let tp = self.confusion[c][c] as f64;
            let support: u64 = self.confusion[c].iter().sum();
            let predicted: u64 = (0..k).map(|t| self.confusion[t][c]).sum();
            if support == 0 && predicted == 0 {
                continue;
            }
            let denom = support as f64 + predicted as f64;
            f1s.push(if denom > 0.0 { 2.0 * tp / denom } else { 0.0 });
        }
        if f1s.is_empty() {
            0.0
        } else {
            f1s.iter().sum::<f64>() / f1s.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_metrics() {
        // labels: 0 0 0 1 1 2 ; preds: 0 0 1 1 0 2
        let mut t = Tally::new(3);
        t.add(1.0, &[0, 0, 1], &[0, 0, 0]);
        t.add(0.5, &[1, 0, 2], &[1, 1, 2]);
        assert_eq!(t.count(), 6);
        assert!((t.loss() - 0.75).abs() < 1e-12);
        assert!((t.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        // class 0: tp 2, support 3, predicted 3 -> 2*2/6 = 0.6667
        // class 1: tp 1, support 2, predicted 2 -> 0.5 ; class 2: 1.0
        let want = (4.0 / 6.0 + 0.5 + 1.0) / 3.0;
        assert!((t.macro_f1() - want).abs() < 1e-12);
    }

    #[test]
    fn absent_classes_are_skipped() {
        let mut t = Tally::new(4);
        t.add(0.0, &[0, 1], &[0, 1]);
        assert_eq!(t.macro_f1(), 1.0);
    }
}
