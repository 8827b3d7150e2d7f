//! Pieces shared by the binaries (feature `cli`): the commands that turn
//! parsed flags into their JSON line ([`fit`], [`extract`]; the Python
//! package calls them too, through [`command_line`]), output setup (logs,
//! progress bars), runtime flags, and the `main` wrapper with sherl's exit
//! codes. The library proper does not depend on this module, nor on the
//! crates it brings (anyhow, tracing-subscriber, indicatif, mimalloc).
//!
//! Conventions (docs/usage.md, "Output conventions"): results go to stdout (one JSON line per run),
//! logs and progress to stderr. Exit codes: 0 ok, 1 finished but some runs
//! failed, 2 error. A broken pipe on stdout exits 0.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

#[cfg(feature = "extract")]
use std::path::PathBuf;

#[cfg(feature = "extract")]
use crate::extract::runtime::{Device, OptLevel, SessionConfig};

#[cfg(feature = "extract")]
pub mod extract;
#[cfg(feature = "extract")]
pub mod extract_args;
#[cfg(feature = "fit")]
pub mod fit;
#[cfg(feature = "fit")]
pub mod fit_args;
#[cfg(feature = "extract")]
pub mod progress;

pub use crate::EXIT_BUSY;
/// A command-line parsing error (a usage error, or `--help`).
pub use clap::Error as ClapError;

/// Verbosity flags.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// More logging on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr; no progress bars.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// No progress bars (logs unchanged).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

impl OutputArgs {
    /// Whether progress bars may be drawn (stderr is a terminal, not quiet,
    /// not verbose: bars and debug logs do not mix).
    pub fn progress(&self) -> bool {
        use std::io::IsTerminal;
        !self.quiet && !self.no_progress && self.verbose == 0 && std::io::stderr().is_terminal()
    }
}

/// The log filter of the flags: the default from the `-v` count (errors
/// only with `-q`); `RUST_LOG` overrides it.
fn log_filter(args: &OutputArgs) -> EnvFilter {
    let default = if args.quiet {
        "error"
    } else {
        match args.verbose {
            0 => "warn,sherl=info",
            1 => "warn,sherl=debug",
            _ => "info,sherl=trace",
        }
    };
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// Set up logging to stderr once (a binary's start).
pub fn init_output(args: &OutputArgs) {
    // A second init (tests calling into binaries' code) is harmless.
    if let Err(e) = tracing_subscriber::fmt()
        .with_env_filter(log_filter(args))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .try_init()
    {
        eprintln!("note: logging already initialised: {e}");
    }
}

/// Logging to stderr for a caller that runs several commands in one
/// process (the Python package): the first call sets up the same logs as
/// [`init_output`], each call sets the filter of its own flags (`-v`,
/// `-q`; `RUST_LOG` overrides). Nothing is changed, and nothing said, when
/// the process already has another logger.
pub fn set_output(args: &OutputArgs) {
    use std::sync::OnceLock;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{reload, Registry};
    static FILTER: OnceLock<Option<reload::Handle<EnvFilter, Registry>>> = OnceLock::new();
    let mut first = false;
    let handle = FILTER.get_or_init(|| {
        first = true;
        let (filter, handle) = reload::Layer::new(log_filter(args));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .without_time();
        let installed = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
            .is_ok();
        installed.then_some(handle)
    });
    if let (false, Some(h)) = (first, handle) {
        if let Err(e) = h.reload(log_filter(args)) {
            tracing::debug!("log filter not changed: {e}");
        }
    }
}

/// ONNX Runtime flags.
#[cfg(feature = "extract")]
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// ONNX Runtime shared library (file or directory). Default: $ORT_DYLIB_PATH,
    /// then the asset directory filled by pipelines/fetch-assets.sh.
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (CUDA when the library has it and a GPU answers).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Intra-op threads for ONNX Runtime (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Graph optimisation level.
    #[arg(long, value_enum, default_value = "all")]
    pub graph_opt: OptLevel,
}

#[cfg(feature = "extract")]
impl RuntimeArgs {
    /// Session settings from the flags.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            device: self.device,
            threads: self.threads.filter(|&t| t > 0),
            opt_level: self.graph_opt,
        }
    }
}

