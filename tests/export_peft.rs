//! `sherl-fit export` of adapter and lst runs: parity with `sherl-fit predict`.
