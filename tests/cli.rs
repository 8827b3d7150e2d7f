//! What a new user reads: help texts and hints that are true.

use crate::common;

/// `sherl-fit run --help` shows every setting's default, taken from the
/// same `FitConfig::default()` the code uses.
#[test]
fn run_help_shows_the_code_defaults() {
    let o = common::run(
        "sherl-fit",
        &["run", "--help"],
        std::env::temp_dir().as_path(),
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let help = common::stdout(&o);
    let d = sherl::fit::config::FitConfig::default();
    let sherl = sherl::fit::method::SherlSettings::default();
    for (flag, value) in [
        ("--method", d.kind().name().to_string()),
        ("--late-layers", sherl.late_layers.to_string()),
        ("--reduction", sherl.reduction.to_string()),
        ("--epochs", d.epochs.to_string()),
        ("--lr", d.lr.to_string()),
        ("--lr-pretrained", d.lr_pretrained.to_string()),
        ("--weight-decay", d.weight_decay.to_string()),
        ("--warmup", d.warmup.to_string()),
        ("--batch-size", d.batch_size.to_string()),
        ("--max-tokens-per-batch", d.max_tokens_per_batch.to_string()),
        ("--grad-clip", d.grad_clip.to_string()),
        ("--seed", d.seed.to_string()),
        ("--dropout", sherl.dropout.to_string()),
    ] {
        // the flag's block runs from its line to the next flag
        let start = help
            .find(&format!("      {flag} <"))
            .unwrap_or_else(|| panic!("{flag} not in help:\n{help}"));
        let block = &help[start..];
        let end = block[1..].find("\n      --").map_or(block.len(), |e| e + 1);
        assert!(
            block[..end].contains(&format!("[default: {value}]")),
            "{flag}: expected [default: {value}] in {}",
            &block[..end]
        );
    }
}

/// Hints in errors point at things that exist.
#[test]
fn device_hints_are_true() {
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--cache",
            "c",
            "--backbone",
            "b",
            "--out",
            "r",
            "--device",
            "cuda",
        ],
        std::env::temp_dir().as_path(),
        &[],
    );
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        !err.contains("--features cuda") && err.contains("--device cpu"),
        "{err}"
    );
}

/// `sherl` lists the phases and hands each tool its arguments unchanged
/// (exit codes included).
#[test]
fn sherl_dispatches_to_the_three_tools() {
    let tmp = std::env::temp_dir();
    let o = common::run("sherl", &["--help"], &tmp, &[]);
    let help = common::stdout(&o);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for phase in [
        "sherl extract run",
        "sherl fit run|sweep",
        "sherl cache inspect",
    ] {
        assert!(help.contains(phase), "{help}");
    }
    for (tool, bin) in [
        ("extract", "sherl-extract"),
        ("fit", "sherl-fit"),
        ("cache", "sherl-cache"),
    ] {
        let via = common::run("sherl", &[tool, "--help"], &tmp, &[]);
        let direct = common::run(bin, &["--help"], &tmp, &[]);
        assert!(via.status.success(), "{}", common::stderr(&via));
        assert_eq!(common::stdout(&via), common::stdout(&direct), "{tool}");
    }
    let missing = tmp.join("sherl-no-such-cache");
    let o = common::run(
        "sherl",
        &["cache", "verify", missing.to_str().unwrap()],
        &tmp,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("sherl-no-such-cache"),
        "{}",
        common::stderr(&o)
    );
}

/// `sherl-fit predict --help` lists the reading flags predict uses and none
/// of extraction's split or label-set flags (the run decides those).
#[test]
fn predict_help_lists_only_what_predict_uses() {
    let o = common::run(
        "sherl-fit",
        &["predict", "--help"],
        std::env::temp_dir().as_path(),
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let help = common::stdout(&o);
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '<']).next().unwrap())
        .collect();
    for wanted in [
        "data",
        "text-column",
        "text-pair-column",
        "label-column",
        "no-labels",
        "format",
        "text-chars",
    ] {
        assert!(flags.contains(&wanted), "--{wanted} missing: {flags:?}");
    }
    for unwanted in [
        "train",
        "valid",
        "test",
        "split",
        "split-seed",
        "group-column",
        "labels",
    ] {
        assert!(!flags.contains(&unwanted), "--{unwanted} listed: {flags:?}");
    }
    assert!(help.contains("[default: the column the run's cache was extracted from]"));
}
