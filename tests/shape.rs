//! The source's shape, checked on the files (docs/architecture.md, "Sizes
//! and circles"): no two files of `src/` import each other, directly or
//! round a loop; no file over 600 lines and no function over 150 lines
//! outside the CPU kernels (`src/fit/kernels/`, long on purpose: one fused
//! forward/backward per file keeps the maths in one place); no binary over
//! 450 lines (the binaries parse flags and dispatch; the work is in the
//! library).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_BIN_LINES: usize = 450;
const MAX_FN_LINES: usize = 150;
const KERNELS: &str = "fit/kernels/";

/// Every `.rs` file under `dir`, as paths relative to `root` with `/`.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap();
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources() -> BTreeMap<String, String> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    files
        .into_iter()
        .map(|f| {
            let code = std::fs::read_to_string(src.join(&f)).unwrap();
            (f, code)
        })
        .collect()
}

/// The module path of a file: `a/b.rs` and `a/b/mod.rs` are `a::b`.
fn module_of(file: &str) -> Vec<String> {
    let stem = file.trim_end_matches(".rs");
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod") || parts == ["lib"] {
        parts.pop();
    }
    parts
}

/// Code without `//` comment lines.
fn code_only(code: &str) -> String {
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths of a use tree such as `a::{b, c::{d, e as f}}`, each as
/// segments (`self` and renames dropped).
fn expand(prefix: &[String], tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let mut path = prefix.to_vec();
        let tree = tree.split(" as ").next().unwrap_or("");
        path.extend(
            tree.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
                .map(str::to_owned),
        );
        return vec![path];
    };
    let mut head = prefix.to_vec();
    head.extend(
        tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    );
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut items, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            items.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| expand(&head, i))
        .collect()
}

/// The path trees after `crate::` or a run of `super::` in `code`: the
/// prefix to resolve them from and the tree text.
fn path_trees(code: &str, module: &[String], is_mod_rs: bool) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut at = 0;
    while at < code.len() {
        let rest = &code[at..];
        let (base, len) = if rest.starts_with("crate::") && (at == 0 || !ident(bytes[at - 1])) {
            (Vec::new(), "crate::".len())
        } else if rest.starts_with("super::") && (at == 0 || !ident(bytes[at - 1])) {
            let mut n = 0;
            let mut r = rest;
            while let Some(t) = r.strip_prefix("super::") {
                n += 1;
                r = t;
            }
            // In `a/b.rs` (module a::b) and in `a/b/mod.rs` alike, `super`
            // is the parent of the file's own module.
            let _ = is_mod_rs;
            let keep = module.len().saturating_sub(n);
            (module[..keep].to_vec(), rest.len() - r.len())
        } else {
            at += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        // The tree: identifiers and `::`, or one balanced `{...}` group.
        let tail = &rest[len..];
        let mut end = 0;
        let mut depth = 0;
        for (i, c) in tail.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                c if depth > 0 || c.is_alphanumeric() || c == '_' || c == ':' => {}
                _ => {
                    end = i;
                    break;
                }
            }
            end = i + c.len_utf8();
        }
        out.push((base, tail[..end].trim_end_matches(':').to_owned()));
        at += len + end.max(1);
    }
    out
}

/// File-to-file imports: each file's `crate::` and `super::` paths
/// resolved to the deepest module file they name (the core modules, which
/// the crate root re-exports, by their place under `base/`).
fn import_graph(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_module: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for f in files.keys().filter(|f| !f.starts_with("bin/")) {
        by_module.insert(module_of(f), f.clone());
    }
    let reexported: BTreeSet<String> = by_module
        .keys()
        .filter(|m| m.len() == 2 && m[0] == "base")
        .map(|m| m[1].clone())
        .collect();
    let resolve = |path: &[String]| -> Option<String> {
        let mut path = path.to_vec();
        if path.first().is_some_and(|p| reexported.contains(p)) {
            path.insert(0, "base".into());
        }
        (1..=path.len())
            .rev()
            .find_map(|n| by_module.get(&path[..n]).cloned())
    };
    let mut graph = BTreeMap::new();
    for (file, code) in files.iter().filter(|(f, _)| !f.starts_with("bin/")) {
        let module = module_of(file);
        let mut to = BTreeSet::new();
        for (base, tree) in path_trees(&code_only(code), &module, file.ends_with("mod.rs")) {
            for path in expand(&base, &tree) {
                if let Some(target) = resolve(&path) {
                    if &target != file && target != "lib.rs" {
                        to.insert(target);
                    }
                }
            }
        }
        graph.insert(file.clone(), to);
    }
    graph
}

