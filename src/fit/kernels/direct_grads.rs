//! Weight gradients that a fused op hands to the training step directly,
//! past candle's gradient store.
//!
//! candle's backward pass adds every gradient an op returns into the
//! store's entry for that argument, creating the entry as a tensor of zeros
//! first: `zeros_like`, then `add` into a new tensor. For a trained BERT
//! layer's packed weights (1.8 M values for MiniLM) that sum with zero costs
//! 2.2-2.7 ms per step and part on the development machine (measured in
//! isolation), about 6 % of a late-layer step. While a [`Collector`] is
//! active on a thread, the fused layer op ([`super::fused_layer`]) gives
//! the gradient of a weight *variable* to it instead of returning it; the
//! training step takes what was collected right after `backward`, adds the
//! parts of a batch in place ([`Collected::add`]) and puts the sums into the
//! store ([`Collected::merge_into`]). The values are the same either way
//! (a gradient plus zero is itself; parts are summed in the same order).
//! Without a collector (tests, evaluation, retrieval training) the op
//! returns its gradients to candle as usual.

use std::cell::RefCell;
use std::marker::PhantomData;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::fit::error::FitError;
use crate::Result;

type Grads = Vec<(Tensor, Vec<f32>)>;

thread_local! {
    static ACTIVE: RefCell<Option<Grads>> = const { RefCell::new(None) };
}

/// Adds `grad` to the entry of `w` in `list`, or makes one.
fn add_to(list: &mut Grads, w: Tensor, grad: Vec<f32>) -> Result<()> {
    match list.iter_mut().find(|(t, _)| t.id() == w.id()) {
        Some((_, acc)) if acc.len() == grad.len() => {
            for (a, g) in acc.iter_mut().zip(&grad) {
                *a += g;
            }
            Ok(())
        }
        Some((_, acc)) => Err(FitError::model(format!(
            "two gradients of one weight tensor differ in size ({} and {} values)",
            acc.len(),
            grad.len()
        ))),
        None => {
            list.push((w, grad));
            Ok(())
        }
    }
}

/// Collects fused ops' weight gradients on this thread while it lives
/// (not `Send`: the backward pass runs on the thread that started it).
#[must_use = "a collector collects only while it lives"]
pub struct Collector {
    _this_thread: PhantomData<*const ()>,
}

impl Collector {
    /// Start collecting on this thread (dropping what an earlier collector
    /// left).
    pub fn start() -> Collector {
        ACTIVE.with(|a| *a.borrow_mut() = Some(Vec::new()));
        Collector {
            _this_thread: PhantomData,
        }
    }

    /// Stop collecting and take the gradients.
    pub fn finish(self) -> Result<Collected> {
        let taken = ACTIVE.with(|a| a.borrow_mut().take());
        taken.map(Collected).ok_or_else(|| {
            FitError::model("gradient collector ended twice on one thread".to_string())
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().take());
    }
}

/// Offered by an op in its backward pass: the gradient of its argument
/// `w`. Kept (and `Ok(None)` returned) when `w` is a variable and a
/// collector is active on this thread; else given back for candle's store.
pub(crate) fn offer(w: &Tensor, grad: Vec<f32>) -> candle_core::Result<Option<Vec<f32>>> {
    if !w.is_variable() {
        return Ok(Some(grad));
    }
    ACTIVE.with(|a| match a.borrow_mut().as_mut() {
        Some(list) => add_to(list, w.clone(), grad)
            .map(|()| None)
            .map_err(|e| candle_core::Error::Msg(e.to_string())),
        None => Ok(Some(grad)),
    })
}

/// Weight gradients taken by a [`Collector`].
#[derive(Default)]
pub struct Collected(Grads);

impl Collected {
    /// Add `other`'s gradients into these (the parts of one batch).
    pub fn add(&mut self, other: Collected) -> Result<()> {
        for (w, g) in other.0 {
            add_to(&mut self.0, w, g)?;
        }
        Ok(())
    }

    /// Put the gradients into `grads` (added to an entry already there).
    pub fn merge_into(self, grads: &mut GradStore) -> Result<()> {
        for (w, g) in self.0 {
            let g = Tensor::from_vec(g, w.shape(), w.device())?;
            let sum = match grads.get(&w) {
                Some(e) => (e + &g)?,
                None => g,
            };
            grads.insert(&w, sum);
        }
        Ok(())
    }

    /// Whether nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
