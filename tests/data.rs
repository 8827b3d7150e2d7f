//! Integration tests of `sherl::data`: every format plain and compressed,
//! encodings, folders, labels, ids, error messages and seeded splits. Every
//! fixture is written in a fresh temp dir by the test itself; one test reads
//! the real Rotten Tomatoes file from the asset directory.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use sherl::data::{
    load, Column, DatasetPlan, Encoding, Format, ReadLimits, ReadOptions, SplitSource, SplitSpec,
};
use sherl::Error;

/// Write `bytes` to `dir/name`, compressed as the extension says.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let data = if name.ends_with(".gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    } else if name.ends_with(".bz2") {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    } else if name.ends_with(".zst") {
        zstd::encode_all(bytes, 3).unwrap()
    } else {
        bytes.to_vec()
    };
    std::fs::write(&path, data).unwrap();
    path
}

fn plan(path: &Path) -> DatasetPlan {
    DatasetPlan {
        source: SplitSource::Single {
            path: path.to_owned(),
            split: None,
        },
        read: ReadOptions::default(),
        labels: None,
    }
}

/// `plan`, with CSV-style quoting for TSV (the [`TSV`] fixture quotes).
fn quoted_plan(path: &Path) -> DatasetPlan {
    let mut p = plan(path);
    p.read.tsv_quotes = true;
    p
}

fn with_split(path: &Path, spec: &str, seed: u64) -> DatasetPlan {
    DatasetPlan {
        source: SplitSource::Single {
            path: path.to_owned(),
            split: Some(SplitSpec::parse(spec, seed).unwrap()),
        },
        ..plan(path)
    }
}

fn texts(ds: &sherl::data::Dataset) -> Vec<&str> {
    ds.examples.iter().map(|e| e.text.as_str()).collect()
}

/// The (path, line, message) of a `DatasetLine` error.
fn line_error(result: sherl::Result<sherl::data::Dataset>) -> (PathBuf, u64, String) {
    match result {
        Err(Error::DatasetLine {
            path,
            line,
            message,
        }) => (path, line, message),
        other => panic!("expected a DatasetLine error, got {other:?}"),
    }
}

/// The message of a `Dataset` error.
fn dataset_error(result: sherl::Result<sherl::data::Dataset>) -> String {
    match result {
        Err(e @ Error::Dataset { .. }) => e.to_string(),
        other => panic!("expected a Dataset error, got {other:?}"),
    }
}

const CSV: &str = "text,label\n\
    \"Hello, world\",pos\n\
    \"She said \"\"hi\"\"\",neg\n\
    \"two\nlines\",pos\n\
    plain,neg\n";

/// A TSV file with CSV-style quoting: needs `tsv_quotes`.
const TSV: &str = "text\tlabel\n\
    Hello, world\tpos\n\
    She said \"hi\"\tneg\n\
    \"two\nlines\"\tpos\n\
    plain\tneg\n";

const JSONL: &str = "{\"text\": \"Hello, world\", \"label\": \"pos\"}\n\
    \n\
    {\"text\": \"She said \\\"hi\\\"\", \"label\": \"neg\"}\n\
    {\"text\": \"two\\nlines\", \"label\": \"pos\"}\n\
    \r\n\
    {\"label\": \"neg\", \"text\": \"plain\", \"extra\": [1]}\n";

const EXPECTED: [&str; 4] = ["Hello, world", "She said \"hi\"", "two\nlines", "plain"];

#[test]
fn csv_rfc4180_quoting() {
    let dir = tempfile::tempdir().unwrap();
    let ds = load(&plan(&write(dir.path(), "reviews.csv", CSV.as_bytes()))).unwrap();
    assert_eq!(texts(&ds), EXPECTED);
    assert_eq!(ds.label_names, ["neg", "pos"]);
    let labels: Vec<_> = ds.examples.iter().map(|e| e.label).collect();
    assert_eq!(labels, [Some(1), Some(0), Some(1), Some(0)]);
    let lines: Vec<_> = ds.examples.iter().map(|e| e.source_line).collect();
    assert_eq!(lines, [2, 3, 4, 6]);
    let ids: Vec<_> = ds.examples.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["reviews:2", "reviews:3", "reviews:4", "reviews:6"]);
    assert!(ds.examples.iter().all(|e| e.split == "train"));
    assert_eq!(ds.report.rows_read, 4);
    assert_eq!(
        ds.report.split_counts,
        BTreeMap::from([("train".into(), 4)])
    );

    // CRLF line endings, a blank line, a quoted last field, no final newline.
    let crlf = write(
        dir.path(),
        "crlf.csv",
        b"text,label\r\na,x\r\n\"b\r\nc\",y\r\n\r\nd,\"x\"\r\ne,x",
    );
    let ds = load(&plan(&crlf)).unwrap();
    assert_eq!(texts(&ds), ["a", "b\r\nc", "d", "e"]);
    assert_eq!(ds.label_names, ["x", "y"]);
    let lines: Vec<_> = ds.examples.iter().map(|e| e.source_line).collect();
    assert_eq!(lines, [2, 3, 6, 7]);

    // Blank LF lines do not shift line numbers either.
    let blank = write(dir.path(), "blank.csv", b"\ntext,label\n\n\na,x\n\nb,y\n\n");
    let ds = load(&plan(&blank)).unwrap();
    let lines: Vec<_> = ds.examples.iter().map(|e| e.source_line).collect();
    assert_eq!(lines, [5, 7]);
    assert_eq!(ds.examples[0].id, "blank:5");
}