/// A flag given by name rather than typed (a keyword argument of the
/// Python package): see [`command_line`].
#[derive(Debug, Clone, PartialEq)]
pub enum FlagValue {
    /// `True` or `False`: a switch given or left out (`true`/`false` for a
    /// flag that takes a value).
    Switch(bool),
    /// The flag's values (several: a list, joined with the flag's
    /// delimiter, or the flag repeated when it is given once per value).
    Values(Vec<String>),
}

/// The command line `PROGRAM SUB --flag value ...` that `flags` (names
/// with `_` or `-`) stand for, to be parsed by `cmd` itself, so that its
/// defaults, checks and messages are the typed command line's. A name
/// `cmd` does not know is passed on as `--name` for clap to refuse; a
/// count flag (`verbose`) given a number is repeated that many times.
pub fn command_line(cmd: &clap::Command, sub: &str, flags: &[(String, FlagValue)]) -> Vec<String> {
    let mut argv = vec![cmd.get_name().to_owned(), sub.to_owned()];
    let subcommand = cmd.find_subcommand(sub);
    for (name, value) in flags {
        let long = name.replace('_', "-");
        let flag = format!("--{long}");
        let arg = subcommand
            .into_iter()
            .flat_map(|s| s.get_arguments())
            .chain(cmd.get_arguments())
            .find(|a| a.get_long() == Some(long.as_str()));
        let takes_values = arg.is_none_or(|a| a.get_action().takes_values());
        let counts = arg.is_some_and(|a| matches!(a.get_action(), clap::ArgAction::Count));
        match value {
            FlagValue::Switch(on) if takes_values => {
                argv.push(flag);
                argv.push(on.to_string());
            }
            FlagValue::Switch(true) => argv.push(flag),
            FlagValue::Switch(false) => {}
            FlagValue::Values(values) if counts => match values.as_slice() {
                [n] if n.parse::<usize>().is_ok() => {
                    argv.extend(std::iter::repeat_n(flag, n.parse().unwrap_or(0)));
                }
                _ => {
                    argv.push(flag);
                    argv.extend(values.iter().cloned());
                }
            },
            FlagValue::Values(values) => {
                let repeated = arg.is_some_and(|a| {
                    matches!(a.get_action(), clap::ArgAction::Append)
                        && a.get_value_delimiter().is_none()
                });
                if repeated {
                    for v in values {
                        argv.push(flag.clone());
                        argv.push(v.clone());
                    }
                } else {
                    let delimiter = arg.and_then(|a| a.get_value_delimiter()).unwrap_or(',');
                    argv.push(flag);
                    argv.push(values.join(&delimiter.to_string()));
                }
            }
        }
    }
    argv
}

/// A clap error (a usage error) as one message without clap's `error: `
/// prefix, the text the binary prints after it.
pub fn usage_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    text.trim_end().to_owned()
}

/// Run a binary's body and map its outcome to sherl's exit codes.
pub fn main_wrapper(body: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    match body() {
        Ok(code) => code,
        Err(err) => {
            let broken_pipe = err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", error_chain(&err));
            let busy = err.chain().any(|c| {
                matches!(
                    c.downcast_ref::<crate::Error>(),
                    Some(crate::Error::Locked { .. })
                )
            });
            ExitCode::from(if busy { EXIT_BUSY } else { 2 })
        }
    }
}

