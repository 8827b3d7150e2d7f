//! `sherl-fit run --task retrieval`: image-text retrieval with two frozen
//! towers (an image cache and a caption cache), each adapted by its own
//! method, projected to a joint space and trained with a contrastive loss
//! (`docs/retrieval.md`).
//!
//! - [`recall`]: Recall@1/5/10 both ways and rsum from one similarity
//!   matrix (pessimistic ties, several captions per image).
//! - [`loss`]: symmetric InfoNCE with a learnable temperature and the
//!   VSE++ max-violation hinge, as candle ops.
//! - [`join`]: the two caches joined by id, split by split, refusing the
//!   first mismatch.
//! - [`config`]: the towers, the joint width, the loss; `--task` and the
//!   retrieval flags.
//! - [`tower`]: one tower (its cache, model, cached-example reader and
//!   embeddings) and both towers' weights as one file.
//! - [`train`]: the run, a task of [`crate::fit::trainer`]: both towers
//!   trained together, Recall@K on valid every epoch, the best epoch by
//!   valid rsum scored on test.
//! - [`examples`]: `examples.json`, a few test queries with their top
//!   images.
//! - [`tables`]: image files and captions by id, from the tables the
//!   caches were extracted from.

pub mod config;
pub mod examples;
pub mod join;
pub mod loss;
pub mod recall;
pub mod tables;
pub mod tower;
pub mod train;