#[test]
fn bad_row_after_quoted_newline_has_the_right_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{CSV}\"multi\nline\nrow\",pos\nonly-one-field\nlast,pos\n");
    let path = write(dir.path(), "d.csv", body.as_bytes());
    let err = load(&plan(&path)).unwrap_err().to_string();
    assert!(err.contains("d.csv:10:"), "{err}");
    let (p, line, message) = line_error(load(&plan(&path)));
    assert_eq!((p, line), (path.clone(), 10));
    assert!(message.contains("expected 2 fields, found 1"), "{message}");

    let mut skip = plan(&path);
    skip.read.skip_bad_rows = true;
    let ds = load(&skip).unwrap();
    assert_eq!(ds.report.skipped_bad_rows, 1);
    assert_eq!(ds.report.rows_read, 7);
    assert_eq!(ds.examples.len(), 6);
    assert_eq!(ds.examples[4].text, "multi\nline\nrow");
    assert_eq!(ds.examples[4].source_line, 7);
    assert_eq!(ds.examples[5].source_line, 11);
}

#[test]
fn tsv_and_jsonl_read_like_csv() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("d.tsv", TSV),
        ("d.tab", TSV),
        ("d.jsonl", JSONL),
        ("d.ndjson", JSONL),
    ] {
        let ds = load(&quoted_plan(&write(dir.path(), name, body.as_bytes()))).unwrap();
        assert_eq!(texts(&ds), EXPECTED, "{name}");
        assert_eq!(ds.label_names, ["neg", "pos"], "{name}");
        assert_eq!(ds.report.rows_read, 4, "{name}");
    }
    let ds = load(&plan(&write(dir.path(), "j.jsonl", JSONL.as_bytes()))).unwrap();
    let lines: Vec<_> = ds.examples.iter().map(|e| e.source_line).collect();
    assert_eq!(lines, [1, 3, 4, 6]);
}

#[test]
fn explicit_format_overrides_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.dat", TSV.as_bytes());
    assert!(matches!(
        load(&plan(&path)),
        Err(Error::Setting { setting, .. }) if setting == "--format"
    ));
    let mut p = quoted_plan(&path);
    p.read.format = Format::Tsv;
    assert_eq!(texts(&load(&p).unwrap()), EXPECTED);
}

/// `.txt` is plain text, one example per line: blank lines skipped, ids
/// keeping the line numbers; it has no labels, ids or pairs to offer.
#[test]
fn plain_text_is_one_example_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "notes.txt",
        b"first text\r\n\n  second, with \"quotes\"\n",
    );
    let message = dataset_error(load(&plan(&path)));
    assert!(message.contains("--no-labels"), "{message}");
    let mut p = plan(&path);
    p.read.label_column = None;
    let ds = load(&p).unwrap();
    assert_eq!(texts(&ds), ["first text", "second, with \"quotes\""]);
    let ids: Vec<_> = ds.examples.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["notes:1", "notes:3"]);
    assert!(ds.label_names.is_empty());
    p.read.label_optional = true;
    p.read.label_column = Some(Column::Name("label".into()));
    assert_eq!(texts(&load(&p).unwrap()).len(), 2);
    p.read.id_column = Some(Column::Name("id".into()));
    assert!(dataset_error(load(&p)).contains("no id column"));
}

/// An optional label column (predict) that a file lacks reads it
/// unlabelled, in every format with columns; one that is there is used.
#[test]
fn an_optional_label_column_may_be_missing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("a.csv", "text\nx\n"),
        ("a.tsv", "text\nx\n"),
        ("a.jsonl", "{\"text\": \"x\"}\n"),
    ] {
        let path = write(dir.path(), name, body.as_bytes());
        let mut p = plan(&path);
        assert!(
            load(&p).is_err(),
            "{name}: a required label column is missing"
        );
        p.read.label_optional = true;
        let ds = load(&p).unwrap();
        assert_eq!(texts(&ds), ["x"], "{name}");
        assert_eq!(ds.examples[0].label, None, "{name}");
    }
    let path = write(dir.path(), "b.csv", b"text,label\nx,pos\n");
    let mut p = plan(&path);
    p.read.label_optional = true;
    assert_eq!(load(&p).unwrap().label_names, ["pos"]);
}

#[test]
fn every_compression_of_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for (ext, body) in [("csv", CSV), ("tsv", TSV), ("jsonl", JSONL)] {
        let plain = load(&quoted_plan(&write(
            dir.path(),
            &format!("d.{ext}"),
            body.as_bytes(),
        )))
        .unwrap();
        for comp in ["gz", "bz2", "zst"] {
            let name = format!("d.{ext}.{comp}");
            let ds = load(&quoted_plan(&write(dir.path(), &name, body.as_bytes()))).unwrap();
            assert_eq!(ds, plain, "{name}");
        }
    }
}

