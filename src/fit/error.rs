//! The errors of training, defined in the core error module
//! ([`crate::error::fit`]) so that `crate::Error` imports nothing from this
//! layer; re-exported here under their old path.

pub use crate::error::fit::FitError;
