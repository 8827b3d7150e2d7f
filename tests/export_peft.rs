//! `sherl-fit export` of adapter and lst runs: parity with `sherl-fit predict`.

use crate::common::tiny;
use crate::export_run::check_parity;
use crate::fit::fit_fixture_with;

fn adapter_parity_on(cfg: &tiny::TinyConfig, bert: bool) {
    let f = fit_fixture_with(cfg, 40, 9, &["--layers", "all"]);
    check_parity(&f.root, bert, "adapter", &[]);
    check_parity(
        &f.root,
        bert,
        "adapter",
        &[
            "--adapter-placement",
            "pfeiffer",
            "--adapter-activation",
            "relu",
        ],
    );
    check_parity(&f.root, bert, "adapter", &["--pool", "cls"]);
}

fn lst_parity_on(cfg: &tiny::TinyConfig, bert: bool) {
    let f = fit_fixture_with(cfg, 40, 9, &["--layers", "all"]);
    check_parity(&f.root, bert, "lst", &[]);
    check_parity(&f.root, bert, "lst", &["--lst-init", "prune"]);
    check_parity(&f.root, bert, "lst", &["--side-dim", "12", "--pool", "cls"]);
}

#[test]
fn exported_bert_adapter_runs_match_predict() {
    adapter_parity_on(&tiny::TinyConfig::default(), true);
}

#[test]
fn exported_mpnet_adapter_runs_match_predict() {
    adapter_parity_on(&tiny::TinyConfig::mpnet(), false);
}

#[test]
fn exported_bert_lst_runs_match_predict() {
    lst_parity_on(&tiny::TinyConfig::default(), true);
}

#[test]
fn exported_mpnet_lst_runs_match_predict() {
    lst_parity_on(&tiny::TinyConfig::mpnet(), false);
}
