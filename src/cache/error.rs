//! The cache's errors, defined in the core error module
//! ([`crate::error::cache`]) so that `crate::Error` imports nothing from
//! this layer; re-exported here under their old path.

pub use crate::error::cache::{CacheError, MergeError};