#[test]
fn concatenated_gzip_members_are_all_read() {
    let dir = tempfile::tempdir().unwrap();
    let gz = |s: &str| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(s.as_bytes()).unwrap();
        enc.finish().unwrap()
    };
    let mut bytes = gz("text,label\na,x\n");
    bytes.extend(gz("b,y\n"));
    let path = dir.path().join("multi.csv.gz");
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(texts(&load(&plan(&path)).unwrap()), ["a", "b"]);
}

#[test]
fn utf8_bom_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("\u{feff}{CSV}");
    for name in ["bom.csv", "bom.csv.gz"] {
        let ds = load(&plan(&write(dir.path(), name, body.as_bytes()))).unwrap();
        assert_eq!(texts(&ds), EXPECTED);
    }
    let body = format!("\u{feff}{JSONL}");
    let ds = load(&plan(&write(dir.path(), "bom.jsonl", body.as_bytes()))).unwrap();
    assert_eq!(texts(&ds), EXPECTED);
}

#[test]
fn latin1_needs_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "l1.csv",
        b"text,label\nok,a\ncaf\xe9 cr\xe8me,b\n",
    );
    let (p, line, message) = line_error(load(&plan(&path)));
    assert_eq!((p, line), (path.clone(), 3));
    assert!(
        message.contains("UTF-8") && message.contains("--encoding latin1"),
        "{message}"
    );
    let mut p = plan(&path);
    p.read.encoding = Encoding::Latin1;
    assert_eq!(texts(&load(&p).unwrap()), ["ok", "café crème"]);
}

#[test]
fn no_header_uses_indices() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "nh.csv", b"pos,good film\nneg,bad film\n");
    let mut p = plan(&path);
    p.read.has_header = false;
    match load(&p) {
        Err(Error::Setting { message: m, .. }) => assert!(m.contains("--no-header"), "{m}"),
        other => panic!("{other:?}"),
    }
    p.read.text_column = Column::Index(1);
    p.read.label_column = Some(Column::Index(0));
    let ds = load(&p).unwrap();
    assert_eq!(texts(&ds), ["good film", "bad film"]);
    assert_eq!(ds.examples[0].id, "nh:1");
    p.read.text_column = Column::Index(2);
    assert!(dataset_error(load(&p)).contains("out of range"));
}

#[test]
fn jsonl_values_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let body = "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": true}\n";
    let ds = load(&plan(&write(dir.path(), "n.jsonl", body.as_bytes()))).unwrap();
    assert_eq!(ds.label_names, ["1", "true"]);

    let mut p = plan(&write(dir.path(), "i.jsonl", body.as_bytes()));
    p.read.text_column = Column::Index(0);
    match load(&p) {
        Err(Error::Setting { message: m, .. }) => {
            assert!(m.contains("JSON") && m.contains("key"), "{m}")
        }
        other => panic!("{other:?}"),
    }

    for (body, line, needle) in [
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \n",
            2,
            "invalid JSON",
        ),
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n\n[1, 2]\n",
            3,
            "JSON object",
        ),
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": null, \"label\": \"x\"}\n",
            2,
            "text",
        ),
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n",
            2,
            "label",
        ),
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": [\"b\"], \"label\": \"x\"}\n",
            2,
            "array",
        ),
    ] {
        let path = write(dir.path(), "bad.jsonl", body.as_bytes());
        let (p, l, message) = line_error(load(&plan(&path)));
        assert_eq!((p, l), (path, line), "{body}");
        assert!(message.contains(needle), "{body}: {message}");
    }
    let path = write(
        dir.path(),
        "k.jsonl",
        b"{\"txt\": \"a\", \"label\": \"x\"}\n",
    );
    let message = dataset_error(load(&plan(&path)));
    assert!(
        message.contains("`text`") && message.contains("txt"),
        "{message}"
    );
}

#[test]
fn folders_format() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    write(&root, "sport/002.txt", b"  Goal!\n");
    write(&root, "sport/001.txt", "\u{feff}Match report".as_bytes());
    write(&root, "business/a.txt", b"Shares rose");
    write(&root, "business/.DS_Store", b"\xff\xfe junk");
    write(&root, ".hidden/x.txt", b"ignored");
    write(&root, "README", b"not a class");
    let ds = load(&plan(&root)).unwrap();
    assert_eq!(ds.label_names, ["business", "sport"]);
    let got: Vec<_> = ds
        .examples
        .iter()
        .map(|e| (e.id.as_str(), e.text.as_str(), e.label, e.source_line))
        .collect();
    assert_eq!(
        got,
        [
            ("business/a.txt", "Shares rose", Some(0), 0),
            ("sport/001.txt", "Match report", Some(1), 0),
            ("sport/002.txt", "Goal!", Some(1), 0),
        ]
    );

    let bad = write(&root, "sport/003.txt", b"caf\xe9");
    let message = dataset_error(load(&plan(&root)));
    assert!(message.contains(&bad.display().to_string()), "{message}");
    assert!(message.contains("--encoding latin1"), "{message}");
    let mut p = plan(&root);
    p.read.skip_bad_rows = true;
    let ds = load(&p).unwrap();
    assert_eq!((ds.examples.len(), ds.report.skipped_bad_rows), (3, 1));
    p.read.encoding = Encoding::Latin1;
    p.read.skip_bad_rows = false;
    assert_eq!(load(&p).unwrap().examples[3].text, "café");
}

