//! ONNX models: a protobuf subset ([`proto`]), the BERT exporter
//! ([`export`]), tools for models users bring ([`inspect`], [`edit`]), and
//! the weights of a DINOv2 ViT read from its initializers ([`vit`]).
//!
//! The contract with extraction is the output naming: a backbone graph takes
//! int64 `input_ids`, `attention_mask` and optionally `token_type_ids`
//! (`[batch, seq]`) and returns float32 `hidden_states.i` (`[batch, seq,
//! hidden]`), where `i` follows Hugging Face's convention (0 = embedding
//! output, `i` = after transformer layer `i`).

pub mod builder;
pub mod edit;
pub mod export;
pub mod inspect;
pub mod proto;
pub mod vit;

pub use export::{export_backbone, hidden_state_name, ExportSummary};
