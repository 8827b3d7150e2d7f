//! `sherl-fit export` of image runs: parity with `sherl-fit predict`. ONNX
//! Runtime on the exported model, fed with the images preprocessed by the
//! exported `preprocess.json`, gives the probabilities `sherl-fit predict`
//! gives on the same images within 1e-4, for the tiny ViT fixture's caches
//! (every layer; patch tokens pooled 2x2; hidden_states.0 alone).

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use prost::Message;
use serde_json::Value;

use crate::common;
use crate::image_cache::{extract_images, image_fixture, ImageFixture};
use crate::vit::write_image_folders;
use sherl::data::image::{read_image, ImageOptions, Preprocess};
use sherl::extract::onnx::proto::ModelProto;
use sherl::extract::runtime::F32Session;

/// An image fixture with a cache `c` of every layer, `p` of every layer
/// with the patch tokens pooled 2x2, `e` of hidden_states.0 alone, and new
/// images to label in `new/`.
fn fixture() -> ImageFixture {
    let f = image_fixture(8);
    extract_images(&f, "c", &["--dtype", "f32", "--layers", "all"]);
    extract_images(
        &f,
        "p",
        &["--dtype", "f32", "--layers", "all", "--patch-pool", "2"],
    );
    extract_images(&f, "e", &["--dtype", "f32", "--layers", "0"]);
    write_image_folders(&f.root.join("new"), 3, 99);
    f
}

/// A `sherl-fit` command in the fixture's root that must succeed: its
/// last stdout line as JSON.
fn sherl_fit(f: &ImageFixture, args: &[&str]) -> Value {
    let o = common::run("sherl-fit", args, &f.root, &[]);
    assert!(
        o.status.success(),
        "sherl-fit {args:?}: exit {:?}: {}",
        o.status.code(),
        common::stderr(&o)
    );
    serde_json::from_str(common::stdout(&o).lines().last().unwrap()).unwrap()
}

/// `predict`'s (image path, probabilities in the order of `labels`) per
/// new image.
fn predicted(
    f: &ImageFixture,
    run: &str,
    labels: &[String],
    out: &str,
) -> Vec<(PathBuf, Vec<f32>)> {
    let backbone = f.backbone.to_str().unwrap();
    sherl_fit(
        f,
        &[
            "predict",
            "--run",
            run,
            "--backbone",
            backbone,
            "--data",
            "new",
            "--out",
            out,
            "--device",
            "cpu",
        ],
    );
    std::fs::read_to_string(f.root.join(out))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let probs = labels
                .iter()
                .map(|c| v["probabilities"][c].as_f64().unwrap() as f32)
                .collect();
            (f.root.join(v["image"].as_str().unwrap()), probs)
        })
        .collect()
}

/// The exported model in `dir` on `images` (one batch, preprocessed by the
/// exported recipe): `[images, classes]` probabilities.
fn onnx_probabilities(dir: &Path, images: &[PathBuf]) -> Vec<Vec<f32>> {
    let recipe = Preprocess::read(&dir.join("preprocess.json")).unwrap();
    let [c, h, w] = recipe.output_shape();
    let mut x = Vec::new();
    for p in images {
        x.extend(
            recipe
                .apply(&read_image(p, &ImageOptions::default()).unwrap())
                .unwrap(),
        );
    }
    let x = ArrayD::from_shape_vec(IxDyn(&[images.len(), c, h, w]), x).unwrap();
    let mut s =
        F32Session::open(common::runtime(), &dir.join("model.onnx"), &common::cpu()).unwrap();
    let out = s
        .run(&[("pixel_values", x.view())], &["logits", "probabilities"])
        .unwrap();
    assert_eq!(out[0].shape(), out[1].shape());
    assert_eq!(out[1].shape()[0], images.len());
    out[1]
        .outer_iter()
        .map(|row| row.iter().copied().collect())
        .collect()
}