/// The groups of files that import each other round a loop (strongly
/// connected components of more than one file).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability by depth-first search from every file: small graphs.
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(f) = stack.pop() {
            for t in graph.get(&f).into_iter().flatten() {
                if seen.insert(t.clone()) {
                    stack.push(t.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|f| (f, reach(f))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for f in graph.keys() {
        if done.contains(f) || !reaches[f].contains(f) {
            continue;
        }
        let group: Vec<String> = reaches[f]
            .iter()
            .filter(|g| reaches[*g].contains(f))
            .cloned()
            .collect();
        done.extend(group.iter().cloned());
        out.push(group);
    }
    out
}

#[test]
fn no_two_files_import_each_other() {
    let files = sources();
    let graph = import_graph(&files);
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    assert!(
        edges > 300,
        "only {edges} imports found: is the scan broken?"
    );
    let found = circles(&graph);
    assert!(
        found.is_empty(),
        "files that import each other (round a loop):\n{}",
        found
            .iter()
            .map(|g| g.join(" -> "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_scan_finds_a_circle_and_resolves_paths() {
    let files: BTreeMap<String, String> = [
        ("lib.rs", "pub mod base; pub mod a;"),
        ("base/mod.rs", "pub mod data;"),
        ("base/data.rs", "pub struct D;"),
        ("a/mod.rs", "pub mod x; pub mod y;"),
        ("a/x.rs", "use super::y::Y;\nuse crate::{data::D, a::x};"),
        ("a/y.rs", "pub struct Y;\nfn f() { crate::a::x::g(); }"),
    ]
    .into_iter()
    .map(|(f, c)| (f.to_owned(), c.to_owned()))
    .collect();
    let graph = import_graph(&files);
    assert_eq!(
        graph["a/x.rs"],
        ["a/y.rs", "base/data.rs"].map(String::from).into()
    );
    assert_eq!(
        circles(&graph),
        vec![vec!["a/x.rs".to_owned(), "a/y.rs".to_owned()]]
    );
}

/// Functions longer than `max` lines in `code`: name, first line, length.
/// A function runs from its `fn` line to the first line that closes it at
/// the same indentation.
fn long_functions(code: &str, max: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let decl = trimmed
            .strip_prefix("pub ")
            .or_else(|| {
                trimmed
                    .strip_prefix("pub(")
                    .and_then(|r| r.split_once(") ").map(|(_, r)| r))
            })
            .unwrap_or(trimmed);
        let decl = decl.strip_prefix("const ").unwrap_or(decl);
        let decl = decl.strip_prefix("unsafe ").unwrap_or(decl);
        let Some(rest) = decl.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let opens = line.matches('{').count();
        if line.trim_end().ends_with(';') || (opens > 0 && opens == line.matches('}').count()) {
            // a declaration, or a body on one line
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = (i + 1..lines.len()).find(|&j| lines[j].starts_with(&close)) {
            let len = end - i + 1;
            if len > max {
                out.push((name, i + 1, len));
            }
        }
    }
    out
}

#[test]
fn files_functions_and_binaries_stay_small() {
    let mut wrong = Vec::new();
    for (file, code) in sources() {
        if file.starts_with(KERNELS) {
            continue;
        }
        let lines = code.lines().count();
        let max = if file.starts_with("bin/") {
            MAX_BIN_LINES
        } else {
            MAX_FILE_LINES
        };
        if lines > max {
            wrong.push(format!("src/{file}: {lines} lines (at most {max})"));
        }
        for (name, at, len) in long_functions(&code, MAX_FN_LINES) {
            wrong.push(format!(
                "src/{file}:{at}: fn {name} is {len} lines (at most {MAX_FN_LINES})"
            ));
        }
    }
    assert!(wrong.is_empty(), "too long:\n{}", wrong.join("\n"));
}

#[test]
fn the_function_scan_measures_from_fn_to_its_brace() {
    let mut code = String::from("impl X {\n    pub(crate) fn long(&self) {\n");
    code.push_str(&"        let a = 1;\n".repeat(160));
    code.push_str("    }\n    fn short() {}\n    fn two() {\n    }\n}\nfn decl();\n");
    assert_eq!(
        long_functions(&code, 150),
        vec![("long".to_owned(), 2, 162)]
    );
    assert!(long_functions(&code, 162).is_empty());
}