#[test]
fn sorted_label_map_trims_labels() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "l.csv", b"text,label\na, c\nb,a \nc,b\nd,a\n");
    let ds = load(&plan(&path)).unwrap();
    assert_eq!(ds.label_names, ["a", "b", "c"]);
    let labels: Vec<_> = ds.examples.iter().map(|e| e.label.unwrap()).collect();
    assert_eq!(labels, [2, 0, 1, 0]);
}

#[test]
fn label_list_filters_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "l.csv",
        b"text,label\na,pos\nb,meh\nc,neg\nd,meh\ne,plot\nf,pos\n",
    );
    let mut p = plan(&path);
    p.labels = Some(vec!["pos".into(), "neg".into(), "never".into()]);
    let ds = load(&p).unwrap();
    assert_eq!(ds.label_names, ["pos", "neg", "never"]);
    assert_eq!(texts(&ds), ["a", "c", "f"]);
    let labels: Vec<_> = ds.examples.iter().map(|e| e.label.unwrap()).collect();
    assert_eq!(labels, [0, 1, 0]);
    assert_eq!(ds.report.rows_read, 6);
    assert_eq!(ds.report.dropped_unknown_label, 3);
    assert_eq!(
        ds.report.dropped_labels,
        BTreeMap::from([("meh".into(), 2), ("plot".into(), 1)])
    );
    assert_eq!(ds.report.split_counts["train"], 3);

    p.labels = Some(vec!["other".into()]);
    let message = dataset_error(load(&p));
    assert!(message.contains("no rows left"), "{message}");
    assert!(message.contains("6 rows were dropped"), "{message}");
    assert!(
        message.contains("meh (2), neg (1), plot (1), pos (2)"),
        "{message}"
    );
}

#[test]
fn unlabelled_and_text_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "p.csv",
        b"premise,hypothesis,label\na,b,x\nc,d,y\n",
    );
    let mut p = plan(&path);
    p.read.text_column = Column::Name("premise".into());
    p.read.text_pair_column = Some(Column::Name("hypothesis".into()));
    p.read.label_column = None;
    let ds = load(&p).unwrap();
    assert!(ds.label_names.is_empty());
    assert!(ds.examples.iter().all(|e| e.label.is_none()));
    assert_eq!(ds.examples[1].text_pair.as_deref(), Some("d"));
}

#[test]
fn empty_label_is_a_bad_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "e.csv", b"text,label\na,x\nb,  \nc,y\n");
    let (_, line, message) = line_error(load(&plan(&path)));
    assert_eq!(line, 3);
    assert!(message.contains("label"), "{message}");
    let mut p = plan(&path);
    p.read.skip_bad_rows = true;
    let ds = load(&p).unwrap();
    assert_eq!((ds.examples.len(), ds.report.skipped_bad_rows), (2, 1));
}

#[test]
fn explicit_ids_must_be_unique() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "ids.csv", b"id,text,label\nr1,a,x\nr2,b,y\n");
    let mut p = plan(&path);
    p.read.id_column = Some(Column::Name("id".into()));
    let ids: Vec<_> = load(&p)
        .unwrap()
        .examples
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["r1", "r2"]);

    write(
        dir.path(),
        "ids.csv",
        b"id,text,label\nr1,a,x\nr2,b,y\nr1,c,x\n",
    );
    let (_, line, message) = line_error(load(&p));
    assert_eq!(line, 4);
    assert!(
        message.contains("`r1`") && message.contains("ids.csv:2"),
        "{message}"
    );

    // Ids are checked across split files too.
    p.source = SplitSource::Files(vec![
        (
            "train".into(),
            write(dir.path(), "a.csv", b"id,text,label\nk,a,x\n"),
        ),
        (
            "test".into(),
            write(dir.path(), "b.csv", b"id,text,label\nj,b,x\nk,c,x\n"),
        ),
    ]);
    let (p2, line, message) = line_error(load(&p));
    assert_eq!((p2.file_name().unwrap().to_str(), line), (Some("b.csv"), 3));
    assert!(message.contains("a.csv:2"), "{message}");
}

