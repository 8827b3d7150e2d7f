//! `--task retrieval`: Recall@K by hand (ties, several captions per image),
//! both contrastive losses against hand-computed values, the hinge's
//! hardest negative.

use candle_core::{Device, Tensor, Var};

use sherl::fit::retrieval::loss::{hinge, infonce, INIT_LOG_SCALE};
use sherl::fit::retrieval::recall::{ranks, recall};

fn t2(v: &[f32], r: usize, c: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b}");
}

#[test]
fn recall_by_hand_4x4_with_ties() {
    // rows: images, columns: captions; caption c belongs to image c.
    #[rustfmt::skip]
    let sim = [
        0.9, 0.9, 0.1, 0.0, // own 0.9 tied with caption 1: pessimistic rank 1
        0.2, 0.8, 0.3, 0.1, // rank 0
        0.5, 0.6, 0.4, 0.7, // three others above: rank 3
        0.0, 0.1, 0.2, 0.3, // rank 0
    ];
    let owner = [0, 1, 2, 3];
    let (i2t, t2i) = ranks(&sim, 4, &owner).unwrap();
    assert_eq!(i2t, vec![1, 0, 3, 0]);
    // caption 1: image 0 scores 0.9 > 0.8; caption 3: image 2 scores 0.7 > 0.3
    assert_eq!(t2i, vec![0, 1, 0, 1]);
    let r = recall(&sim, 4, &owner).unwrap();
    assert_eq!(r.i2t, [50.0, 100.0, 100.0]);
    assert_eq!(r.t2i, [50.0, 100.0, 100.0]);
    assert_eq!(r.rsum, 500.0);
    assert_eq!((r.images, r.captions), (4, 4));
}

#[test]
fn recall_by_hand_several_captions_per_image() {
    // 3 images, 5 captions: image 0 owns captions 0 and 1, image 1 owns 2
    // and 3, image 2 owns 4.
    #[rustfmt::skip]
    let sim = [
        0.3, 0.7, 0.7, 0.1, 0.2, // best own 0.7 (c1) tied with c2 (image 1's): rank 1
        0.6, 0.1, 0.5, 0.2, 0.4, // best own 0.5 (c2); c0 scores 0.6: rank 1
        0.1, 0.2, 0.3, 0.4, 0.9, // rank 0
    ];
    let owner = [0, 0, 1, 1, 2];
    let (i2t, t2i) = ranks(&sim, 3, &owner).unwrap();
    assert_eq!(i2t, vec![1, 1, 0]);
    // c0: image 1 (0.6) above image 0 (0.3); c2: image 0 (0.7) above 0.5;
    // c3: image 2 (0.4) above 0.2
    assert_eq!(t2i, vec![1, 0, 1, 1, 0]);
    let r = recall(&sim, 3, &owner).unwrap();
    close(r.i2t[0], 100.0 / 3.0, 1e-9);
    assert_eq!(r.t2i[0], 40.0);
    assert_eq!(r.i2t[1], 100.0);
    // An image is a hit when ANY of its captions ranks first: image 0's
    // caption 0 is far down, but caption 1 is first once the tie is broken
    // in its favour.
    let mut better = sim;
    better[2] = 0.69;
    assert_eq!(ranks(&better, 3, &owner).unwrap().0[0], 0);
}

#[test]
fn recall_at_5_and_10_boundaries_and_constant_scores() {
    // 12 x 12: image i's own caption scores 0.5 and exactly 5 other captions
    // (i+1 ..= i+5 mod 12) score 1.0: rank 5 both ways, a miss at 5, a hit at 10.
    let n = 12;
    let mut sim = vec![0f32; n * n];
    for i in 0..n {
        sim[i * n + i] = 0.5;
        for d in 1..=5 {
            sim[i * n + (i + d) % n] = 1.0;
        }
    }
    let owner: Vec<usize> = (0..n).collect();
    let r = recall(&sim, n, &owner).unwrap();
    assert_eq!(r.i2t, [0.0, 0.0, 100.0]);
    assert_eq!(r.t2i, [0.0, 0.0, 100.0]);
    assert_eq!(r.rsum, 200.0);
    // Everything tied: pessimistic ranks put every right item last.
    let flat = vec![0.25f32; n * n];
    let r = recall(&flat, n, &owner).unwrap();
    assert_eq!(r.rsum, 0.0);
}

