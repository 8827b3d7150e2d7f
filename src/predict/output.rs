//! The prediction lines (JSON Lines, one per input) and the accuracy over
//! the inputs whose true label the run knows.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::plan::PredictSummary;
use crate::{Error, Result};

/// Writes one line per labelled input and keeps the accuracy's tally.
pub(crate) struct Labeller<'a> {
    sink: Box<dyn Write + 'a>,
    out_name: PathBuf,
    /// The run's classes.
    labels: &'a [String],
    /// The input's label names (its true labels index these).
    names: &'a [String],
    /// The run's class of each input label name, if it has one.
    class_of: Vec<Option<usize>>,
    correct: usize,
    labelled: usize,
    unknown: usize,
}

impl<'a> Labeller<'a> {
    /// Lines go to `out` (stdout when `None`); `labels` are the run's
    /// classes, `names` the label names of the input.
    pub(crate) fn open(
        out: Option<&Path>,
        labels: &'a [String],
        names: &'a [String],
    ) -> Result<Self> {
        let sink: Box<dyn Write> = match out {
            Some(p) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| Error::io(p, e))?,
            )),
            None => Box::new(std::io::stdout().lock()),
        };
        Ok(Labeller {
            sink,
            out_name: out.map_or_else(|| PathBuf::from("<stdout>"), Path::to_path_buf),
            labels,
            names,
            class_of: names
                .iter()
                .map(|n| labels.iter().position(|l| l == n))
                .collect(),
            correct: 0,
            labelled: 0,
            unknown: 0,
        })
    }

    /// One input's line: `fields` (its id and what identifies it), the
    /// most probable class, every class's probability and, when the input
    /// has one, its true label (counted in the accuracy when the run knows
    /// it).
    pub(crate) fn write(
        &mut self,
        mut fields: Map<String, Value>,
        probs: &[f32],
        truth: Option<u32>,
    ) -> Result<()> {
        let best = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        fields.insert("label".into(), json!(self.labels[best]));
        let per_class: Map<String, Value> = self
            .labels
            .iter()
            .cloned()
            .zip(probs.iter().map(|&x| json!(f64::from(x))))
            .collect();
        fields.insert("probabilities".into(), Value::Object(per_class));
        if let Some(t) = truth {
            let t = t as usize;
            fields.insert("true_label".into(), json!(self.names[t]));
            match self.class_of[t] {
                Some(c) => {
                    self.labelled += 1;
                    self.correct += usize::from(c == best);
                }
                None => self.unknown += 1,
            }
        }
        writeln!(self.sink, "{}", Value::Object(fields)).map_err(|e| Error::io(&self.out_name, e))
    }

    /// Flush the lines; warn about true labels the run does not know.
    pub(crate) fn finish(
        mut self,
        run_id: String,
        examples: usize,
        out: Option<PathBuf>,
    ) -> Result<PredictSummary> {
        self.sink
            .flush()
            .map_err(|e| Error::io(&self.out_name, e))?;
        if self.unknown > 0 {
            let names: Vec<&str> = self
                .class_of
                .iter()
                .zip(self.names)
                .filter(|(c, _)| c.is_none())
                .map(|(_, n)| n.as_str())
                .collect();
            tracing::warn!(
                "{} row(s) have a true label the run was not trained on ({}); they are labelled but left out of the accuracy",
                self.unknown,
                names.join(", ")
            );
        }
        Ok(PredictSummary {
            run_id,
            examples,
            accuracy: (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64),
            labelled: self.labelled,
            unknown_labels: self.unknown,
            out,
        })
    }
}
