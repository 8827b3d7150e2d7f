//! Terminal progress for the binaries (indicatif on stderr), implementing
//! the library's reporter traits. Hidden when stderr is not a terminal, with
//! `-q`, `--no-progress` or `-v` (bars and debug logs do not mix).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::extract::ExtractReporter;

/// Progress bar for extraction: examples, tokens/s, ETA.
pub struct ExtractBar {
    bar: ProgressBar,
    tokens: AtomicU64,
    start: Instant,
}

impl ExtractBar {
    /// A bar that draws only when `visible`.
    pub fn new(visible: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(0),
            if visible {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} examples ({per_sec}) {msg} ETA {eta}",
            )
            .expect("static template is valid")
            .progress_chars("=> "),
        );
        ExtractBar {
            bar,
            tokens: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

impl ExtractReporter for ExtractBar {
    fn start(&self, examples: u64, tokens: u64) {
        self.bar.set_length(examples);
        tracing::info!("running the backbone over {examples} examples ({tokens} tokens)");
    }

    fn advance(&self, examples: u64, tokens: u64) {
        let t = self.tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar
            .set_message(format!("{:.0} tokens/s", t as f64 / secs));
        self.bar.inc(examples);
    }

    fn note(&self, message: &str) {
        self.bar.suspend(|| tracing::info!("{message}"));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
