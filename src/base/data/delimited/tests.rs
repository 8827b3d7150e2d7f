//! Unit tests of `src/data/delimited.rs` (kept apart so the module stays readable).

use super::*;

/// A row's (line, last line, fields), or a broken row's (line, message).
type Got = std::result::Result<(u64, u64, Vec<String>), (u64, String)>;

/// Every row of `bytes`, rows needing `width` fields.
fn rows(bytes: &'static [u8], quoting: bool, width: usize, limits: ReadLimits) -> Vec<Got> {
    let reader = Box::new(std::io::Cursor::new(bytes.to_vec()));
    let lines = LineReader::new(reader, Path::new("t.csv"), 1 << 20);
    let mut splitter = Splitter::new(lines, b',', quoting, limits);
    splitter.width = Some(width);
    let mut out = Vec::new();
    loop {
        match splitter.next_record().unwrap() {
            Next::End => return out,
            Next::Broken { line, message } => out.push(Err((line, message))),
            Next::Row(r) => out.push(Ok((
                r.line,
                r.last_line,
                r.fields
                    .iter()
                    .map(|f| String::from_utf8(f.clone()).unwrap())
                    .collect(),
            ))),
        }
    }
}

fn row(line: u64, last: u64, fields: &[&str]) -> (u64, u64, Vec<String>) {
    (line, last, fields.iter().map(|f| (*f).to_owned()).collect())
}

#[test]
fn quoting_rules() {
    let got = rows(
        b"\"a,b\",\"c\"\"d\"\r\n\"x\r\ny\",z\n\n\"\",e\"f\n",
        true,
        2,
        ReadLimits::default(),
    );
    assert_eq!(
        got,
        [
            Ok(row(1, 1, &["a,b", "c\"d"])),
            Ok(row(2, 3, &["x\r\ny", "z"])),
            Ok(row(5, 5, &["", "e\"f"])),
        ]
    );
    // Without quoting a quote is text and a line is a row.
    let got = rows(b"\"a,b\n\"x,y\"\n", false, 2, ReadLimits::default());
    assert_eq!(
        got,
        [Ok(row(1, 1, &["\"a", "b"])), Ok(row(2, 2, &["\"x", "y\""]))]
    );
}

#[test]
fn a_broken_row_gives_back_its_later_lines() {
    // Row 2's quote pairs with row 4's opening quote; text follows it.
    let got = rows(
        b"a,1\n\"b,2\nc,3\n\"d\",4\ne,5\n",
        true,
        2,
        ReadLimits::default(),
    );
    assert_eq!(got.len(), 5, "{got:?}");
    let Err((2, message)) = &got[1] else {
        panic!("{got:?}")
    };
    assert!(
        message.contains(
            "field 0: text after its closing quote (on line 4, closing the quote opened \
             on line 2)"
        ),
        "{message}"
    );
    assert_eq!(got[0], Ok(row(1, 1, &["a", "1"])));
    assert_eq!(got[2], Ok(row(3, 3, &["c", "3"])));
    assert_eq!(got[3], Ok(row(4, 4, &["d", "4"])));
    assert_eq!(got[4], Ok(row(5, 5, &["e", "5"])));
    // ...and so does a row whose quote is never closed, and a row that
    // closes its quote but has the wrong number of fields.
    for (bytes, needle) in [
        (&b"\"b,2\nc,3\n"[..], "never closed (end of file)"),
        (
            &b"\"b,2\nc\",3,x\n"[..],
            "expected 2 fields, found 3 in a row that runs over lines 1-2",
        ),
    ] {
        let lines = LineReader::new(Box::new(bytes), Path::new("t.csv"), 100);
        let mut splitter = Splitter::new(lines, b',', true, ReadLimits::default());
        splitter.width = Some(2);
        match splitter.next_record().unwrap() {
            Next::Broken { line: 1, message } => {
                assert!(message.contains(needle), "{message}")
            }
            _ => panic!("expected a broken row"),
        }
        match splitter.next_record().unwrap() {
            Next::Row(Record { line: 2, .. }) | Next::Broken { line: 2, .. } => {}
            _ => panic!("line 2 should be read again"),
        }
    }
}

#[test]
fn fields_per_row_are_bounded() {
    let got = rows(&[b','; MAX_FIELDS + 9], true, 2, ReadLimits::default());
    let Err((1, message)) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(
        message.contains("more than 65536 fields (65546)"),
        "{message}"
    );
    let got = rows(
        &[b','; MAX_FIELDS - 1],
        true,
        MAX_FIELDS,
        ReadLimits::default(),
    );
    assert!(matches!(&got[..], [Ok((1, 1, fields))] if fields.len() == MAX_FIELDS));
}

#[test]
fn quoted_line_breaks_are_bounded() {
    let limits = ReadLimits {
        max_quoted_lines: 2,
        max_quoted_bytes: 10,
        ..ReadLimits::default()
    };
    let got = rows(b"\"a\nb\nc\",1\n", true, 2, limits);
    assert_eq!(got, [Ok(row(1, 3, &["a\nb\nc", "1"]))]);
    let got = rows(b"\"a\nb\nc\nd\",1\n", true, 2, limits);
    let Err((1, message)) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(
        message.contains("quote that opens field 0 on this line is still open after 2 line breaks (--max-quoted-lines)"),
        "{message}"
    );
    // Lines 2-4 are read again: `b` and `c` have one field, `d",1` two.
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[3], Ok(row(4, 4, &["d\"", "1"])));
    let got = rows(b"x,\"a\n0123456789\",1\n", true, 2, limits);
    let Err((1, message)) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(
        message.contains("field 1") && message.contains("--max-quoted-bytes"),
        "{message}"
    );
}
