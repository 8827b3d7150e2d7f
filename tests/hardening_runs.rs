//! Hardening, second round (issue 28): run files (config.json, summary.json, metrics.jsonl, --config) are bounded and checked.
