//! sherl's integration tests: one binary (ripgrep style), one module per topic.

mod cache;
mod cli;
mod common;
mod data;
mod docs;
mod export;
mod extract;
mod fit;
mod fuzz;
mod golden;
mod hardening;
mod image_cache;
mod images;
mod layers;
mod methods;
mod mpnet;
mod peft;
mod predict;
mod report;
mod retrieval;
mod runtime;
mod shape;
mod sweep;
mod tokenize;
mod vit;
