//! Unit tests of `src/data/args.rs` (kept apart so the module stays readable).

use clap::Parser;

use super::*;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    data: DatasetArgs,
}

/// Parse space-separated flags as a binary would, then validate.
fn plan(args: &str) -> Result<DatasetPlan> {
    let cli = Cli::try_parse_from(std::iter::once("t").chain(args.split_whitespace()))
        .map_err(|e| Error::setting("arguments", e.to_string()))?;
    cli.data.to_plan()
}

fn config_message(args: &str) -> String {
    match plan(args) {
        Err(Error::Setting { message, .. }) => message,
        other => panic!("{args}: expected a config error, got {other:?}"),
    }
}

#[test]
fn defaults() {
    let plan = plan("--data d.csv").unwrap();
    assert_eq!(
        plan.source,
        SplitSource::Single {
            path: "d.csv".into(),
            split: None
        }
    );
    assert_eq!(plan.read, ReadOptions::default());
    assert_eq!(plan.labels, None);
}

#[test]
fn every_flag() {
    let plan = plan(
        "--data d.tsv.gz --format tsv --no-header --encoding latin1 --text-column 1 \
         --text-pair-column 2 --label-column 0 --id-column 3 --labels neg,pos \
         --split train=0.9,test=0.1 --split-seed 5 --group-column 4 --skip-bad-rows \
         --tsv-quotes --max-line-bytes 2M --max-quoted-lines 7 --max-quoted-bytes 300",
    )
    .unwrap();
    let SplitSource::Single {
        split: Some(spec), ..
    } = &plan.source
    else {
        panic!("{plan:?}");
    };
    assert_eq!(spec.seed, 5);
    assert_eq!(spec.fractions.len(), 2);
    let read = &plan.read;
    assert_eq!(read.format, Format::Tsv);
    assert!(!read.has_header && read.skip_bad_rows && read.tsv_quotes);
    assert_eq!(
        read.limits,
        ReadLimits {
            max_line_bytes: 2 << 20,
            max_quoted_lines: 7,
            max_quoted_bytes: 300,
        }
    );
    assert_eq!(read.encoding, Encoding::Latin1);
    assert_eq!(read.text_column, Column::Index(1));
    assert_eq!(read.text_pair_column, Some(Column::Index(2)));
    assert_eq!(read.label_column, Some(Column::Index(0)));
    assert_eq!(read.id_column, Some(Column::Index(3)));
    assert_eq!(read.group_column, Some(Column::Index(4)));
    assert_eq!(plan.labels, Some(vec!["neg".into(), "pos".into()]));
}

#[test]
fn sizes() {
    assert_eq!(parse_size("0"), Ok(0));
    assert_eq!(parse_size("123"), Ok(123));
    assert_eq!(parse_size("4k"), Ok(4096));
    assert_eq!(parse_size("16MiB"), Ok(ReadLimits::MAX_LINE_BYTES));
    assert_eq!(parse_size("1 M"), Ok(ReadLimits::MAX_QUOTED_BYTES));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    for bad in ["", "M", "1.5M", "-1", "1T", "99999999999999999999999"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert!(parse_size(&format!("{}G", usize::MAX)).is_err());
}

#[test]
fn split_files() {
    let plan = plan("--train a.csv --test c.csv --no-labels").unwrap();
    assert_eq!(
        plan.source,
        SplitSource::Files(vec![
            ("train".into(), "a.csv".into()),
            ("test".into(), "c.csv".into())
        ])
    );
    assert_eq!(plan.read.label_column, None);
}

#[test]
fn bad_combinations() {
    for (args, needle) in [
        ("--data a --train b", "--data conflicts"),
        ("--valid b", "need --train"),
        ("", "no dataset given"),
        ("--train a --split train=1", "--split only applies"),
        ("--data a --group-column g", "--group-column"),
        ("--data a --no-labels --labels x", "--no-labels"),
        ("--data a --no-labels --label-column y", "--no-labels"),
        ("--data a --labels x,,y", "empty label"),
        ("--data a --labels x,y,x", "twice"),
        ("--data a --split train=0.5", "sum"),
        ("--data a --format xml", "xml"),
        ("--data a --max-line-bytes 0", "at least 1 byte"),
        ("--data a --max-line-bytes 1T", "not a size"),
        ("--data a --max-quoted-bytes x", "not a size"),
        ("--data a --max-quoted-lines -1", "-1"),
        ("--data -", "standard input"),
        ("--train a --test -", "standard input"),
    ] {
        let message = config_message(args);
        assert!(message.contains(needle), "{args}: {message}");
    }
}
