//! The errors of extraction, defined in the core error module
//! ([`crate::error::extract`]) so that `crate::Error` imports nothing from
//! this layer; re-exported here under their old path.

pub use crate::error::extract::ExtractError;
