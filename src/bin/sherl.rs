//! `sherl`: one entry point for the three tools. `sherl extract ...` runs
//! `sherl-extract ...`, `sherl fit ...` runs `sherl-fit ...`, `sherl cache
//! ...` runs `sherl-cache ...`, with the arguments unchanged; the three
//! binaries stay the real commands.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Memory-efficient transfer learning (SHERL): cache a frozen backbone's
/// features once, then train many times from the cache.
#[derive(Debug, Parser)]
#[command(
    name = "sherl",
    version,
    about,
    long_about = None,
    after_help = "The phases, in order:\n  1. sherl extract run ...   run the frozen backbone once, write the feature cache\n  2. sherl fit run|sweep ... train SHERL and baselines from the cache\n     sherl fit report ...    compare runs;  sherl fit predict ...  label new texts\n     sherl fit search ...    query a retrieval run\n  sherl cache inspect|verify|compare|merge|export ...\n                             look into, check, compare, combine caches; export one as NumPy files\n\n`sherl <tool> --help` shows each tool's commands."
)]
struct Args {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Phase one (sherl-extract): export-onnx, inspect-onnx, expose-layers, run (write the feature cache), sample, pairs (prepare paired data).
    #[command(disable_help_flag = true)]
    Extract {
        /// Arguments for sherl-extract.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Phase two (sherl-fit): run (train one model), sweep, report, predict, search, export (a run as one ONNX model).
    #[command(disable_help_flag = true)]
    Fit {
        /// Arguments for sherl-fit.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Caches (sherl-cache): inspect, verify, compare, merge, export (NumPy files).
    // (Each tool's line lists its commands by name: the hardening_sweep
    // tests check it against the tool's own --help.)
    #[command(disable_help_flag = true)]
    Cache {
        /// Arguments for sherl-cache.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// The tool's binary: next to this one (as `cargo build` and `cargo
/// install` place them), else found on PATH by name.
fn tool_path(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (name, rest) = match args.tool {
        Tool::Extract { args } => ("sherl-extract", args),
        Tool::Fit { args } => ("sherl-fit", args),
        Tool::Cache { args } => ("sherl-cache", args),
    };
    let path = tool_path(name);
    let mut cmd = std::process::Command::new(&path);
    cmd.args(&rest);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Only returns on failure.
        let e = cmd.exec();
        eprintln!(
            "error: cannot run {}: {e} (it is installed next to sherl by `cargo install --path .`)",
            path.display()
        );
        ExitCode::from(2)
    }
    #[cfg(not(unix))]
    match cmd.status() {
        Ok(s) => ExitCode::from(s.code().unwrap_or(2).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}