#[test]
fn recall_refuses_bad_input() {
    let e = recall(&[0.0; 5], 2, &[0, 1]).unwrap_err().to_string();
    assert!(e.contains("5 values"), "{e}");
    let e = recall(&[0.0; 4], 2, &[0, 0]).unwrap_err().to_string();
    assert!(e.contains("image 1 has no caption"), "{e}");
    let e = recall(&[0.0, f32::NAN, 0.0, 0.0], 2, &[0, 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 0 and caption 1"), "{e}");
    let e = recall(&[0.0; 4], 2, &[0, 2]).unwrap_err().to_string();
    assert!(e.contains("caption 1 belongs to image 2"), "{e}");
}

/// Images = the identity, so `S = images x captions^T` is `captions^T`:
/// the tests choose `S` and pass its transpose as the captions.
fn from_scores(s: &[f32], b: usize) -> (Tensor, Var) {
    let mut t = vec![0f32; b * b];
    for i in 0..b {
        for j in 0..b {
            t[j * b + i] = s[i * b + j];
        }
    }
    let eye = Tensor::eye(b, candle_core::DType::F32, &Device::Cpu).unwrap();
    (eye, Var::from_tensor(&t2(&t, b, b)).unwrap())
}

#[test]
fn hinge_by_hand_takes_the_hardest_negative() {
    #[rustfmt::skip]
    let s = [
        0.5, 0.6, 0.45, // image 0: captions 1 (0.3) and 2 (0.15) violate; hardest 1
        0.45, 0.9, 0.4, // image 1: none
        0.3, 0.0, 0.7,  // image 2: none
    ];
    // caption 0 as query: image 1 violates (0.2 + 0.45 - 0.5 = 0.15),
    // image 2 sits exactly on the margin (0); captions 1, 2: none.
    let (img, txt) = from_scores(&s, 3);
    let loss = hinge(&img, txt.as_tensor(), 0.2).unwrap();
    close(
        f64::from(loss.to_scalar::<f32>().unwrap()),
        (0.3 + 0.15) / 3.0,
        1e-6,
    );
    // Gradient: only the hardest negatives and the diagonal they compete
    // with move; caption 2 violates for image 0 but is not the hardest.
    let g = loss.backward().unwrap();
    let gt = g.get(txt.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    let ds = |i: usize, j: usize| f64::from(gt[j][i]); // dL/dS_ij
    close(ds(0, 1), 1.0 / 3.0, 1e-6);
    close(ds(1, 0), 1.0 / 3.0, 1e-6);
    close(ds(0, 0), -2.0 / 3.0, 1e-6);
    close(ds(0, 2), 0.0, 1e-9);
    close(ds(2, 0), 0.0, 1e-9);
    close(ds(1, 1), 0.0, 1e-9);
    // One pair has no negative.
    let (i1, t1) = from_scores(&[0.3], 1);
    let l1 = hinge(&i1, t1.as_tensor(), 0.2).unwrap();
    assert_eq!(l1.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn infonce_by_hand_with_the_scale_cap() {
    let s = [1.0f32, 0.6, 0.0, 0.8];
    let (img, txt) = from_scores(&s, 2);
    let ce = |right: f64, other: f64| (1.0 + (other - right).exp()).ln();
    // rows: (1 vs 0.6), (0.8 vs 0); columns: (1 vs 0), (0.8 vs 0.6)
    let want =
        |t: f64| 0.25 * (ce(t, 0.6 * t) + ce(0.8 * t, 0.0) + ce(t, 0.0) + ce(0.8 * t, 0.6 * t));
    let scalar = |v: f64| Var::from_tensor(&Tensor::new(v as f32, &Device::Cpu).unwrap()).unwrap();
    let ls = scalar(0.0); // scale 1
    let loss = infonce(&img, txt.as_tensor(), ls.as_tensor()).unwrap();
    close(f64::from(loss.to_scalar::<f32>().unwrap()), want(1.0), 1e-6);
    // CLIP's starting temperature 0.07.
    let ls = scalar(INIT_LOG_SCALE);
    let loss = infonce(&img, txt.as_tensor(), ls.as_tensor()).unwrap();
    close(
        f64::from(loss.to_scalar::<f32>().unwrap()),
        want(1.0 / 0.07),
        1e-4,
    );
    let g = loss.backward().unwrap();
    // The log-scale learns: sharpening helps here (every diagonal wins).
    assert!(g.get(ls.as_tensor()).unwrap().to_scalar::<f32>().unwrap() < 0.0);
    // Above the cap the scale is 100 and the log-scale gets no gradient.
    let ls = scalar(10.0);
    let loss = infonce(&img, txt.as_tensor(), ls.as_tensor()).unwrap();
    close(
        f64::from(loss.to_scalar::<f32>().unwrap()),
        want(100.0),
        1e-4,
    );
    let g = loss.backward().unwrap();
    let gl = g.get(ls.as_tensor()).map(|t| t.to_scalar::<f32>().unwrap());
    assert!(gl.is_none_or(|v| v == 0.0), "{gl:?}");
}

/// Not a timed test: prints how long evaluating 1,000 images x 1,000
/// captions takes (docs/results.md); checks the result. Run with
/// `cargo test --release --test it -- --ignored retrieval_eval_1000 --nocapture`.
#[test]
#[ignore = "a measurement for docs/results.md, not a check; run with --ignored --nocapture"]
fn retrieval_eval_1000_measured() {
    use sherl::fit::retrieval::loss::l2_normalize;
    use sherl::fit::retrieval::recall::similarity;
    let (n, j) = (1000usize, 256usize);
    let mut rng = sherl::rng::SplitMix64::new(7);
    let img: Vec<f32> = (0..n * j).map(|_| rng.symmetric_f32(1.0)).collect();
    // Each caption: its image plus noise, so most rank first.
    let cap: Vec<f32> = img.iter().map(|x| x + rng.symmetric_f32(0.5)).collect();
    let img = l2_normalize(&t2(&img, n, j)).unwrap();
    let cap = l2_normalize(&t2(&cap, n, j)).unwrap();
    let owner: Vec<usize> = (0..n).collect();
    let mut best = f64::INFINITY;
    let mut r = None;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let sim = similarity(&img, &cap).unwrap();
        r = Some(recall(&sim, n, &owner).unwrap());
        best = best.min(t.elapsed().as_secs_f64());
    }
    let r = r.unwrap();
    assert!(r.i2t[0] > 90.0 && r.t2i[0] > 90.0, "{r:?}");
    println!("1000 x 1000 (J = {j}): similarity + Recall@K in {best:.4} s (best of 5); {r:?}");
}

use sherl::data::paired::{caption_id, emoji_pairs, pair_of_caption, split_pairs, write_tables};
use sherl::fit::retrieval::join::{join, Entry};

fn entries(rows: &[(&str, &str)]) -> Vec<Entry> {
    rows.iter()
        .enumerate()
        .map(|(i, (id, split))| Entry {
            position: i as u64,
            id: id.to_string(),
            split: split.to_string(),
        })
        .collect()
}

fn try_join(images: &[(&str, &str)], captions: &[(&str, &str)]) -> Result<(), String> {
    join(
        &entries(images),
        &entries(captions),
        std::path::Path::new("IMG"),
        std::path::Path::new("TXT"),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[test]
fn join_pairs_captions_with_their_images() {
    let images = [("a", "train"), ("b", "train"), ("c", "valid")];
    let captions = [
        ("a#0", "train"),
        ("b#0", "train"),
        ("a#1", "train"),
        ("c#0", "valid"),
        ("c#3", "valid"),
    ];
    let j = join(
        &entries(&images),
        &entries(&captions),
        std::path::Path::new("IMG"),
        std::path::Path::new("TXT"),
    )
    .unwrap();
    let t = j.split("train").unwrap();
    assert_eq!(t.images, vec![0, 1]);
    assert_eq!(t.captions, vec![0, 1, 2]);
    assert_eq!(t.owner, vec![0, 1, 0]);
    assert_eq!(t.captions_of, vec![vec![0, 2], vec![1]]);
    let v = j.split("valid").unwrap();
    assert_eq!((v.images.clone(), v.owner.clone()), (vec![2], vec![0, 0]));
    assert!(j.split("test").is_none());
}

#[test]
fn join_refuses_each_mismatch_naming_the_first() {
    let ok_imgs = [("a", "train"), ("b", "valid")];
    // an image id twice
    let e = try_join(&[("a", "train"), ("a", "valid")], &[("a#0", "train")]).unwrap_err();
    assert!(
        e.contains("image id a appears twice") && e.contains("positions 0 and 1"),
        "{e}"
    );
    // a caption id twice
    let e = try_join(&ok_imgs, &[("a#0", "train"), ("a#0", "train")]).unwrap_err();
    assert!(e.contains("caption id a#0 appears twice"), "{e}");
    // a caption id without #k
    let e = try_join(&ok_imgs, &[("a#0", "train"), ("b", "valid")]).unwrap_err();
    assert!(
        e.contains("caption id b (position 1") && e.contains("<pair id>#<k>"),
        "{e}"
    );
    // a caption whose image is not in the image cache: the first one named
    let e = try_join(
        &ok_imgs,
        &[("a#0", "train"), ("z#0", "train"), ("y#0", "train")],
    )
    .unwrap_err();
    assert!(
        e.contains("belongs to pair z") && !e.contains("pair y"),
        "{e}"
    );
    assert!(e.contains("IMG") && e.contains("TXT"), "{e}");
    // a caption in another split than its image
    let e = try_join(&ok_imgs, &[("a#0", "train"), ("b#0", "test")]).unwrap_err();
    assert!(
        e.contains("caption b#0 is in split test") && e.contains("split valid of the image cache"),
        "{e}"
    );
    // an image without a caption (counts differ)
    let e = try_join(&ok_imgs, &[("a#0", "train"), ("a#1", "train")]).unwrap_err();
    assert!(
        e.contains("image b (split valid, position 1") && e.contains("no caption"),
        "{e}"
    );
}

#[test]
fn caption_ids_round_trip() {
    assert_eq!(caption_id("1F41E", 2), "1F41E#2");
    assert_eq!(pair_of_caption("1F41E#2"), Some("1F41E"));
    assert_eq!(pair_of_caption("a#b#10"), Some("a#b"));
    assert_eq!(pair_of_caption("a#"), None);
    assert_eq!(pair_of_caption("a#x"), None);
    assert_eq!(pair_of_caption("a"), None);
}

/// A tiny emoji package: `emoji.json` and 64x64 PNGs.
fn tiny_emoji(dir: &std::path::Path, n: usize) {
    std::fs::create_dir_all(dir.join("img/google/64")).unwrap();
    let mut entries = Vec::new();
    for i in 0..n {
        let unified = format!("1F{:03X}", 0x400 + i);
        let file = format!("{}.png", unified.to_lowercase());
        image::RgbaImage::from_pixel(4, 4, image::Rgba([i as u8 * 20, 10, 200, 255]))
            .save(dir.join("img/google/64").join(&file))
            .unwrap();
        entries.push(serde_json::json!({
            "name": format!("THING NUMBER {i}, LARGE"),
            "unified": unified,
            "image": file,
            "short_names": [format!("thing_{i}"), format!("thing {i}")],
            "has_img_google": true
        }));
    }
    // one without a Google image: left out
    entries.push(
        serde_json::json!({"name": "NONE", "unified": "FFFF", "image": "ffff.png",
        "short_names": ["none"], "has_img_google": false}),
    );
    std::fs::write(
        dir.join("emoji.json"),
        serde_json::to_vec(&entries).unwrap(),
    )
    .unwrap();
}

#[test]
fn emoji_pairs_split_by_group_into_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("emoji");
    tiny_emoji(&dir, 20);
    let pairs = emoji_pairs(&dir).unwrap();
    assert_eq!(pairs.len(), 20);
    // the name lower-cased, then short names with _ as a space, once each
    assert_eq!(
        pairs[3].captions,
        vec!["thing number 3, large".to_string(), "thing 3".to_string()]
    );
    let spec = sherl::data::SplitSpec::parse("train=0.6,valid=0.2,test=0.2", 1).unwrap();
    let splits = split_pairs(&pairs, &spec).unwrap();
    assert_eq!(splits, split_pairs(&pairs, &spec).unwrap(), "seeded");
    for name in ["train", "valid", "test"] {
        assert!(splits.iter().any(|s| s == name), "{name} empty: {splits:?}");
    }
    let order: Vec<String> = ["train", "valid", "test"].map(String::from).to_vec();
    let out = tmp.path().join("tables");
    let w = write_tables(&pairs, &splits, &order, &out).unwrap();
    assert_eq!(w.iter().map(|t| t.pairs).sum::<usize>(), 20);
    assert_eq!(w.iter().map(|t| t.caption_rows).sum::<usize>(), 40);
    let caps = std::fs::read_to_string(out.join("captions-valid.csv")).unwrap();
    let first = caps.lines().nth(1).unwrap();
    // the comma in the name is quoted; the id is <pair>#0
    assert!(first.contains("#0,\"thing number"), "{first}");
    let imgs = std::fs::read_to_string(out.join("images-valid.csv")).unwrap();
    assert_eq!(imgs.lines().count() - 1, w[1].pairs);
    // A missing image is an error naming it.
    std::fs::remove_file(dir.join("img/google/64/1f405.png")).unwrap();
    let e = emoji_pairs(&dir).unwrap_err().to_string();
    assert!(e.contains("1F405") && e.contains("missing"), "{e}");
}

// ---- sherl-fit run --task retrieval on tiny generated towers ----

use crate::common;
use crate::common::tiny::{tiny_backbone, Rng, TinyConfig};
use crate::vit::write_tiny_vit_backbone;
use sherl::data::paired::Pair;

pub(crate) struct RetrievalFixture {
    _tmp: tempfile::TempDir,
    pub(crate) root: std::path::PathBuf,
}

/// 24 pairs (16 train, 4 valid, 4 test): image i is a seeded noisy PNG
/// whose colour depends on i; its two captions name word i (and a second
/// word). Both caches are extracted with every layer.
pub(crate) fn retrieval_fixture() -> RetrievalFixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    write_tiny_vit_backbone(&root.join("vit"));
    tiny_backbone(&root.join("bert"), &TinyConfig::default(), 3);
    std::fs::create_dir_all(root.join("png")).unwrap();
    let mut rng = Rng::new(9);
    let mut pairs = Vec::new();
    let mut splits = Vec::new();
    for i in 0..24usize {
        let base = [
            (i * 37 % 256) as f32,
            (i * 91 % 256) as f32,
            (i * 53 % 256) as f32,
        ];
        let img = image::RgbImage::from_fn(8, 8, |x, _| {
            let mut c =
                |b: f32| (b + 30.0 * rng.uniform() + 4.0 * x as f32).clamp(0.0, 255.0) as u8;
            image::Rgb([c(base[0]), c(base[1]), c(base[2])])
        });
        let path = root.join("png").join(format!("{i}.png"));
        img.save(&path).unwrap();
        pairs.push(Pair {
            id: format!("p{i}"),
            image: path,
            captions: vec![
                format!("w{}", 10 + i),
                format!("w{} w{}", 10 + i, 50 + i % 5),
            ],
            group: format!("p{i}"),
        });
        splits.push(
            match i % 6 {
                4 => "valid",
                5 => "test",
                _ => "train",
            }
            .to_string(),
        );
    }
    let order: Vec<String> = ["train", "valid", "test"].map(String::from).to_vec();
    write_tables(&pairs, &splits, &order, &root.join("tables")).unwrap();
    let t = |k: &str, s: &str| format!("tables/{k}-{s}.csv");
    for (kind, backbone, out, extra) in [
        ("images", "vit", "img", vec!["--image-column", "image"]),
        (
            "captions",
            "bert",
            "txt",
            // Small text chunks: an evaluation batch spans more chunks
            // than the reader keeps decoded.
            vec![
                "--text-column",
                "caption",
                "--max-len",
                "16",
                "--chunk-size",
                "2",
            ],
        ),
    ] {
        let (tr, va, te) = (t(kind, "train"), t(kind, "valid"), t(kind, "test"));
        let mut args = vec![
            "run",
            "--backbone",
            backbone,
            "--train",
            &tr,
            "--valid",
            &va,
            "--test",
            &te,
            "--id-column",
            "id",
            "--no-labels",
            "--layers",
            "all",
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--out",
            out,
        ];
        args.extend(extra);
        let o = common::run("sherl-extract", &args, &root, &[]);
        assert!(o.status.success(), "{kind}: {}", common::stderr(&o));
    }
    RetrievalFixture { _tmp: tmp, root }
}

pub(crate) fn fit_retrieval(f: &RetrievalFixture, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "run",
        "--task",
        "retrieval",
        "--image-cache",
        "img",
        "--text-cache",
        "txt",
        "--image-backbone",
        "vit",
        "--text-backbone",
        "bert",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--joint-dim",
        "16",
        "--batch-size",
        "8",
    ];
    if !extra.contains(&"--out") {
        a.extend(["--out", "runs"]);
    }
    a.extend_from_slice(extra);
    common::run("sherl-fit", &a, &f.root, &[])
}

pub(crate) fn last_json(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
    serde_json::from_str(common::stdout(o).lines().last().unwrap()).unwrap()
}

fn metrics(f: &RetrievalFixture, s: &serde_json::Value) -> Vec<serde_json::Value> {
    let dir = f.root.join(s["run_dir"].as_str().unwrap());
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn retrieval_run_learns_is_seeded_and_writes_metrics() {
    let f = retrieval_fixture();
    let args = [
        "--epochs", "4", "--lr", "0.01", "--seed", "1", "--warmup", "0",
    ];
    let s = last_json(&fit_retrieval(&f, &args));
    assert_eq!(s["task"], "retrieval");
    assert_eq!(s["method"], "sherl+sherl");
    assert_eq!(s["pairs"]["train"], serde_json::json!([16, 32]));
    assert_eq!(s["pairs"]["test"], serde_json::json!([4, 8]));
    // Both towers' training memory, counted by sherl-fit's allocator.
    let tm = &s["train_memory"];
    let state = tm["trainable_state_bytes"].as_u64().unwrap();
    let peak = tm["step_peak_bytes"].as_u64().unwrap();
    assert_eq!(state, 12 * s["trainable_params"].as_u64().unwrap());
    assert!(peak > 0, "{tm}");
    assert_eq!(tm["total_bytes"].as_u64().unwrap(), state + peak);
    let m = metrics(&f, &s);
    assert_eq!(m.len(), 4);
    for line in &m {
        for k in ["train_loss", "valid_rsum", "seconds", "scale"] {
            assert!(line[k].is_number(), "{k} in {line}");
        }
        assert_eq!(line["valid"]["i2t"].as_array().unwrap().len(), 3);
    }
    let loss = |i: usize| m[i]["train_loss"].as_f64().unwrap();
    assert!(loss(3) < loss(0), "the loss falls: {m:?}");
    // test Recall@K of the best checkpoint, its epoch the best valid rsum
    let best = m
        .iter()
        .map(|l| l["valid_rsum"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(s["valid_rsum"].as_f64().unwrap(), best);
    assert!(
        s["test"]["t2i"].is_array() && s["test_rsum"].is_number(),
        "{s}"
    );
    let dir = f.root.join(s["run_dir"].as_str().unwrap());
    for file in ["config.json", "weights.safetensors", "summary.json"] {
        assert!(dir.join(file).exists(), "{file}");
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["retrieval"]["joint_dim"], 16);
    assert!(cfg["config"].get("method").is_none());
    // Same seed, another directory: the same numbers and weights.
    let mut again_args = args.to_vec();
    again_args.extend(["--out", "runs2"]);
    let s2 = last_json(&fit_retrieval(&f, &again_args));
    assert_eq!(s2["weights_sha256"], s["weights_sha256"]);
    assert_eq!(s2["run_id"], s["run_id"]);
    let m2 = metrics(&f, &s2);
    for (a, b) in m.iter().zip(&m2) {
        assert_eq!(a["train_loss"], b["train_loss"]);
        assert_eq!(a["valid"], b["valid"]);
    }
    // Another seed: other weights.
    let mut other = args.to_vec();
    other[5] = "2";
    let s3 = last_json(&fit_retrieval(&f, &other));
    assert_ne!(s3["weights_sha256"], s["weights_sha256"]);
}

#[test]
fn retrieval_towers_take_other_methods_and_the_hinge() {
    let f = retrieval_fixture();
    for (im, tm, loss) in [
        ("linear-probe", "linear-probe", "infonce"),
        ("late-layer", "unipt", "hinge"),
        ("unipt", "full-ft", "infonce"),
    ] {
        let s = last_json(&fit_retrieval(
            &f,
            &[
                "--epochs",
                "1",
                "--image-method",
                im,
                "--text-method",
                tm,
                "--loss",
                loss,
            ],
        ));
        assert_eq!(s["method"], format!("{im}+{tm}"));
        assert_eq!(s["loss"], loss);
        assert!(s["valid_rsum"].as_f64().unwrap() >= 0.0);
        assert!(s["trainable_params"].as_u64().unwrap() > 0);
    }
    // The probe trains only its projection: (D + 1) x J per tower, + the scale.
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
    assert_eq!(s["image_trainable_params"], (8 + 1) * 16);
    assert_eq!(s["text_trainable_params"], (32 + 1) * 16);
}

/// `--image-method full-ft`: every ViT block trained from the cached
/// hidden_states.0 (nothing of the image backbone frozen), the projection
/// on top; one block more than `late-layer` (K = 1) trains, so
/// full-ft = head + 2 blocks and late-layer = head + 1 block. The loss
/// falls and a seeded run repeats its weights.
#[test]
fn retrieval_image_tower_full_ft_trains_every_vit_block() {
    let f = retrieval_fixture();
    let run = |im: &str, tm: &str, out: &str| {
        last_json(&fit_retrieval(
            &f,
            &[
                "--epochs",
                "4",
                "--lr",
                "0.003",
                "--warmup",
                "0",
                "--image-method",
                im,
                "--text-method",
                tm,
                "--out",
                out,
            ],
        ))
    };
    let s = run("full-ft", "full-ft", "runs");
    assert_eq!(s["method"], "full-ft+full-ft");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            f.root
                .join(s["run_dir"].as_str().unwrap())
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["image_cache"]["inputs"], serde_json::json!([0]));
    assert_eq!(cfg["image_cache"]["frozen_params"], 0);
    let head = (8 + 1) * 16;
    let late = run("late-layer", "linear-probe", "runs")["image_trainable_params"]
        .as_u64()
        .unwrap();
    let block = late - head;
    assert!(block > 0);
    assert_eq!(
        s["image_trainable_params"].as_u64().unwrap(),
        head + 2 * block
    );
    let m = metrics(&f, &s);
    let loss = |i: usize| m[i]["train_loss"].as_f64().unwrap();
    assert!(loss(3) < loss(0), "the loss falls: {m:?}");
    let again = run("full-ft", "full-ft", "runs2");
    assert_eq!(again["weights_sha256"], s["weights_sha256"]);
}

#[test]
fn retrieval_run_refuses_bad_input_before_writing() {
    let f = retrieval_fixture();
    // caches swapped
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--task",
            "retrieval",
            "--image-cache",
            "txt",
            "--text-cache",
            "img",
            "--image-backbone",
            "vit",
            "--text-backbone",
            "bert",
            "--out",
            "runs",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("holds text, not images"),
        "{}",
        common::stderr(&o)
    );
    // retrieval flags on a classification run, and --method on a retrieval run
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--cache",
            "img",
            "--backbone",
            "vit",
            "--image-method",
            "sherl",
            "--out",
            "runs",
        ],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("--image-method belong to --task retrieval"));
    let o = fit_retrieval(&f, &["--method", "sherl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("not --method"));
    let o = fit_retrieval(&f, &["--margin=-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("--margin -1"),
        "{}",
        common::stderr(&o)
    );
    // a caption cache extracted from other captions: a caption of a pair
    // the image cache lacks
    let caps = f.root.join("tables/captions-test.csv");
    let text = std::fs::read_to_string(&caps).unwrap();
    std::fs::write(&caps, text.replacen("p5#0", "q5#0", 1)).unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "run",
            "--backbone",
            "bert",
            "--train",
            "tables/captions-train.csv",
            "--valid",
            "tables/captions-valid.csv",
            "--test",
            "tables/captions-test.csv",
            "--id-column",
            "id",
            "--no-labels",
            "--text-column",
            "caption",
            "--max-len",
            "16",
            "--device",
            "cpu",
            "--out",
            "txt2",
        ],
        &f.root,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = common::run(
        "sherl-fit",
        &[
            "run",
            "--task",
            "retrieval",
            "--image-cache",
            "img",
            "--text-cache",
            "txt2",
            "--image-backbone",
            "vit",
            "--text-backbone",
            "bert",
            "--out",
            "runs",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = common::stderr(&o);
    assert!(
        e.contains("q5#0") && e.contains("belongs to pair q5"),
        "{e}"
    );
    assert!(!f.root.join("runs").exists(), "nothing written");
}

#[test]
fn cross_style_test_split_gets_rasterised_openmoji_drawings() {
    use sherl::data::paired::{code_key, cross_style};
    assert_eq!(code_key("0023-fe0f-20e3"), "0023-20E3");
    assert_eq!(code_key("1F600"), "1F600");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("emoji");
    tiny_emoji(&dir, 12);
    let mut pairs = emoji_pairs(&dir).unwrap();
    let spec = sherl::data::SplitSpec::parse("train=0.5,valid=0.25,test=0.25", 3).unwrap();
    let mut splits = split_pairs(&pairs, &spec).unwrap();
    // OpenMoji drawings for every emoji but one test emoji: a red square in
    // a 72 x 72 view box; one written with an FE0F the Google id lacks.
    let om = tmp.path().join("openmoji");
    std::fs::create_dir_all(om.join("color/svg")).unwrap();
    let test_ids: Vec<String> = pairs
        .iter()
        .zip(&splits)
        .filter(|(_, s)| *s == "test")
        .map(|(p, _)| p.id.clone())
        .collect();
    assert!(test_ids.len() >= 2, "{splits:?}");
    let svg = r##"<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><rect x="12" y="12" width="48" height="48" fill="#ff0000"/></svg>"##;
    for p in &pairs {
        if p.id == test_ids[0] {
            continue; // no drawing: dropped
        }
        let name = if p.id == test_ids[1] {
            format!("{}-FE0F.svg", p.id)
        } else {
            format!("{}.svg", p.id)
        };
        std::fs::write(om.join("color/svg").join(name), svg).unwrap();
    }
    let out = tmp.path().join("tables");
    let before: Vec<(String, std::path::PathBuf)> = pairs
        .iter()
        .map(|p| (p.id.clone(), p.image.clone()))
        .collect();
    let (replaced, dropped) = cross_style(&mut pairs, &mut splits, "test", &om, &out, 64).unwrap();
    assert_eq!((replaced, dropped), (test_ids.len() - 1, 1));
    assert_eq!(pairs.len(), splits.len());
    assert!(!pairs.iter().any(|p| p.id == test_ids[0]));
    for (p, s) in pairs.iter().zip(&splits) {
        let old = &before.iter().find(|(id, _)| *id == p.id).unwrap().1;
        if s == "test" {
            assert!(
                p.image.starts_with(out.join("openmoji-64")),
                "{:?}",
                p.image
            );
            let img = image::open(&p.image).unwrap().to_rgba8();
            assert_eq!(img.dimensions(), (64, 64));
            // the square covers the centre, the corner is transparent
            assert_eq!(img.get_pixel(32, 32).0, [255, 0, 0, 255]);
            assert_eq!(img.get_pixel(1, 1).0[3], 0);
        } else {
            assert_eq!(&p.image, old, "train and valid keep Google's image");
        }
    }
    // A broken SVG is an error naming it.
    std::fs::write(
        om.join("color/svg").join(format!("{}.svg", test_ids[1])),
        "<svg",
    )
    .unwrap();
    std::fs::remove_file(
        om.join("color/svg")
            .join(format!("{}-FE0F.svg", test_ids[1])),
    )
    .unwrap();
    let mut pairs = emoji_pairs(&dir).unwrap();
    let mut splits = split_pairs(&pairs, &spec).unwrap();
    let e = cross_style(&mut pairs, &mut splits, "test", &om, &out, 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{}.svg", test_ids[1])) && e.contains("not a usable SVG"),
        "{e}"
    );
}

// ---- sherl-fit search ----

pub(crate) fn search(f: &RetrievalFixture, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "search",
        "--image-backbone",
        "vit",
        "--text-backbone",
        "bert",
        "--device",
        "cpu",
        "--threads",
        "1",
    ];
    a.extend_from_slice(extra);
    common::run("sherl-fit", &a, &f.root, &[])
}

pub(crate) fn hits(o: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        common::stderr(o)
    );
    common::stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn search_fails(f: &RetrievalFixture, extra: &[&str], want: &[&str]) {
    let o = search(f, extra);
    assert!(!o.status.success(), "{extra:?} succeeded");
    let e = common::stderr(&o);
    for w in want {
        assert!(e.contains(w), "{extra:?}: {w:?} not in {e}");
    }
}

/// A text query ranks the split's images, an image query its captions,
/// both through the backbones' ONNX models and the trained towers. The
/// query side is computed from the raw input and the gallery side from the
/// cache, so the score of (caption c, image i) from `--text c` equals the
/// score of the same pair from `--image i`: the two paths agree only if
/// both reproduce the cached features. Output shape, order, `--k`,
/// `--split`, `--out` and determinism.
#[test]
fn search_ranks_a_split_with_the_trained_towers() {
    let f = retrieval_fixture();
    let s = last_json(&fit_retrieval(
        &f,
        &["--epochs", "3", "--lr", "0.01", "--warmup", "0"],
    ));
    let run = s["run_dir"].as_str().unwrap().to_string();
    // The test split holds pairs 5, 11, 17, 23; p5's captions are "w15"
    // and "w15 w50".
    let h = hits(&search(&f, &["--run", &run, "--text", "w15 w50"]));
    assert_eq!(h.len(), 4, "k 5, but only 4 test images: {h:?}");
    let ids: std::collections::BTreeSet<&str> =
        h.iter().map(|x| x["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["p11", "p17", "p23", "p5"].into_iter().collect());
    for (i, x) in h.iter().enumerate() {
        assert_eq!(x["rank"], i + 1);
        let score = x["score"].as_f64().unwrap();
        assert!((-1.0001..=1.0001).contains(&score), "{x}");
        if i > 0 {
            assert!(h[i - 1]["score"].as_f64().unwrap() >= score, "{h:?}");
        }
        // the image file from the table the cache was extracted from
        let n = x["id"].as_str().unwrap().trim_start_matches('p');
        assert!(
            x["image"]
                .as_str()
                .unwrap()
                .ends_with(&format!("png/{n}.png")),
            "{x}"
        );
        assert!(x.get("caption").is_none());
    }
    // Deterministic, and --k cuts the same list.
    assert_eq!(hits(&search(&f, &["--run", &run, "--text", "w15 w50"])), h);
    let h2 = hits(&search(
        &f,
        &["--run", &run, "--text", "w15 w50", "--k", "2"],
    ));
    assert_eq!(h2[..], h[..2]);

    // An image query: the test split's 8 captions.
    let hi = hits(&search(
        &f,
        &["--run", &run, "--image", "png/5.png", "--k", "20"],
    ));
    assert_eq!(hi.len(), 8);
    for x in &hi {
        let id = x["id"].as_str().unwrap();
        let (pair, k) = id.split_once('#').unwrap();
        assert_eq!(x["pair"], pair);
        let n: usize = pair[1..].parse().unwrap();
        let want = if k == "0" {
            format!("w{}", 10 + n)
        } else {
            format!("w{} w{}", 10 + n, 50 + n % 5)
        };
        assert_eq!(x["caption"], want.as_str(), "{x}");
    }
    // The pair (p5#1 = "w15 w50", image p5) scored both ways.
    let by_text = h.iter().find(|x| x["id"] == "p5").unwrap()["score"]
        .as_f64()
        .unwrap();
    let by_image = hi.iter().find(|x| x["id"] == "p5#1").unwrap()["score"]
        .as_f64()
        .unwrap();
    assert!(
        (by_text - by_image).abs() < 1e-4,
        "text query {by_text} vs image query {by_image}"
    );
    // --split valid: its 4 images; --out writes the JSONL there and a
    // summary line to stdout.
    let o = search(
        &f,
        &[
            "--run",
            &run,
            "--text",
            "w14",
            "--split",
            "valid",
            "--out",
            "hits.jsonl",
        ],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(common::stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!(summary["hits"], 4);
    let written = std::fs::read_to_string(f.root.join("hits.jsonl")).unwrap();
    let valid_ids: std::collections::BTreeSet<String> = written
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        valid_ids,
        ["p10", "p16", "p22", "p4"]
            .map(String::from)
            .into_iter()
            .collect()
    );

    // Refusals, each naming what is wrong.
    search_fails(
        &f,
        &["--run", &run, "--text", "x", "--split", "nope"],
        &["--split nope", "test, train, valid"],
    );
    search_fails(&f, &["--run", &run, "--text", "x", "--k", "0"], &["--k 0"]);
    search_fails(&f, &["--run", &run, "--text", "  "], &["empty"]);
    search_fails(
        &f,
        &["--run", &run, "--image", "png/none.png"],
        &["png/none.png", "not found"],
    );
    search_fails(&f, &["--run", &run], &["--text"]);
    search_fails(
        &f,
        &["--run", &run, "--text", "x", "--image", "png/5.png"],
        &["cannot be used with"],
    );
    // backbones swapped
    let o = common::run(
        "sherl-fit",
        &[
            "search",
            "--run",
            &run,
            "--text",
            "x",
            "--image-backbone",
            "bert",
            "--text-backbone",
            "vit",
            "--device",
            "cpu",
        ],
        &f.root,
        &[],
    );
    assert!(!o.status.success());
    // not a retrieval run
    std::fs::create_dir_all(f.root.join("cls")).unwrap();
    std::fs::write(
        f.root.join("cls/config.json"),
        r#"{"run_id": "x", "config": {}}"#,
    )
    .unwrap();
    search_fails(
        &f,
        &["--run", "cls", "--text", "x"],
        &["not a retrieval run", "sherl-fit predict"],
    );
    // the caption cache moved
    std::fs::rename(f.root.join("txt"), f.root.join("txt-moved")).unwrap();
    search_fails(
        &f,
        &["--run", &run, "--text", "x"],
        &["caption cache txt", "cannot be opened"],
    );
    std::fs::rename(f.root.join("txt-moved"), f.root.join("txt")).unwrap();
    // another cache in the image cache's place
    std::fs::rename(f.root.join("img"), f.root.join("img-moved")).unwrap();
    std::os::unix::fs::symlink(f.root.join("txt"), f.root.join("img")).unwrap();
    search_fails(
        &f,
        &["--run", &run, "--text", "x"],
        &["img is not the image cache the run was trained on"],
    );
    std::fs::remove_file(f.root.join("img")).unwrap();
    std::fs::rename(f.root.join("img-moved"), f.root.join("img")).unwrap();
    // changed weights
    let w = f.root.join(&run).join("weights.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    search_fails(
        &f,
        &["--run", &run, "--text", "x"],
        &["weights.safetensors", "differs"],
    );
}
