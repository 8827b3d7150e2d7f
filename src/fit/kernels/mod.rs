//! The hand-written CPU kernels under the modules of [`super::nn`]: custom
//! candle ops with their own forward and backward passes, the matrix
//! products they run on, and the plumbing of their gradients.
//!
//! - [`gemm`]: matrix products on strided views of f32 slices (the `gemm`
//!   crate, or OpenBLAS loaded at run time);
//! - [`fused`]: the linear map, LayerNorm and masked mean as single ops;
//! - [`fused_layer`]: a whole BERT encoder layer as one op;
//! - [`direct_grads`]: weight gradients the fused layer hands to the
//!   training step past candle's gradient store;
//! - [`simd`]: whether the AVX2 builds of the hot loops may run.
//!
//! These files are long on purpose, and exempt from the limits the rest of
//! `src/` keeps (600 lines a file, 150 a function): each fused op's forward
//! and backward maths stays in one file, next to the tests that check it
//! against the composed candle ops and finite differences, so a change to
//! a formula and to its gradient is read and reviewed in one place.
//! `unsafe` is allowed in `gemm` (see its docs) and, in `fused_layer`,
//! at the two calls into the AVX2 builds of its passes.

pub mod direct_grads;
pub mod fused;
pub mod fused_layer;
pub mod gemm;
pub mod simd;
