//! `sherl-fit export` of retrieval runs: two encoders, `text.onnx` and
//! `image.onnx`. ONNX Runtime on them, fed as the README's Python example
//! feeds them (texts by the exported `tokenizer.json`, one padded batch;
//! images by the exported `preprocess.json`), gives unit-length embeddings
//! whose dot products are the scores `sherl-fit search` prints, within
//! 1e-4, both ways: a text query against the split's cached images (the
//! text encoder against the image tower on cached features) and an image
//! query against its cached captions (the image encoder against the text
//! tower). Runs that fail search's checks are refused.

use std::path::Path;

use ndarray::{Array2, ArrayD, ArrayViewD, IxDyn};
use serde_json::Value;

use crate::common;
use crate::retrieval::{
    fit_retrieval, hits, last_json, retrieval_fixture, search, RetrievalFixture,
};
use sherl::data::image::{read_image, ImageOptions, Preprocess};
use sherl::extract::runtime::F32Session;

/// `sherl-fit export` of `run` into `root/out` with the fixture's backbones.
fn export(f: &RetrievalFixture, run: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "export",
        "--run",
        run,
        "--image-backbone",
        "vit",
        "--text-backbone",
        "bert",
        "--out",
        out,
    ];
    a.extend_from_slice(extra);
    common::run("sherl-fit", &a, &f.root, &[])
}

fn padded(rows: &[Vec<u32>]) -> Array2<i64> {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let mut a = Array2::<i64>::zeros((rows.len(), width));
    for (r, row) in rows.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            a[[r, c]] = i64::from(v);
        }
    }
    a
}

/// The rows of a `[n, J]` output.
fn rows(a: &ArrayD<f32>) -> Vec<Vec<f32>> {
    a.outer_iter()
        .map(|row| row.iter().copied().collect())
        .collect()
}

/// `text.onnx` in `dir` on `texts`, one padded batch tokenized by the
/// exported `tokenizer.json`: `[texts, J]`.
fn text_embeddings(dir: &Path, texts: &[String]) -> Vec<Vec<f32>> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let encs = tok.encode_batch(texts.to_vec(), true).unwrap();
    let col = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| {
        padded(&encs.iter().map(f).collect::<Vec<_>>())
    };
    let ids = col(&|e| e.get_ids().to_vec());
    let mask = col(&|e| e.get_attention_mask().to_vec());
    let types = col(&|e| e.get_type_ids().to_vec());
    assert!(
        mask.iter().any(|&m| m == 0),
        "the batch should hold padding"
    );
    let inputs: Vec<(&str, ArrayViewD<'_, i64>)> = vec![
        ("input_ids", ids.view().into_dyn()),
        ("attention_mask", mask.view().into_dyn()),
        ("token_type_ids", types.view().into_dyn()),
    ];
    let mut s =
        F32Session::open(common::runtime(), &dir.join("text.onnx"), &common::cpu()).unwrap();
    let out = s.run_i64(&inputs, &["embeddings"]).unwrap();
    assert_eq!(out[0].shape()[0], texts.len());
    rows(&out[0])
}

