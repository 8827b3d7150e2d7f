//! `sherl-fit export` of sherl and unipt runs: parity with `sherl-fit predict`.