/// Train `method` with `flags` on cache `cache`, export it, and compare
/// ONNX Runtime on the export with predict on every new image; returns
/// the largest difference seen.
fn check_image_parity(f: &ImageFixture, cache: &str, method: &str, flags: &[&str]) -> f32 {
    let backbone = f.backbone.to_str().unwrap();
    let mut args = vec![
        "run",
        "--cache",
        cache,
        "--backbone",
        backbone,
        "--device",
        "cpu",
        "--out",
        "runs",
        "--method",
        method,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
    ];
    args.extend_from_slice(flags);
    let s = sherl_fit(f, &args);
    let run = s["run_dir"].as_str().unwrap().to_owned();
    let tag = format!("{cache}-{method}-{}", flags.join("_"));
    let out = format!("export-{tag}");
    let line = sherl_fit(
        f,
        &[
            "export",
            "--run",
            &run,
            "--backbone",
            backbone,
            "--out",
            &out,
        ],
    );
    assert_eq!(line["method"], method);
    let dir = f.root.join(&out);

    // the files: recipe as the cache recorded it, labels, README
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(f.root.join(&run).join("config.json")).unwrap())
            .unwrap();
    let recipe = Preprocess::read(&dir.join("preprocess.json")).unwrap();
    let want: Preprocess =
        serde_json::from_value(recorded["cache"]["image"]["preprocess"].clone()).unwrap();
    assert_eq!(recipe, want, "{tag}");
    let labels: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels.len(), line["classes"].as_u64().unwrap() as usize);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(
        readme.contains("onnxruntime")
            && readme.contains("pixel_values")
            && readme.contains(&run[run.len() - 8..]),
        "{readme}"
    );

    // one input, the two outputs: the backbone's own outputs are gone
    let model = ModelProto::decode(std::fs::read(dir.join("model.onnx")).unwrap().as_slice())
        .unwrap()
        .graph
        .unwrap();
    let names = |v: &[sherl::extract::onnx::proto::ValueInfoProto]| -> Vec<String> {
        v.iter().map(|i| i.name.clone()).collect()
    };
    assert_eq!(names(&model.input), ["pixel_values"], "{tag}");
    assert_eq!(names(&model.output), ["logits", "probabilities"], "{tag}");

    let want = predicted(f, &run, &labels, &format!("pred-{tag}.jsonl"));
    let images: Vec<PathBuf> = want.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(images.len(), 6);
    let got = onnx_probabilities(&dir, &images);
    let mut worst = 0f32;
    for (i, (g, (_, w))) in got.iter().zip(&want).enumerate() {
        common::assert_close(g, w, 1e-4, 0.0, &format!("{tag} image {i}"));
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    // the model is not a constant: rows differ
    assert!(
        got.iter().any(|g| (g[0] - got[0][0]).abs() > 1e-6),
        "{tag}: {got:?}"
    );
    eprintln!("{tag}: largest difference from predict {worst:e}");
    worst
}

/// The backbone methods on a cache of every layer: the probe of the last
/// layer and of layer 1, patch-mean and CLS pooling, the trained last
/// layer(s), every block trained.
#[test]
fn exported_image_runs_match_predict() {
    let f = fixture();
    check_image_parity(&f, "c", "linear-probe", &[]);
    check_image_parity(
        &f,
        "c",
        "linear-probe",
        &["--probe-layer", "1", "--pool", "cls"],
    );
    check_image_parity(&f, "c", "linear-probe", &["--pool", "patch-mean"]);
    check_image_parity(&f, "c", "late-layer", &[]);
    check_image_parity(
        &f,
        "c",
        "late-layer",
        &["--late-layers", "2", "--pool", "patch-mean"],
    );
    check_image_parity(&f, "c", "full-ft", &[]);
    // patch tokens pooled 2x2 in the cache: the trained layers run on the
    // pooled tokens, as in training
    check_image_parity(&f, "p", "late-layer", &["--late-layers", "2"]);
    check_image_parity(&f, "p", "full-ft", &["--pool", "cls"]);
    check_image_parity(&f, "p", "linear-probe", &["--pool", "patch-mean"]);
    // hidden_states.0 alone cached: the probe of layer 2 runs the frozen
    // blocks from it
    check_image_parity(&f, "e", "linear-probe", &[]);
    check_image_parity(&f, "e", "full-ft", &[]);
}

/// The side methods on images: their graphs (written once for every
/// backbone) on the ViT body, without a padding mask.
#[test]
fn exported_image_side_runs_match_predict() {
    let f = fixture();
    check_image_parity(&f, "c", "sherl", &[]);
    check_image_parity(&f, "c", "sherl", &["--late-trainable", "--pool", "cls"]);
    check_image_parity(&f, "p", "sherl", &["--pool", "patch-mean"]);
    check_image_parity(&f, "c", "unipt", &[]);
    check_image_parity(&f, "p", "unipt", &["--pool", "patch-mean"]);
    check_image_parity(&f, "c", "lst", &[]);
    check_image_parity(&f, "p", "lst", &[]);
}

