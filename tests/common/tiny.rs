//! A tiny random BERT (seeded), written as `config.json` + `model.safetensors`
//! exactly as Hugging Face lays them out, so the exporter can be tested with
//! nothing downloaded.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use sherl::rng::SplitMix64;

/// The tiny seeded generator for test weights and fixtures: sherl's
/// SplitMix64 with the state and sampling rule these fixtures were first
/// generated with (the golden caches depend on them).
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0.symmetric_f32(1.0)
    }
    pub fn below(&mut self, n: u32) -> u32 {
        self.0.below_modulo(u64::from(n)) as u32
    }
}

/// Shape of the tiny model.
#[derive(Clone, Debug)]
pub struct TinyConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub inter: usize,
    pub max_pos: usize,
    pub types: usize,
    pub act: &'static str,
    pub eps: f64,
    /// "bert" or "mpnet" (MPNet names, no token types, positions from 2,
    /// a relative-position table of `buckets` rows).
    pub family: &'static str,
    pub buckets: usize,
}

impl TinyConfig {
    /// A tiny MPNet: position table of `max_pos` rows (2 + 16 tokens).
    pub fn mpnet() -> Self {
        TinyConfig {
            family: "mpnet",
            max_pos: 18,
            eps: 1e-5,
            ..Default::default()
        }
    }

    /// The row of the first token's position.
    pub fn position_offset(&self) -> usize {
        if self.family == "mpnet" {
            2
        } else {
            0
        }
    }

    /// The checkpoint name of the BERT-named layer tensor `name` (under
    /// `encoder.layer.{i}.`).
    pub fn layer_name(&self, name: &str) -> String {
        if self.family != "mpnet" {
            return name.to_string();
        }
        for (from, to) in [
            ("attention.self.query", "attention.attn.q"),
            ("attention.self.key", "attention.attn.k"),
            ("attention.self.value", "attention.attn.v"),
            ("attention.output.dense", "attention.attn.o"),
            ("attention.output.LayerNorm", "attention.LayerNorm"),
        ] {
            if let Some(rest) = name.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig {
            vocab: 100,
            hidden: 32,
            layers: 3,
            heads: 4,
            inter: 64,
            max_pos: 16,
            types: 2,
            act: "gelu",
            eps: 1e-12,
            family: "bert",
            buckets: 32,
        }
    }
}

/// Named weights (without prefix), row-major, with shapes.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Generate weights for `cfg` from `seed`. Scales keep activations O(1).
pub fn weights(cfg: &TinyConfig, seed: u64) -> Weights {
    let mut rng = Rng::new(seed);
    let mut w = Weights::new();
    let d = cfg.hidden;
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * rng.uniform()).collect();
        w.insert(name, (shape, v));
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        vec![cfg.vocab, d],
        1.0,
        0.0,
        &mut rng,
    );
    put(
        "embeddings.position_embeddings.weight".into(),
        vec![cfg.max_pos, d],
        0.5,
        0.0,
        &mut rng,
    );
    put(
        "embeddings.token_type_embeddings.weight".into(),
        vec![cfg.types, d],
        0.5,
        0.0,
        &mut rng,
    );
    put(
        "embeddings.LayerNorm.weight".into(),
        vec![d],
        0.2,
        1.0,
        &mut rng,
    );
    put(
        "embeddings.LayerNorm.bias".into(),
        vec![d],
        0.1,
        0.0,
        &mut rng,
    );
    let s_in = 1.0 / (d as f32).sqrt();
    let s_inter = 1.0 / (cfg.inter as f32).sqrt();
    for i in 0..cfg.layers {
        let p = format!("encoder.layer.{i}");
        for m in ["query", "key", "value"] {
            put(
                format!("{p}.attention.self.{m}.weight"),
                vec![d, d],
                2.0 * s_in,
                0.0,
                &mut rng,
            );
            put(
                format!("{p}.attention.self.{m}.bias"),
                vec![d],
                0.1,
                0.0,
                &mut rng,
            );
        }
        put(
            format!("{p}.attention.output.dense.weight"),
            vec![d, d],
            s_in,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.attention.output.dense.bias"),
            vec![d],
            0.1,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.attention.output.LayerNorm.weight"),
            vec![d],
            0.2,
            1.0,
            &mut rng,
        );
        put(
            format!("{p}.attention.output.LayerNorm.bias"),
            vec![d],
            0.1,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.intermediate.dense.weight"),
            vec![cfg.inter, d],
            s_in,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.intermediate.dense.bias"),
            vec![cfg.inter],
            0.1,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.output.dense.weight"),
            vec![d, cfg.inter],
            s_inter,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.output.dense.bias"),
            vec![d],
            0.1,
            0.0,
            &mut rng,
        );
        put(
            format!("{p}.output.LayerNorm.weight"),
            vec![d],
            0.2,
            1.0,
            &mut rng,
        );
        put(
            format!("{p}.output.LayerNorm.bias"),
            vec![d],
            0.1,
            0.0,
            &mut rng,
        );
    }
    if cfg.family == "mpnet" {
        w.remove("embeddings.token_type_embeddings.weight");
        let renamed: Weights = std::mem::take(&mut w)
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("encoder.layer.") {
                Some(rest) => {
                    let (i, name) = rest.split_once('.').unwrap();
                    (format!("encoder.layer.{i}.{}", cfg.layer_name(name)), v)
                }
                None => (k, v),
            })
            .collect();
        w = renamed;
        // large enough that the bias visibly changes attention
        let n = cfg.buckets * cfg.heads;
        let table = (0..n).map(|_| 2.0 * rng.uniform()).collect();
        w.insert(
            "encoder.relative_attention_bias.weight".into(),
            (vec![cfg.buckets, cfg.heads], table),
        );
    }
    w
}

