//! The classification head: pool the final sequence, then a fresh linear
//! layer to the classes.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::ops::masked_mean;
use super::{Builder, Linear};
use crate::Result;

/// Pooling of the final sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The first (`[CLS]`) token.
    Cls,
    /// Mean over real tokens (on an image cache: the CLS token and the
    /// patch tokens).
    Mean,
    /// Mean over the patch tokens alone, the CLS token left out: image
    /// caches whose backbone has a CLS token only (refused on text caches).
    #[serde(rename = "patch-mean")]
    PatchMean,
}

/// The pooling and sizes of a [`Head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadConfig {
    /// Pooling of the final sequence.
    pub pool: Pool,
    /// Width `d` of the final sequence.
    pub d: usize,
    /// Number of classes.
    pub classes: usize,
}

/// Pooling and `Linear(d -> classes)`.
#[derive(Debug, Clone)]
pub struct Head {
    pool: Pool,
    linear: Linear,
}

impl super::Detach for Head {
    fn detached(&self) -> Self {
        Head {
            pool: self.pool,
            linear: self.linear.detached(),
        }
    }
}

impl Head {
    /// A fresh head under `vb`'s prefix (`head`), its linear layer's
    /// `weight` and `bias` directly there.
    pub fn load(vb: Builder, cfg: &HeadConfig) -> Result<Self> {
        Ok(Head {
            pool: cfg.pool,
            linear: Linear::fresh(vb, cfg.d, cfg.classes)?,
        })
    }

    /// # Shapes
    /// `y` `[B, S, d]`, `mask` `[B, S]` -> logits `[B, classes]`.
    pub fn forward(&self, y: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.linear.forward(&self.pool(y, mask)?)
    }

    /// The pooling alone: `y` `[B, S, d]`, `mask` `[B, S]` -> `[B, d]`.
    pub fn pool(&self, y: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(match self.pool {
            Pool::Cls => y.narrow(1, 0, 1)?.squeeze(1)?,
            Pool::Mean => masked_mean(y, mask)?,
            Pool::PatchMean => {
                let n = y.dim(1)?.saturating_sub(1);
                masked_mean(&y.narrow(1, 1, n)?, &mask.narrow(1, 1, n)?)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Pooled features of `y` (`[1, 3, 1]`, all tokens real) through a
    /// head whose linear layer is the identity.
    fn pooled(pool: Pool) -> f32 {
        let dev = Device::Cpu;
        let head = Head {
            pool,
            linear: Linear {
                weight: Tensor::new(&[[1f32]], &dev).unwrap(),
                bias: Tensor::new(&[0f32], &dev).unwrap(),
            },
        };
        let y = Tensor::new(&[[[10f32], [1.0], [3.0]]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0, 1.0]], &dev).unwrap();
        head.forward(&y, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn pools_cls_mean_and_patch_mean() {
        assert_eq!(pooled(Pool::Cls), 10.0);
        assert!((pooled(Pool::Mean) - 14.0 / 3.0).abs() < 1e-6);
        assert_eq!(pooled(Pool::PatchMean), 2.0);
    }
}
