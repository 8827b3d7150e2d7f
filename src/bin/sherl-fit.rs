//! `sherl-fit`: phase two (training SHERL and baselines from a feature
//! cache). Not implemented yet: it prints its usage and exits with an error.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "sherl-fit {}: training from a feature cache is not implemented yet.\n\
         usage (planned): sherl-fit run --cache CACHE --backbone DIR --out RUNS [options]",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
