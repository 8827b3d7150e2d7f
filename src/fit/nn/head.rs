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
    /// Mean over real tokens.
    Mean,
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
    /// A fresh head named `name` (`head`) from width `d` to `classes`.
    pub fn load(
        vb: &mut Builder,
        name: &str,
        pool: Pool,
        d: usize,
        classes: usize,
    ) -> Result<Self> {
        Ok(Head {
            pool,
            linear: vb.fresh_linear(name, d, classes)?,
        })
    }

    /// # Shapes
    /// `y` `[B, S, d]`, `mask` `[B, S]` -> logits `[B, classes]`.
    pub fn forward(&self, y: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let pooled = match self.pool {
            Pool::Cls => y.narrow(1, 0, 1)?.squeeze(1)?,
            Pool::Mean => masked_mean(y, mask)?,
        };
        self.linear.forward(&pooled)
    }
}