#[test]
fn missing_file_is_an_io_error_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.csv.gz");
    match load(&plan(&path)) {
        Err(Error::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_column_lists_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "c.csv", b"review,sentiment\na,x\n");
    let message = dataset_error(load(&plan(&path)));
    assert!(
        message.contains("`text`") && message.contains("review, sentiment"),
        "{message}"
    );
    let mut p = plan(&path);
    p.read.text_column = Column::Name("review".into());
    let message = dataset_error(load(&p));
    assert!(
        message.contains("`label`") && message.contains("--no-labels"),
        "{message}"
    );
    p.read.label_column = Some(Column::Name("sentiment".into()));
    assert_eq!(load(&p).unwrap().label_names, ["x"]);
}

#[test]
fn empty_datasets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("h.csv", "text,label\n"),
        ("z.csv", ""),
        ("b.jsonl", "\n\n"),
    ] {
        let path = write(dir.path(), name, body.as_bytes());
        let message = dataset_error(load(&plan(&path)));
        assert!(
            message.contains("no rows") && message.contains(name),
            "{message}"
        );
    }
    let path = write(dir.path(), "allbad.csv", b"text,label\na\nb\n");
    let mut p = plan(&path);
    p.read.skip_bad_rows = true;
    let message = dataset_error(load(&p));
    assert!(message.contains("all 2 rows were bad"), "{message}");
}

#[test]
fn split_files_keep_order_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let train = write(dir.path(), "train.csv", b"text,label\na,x\nb,y\n");
    let valid = write(
        dir.path(),
        "valid.jsonl.gz",
        b"{\"text\":\"c\",\"label\":\"z\"}\n",
    );
    let test = write(dir.path(), "test.tsv", b"text\tlabel\nd\tx\n");
    let mut p = plan(&train);
    p.source = SplitSource::Files(vec![
        ("train".into(), train.clone()),
        ("valid".into(), valid.clone()),
        ("test".into(), test.clone()),
    ]);
    let ds = load(&p).unwrap();
    let got: Vec<_> = ds
        .examples
        .iter()
        .map(|e| (e.split.as_str(), e.text.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("train", "a", "train:2"),
            ("train", "b", "train:3"),
            ("valid", "c", "valid:1"),
            ("test", "d", "test:2")
        ]
    );
    assert_eq!(ds.label_names, ["x", "y", "z"]);
    assert_eq!(
        ds.report.split_counts,
        BTreeMap::from([("test".into(), 1), ("train".into(), 2), ("valid".into(), 1)])
    );

    let empty = write(dir.path(), "empty.csv", b"text,label\n");
    p.source = SplitSource::Files(vec![
        ("train".into(), train.clone()),
        ("valid".into(), empty),
    ]);
    let message = dataset_error(load(&p));
    assert!(
        message.contains("empty.csv") && message.contains("`valid`"),
        "{message}"
    );

    // A split file emptied by the label list is named too.
    p.source = SplitSource::Files(vec![("train".into(), train), ("valid".into(), valid)]);
    p.labels = Some(vec!["x".into(), "y".into()]);
    let message = dataset_error(load(&p));
    assert!(
        message.contains("valid.jsonl.gz") && message.contains("z (1)"),
        "{message}"
    );
}

/// `n` rows `text<i>,label<i % 2>,group<i / per_group>`.
fn many_rows(dir: &Path, n: usize, per_group: usize) -> PathBuf {
    let mut body = String::from("text,label,group\n");
    for i in 0..n {
        body.push_str(&format!("t{i},l{},g{}\n", i % 2, i / per_group));
    }
    write(dir, "many.csv", body.as_bytes())
}

fn splits_of(ds: &sherl::data::Dataset) -> Vec<String> {
    ds.examples.iter().map(|e| e.split.clone()).collect()
}

