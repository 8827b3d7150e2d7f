//! `sherl-fit export` of image runs: parity with `sherl-fit predict`.
