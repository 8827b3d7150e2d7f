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
//! - [`train`]: the run: both towers trained together, Recall@K on valid
//!   every epoch, the best epoch by valid rsum scored on test.
//! - [`tables`]: image files and captions by id, from the tables the
//!   caches were extracted from.

pub mod config;
pub mod join;
pub mod loss;
pub mod recall;
pub mod tables;
pub mod train;