/// An error and its causes on one line, `outer: inner: ...`, each cause
/// printed once: sherl's errors already include their source's text in
/// their own message (so a library caller sees it too), and a cause whose
/// text the line already holds is not repeated.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Print one line to stdout, propagating errors (a closed pipe included).
pub fn print_line(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Allocator settings for the training and extraction processes, applied
/// before any work starts. Both are mimalloc options, which it reads once
/// when the process starts, so when either variable is unset this
/// re-executes the program with the missing ones set (safe Rust; on failure
/// the program simply continues). A value already in the environment is
/// respected, so either can be switched back.
///
/// - `MIMALLOC_PURGE_DELAY=-1`: keep freed memory in the allocator instead
///   of returning it to the kernel. Training allocates and frees the same
///   large tensors every step (extraction, the backbone's outputs every
///   batch), and mimalloc's default (purge freed pages after 10 ms) makes
///   every step page-fault them back in (measured with `perf stat -e
///   page-faults` on a 2,402-example cache: 258k faults per epoch by
///   default, 209k with a 1 s delay, 5.5k with purging off; the epoch ran
///   up to 1.4x faster).
/// - `MIMALLOC_ALLOW_THP=0`: no transparent huge pages for this process.
///   mimalloc asks for 2 MiB pages by default, and the kernel must clear
///   each one when it is first touched. Right after another process freed
///   gigabytes (a PyTorch job, an extraction, the peer in the benchmark)
///   that clearing is slow on a virtual machine: `perf record` put 47 % of
///   a 1-epoch UniPT run in the kernel's `clear_page_erms`; in more than half
///   of the runs the first epoch took 2.5-2.9 s instead of 1.5-1.7 and the
///   process spent 2.6-3.1 s in the kernel instead of 0.4-0.5 (4 KiB pages:
///   4x the page faults, each cheap). Later epochs were as fast either way,
///   and full fine-tuning and extraction a little faster without.
pub fn tune_allocator() {
    #[cfg(unix)]
    {
        const SETTINGS: [(&str, &str); 2] =
            [("MIMALLOC_PURGE_DELAY", "-1"), ("MIMALLOC_ALLOW_THP", "0")];
        let missing: Vec<_> = SETTINGS
            .iter()
            .filter(|(name, _)| std::env::var_os(name).is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        use std::os::unix::process::CommandExt;
        if let Ok(exe) = std::env::current_exe() {
            let mut command = std::process::Command::new(exe);
            command.args(std::env::args_os().skip(1));
            for (name, value) in missing {
                command.env(name, value);
            }
            // `exec` only returns if it failed; then run as we are.
            let _exec_error = command.exec();
        }
    }
}

/// Compute threads when `--threads` is not given: `RAYON_NUM_THREADS` if
/// set (a sweep sets it for its runs), else the cores available.
pub fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Set candle's CPU thread count (it follows `RAYON_NUM_THREADS`) before
/// any tensor work starts. `None` keeps the environment's choice (all cores
/// by default).
pub fn set_compute_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_follows_the_flags_kinds() {
        #[derive(clap::Parser)]
        #[command(name = "prog")]
        struct Cli {
            #[arg(short, long, action = clap::ArgAction::Count, global = true)]
            verbose: u8,
            #[command(subcommand)]
            cmd: Sub,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            Go {
                #[arg(long)]
                out: String,
                #[arg(long)]
                resume: bool,
                #[arg(long, value_delimiter = ',')]
                labels: Vec<String>,
                #[arg(long)]
                tag: Vec<String>,
                #[arg(long)]
                shuffle: Option<bool>,
            },
        }
        let cmd = <Cli as clap::CommandFactory>::command();
        let v = |s: &[&str]| FlagValue::Values(s.iter().map(|x| x.to_string()).collect());
        let flags = [
            ("out".to_owned(), v(&["o"])),
            ("resume".to_owned(), FlagValue::Switch(true)),
            ("labels".to_owned(), v(&["a", "b"])),
            ("tag".to_owned(), v(&["x", "y"])),
            ("shuffle".to_owned(), FlagValue::Switch(false)),
            ("verbose".to_owned(), v(&["2"])),
            ("no_such_flag".to_owned(), FlagValue::Switch(false)),
        ];
        let argv = command_line(&cmd, "go", &flags);
        assert_eq!(
            argv,
            [
                "prog",
                "go",
                "--out",
                "o",
                "--resume",
                "--labels",
                "a,b",
                "--tag",
                "x",
                "--tag",
                "y",
                "--shuffle",
                "false",
                "--verbose",
                "--verbose",
                "--no-such-flag",
                "false"
            ]
        );
        let left_out = command_line(
            &cmd,
            "go",
            &[("resume".to_owned(), FlagValue::Switch(false))],
        );
        assert_eq!(left_out, ["prog", "go"]);
        let err = <Cli as clap::Parser>::try_parse_from(&argv)
            .err()
            .map(|e| usage_error(&e));
        assert_eq!(
            err.as_deref().map(|e| e.lines().next().unwrap_or_default()),
            Some("unexpected argument '--no-such-flag' found")
        );
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = anyhow::Error::from(crate::Error::io("nope.csv", io));
        assert_eq!(error_chain(&err), "nope.csv: No such file or directory");
        let err = err.context("reading the dataset");
        assert_eq!(
            error_chain(&err),
            "reading the dataset: nope.csv: No such file or directory"
        );
    }
}
