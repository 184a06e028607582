//! The crate's layers (issue 9): every `src/**/*.rs` may name, through `crate::`, only modules of
//! its own layer or of a layer below it. The order is read from the `//!` list in `src/lib.rs`,
//! so the documentation and the check cannot drift apart. A violation names file and line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Top-level module → layer number (0 = top), from lib.rs lines like "//! 2. `tcp` `udp`".
fn layers(lib: &str) -> HashMap<String, usize> {
    let mut map = HashMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! ") else {
            continue;
        };
        let Some((number, names)) = rest.split_once(". ") else {
            continue;
        };
        let Ok(rank) = number.trim().parse::<usize>() else {
            continue;
        };
        for name in names.split('`').skip(1).step_by(2) {
            map.insert(name.to_string(), rank);
        }
    }
    map
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a line names through `crate::` (also `use crate::{a, b::c}`).
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or `mycrate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push(name);
                        start = false;
                    }
                    _ => {}
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(name);
        }
    }
    found
}

#[test]
fn no_module_names_a_higher_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
    let rank = layers(&lib);
    assert!(
        rank.len() >= 5,
        "src/lib.rs lists no layers (lines like \"//! 2. `tcp` `udp`\"): {rank:?}"
    );
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(root).expect("under the crate");
        let top = rel
            .components()
            .nth(1)
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a module name");
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(&own) = rank.get(&top) else {
            violations.push(format!(
                "{}: module '{top}' is in no layer of src/lib.rs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for used in crate_paths(code) {
                match rank.get(&used) {
                    Some(&layer) if layer < own => violations.push(format!(
                        "{}:{}: '{top}' (layer {own}) uses crate::{used} (layer {layer}, above it)",
                        rel.display(),
                        n + 1
                    )),
                    None => violations.push(format!(
                        "{}:{}: crate::{used} is in no layer of src/lib.rs",
                        rel.display(),
                        n + 1
                    )),
                    _ => {}
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_path_reader_sees_every_form() {
    assert_eq!(crate_paths("use crate::tcp::pipe::Pair;"), ["tcp"]);
    assert_eq!(
        crate_paths("use crate::{config::{A, B}, reactor::End, sys};"),
        ["config", "reactor", "sys"]
    );
    assert_eq!(
        crate_paths("let x = crate::sys::io_reason(&e) + crate::reactor::after(a, b);"),
        ["sys", "reactor"]
    );
    assert!(crate_paths("$crate::x; mycrate::y").is_empty());
}
