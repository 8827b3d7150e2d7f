//! Phase one: running the frozen backbone over a dataset.
//!
//! [`batch`] turns tokenized examples into padded ONNX Runtime inputs and
//! back into per-example hidden states at real tokens only.

pub mod batch;
pub mod run;
