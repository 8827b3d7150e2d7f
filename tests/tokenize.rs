//! Tokenization with the backbone's own tokenizer.json: padding off,
//! truncation at max-len, single texts and pairs.

use crate::common;
use sherl::extract::tokenize::Tokenizer;

fn minilm(max_len: usize) -> Tokenizer {
    Tokenizer::from_file(&common::minilm_dir().join("tokenizer.json"), max_len).unwrap()
}

#[test]
fn single_text_has_no_padding() {
    let t = minilm(128);
    // MiniLM's tokenizer.json pads to 128; ours must not.
    let e = t.encode("the movie was great", None).unwrap();
    assert_eq!(e.ids, vec![101, 1996, 3185, 2001, 2307, 102]);
    assert_eq!(e.type_ids, vec![0; 6]);
}

#[test]
fn truncation_at_max_len_keeps_special_tokens() {
    let t = minilm(8);
    let long = "one two three four five six seven eight nine ten eleven twelve";
    let e = t.encode(long, None).unwrap();
    assert_eq!(e.len(), 8);
    assert_eq!(e.ids[0], 101);
    assert_eq!(*e.ids.last().unwrap(), 102);
}

#[test]
fn pairs_get_segment_ids_and_are_truncated_together() {
    let t = minilm(128);
    let e = t.encode("is it good?", Some("yes it is")).unwrap();
    let seps = e.ids.iter().filter(|&&i| i == 102).count();
    assert_eq!(seps, 2);
    let first_sep = e.ids.iter().position(|&i| i == 102).unwrap();
    assert!(e.type_ids[..=first_sep].iter().all(|&x| x == 0));
    assert!(e.type_ids[first_sep + 1..].iter().all(|&x| x == 1));
    let t = minilm(10);
    let e = t
        .encode("a b c d e f g h i j k", Some("l m n o p q r s t"))
        .unwrap();
    assert_eq!(e.len(), 10);
}

#[test]
fn bad_inputs_are_errors() {
    let err =
        Tokenizer::from_file(std::path::Path::new("/nonexistent/tokenizer.json"), 128).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
    let err = Tokenizer::from_file(&common::minilm_dir().join("tokenizer.json"), 2).unwrap_err();
    assert!(err.to_string().contains("too small"));
}
