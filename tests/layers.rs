//! The import-cycle check: layers only point down.
//!
//! It reads every `src/**/*.rs` file, collects the `crate::` paths the code names (comments
//! aside, grouped `use crate::{a, b::c}` imports included) and checks them against the layer
//! each file belongs to:
//!
//! - `sys` (the only nix/libc user) references nothing of the crate above it;
//! - `conn`, `timer` and `stats` reference at most `sys`;
//! - `tls` (rustls's side of TLS termination) references nothing of the crate;
//! - the engine (`server`) references only `sys`, `conn`, `timer`, `stats`, `tls` and itself:
//!   never the product (its configuration, router, metrics, app), the protocols built on it
//!   (`service`), the bench, the command line or `tune`.
//!
//! A module that is not listed (the product, bench, cli) may use anything below it; the rules
//! here are what keeps the engine usable without the product and the graph free of cycles.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// (layer, the top-level modules it may reference besides itself).
const RULES: &[(&str, &[&str])] = &[
    ("sys", &[]),
    ("conn", &["sys"]),
    ("timer", &["sys"]),
    ("stats", &["sys"]),
    ("tls", &[]),
    ("server", &["sys", "conn", "timer", "stats", "tls"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`server` for `src/server/shard/io.rs`).
fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The code without `//` comments (doc links are not imports) and `/* */` blocks.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every top-level module named by a `crate::` path in `code`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // `crate::{a::b, c}`: the first segment of each item at depth 0.
            let mut depth = 0;
            let mut item_start = true;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        refs.insert(ident(&group[k..]).to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(after);
            if !name.is_empty() {
                refs.insert(name.to_string());
            }
        }
        rest = after;
    }
    refs
}

#[test]
fn engine_layers_never_reference_what_is_above_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = BTreeSet::new();
    let mut violations = Vec::new();
    for file in &files {
        let layer = layer_of(&src, file);
        let Some((_, allowed)) = RULES.iter().find(|(l, _)| *l == layer) else {
            continue;
        };
        checked.insert(layer.clone());
        let code = code_only(&std::fs::read_to_string(file).expect("read a source file"));
        for r in crate_refs(&code) {
            if r != layer && !allowed.contains(&r.as_str()) {
                violations.push(format!(
                    "{} (layer `{layer}`) references `crate::{r}`",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    let expected: BTreeSet<String> = RULES.iter().map(|(l, _)| l.to_string()).collect();
    assert_eq!(checked, expected, "every engine layer was found and read");
    assert!(
        violations.is_empty(),
        "layers must only point down:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_reference_scanner_sees_grouped_imports_and_skips_comments() {
    let code = code_only(
        "use crate::{config::Config, server::{Server, Limits}};\n\
         // crate::bench in a comment\n\
         /* crate::cli in a block */ let x = crate::stats::Stats::new(1);\n\
         use crate::sys;",
    );
    let refs: Vec<String> = crate_refs(&code).into_iter().collect();
    assert_eq!(refs, ["config", "server", "stats", "sys"]);
}