#[test]
fn row_splits_are_seeded_and_proportional() {
    let dir = tempfile::tempdir().unwrap();
    let path = many_rows(dir.path(), 1000, 1);
    let spec = "train=0.8,valid=0.1,test=0.1";
    let a = load(&with_split(&path, spec, 42)).unwrap();
    let b = load(&with_split(&path, spec, 42)).unwrap();
    let c = load(&with_split(&path, spec, 43)).unwrap();
    assert_eq!(a, b);
    assert_ne!(splits_of(&a), splits_of(&c));
    for ds in [&a, &c] {
        assert_eq!(
            ds.report.split_counts,
            BTreeMap::from([
                ("test".into(), 100),
                ("train".into(), 800),
                ("valid".into(), 100)
            ])
        );
        // File order is kept; the splits are interleaved, not blocks.
        let want: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
        assert_eq!(
            texts(ds),
            want.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert_ne!(
            ds.examples[..800]
                .iter()
                .filter(|e| e.split == "train")
                .count(),
            800
        );
    }
}

#[test]
fn group_splits_keep_groups_together() {
    let dir = tempfile::tempdir().unwrap();
    // 1000 rows in 200 groups of 5.
    let path = many_rows(dir.path(), 1000, 5);
    let spec = "train=0.8,valid=0.1,test=0.1";
    let mut p = with_split(&path, spec, 7);
    p.read.group_column = Some(Column::Name("group".into()));
    let a = load(&p).unwrap();
    assert_eq!(a, load(&p).unwrap());
    let mut group_split: HashMap<&str, &str> = HashMap::new();
    for e in &a.examples {
        let g = e.group.as_deref().unwrap();
        assert_eq!(
            *group_split.entry(g).or_insert(&e.split),
            e.split,
            "group {g}"
        );
    }
    let counts = &a.report.split_counts;
    assert_eq!(counts.values().sum::<u64>(), 1000);
    assert_eq!(counts["train"], 800);
    assert_eq!(counts["valid"], 100);

    let SplitSource::Single {
        split: Some(spec), ..
    } = &mut p.source
    else {
        unreachable!()
    };
    spec.seed = 8;
    assert_ne!(splits_of(&a), splits_of(&load(&p).unwrap()));
}

#[test]
fn group_split_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "g.csv",
        b"text,label,group\na,x,g1\nb,x,\nc,y,g2\n",
    );
    let mut p = with_split(&path, "train=0.5,test=0.5", 0);
    p.read.group_column = Some(Column::Name("group".into()));
    let (_, line, message) = line_error(load(&p));
    assert_eq!(line, 3);
    assert!(message.contains("group"), "{message}");

    p.read.skip_bad_rows = true;
    let ds = load(&p).unwrap();
    assert_eq!(ds.report.split_counts.len(), 2);
    p = DatasetPlan {
        source: SplitSource::Single {
            path: path.clone(),
            split: Some(SplitSpec::parse("a=0.4,b=0.3,c=0.3", 0).unwrap()),
        },
        ..p
    };
    let message = dataset_error(load(&p));
    assert!(message.contains("3 splits from 2 groups"), "{message}");
}

/// A 60-row file `id<sep>text<sep>label` (header on line 1, row `r<i>` on
/// line `i + 1`), with row `bad`'s text replaced by `bad_text`; with
/// `quoted_every`, every such row's text is quoted (`"text, i"`).
fn sixty_rows(sep: char, bad: &[(usize, &str)], quoted_every: Option<usize>) -> String {
    let mut body = format!("id{sep}text{sep}label\n");
    for i in 1..=60 {
        let label = if i % 2 == 0 { "pos" } else { "neg" };
        let text = match bad.iter().find(|(row, _)| *row == i) {
            Some((_, text)) => (*text).to_owned(),
            None if quoted_every.is_some_and(|n| i % n == 0) => format!("\"text, {i}\""),
            None => format!("text {i}"),
        };
        body.push_str(&format!("r{i}{sep}{text}{sep}{label}\n"));
    }
    body
}

fn ids(ds: &sherl::data::Dataset) -> Vec<&str> {
    ds.examples.iter().map(|e| e.id.as_str()).collect()
}

/// `r1..=r60` without the given rows.
fn ids_but(missing: &[usize]) -> Vec<String> {
    (1..=60)
        .filter(|i| !missing.contains(i))
        .map(|i| format!("r{i}"))
        .collect()
}

fn with_ids(mut p: DatasetPlan) -> DatasetPlan {
    p.read.id_column = Some(Column::Name("id".into()));
    p
}

/// Issue 8 item 2: a stray opening quote costs its own row, never the rest
/// of the file, whether later rows hold quotes or not.
#[test]
fn stray_quote_in_csv_costs_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let stray = "\"unbalanced quote opens here";
    for (quoted_every, needle) in [
        (None, "never closed"),
        (Some(7), "text after its closing quote"),
        (Some(1), "text after its closing quote"),
    ] {
        let body = sixty_rows(',', &[(10, stray)], quoted_every);
        let path = write(dir.path(), "stray.csv", body.as_bytes());
        let (p, line, message) = line_error(load(&with_ids(plan(&path))));
        assert_eq!((p, line), (path.clone(), 11), "{quoted_every:?}: {message}");
        assert!(
            message.contains("field 1") && message.contains(needle),
            "{quoted_every:?}: {message}"
        );
        let mut skip = with_ids(plan(&path));
        skip.read.skip_bad_rows = true;
        let ds = load(&skip).unwrap();
        assert_eq!(ids(&ds), ids_but(&[10]), "{quoted_every:?}");
        assert_eq!(
            (ds.report.rows_read, ds.report.skipped_bad_rows),
            (60, 1),
            "{quoted_every:?}"
        );
        let r11 = &ds.examples[9];
        assert_eq!((r11.id.as_str(), r11.source_line), ("r11", 12));
        assert_eq!(r11.label, Some(0), "r11 is neg");
    }
    // Two stray quotes: exactly those two rows go.
    let body = sixty_rows(',', &[(10, stray), (40, stray)], Some(3));
    let mut skip = with_ids(plan(&write(dir.path(), "two.csv", body.as_bytes())));
    skip.read.skip_bad_rows = true;
    let ds = load(&skip).unwrap();
    assert_eq!(ids(&ds), ids_but(&[10, 40]));
    assert_eq!(ds.report.skipped_bad_rows, 2);
}

