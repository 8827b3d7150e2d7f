//! Extraction benchmark (see pipelines/bench-extract.sh). Being written.
fn main() {}