/// An image run exported with a backbone other than its cache's (an edited
/// `backbone.json`, another `model.onnx`) is refused, naming the file;
/// nothing is written.
#[test]
fn image_export_refuses_another_backbone() {
    let f = image_fixture(4);
    extract_images(&f, "c", &["--dtype", "f32", "--layers", "all"]);
    let backbone = f.backbone.to_str().unwrap();
    let s = sherl_fit(
        &f,
        &[
            "run",
            "--cache",
            "c",
            "--backbone",
            backbone,
            "--device",
            "cpu",
            "--out",
            "runs",
            "--method",
            "linear-probe",
            "--epochs",
            "1",
        ],
    );
    let run = s["run_dir"].as_str().unwrap().to_owned();
    for (file, edit) in [("backbone.json", b"\n".as_slice()), ("model.onnx", b"\0")] {
        let other = f.root.join(format!("other-{file}"));
        std::fs::create_dir_all(&other).unwrap();
        for entry in std::fs::read_dir(&f.backbone).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), other.join(entry.file_name())).unwrap();
        }
        let mut bytes = std::fs::read(other.join(file)).unwrap();
        bytes.extend_from_slice(edit);
        std::fs::write(other.join(file), bytes).unwrap();
        let out = format!("refused-{file}");
        let o = common::run(
            "sherl-fit",
            &[
                "export",
                "--run",
                &run,
                "--backbone",
                other.to_str().unwrap(),
                "--out",
                &out,
            ],
            &f.root,
            &[],
        );
        assert!(!o.status.success(), "{file}");
        let e = common::stderr(&o);
        assert!(e.contains(file) && e.contains("differs"), "{file}: {e}");
        assert!(!f.root.join(&out).exists(), "{file}");
    }
}

/// `y = Relu(x)` at default-domain opset `opset`.
fn relu_model(opset: i64) -> Vec<u8> {
    use sherl::extract::onnx::proto::{
        data_type, GraphProto, NodeProto, OperatorSetIdProto, ValueInfoProto,
    };
    let io = |name: &str| ValueInfoProto::tensor(name, data_type::FLOAT, &[Err("n")]);
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            node: vec![NodeProto {
                input: vec!["x".into()],
                output: vec!["y".into()],
                op_type: "Relu".into(),
                ..Default::default()
            }],
            input: vec![io("x")],
            output: vec![io("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The graph appended to a backbone's: its input renamed, the opset and
/// IR version raised, ONNX Runtime computing both graphs; a name the
/// model defines already, and a model below opset 13, are refused.
#[test]
fn appended_graph_renames_the_input_and_raises_the_opset() {
    use sherl::extract::onnx::edit::append_graph;
    use sherl::extract::onnx::proto::{data_type, GraphProto, NodeProto, ValueInfoProto};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.onnx");
    let extra = |out: &str| GraphProto {
        node: vec![NodeProto {
            input: vec!["y".into(), "y".into()],
            output: vec![out.into()],
            op_type: "Add".into(),
            ..Default::default()
        }],
        output: vec![ValueInfoProto::tensor(out, data_type::FLOAT, &[Err("n")])],
        ..Default::default()
    };
    let bytes = append_graph(
        &path,
        &relu_model(14),
        &extra("z"),
        Some(("x", "pixel_values")),
        17,
        8,
    )
    .unwrap();
    let m = ModelProto::decode(bytes.as_slice()).unwrap();
    assert_eq!((m.ir_version, m.opset_import.len()), (8, 1));
    assert_eq!(m.opset_import[0].version, 17);
    let g = m.graph.unwrap();
    assert_eq!(g.input.len(), 1);
    assert_eq!(g.input[0].name, "pixel_values");
    assert_eq!(g.node[0].op_type, "Identity"); // before the model's nodes
    std::fs::write(&path, &bytes).unwrap();
    let mut s = F32Session::open(common::runtime(), &path, &common::cpu()).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![-1.0f32, 0.5, 2.0]).unwrap();
    let out = s.run(&[("pixel_values", x.view())], &["y", "z"]).unwrap();
    assert_eq!(out[0].as_slice().unwrap(), &[0.0, 0.5, 2.0]);
    assert_eq!(out[1].as_slice().unwrap(), &[0.0, 1.0, 4.0]);

    let e = append_graph(&path, &relu_model(14), &extra("y"), None, 17, 8).unwrap_err();
    assert!(
        e.to_string().contains("already has a tensor named 'y'"),
        "{e}"
    );
    let e = append_graph(&path, &relu_model(14), &extra("z"), Some(("x", "y")), 17, 8).unwrap_err();
    assert!(e.to_string().contains("'y'"), "{e}");
    let e = append_graph(&path, &relu_model(14), &extra("z"), Some(("w", "v")), 17, 8).unwrap_err();
    assert!(e.to_string().contains("no input 'w'"), "{e}");
    let e = append_graph(&path, &relu_model(12), &extra("z"), None, 17, 8).unwrap_err();
    assert!(e.to_string().contains("opset 12"), "{e}");
    // a model at a later opset keeps it
    let bytes = append_graph(&path, &relu_model(18), &extra("z"), None, 17, 8).unwrap();
    let m = ModelProto::decode(bytes.as_slice()).unwrap();
    assert_eq!(m.opset_import[0].version, 18);
}
