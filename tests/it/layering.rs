//! The layering ARCHITECTURE.md's "may use" column states, checked on the source: a module that
//! starts reaching past its door fails here, naming the file, the line and the rule.
//!
//! Also the size rule: a file in `src/` longer than 400 lines (its unit tests aside) says why on
//! a `//! Longer than 400 lines: …` line in its module documentation.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a file, unit tests aside: everything before its `#[cfg(test)]` module, with line
/// comments dropped so prose may name what code must not.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).expect("read a source file");
    text.lines()
        .enumerate()
        .take_while(|(_, l)| !l.starts_with("#[cfg(test)]"))
        .map(|(i, l)| {
            let code = match l.find("//") {
                Some(at) => &l[..at],
                None => l,
            };
            (i + 1, code.to_owned())
        })
        .collect()
}

/// Files under `under` (a path inside `src/`) that use any of `forbidden`.
fn violations(under: &str, forbidden: &[&str]) -> Vec<String> {
    let root = src().join(under);
    let mut files = Vec::new();
    if root.is_dir() {
        rust_files(&root, &mut files);
    } else {
        files.push(root);
    }
    let mut found = Vec::new();
    for f in files {
        for (n, line) in code_lines(&f) {
            for word in forbidden {
                if line.contains(word) {
                    let rel = f.strip_prefix(src()).unwrap_or(&f).display().to_string();
                    found.push(format!("src/{rel}:{n} uses `{word}`: {}", line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn workers_and_http_reach_data_and_upstream_only_through_relay() {
    let forbidden = [
        "crate::storage",
        "crate::upstream",
        "relay.store",
        "relay.upstream",
        ".store()",
        "sqlx",
    ];
    let mut found = violations("workers", &forbidden);
    found.extend(violations("http", &forbidden));
    found.extend(violations("resource.rs", &["crate::storage", "sqlx"]));
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_domain_does_no_io_and_imports_nothing_above_it() {
    let found = violations(
        "domain",
        &[
            "axum",
            "sqlx",
            "reqwest",
            "tokio",
            "hyper",
            "std::fs",
            "TcpStream",
            "UdpSocket",
            "crate::service",
            "crate::storage",
            "crate::http",
            "crate::workers",
            "crate::upstream",
            "crate::app",
            "crate::cli",
            "crate::config",
            "crate::simulator",
            "crate::resource",
        ],
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn storage_and_upstream_do_not_import_the_layers_above() {
    let above = [
        "crate::service",
        "crate::http",
        "crate::workers",
        "crate::app",
        "crate::cli",
        "crate::resource",
    ];
    let mut found = violations("storage", &above);
    found.extend(violations("upstream", &above));
    found.extend(violations(
        "service",
        &["crate::http", "crate::workers", "axum"],
    ));
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn a_file_over_400_lines_says_why_at_its_top() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found = Vec::new();
    for f in files {
        let code = code_lines(&f).len();
        if code <= 400 {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read a source file");
        let says_why = text
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .any(|l| l.starts_with("//! Longer than 400 lines: "));
        if !says_why {
            let rel = f.strip_prefix(src()).unwrap_or(&f).display().to_string();
            found.push(format!(
                "src/{rel}: {code} lines of code and no reason at its top"
            ));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