/// `image.onnx` in `dir` on `images` (relative to `root`), one batch
/// preprocessed by the exported recipe: `[images, J]`.
fn image_embeddings(dir: &Path, root: &Path, images: &[String]) -> Vec<Vec<f32>> {
    let recipe = Preprocess::read(&dir.join("preprocess.json")).unwrap();
    let [c, h, w] = recipe.output_shape();
    let mut x = Vec::new();
    for p in images {
        let img = read_image(&root.join(p), &ImageOptions::default()).unwrap();
        x.extend(recipe.apply(&img).unwrap());
    }
    let x = ArrayD::from_shape_vec(IxDyn(&[images.len(), c, h, w]), x).unwrap();
    let mut s =
        F32Session::open(common::runtime(), &dir.join("image.onnx"), &common::cpu()).unwrap();
    let out = s
        .run(&[("pixel_values", x.view())], &["embeddings"])
        .unwrap();
    assert_eq!(out[0].shape()[0], images.len());
    rows(&out[0])
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Every embedding has unit length and `joint` values.
fn check_unit(z: &[Vec<f32>], joint: usize) {
    for row in z {
        assert_eq!(row.len(), joint);
        let n = dot(row, row).sqrt();
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
}

/// Train a retrieval run with towers `image_method` and `text_method`,
/// export it, and compare the encoders' dot products with the scores of
/// `search` both ways; returns the largest difference seen.
fn check_parity(f: &RetrievalFixture, image_method: &str, text_method: &str) -> f64 {
    let s = last_json(&fit_retrieval(
        f,
        &[
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--warmup",
            "0",
            "--image-method",
            image_method,
            "--text-method",
            text_method,
        ],
    ));
    let run = s["run_dir"].as_str().unwrap().to_string();
    let out = format!("exp-{image_method}-{text_method}");
    let o = export(f, &run, &out, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let summary: Value = serde_json::from_str(common::stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!(summary["method"], format!("{image_method}+{text_method}"));
    assert_eq!(summary["joint_dim"], 16);
    assert_eq!(summary["text"]["method"], text_method);
    assert_eq!(summary["image"]["method"], image_method);
    let dir = f.root.join(&out);
    for file in [
        "text.onnx",
        "image.onnx",
        "tokenizer.json",
        "preprocess.json",
        "retrieval.json",
        "README.md",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    assert!(!dir.join("model.onnx").exists());
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("retrieval.json")).unwrap())
            .unwrap();
    assert_eq!(meta["joint_dim"], 16);
    assert_eq!(meta["text"]["max_len"], 16);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(
        readme.contains("text_session.run([\"embeddings\"]"),
        "{readme}"
    );

    let mut worst = 0f64;
    // A text query: its embedding against the test images'.
    let query = "w15 w50".to_string();
    let h = hits(&search(f, &["--run", &run, "--text", &query, "--k", "20"]));
    assert_eq!(h.len(), 4);
    let images: Vec<String> = h
        .iter()
        .map(|x| format!("png/{}.png", &x["id"].as_str().unwrap()[1..]))
        .collect();
    let zi = image_embeddings(&dir, &f.root, &images);
    // The query in a batch with a longer and a shorter text: padding and
    // the masked pooling are exercised.
    let texts = vec![query, "w11 w12 w13 w14 w15 w16".into(), "w3".into()];
    let zt = text_embeddings(&dir, &texts);
    check_unit(&zi, 16);
    check_unit(&zt, 16);
    for (x, z) in h.iter().zip(&zi) {
        let d = (dot(&zt[0], z) - x["score"].as_f64().unwrap()).abs();
        assert!(d < 1e-4, "text query, {x}: ONNX {}", dot(&zt[0], z));
        worst = worst.max(d);
    }
    // An image query: its embedding against the test captions'.
    let hi = hits(&search(
        f,
        &["--run", &run, "--image", "png/5.png", "--k", "20"],
    ));
    assert_eq!(hi.len(), 8);
    let captions: Vec<String> = hi
        .iter()
        .map(|x| x["caption"].as_str().unwrap().to_string())
        .collect();
    let zc = text_embeddings(&dir, &captions);
    let zq = image_embeddings(&dir, &f.root, &["png/5.png".to_string()]);
    check_unit(&zc, 16);
    for (x, z) in hi.iter().zip(&zc) {
        let d = (dot(&zq[0], z) - x["score"].as_f64().unwrap()).abs();
        assert!(d < 1e-4, "image query, {x}: ONNX {}", dot(&zq[0], z));
        worst = worst.max(d);
    }
    eprintln!("{image_method}+{text_method}: largest difference {worst:.2e}");
    worst
}

/// Both encoders of the default run (`sherl` towers) and of runs with
/// the other methods (each on at least one tower) reproduce search's
/// scores.
#[test]
fn exported_retrieval_encoders_match_search() {
    let f = retrieval_fixture();
    let mut worst = 0f64;
    for (im, tm) in [
        ("sherl", "sherl"),
        ("late-layer", "unipt"),
        ("full-ft", "lora"),
        ("lst", "adapter"),
        ("linear-probe", "full-ft"),
    ] {
        worst = worst.max(check_parity(&f, im, tm));
    }
    eprintln!("largest difference over all runs: {worst:.2e}");
}

/// A retrieval export is refused, naming the reason, when the weights fail
/// their checksum, a backbone is not its cache's, or `--backbone` (one
/// backbone) is given; a classification flag mix-up is named too.
#[test]
fn retrieval_export_refuses_what_search_refuses() {
    let f = retrieval_fixture();
    let s = last_json(&fit_retrieval(
        &f,
        &[
            "--epochs",
            "1",
            "--image-method",
            "linear-probe",
            "--text-method",
            "linear-probe",
        ],
    ));
    let run = s["run_dir"].as_str().unwrap().to_string();
    let fails = |extra: &[&str], backbones: (&str, &str), want: &[&str]| {
        let mut a = vec![
            "export",
            "--run",
            &run,
            "--image-backbone",
            backbones.0,
            "--text-backbone",
            backbones.1,
            "--out",
            "bad",
        ];
        a.extend_from_slice(extra);
        let o = common::run("sherl-fit", &a, &f.root, &[]);
        assert!(!o.status.success(), "{extra:?} {backbones:?} succeeded");
        let e = common::stderr(&o);
        for w in want {
            assert!(e.contains(w), "{extra:?}: {w:?} not in {e}");
        }
        assert!(!f.root.join("bad/text.onnx").exists());
    };
    fails(
        &["--backbone", "bert"],
        ("vit", "bert"),
        &["--image-backbone"],
    );
    // Backbones swapped: each is checked against its cache.
    fails(
        &[],
        ("bert", "vit"),
        &["is an image backbone", "holds text"],
    );
    // The run's own backbones when none are given: the export succeeds.
    let o = common::run(
        "sherl-fit",
        &["export", "--run", &run, "--out", "own"],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(f.root.join("own/image.onnx").is_file());
    // Flipped bits in the weights.
    let w = f.root.join(&run).join("weights.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    fails(&[], ("vit", "bert"), &["sha256", "weights.safetensors"]);
}
