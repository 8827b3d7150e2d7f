//! The library's layering (docs/architecture.md, "Layers"), checked on the source: every
//! `crate::` path in `src/` (outside comments) names a module of the same
//! layer or a lower one, and modules of one layer never reach into each
//! other (the two phases stay apart; `predict`, the layer above both,
//! composes them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layer of each top-level module, lowest first.
fn layer(module: &str) -> Option<(u8, &'static str)> {
    Some(match module {
        "base" | "error" | "data" | "backbone" | "batching" | "rng" | "hash" | "le" | "fsutil"
        | "assets" | "Error" | "Result" | "EXIT_BUSY" => (0, "core"),
        "cache" => (1, "cache"),
        "extract" => (2, "extract"),
        "fit" => (2, "fit"),
        "predict" => (3, "predict"),
        "report" => (3, "report"),
        "cli" => (4, "cli"),
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level modules named after `crate::`, including inside `crate::{..}`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // top-level names of a (possibly nested, multi-line) group
            let (mut depth, mut name, mut expect_name) = (1, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect_name = true,
                    c if depth == 1 && expect_name && (c.is_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    _ if depth == 1 && !name.is_empty() => {
                        found.insert(std::mem::take(&mut name));
                        expect_name = false;
                    }
                    _ => {}
                }
            }
            if !name.is_empty() {
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

#[test]
fn no_import_runs_upward_and_the_phases_stay_apart() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        if top == "bin" || top == "lib" {
            continue;
        }
        let (own, own_name) = layer(top).unwrap_or_else(|| panic!("{}: no layer", rel.display()));
        let code: String = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for target in crate_paths(&code) {
            let (to, to_name) = layer(&target)
                .unwrap_or_else(|| panic!("{}: crate::{target} has no layer", rel.display()));
            checked += 1;
            let sideways = own == to && own_name != to_name;
            if to > own || sideways {
                wrong.push(format!(
                    "{} ({own_name}) -> crate::{target} ({to_name})",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} crate:: paths found: is the scan broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_grouped_and_nested_paths() {
    let code = "use crate::{cache::{Cache, X}, fit::Y};\nlet a = crate::report::z();";
    let names: Vec<String> = crate_paths(code).into_iter().collect();
    assert_eq!(names, ["cache", "fit", "report"]);
}
