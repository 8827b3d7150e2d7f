//! sherl's integration tests: one binary (ripgrep style), one module per topic.

// Tests write fixtures and read outputs with plain std::fs calls (clippy.toml
// forbids them in the library proper).
#![allow(clippy::disallowed_methods)]

mod cache;
mod checkpoint;
mod cli;
mod common;
mod data;
mod docs;
mod export;
mod export_image;
mod export_peft;
mod export_retrieval;
mod export_run;
mod export_side;
mod extract;
mod fit;
mod fuzz;
mod golden;
mod hardening;
mod hardening_data;
mod hardening_runs;
mod hardening_runtime;
mod hardening_sweep;
mod image_cache;
mod images;
mod layers;
mod methods;
mod mpnet;
mod peft;
mod predict;
mod predict_ux;
mod report;
mod retrieval;
mod runtime;
mod shape;
mod sweep;
mod tokenize;
mod vit;
