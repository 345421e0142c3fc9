//! The tree's dependencies run one way: no file of `src/` reaches itself through the modules it
//! names, the hand-written ops (`src/ops/`) lean only on each other and on the readable
//! reference (`norm/functional.rs`, `norm/epilogue.rs`), and the reference leans on nothing of
//! bnlab's. Read from the sources: every `crate::`, `super::` and `self::` path outside test
//! modules, resolved to the file of the longest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `src/lib.rs` is the root, "".
fn module_of(file: &Path, src: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source before its first `#[cfg(test)]`, without comments.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module paths a file names, made absolute (`crate::` dropped), one per path segment run:
/// `use crate::a::{b, c::d}` gives `a::b` and `a::c::d`.
fn named_paths(code: &str, module: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let starts = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|s| bytes[i..].starts_with(s.as_bytes()) && (i == 0 || !is_ident(bytes[i - 1])));
        let Some(start) = starts else {
            i += 1;
            continue;
        };
        // The base the path is relative to.
        let mut base: Vec<&str> = match start {
            "crate::" => Vec::new(),
            _ => module.split("::").filter(|s| !s.is_empty()).collect(),
        };
        let mut j = i + start.len();
        if start == "super::" {
            base.pop();
            while bytes[j..].starts_with(b"super::") {
                base.pop();
                j += "super::".len();
            }
        }
        let prefix = base.join("::");
        expand(&code[j..], &prefix, &mut paths);
        i = j;
    }
    paths
}

/// Expands `a::b::{c, d::e}` after `prefix` into full paths (only as far as identifiers go).
fn expand(rest: &str, prefix: &str, out: &mut Vec<String>) {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_string()
        } else {
            format!("{p}::{s}")
        }
    };
    let mut path = prefix.to_string();
    let mut chars = rest.char_indices().peekable();
    let mut ident = String::new();
    while let Some((k, c)) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            ident.push(c);
            continue;
        }
        if c == ':' && rest[k..].starts_with("::") {
            chars.next();
            path = join(&path, &ident);
            ident.clear();
            if rest[k + 2..].starts_with('{') {
                // A group: split at top-level commas.
                let body = &rest[k + 3..];
                let (mut depth, mut from) = (0, 0);
                for (m, ch) in body.char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            expand(body[from..m].trim(), &path, out);
                            return;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            expand(body[from..m].trim(), &path, out);
                            from = m + 1;
                        }
                        _ => {}
                    }
                }
                return;
            }
            continue;
        }
        break;
    }
    out.push(join(&path, &ident));
}

/// The file of the longest module among `modules` that `path` names.
fn file_for<'a>(path: &str, modules: &'a BTreeMap<String, String>) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .find_map(|n| modules.get(&parts[..n].join("::")))
}

fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let display = |f: &Path| f.strip_prefix(&src).unwrap().display().to_string();
    let modules: BTreeMap<String, String> = files
        .iter()
        .filter(|f| !f.ends_with("main.rs") && !f.starts_with(src.join("cli")))
        .map(|f| (module_of(f, &src), display(f)))
        .collect();
    let mut graph = BTreeMap::new();
    for file in files
        .iter()
        .filter(|f| !f.ends_with("main.rs") && !f.starts_with(src.join("cli")))
    {
        let module = module_of(file, &src);
        let code = code_of(&std::fs::read_to_string(file).expect("readable"));
        let deps: BTreeSet<String> = named_paths(&code, &module)
            .iter()
            .filter_map(|p| file_for(p, &modules))
            .filter(|f| **f != display(file))
            .cloned()
            .collect();
        graph.insert(display(file), deps);
    }
    graph
}

/// A cycle through `node`, if there is one.
fn cycle_from(
    node: &str,
    graph: &BTreeMap<String, BTreeSet<String>>,
    stack: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = stack.iter().position(|n| n == node) {
        let mut cycle = stack[at..].to_vec();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    stack.push(node.to_string());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(c) = cycle_from(next, graph, stack, done) {
            return Some(c);
        }
    }
    stack.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn the_parser_resolves_nested_groups_and_super() {
    let paths = named_paths(
        "use crate::a::{b, c::{d, e}};\nuse super::f::G;\nlet x = crate::h::i(1);",
        "x::y",
    );
    assert_eq!(paths, ["a::b", "a::c::d", "a::c::e", "x::f::G", "h::i"]);
}

#[test]
fn no_file_of_src_depends_on_itself_through_others() {
    let graph = dependency_graph();
    assert!(graph.len() > 20, "found only {} files", graph.len());
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = cycle_from(node, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn fast_ops_lean_only_on_each_other_and_the_reference() {
    let graph = dependency_graph();
    let reference = ["norm/functional.rs", "norm/epilogue.rs"];
    for (file, deps) in &graph {
        if reference.contains(&file.as_str()) {
            assert!(deps.is_empty(), "the reference {file} depends on {deps:?}");
        }
        if file.starts_with("ops/") {
            for dep in deps {
                assert!(
                    dep.starts_with("ops/") || reference.contains(&dep.as_str()),
                    "{file} depends on {dep}, outside ops/ and the reference"
                );
            }
        }
    }
    assert!(graph.keys().any(|f| f.starts_with("ops/batch_norm/")));
}