/// Write a backbone directory (config.json + model.safetensors) for `cfg`
/// and `w`, names prefixed by `prefix` (e.g. "bert.").
pub fn write_backbone(dir: &Path, cfg: &TinyConfig, w: &Weights, prefix: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.inter,
        "hidden_act": cfg.act,
        "max_position_embeddings": cfg.max_pos,
        "type_vocab_size": cfg.types,
        "layer_norm_eps": cfg.eps,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1,
    });
    if cfg.family == "mpnet" {
        let c = config.as_object_mut().unwrap();
        c.remove("type_vocab_size");
        c.remove("position_embedding_type");
        c.insert("architectures".into(), serde_json::json!(["MPNetModel"]));
        c.insert("pad_token_id".into(), serde_json::json!(1));
        c.insert(
            "relative_attention_num_buckets".into(),
            serde_json::json!(cfg.buckets),
        );
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(k, (s, v))| {
            (
                format!("{prefix}{k}"),
                (s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (s, b))| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Random token ids: [CLS]=1 first, [SEP]=2 last, others in 3..vocab.
pub fn random_ids(rng: &mut Rng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| {
            if i == 0 {
                1
            } else if i == len - 1 {
                2
            } else {
                3 + rng.below(vocab as u32 - 3)
            }
        })
        .collect()
}

/// Write a WordLevel `tokenizer.json` for the tiny model: `[PAD]`=0,
/// `[CLS]`=1, `[SEP]`=2, `[UNK]`=3, then words `w4` .. `w{vocab-1}`; BERT
/// post-processing (`[CLS] A [SEP]`, pairs `[CLS] A [SEP] B [SEP]`).
pub fn write_tokenizer(dir: &Path, vocab: usize) {
    let mut v = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[CLS]", "[SEP]", "[UNK]"].iter().enumerate() {
        v.insert(t.to_string(), serde_json::json!(i));
    }
    for i in 4..vocab {
        v.insert(format!("w{i}"), serde_json::json!(i));
    }
    let special = |id: &str, type_id: u32| serde_json::json!({"SpecialToken": {"id": id, "type_id": type_id}});
    let seq =
        |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [
            {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 3, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]", 0), seq("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), seq("A", 0), special("[SEP]", 0), seq("B", 1), special("[SEP]", 1)],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": v, "unk_token": "[UNK]"}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tok).unwrap(),
    )
    .unwrap();
}

/// A complete tiny backbone directory: config, checkpoint, tokenizer and
/// `model.onnx` (exported by sherl). Returns the weights.
pub fn tiny_backbone(dir: &Path, cfg: &TinyConfig, seed: u64) -> Weights {
    let w = weights(cfg, seed);
    write_backbone(dir, cfg, &w, "");
    write_tokenizer(dir, cfg.vocab);
    let b = sherl::backbone::BackboneDir::open(dir).unwrap();
    let config = b.config().unwrap();
    let ckpt = sherl::backbone::Checkpoint::open(&b.safetensors_path()).unwrap();
    sherl::extract::onnx::export_backbone(&config, &ckpt, &b.onnx_path()).unwrap();
    w
}

/// A CSV dataset of `rows` random texts (1..=max_words words from the tiny
/// vocabulary), labels `a`/`b`/`c`, and a `group` column.
pub fn write_dataset(path: &Path, rows: usize, max_words: usize, vocab: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut s = String::from("text,label,group\n");
    for r in 0..rows {
        let n = 1 + rng.below(max_words as u32) as usize;
        let words: Vec<String> = (0..n)
            .map(|_| format!("w{}", 4 + rng.below(vocab as u32 - 4)))
            .collect();
        let label = ["a", "b", "c"][rng.below(3) as usize];
        s.push_str(&format!("{},{label},g{}\n", words.join(" "), r % 17));
    }
    std::fs::write(path, s).unwrap();
}
