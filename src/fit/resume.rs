//! Continuing a run from its mid-run checkpoint ([`super::checkpoint`]):
//! the [`Trainer`]'s side, which checks a checkpoint against the run's
//! files and puts the training state back, and writes one after an epoch.

use std::collections::BTreeMap;

use super::checkpoint::{self, BestRecord, State, STATE_FILE, TENSORS_FILE};
use super::params::Params;
use super::run_dir::{METRICS_FILE, WEIGHTS_FILE};
use super::trainer::{Best, Optimisers, Progress, Task, Trainer};
use crate::rng::SplitMix64;
use crate::Result;

impl Trainer<'_> {
    /// Continue from the run's mid-run checkpoint when there is a usable
    /// one: the task's weights and totals, the optimisers' moments and
    /// steps, and where the epochs, the schedule and the dropout stream
    /// stood. A checkpoint that cannot be used is removed, with a note
    /// saying why, and the run starts from epoch 1 (`None`).
    pub(super) fn resume<T: Task>(
        &self,
        task: &mut T,
        opt: &mut Optimisers,
        config_sha256: &str,
    ) -> Result<Option<Progress>> {
        let dir = &self.run_dir;
        let groups = opt.groups.len();
        let loaded = match checkpoint::load(dir, config_sha256, self.config.epochs, groups) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            Err(why) => return self.start_over(&why),
        };
        let st = &loaded.state;
        let weights_path = dir.join(WEIGHTS_FILE);
        // everything is checked before anything is put back
        let best = match &st.best {
            Some(b) => {
                if !weights_path.exists() || crate::fsutil::sha256_file(&weights_path)? != b.sha256
                {
                    return self.start_over(&format!(
                        "{WEIGHTS_FILE} is not the best epoch's it records"
                    ));
                }
                let snap = Params::load_file(&weights_path, &candle_core::Device::Cpu)?;
                Some((b.score, b.epoch, snap, b.sha256.clone()))
            }
            None => None,
        };
        let metrics_path = dir.join(METRICS_FILE);
        let lines = if metrics_path.exists() {
            crate::fsutil::read_text(&metrics_path, crate::fsutil::METADATA_LIMIT)?
        } else {
            String::new()
        };
        let kept: Vec<&str> = lines
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .take(st.epoch)
            .collect();
        if kept.len() < st.epoch {
            return self.start_over(&format!(
                "{METRICS_FILE} has fewer than {} epochs",
                st.epoch
            ));
        }
        if let Err(e) = opt.check_moments(&loaded.moments) {
            return self.start_over(&e);
        }
        // put back (a failure from here on is an error: the task is changed)
        let device_weights = loaded
            .weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(self.device)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        task.restore(&device_weights, &dir.join(TENSORS_FILE))?;
        task.set_carried(&st.task)?;
        opt.set_state(&st.adam_steps, loaded.moments)?;
        let mut b = Best::new(weights_path);
        if let Some((score, epoch, snap, sha)) = best {
            let snap = snap
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_device(self.device)?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            b.best = Some((score, epoch, snap));
            b.sha256 = sha;
        }
        self.reporter.note(&format!(
            "{}: resuming after epoch {} of {} ({})",
            self.run_id,
            st.epoch,
            self.config.epochs,
            dir.join(STATE_FILE).display()
        ));
        Ok(Some(Progress {
            first_epoch: st.epoch + 1,
            step: st.step,
            dropout: SplitMix64::new(st.dropout),
            train_seconds: st.train_seconds,
            step_peak: st.step_peak,
            best: b,
            metrics: kept.concat(),
        }))
    }

    /// Say why the checkpoint is not used, remove it, start from epoch 1.
    fn start_over(&self, why: &str) -> Result<Option<Progress>> {
        self.reporter.note(&format!(
            "{}: the mid-run checkpoint is not used ({why}); training from epoch 1",
            self.run_id
        ));
        checkpoint::remove(&self.run_dir)?;
        Ok(None)
    }

    /// Write the mid-run checkpoint after an epoch (`at`: epochs finished,
    /// steps, training seconds, step peak).
    pub(super) fn save_checkpoint<T: Task>(
        &self,
        task: &T,
        opt: &Optimisers,
        best: &Best,
        dropout: &SplitMix64,
        config_sha256: &str,
        at: (usize, usize, f64, Option<u64>),
    ) -> Result<()> {
        let (epoch, step, train_seconds, step_peak) = at;
        let mut adam_steps = Vec::new();
        let mut moments = Vec::new();
        for (t, m) in opt.state().expect("checked before training") {
            adam_steps.push(t);
            moments.push(m);
        }
        let state = State {
            format: 0,
            epoch,
            step,
            dropout: dropout.state(),
            train_seconds,
            step_peak,
            best: best.best.as_ref().map(|(score, epoch, _)| BestRecord {
                score: *score,
                epoch: *epoch,
                sha256: best.sha256.clone(),
            }),
            adam_steps,
            task: task.carried(),
            config_sha256: config_sha256.to_string(),
            tensors_sha256: String::new(),
        };
        checkpoint::save(&self.run_dir, state, task.snapshot()?, &moments)
    }
}
