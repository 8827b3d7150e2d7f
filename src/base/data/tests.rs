//! Unit tests of `src/data/mod.rs` (kept apart so the module stays readable).

use super::*;

#[test]
fn column_from_str() {
    assert_eq!("3".parse::<Column>().unwrap(), Column::Index(3));
    assert_eq!("0".parse::<Column>().unwrap(), Column::Index(0));
    assert_eq!(
        " text ".parse::<Column>().unwrap(),
        Column::Name("text".into())
    );
    assert_eq!("3a".parse::<Column>().unwrap(), Column::Name("3a".into()));
    assert_eq!("-1".parse::<Column>().unwrap(), Column::Name("-1".into()));
    assert!("".parse::<Column>().is_err());
    assert!("99999999999999999999999".parse::<Column>().is_err());
}

#[test]
fn column_display_round_trips() {
    for c in [
        Column::Name("text".into()),
        Column::Name("a b".into()),
        Column::Index(7),
    ] {
        assert_eq!(Column::from_display(&c.to_string()), Some(c));
    }
    for bad in ["text", "``", "#", "#x", "`x"] {
        assert_eq!(Column::from_display(bad), None, "{bad}");
    }
}

#[test]
fn format_and_encoding_from_str() {
    assert_eq!("CSV".parse::<Format>().unwrap(), Format::Csv);
    assert_eq!("tsv".parse::<Format>().unwrap(), Format::Tsv);
    assert_eq!("jsonl".parse::<Format>().unwrap(), Format::Jsonl);
    assert_eq!("folders".parse::<Format>().unwrap(), Format::Folders);
    assert_eq!("auto".parse::<Format>().unwrap(), Format::Auto);
    assert_eq!("text".parse::<Format>().unwrap(), Format::Text);
    assert!("xml".parse::<Format>().is_err());
    assert_eq!("utf-8".parse::<Encoding>().unwrap(), Encoding::Utf8);
    assert_eq!("latin1".parse::<Encoding>().unwrap(), Encoding::Latin1);
    assert!("utf16".parse::<Encoding>().is_err());
}

#[test]
fn format_by_extension() {
    let auto = |p: &str| Format::Auto.resolve(Path::new(p));
    assert_eq!(auto("a/train.csv").unwrap(), Format::Csv);
    assert_eq!(auto("train.CSV.gz").unwrap(), Format::Csv);
    assert_eq!(auto("train.tsv.bz2").unwrap(), Format::Tsv);
    assert_eq!(auto("train.tab").unwrap(), Format::Tsv);
    assert_eq!(auto("train.jsonl.zst").unwrap(), Format::Jsonl);
    assert_eq!(auto("train.ndjson").unwrap(), Format::Jsonl);
    assert_eq!(auto("train.json").unwrap(), Format::Jsonl);
    assert_eq!(auto("notes.txt.gz").unwrap(), Format::Text);
    assert_eq!(auto(STDIN).unwrap(), Format::Text);
    assert!(auto("train.dat").is_err());
    assert!(auto("train.gz").is_err());
    assert_eq!(
        Format::Csv.resolve(Path::new("x.txt")).unwrap(),
        Format::Csv
    );
}
