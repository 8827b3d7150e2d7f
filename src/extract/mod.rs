//! Phase one: running the frozen backbone over a dataset.
//!
//! Padded inputs and per-example rows at real tokens come from
//! [`crate::batching`], shared with training.

pub mod run;