/// Issue 8 item 2, TSV: a TSV quote is text by default (all 60 rows, said
/// in the report); with CSV-style quoting the stray quote costs one row.
#[test]
fn stray_quote_in_tsv() {
    let dir = tempfile::tempdir().unwrap();
    let stray = "\"unbalanced quote opens here";
    let body = sixty_rows('\t', &[(10, stray)], None);
    let path = write(dir.path(), "stray.tsv", body.as_bytes());
    let ds = load(&with_ids(plan(&path))).unwrap();
    assert_eq!(ids(&ds), ids_but(&[]));
    assert_eq!(ds.examples[9].text, stray);
    assert_eq!(ds.report.literal_quote_rows, 1);
    assert_eq!(ds.report.multi_line_rows, 0);

    let mut quoted = with_ids(quoted_plan(&path));
    let (p, line, message) = line_error(load(&quoted));
    assert_eq!((p, line), (path.clone(), 11), "{message}");
    assert!(message.contains("never closed"), "{message}");
    quoted.read.skip_bad_rows = true;
    let ds = load(&quoted).unwrap();
    assert_eq!(ids(&ds), ids_but(&[10]));
    assert_eq!(ds.report.skipped_bad_rows, 1);
}

/// Issue 8 item 3: a quote opened on one TSV row and closed three rows
/// later never merges rows silently: by default every line is its own row
/// (60 in, 60 out); with --tsv-quotes the merge is RFC 4180 as asked for,
/// and counted.
#[test]
fn tsv_quote_spanning_rows_is_never_merged_silently() {
    let dir = tempfile::tempdir().unwrap();
    let body = sixty_rows('\t', &[(20, "\"starts here"), (23, "closes\"")], None);
    let path = write(dir.path(), "span.tsv", body.as_bytes());
    let ds = load(&with_ids(plan(&path))).unwrap();
    assert_eq!(ids(&ds), ids_but(&[]));
    assert_eq!(ds.examples[19].text, "\"starts here");
    assert_eq!(ds.examples[22].text, "closes\"");
    assert_eq!(ds.examples[19].label, Some(1), "r20 is pos");
    assert_eq!(ds.report.literal_quote_rows, 1);
    assert_eq!(ds.report.multi_line_rows, 0);

    let ds = load(&with_ids(quoted_plan(&path))).unwrap();
    assert_eq!(ds.examples.len(), 57);
    assert_eq!(ds.report.multi_line_rows, 1);
    assert_eq!(ds.report.literal_quote_rows, 0);
    assert!(ds.examples[19].text.starts_with("starts here\tpos\nr21"));
}

/// A quoted field may hold line breaks up to the bounds, which flags raise.
#[test]
fn quoted_field_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let long = vec!["line"; 151].join("\n");
    let body = format!("text,label\na,x\n\"{long}\",y\nb,x\n");
    let path = write(dir.path(), "long.csv", body.as_bytes());
    let (p, line, message) = line_error(load(&plan(&path)));
    assert_eq!((p, line), (path.clone(), 3));
    assert!(
        message.contains("still open after 100 line breaks")
            && message.contains("--max-quoted-lines"),
        "{message}"
    );
    let mut p = plan(&path);
    p.read.limits.max_quoted_lines = 150;
    let ds = load(&p).unwrap();
    assert_eq!(ds.examples[1].text, long);
    assert_eq!(ds.examples[2].source_line, 154);
    assert_eq!(ds.report.multi_line_rows, 1);

    let big = "x".repeat(ReadLimits::MAX_QUOTED_BYTES);
    let body = format!("text,label\n\"a\n{big}\",y\nb,x\n");
    let path = write(dir.path(), "big.csv", body.as_bytes());
    let (_, line, message) = line_error(load(&plan(&path)));
    assert_eq!(line, 2);
    assert!(message.contains("--max-quoted-bytes"), "{message}");
    let mut p = plan(&path);
    p.read.limits.max_quoted_bytes = 2 * ReadLimits::MAX_QUOTED_BYTES;
    assert_eq!(load(&p).unwrap().examples[0].text.len(), big.len() + 2);
}

/// Issue 8 item 13, issue 28 case 2: `/dev/zero` is refused before a byte
/// is read (only regular files are dataset files; standard input is `-`),
/// naming it, in every line-based format, skipping bad rows or not. (An
/// endless line from a regular source is bounded by --max-line-bytes: see
/// `long_lines_are_bounded_in_every_format` and the `LineReader` tests.)
#[test]
fn dev_zero_is_an_error_not_a_memory_hog() {
    let zero = Path::new("/dev/zero");
    for format in [Format::Csv, Format::Tsv, Format::Jsonl] {
        for skip in [false, true] {
            let mut p = plan(zero);
            p.read.format = format;
            p.read.skip_bad_rows = skip;
            p.read.tsv_quotes = skip;
            let message = load(&p).unwrap_err().to_string();
            assert!(
                message.contains("/dev/zero") && message.contains("a device"),
                "{format}: {message}"
            );
        }
    }
}

