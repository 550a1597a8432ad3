//! The crate's shape, checked by `cargo xtask lint` (issue 15):
//! - the pure layers (`portguard/src/policy`, `portguard/src/apply`) import
//!   neither aya, tokio nor libc;
//! - `portguard/src/kernel` is the only part of the agent that names aya;
//! - no source file under `portguard/src` or `tests/src` is longer than
//!   [`MAX_LINES`] lines, except `tests.rs` files that hold only unit tests.

use std::path::{Path, PathBuf};

/// The longest a source file may be.
pub const MAX_LINES: usize = 600;

/// Crates the pure layers must not use.
const FORBIDDEN: [&str; 3] = ["aya", "tokio", "libc"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of `text` that use a forbidden crate: `use aya...`, `aya::...`
/// and the like (comments skipped).
pub fn forbidden_uses(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        for krate in FORBIDDEN {
            let used = code
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .any(|tok| {
                    tok == krate
                        || tok.starts_with(&format!("{krate}::"))
                        || tok.starts_with(&format!("::{krate}::"))
                });
            if used && (code.contains("use ") || code.contains(&format!("{krate}::"))) {
                out.push((i + 1, line.trim().to_owned()));
            }
        }
    }
    out
}

/// Every violation under the workspace at `root`, one line each.
pub fn violations(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for pure in ["portguard/src/policy", "portguard/src/apply"] {
        let mut files = Vec::new();
        rust_files(&root.join(pure), &mut files);
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for (line, code) in forbidden_uses(&text) {
                out.push(format!(
                    "{}:{line}: the pure layer uses {code:?} (policy/ and apply/ import neither aya, \
                     tokio nor libc)",
                    f.strip_prefix(root).unwrap_or(&f).display()
                ));
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&root.join("portguard/src"), &mut files);
    files.sort();
    for f in files {
        if f.starts_with(root.join("portguard/src/kernel")) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (line, code) in forbidden_uses(&text) {
            if code.contains("aya") {
                out.push(format!(
                    "{}:{line}: names aya ({code:?}); only portguard/src/kernel may",
                    f.strip_prefix(root).unwrap_or(&f).display()
                ));
            }
        }
    }
    for tree in ["portguard/src", "tests/src"] {
        let mut files = Vec::new();
        rust_files(&root.join(tree), &mut files);
        files.sort();
        for f in files {
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let lines = std::fs::read_to_string(&f)
                .unwrap_or_default()
                .lines()
                .count();
            if lines > MAX_LINES {
                out.push(format!(
                    "{}: {lines} lines (at most {MAX_LINES}; split it by concern, unit tests may \
                     sit in a sibling tests.rs)",
                    f.strip_prefix(root).unwrap_or(&f).display()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_crates_are_found_in_code_not_in_comments() {
        let text = "use aya::maps::Array;\n// aya:: in a comment\nlet x = libc::getpid();\nuse tokio;\nuse crate::policy::Mode; // not tokio::\nlet libcx = 1;\n";
        let found: Vec<usize> = forbidden_uses(text).into_iter().map(|(l, _)| l).collect();
        assert_eq!(found, vec![1, 3, 4]);
    }

    /// The checked-in tree holds the rules (fails if a file grows past the
    /// limit or a pure layer imports aya, tokio or libc).
    #[test]
    fn the_workspace_keeps_its_shape() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let v = violations(&root);
        assert!(v.is_empty(), "{}", v.join("\n"));
    }
}