/// Issue 8 item 13: a line longer than the bound, plain or inflated from a
/// small compressed file, is an error naming the file and its line.
#[test]
fn long_lines_are_bounded_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let long = "a".repeat(5000);
    for (name, body) in [
        ("l.csv", format!("text,label\nok,x\n{long},x\nok,y\n")),
        ("l.tsv", format!("text\tlabel\nok\tx\n{long}\tx\nok\ty\n")),
        (
            "l.jsonl",
            format!("{{\"text\":\"ok\",\"label\":\"x\"}}\n\n{long}\n"),
        ),
        ("l.csv.gz", format!("text,label\nok,x\n{long},x\n")),
        ("l.csv.bz2", format!("text,label\nok,x\n{long},x\n")),
        (
            "l.jsonl.zst",
            format!("{{\"text\":\"ok\",\"label\":\"x\"}}\n\n{long}\n"),
        ),
    ] {
        let path = write(dir.path(), name, body.as_bytes());
        let mut p = plan(&path);
        p.read.limits.max_line_bytes = 4096;
        p.read.skip_bad_rows = true;
        let (got, line, message) = line_error(load(&p));
        assert_eq!((got, line), (path.clone(), 3), "{name}");
        assert!(message.contains("--max-line-bytes"), "{name}: {message}");
        p.read.limits.max_line_bytes = 5002;
        assert!(load(&p).is_ok(), "{name}");
    }
    // A small .gz that inflates to one 20 MiB line hits the default bound.
    let body = format!("text,label\n{}", "a".repeat(20 << 20));
    let path = write(dir.path(), "bomb.csv.gz", body.as_bytes());
    assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
    let (got, line, message) = line_error(load(&plan(&path)));
    assert_eq!((got, line), (path, 2));
    assert!(message.contains("--max-line-bytes"), "{message}");
}

/// Folders: only regular files are examples (a device is never read), and a
/// file over the bound is a bad example.
#[test]
fn folders_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    write(&root, "a/1.txt", b"short");
    write(&root, "b/1.txt", "x".repeat(100).as_bytes());
    std::os::unix::fs::symlink("/dev/null", root.join("a/null.txt")).unwrap();
    let ds = load(&plan(&root)).unwrap();
    assert_eq!(texts(&ds), ["short", &"x".repeat(100)]);
    let mut p = plan(&root);
    p.read.limits.max_line_bytes = 99;
    let message = dataset_error(load(&p));
    assert!(
        message.contains("b/1.txt") && message.contains("--max-line-bytes"),
        "{message}"
    );
    p.read.skip_bad_rows = true;
    let ds = load(&p).unwrap();
    assert_eq!(texts(&ds), ["short"]);
    assert_eq!(ds.report.skipped_bad_rows, 1);
}

/// Without --tsv-quotes, a TSV row broken where a CSV-style quoted field
/// would have held a line break says how to read such a file.
#[test]
fn unquoted_tsv_points_to_the_quoting_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "q.tsv", TSV.as_bytes());
    let (p, line, message) = line_error(load(&plan(&path)));
    assert_eq!((p, line), (path, 4));
    assert!(
        message.contains("expected 2 fields, found 1") && message.contains("--tsv-quotes"),
        "{message}"
    );
}

/// The asset directory (`$SHERL_ASSETS`, else `~/.cache/sherl`).
fn assets_dir() -> PathBuf {
    sherl::assets::assets_dir()
}

#[test]
fn rotten_tomatoes_by_movie() {
    let path = assets_dir().join("data/rotten_tomatoes_corpus_full.csv.bz2");
    assert!(
        path.exists(),
        "{} is missing: run pipelines/fetch-assets.sh",
        path.display()
    );
    let mut p = with_split(&path, "train=0.8,valid=0.1,test=0.1", 0);
    p.read.label_column = Some(Column::Name("category".into()));
    p.read.group_column = Some(Column::Name("movie_name".into()));
    p.labels = Some(vec!["fresh".into(), "rotten".into()]);
    let ds = load(&p).unwrap();
    let r = &ds.report;
    assert_eq!(r.rows_read, 13_905);
    assert_eq!(r.skipped_bad_rows, 0);
    assert_eq!(r.dropped_unknown_label, 1_097);
    assert_eq!(r.dropped_labels, BTreeMap::from([("plot".into(), 1_097)]));
    assert_eq!(ds.label_names, ["fresh", "rotten"]);
    let fresh = ds.examples.iter().filter(|e| e.label == Some(0)).count();
    let rotten = ds.examples.iter().filter(|e| e.label == Some(1)).count();
    assert_eq!((fresh, rotten), (7_403, 5_405));
    let mut movie_split: HashMap<&str, &str> = HashMap::new();
    for e in &ds.examples {
        let movie = e.group.as_deref().unwrap();
        assert_eq!(
            *movie_split.entry(movie).or_insert(&e.split),
            e.split,
            "{movie}"
        );
    }
    let total = ds.examples.len() as f64;
    for (name, fraction) in [("train", 0.8), ("valid", 0.1), ("test", 0.1)] {
        let share = r.split_counts[name] as f64 / total;
        assert!((share - fraction).abs() < 0.01, "{name}: {share}");
    }
}
