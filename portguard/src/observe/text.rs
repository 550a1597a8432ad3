//! Text for terminals and log lines: [`escape`] makes an untrusted string
//! (a cgroup, unit or pod name a tenant chose) safe to print, so it cannot
//! repaint the operator's terminal (ESC sequences), forge a log line (a
//! newline), hide text (bidi overrides) or break a table's columns (a tab).
//!
//! It lives in `observe/` because everything that prints for humans sits at
//! or above it: the `events` and `status` renderers in `cli/` and
//! `observe::status`, and the process's logger (`main.rs`), which escapes
//! every agent log line once, so no `warn!` in `agent/` or `workload/` can
//! forget. JSON output needs none of this (serde escapes control
//! characters).

use std::{borrow::Cow, fmt::Write as _};

/// Whether `c` is printed as an escape: C0 controls, DEL, C1 controls
/// (U+0080..U+009F, NEL U+0085 among them), the Unicode line and paragraph
/// separators, and the bidirectional formatting characters (the marks,
/// embeddings, overrides and isolates that make text read differently from
/// what it is: "Trojan Source", CVE-2021-42574).
fn needs_escape(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{2028}' | '\u{2029}'
        | '\u{061c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every backslash doubled and every character [`needs_escape`]
/// picks written as an escape: `\n`, `\r`, `\t`, `\xNN` for the other
/// ASCII controls (`\x1b` for ESC, `\x7f` for DEL) and `\u{NNNN}` for the
/// rest. Unambiguous: a backslash in the output always starts an escape, so
/// the original can be read back. Borrowed when nothing needs escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in [
            "",
            "/kubepods/besteffort/pod1234",
            "nginx.service",
            "ünïcødé ✓",
        ] {
            assert!(matches!(escape(s), std::borrow::Cow::Borrowed(_)), "{s}");
            assert_eq!(escape(s), s);
        }
    }

    #[test]
    fn terminal_and_line_controls_are_escaped() {
        for (raw, shown) in [
            ("a\x1b[2Jb", "a\\x1b[2Jb"),
            ("evil\n[INFO ] forged", "evil\\n[INFO ] forged"),
            ("a\rb\tc", "a\\rb\\tc"),
            ("\0\x07\x7f", "\\x00\\x07\\x7f"),
            // C1: NEL and CSI (an 8-bit ESC [).
            ("a\u{85}b\u{9b}2J", "a\\u{0085}b\\u{009b}2J"),
            ("line\u{2028}para\u{2029}", "line\\u{2028}para\\u{2029}"),
            ("x\u{202e}txt.exe", "x\\u{202e}txt.exe"),
            (
                "\u{2066}\u{2069}\u{200f}\u{61c}",
                "\\u{2066}\\u{2069}\\u{200f}\\u{061c}",
            ),
        ] {
            assert_eq!(escape(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn a_literal_backslash_cannot_pass_for_an_escape() {
        // systemd's own escaping (`\x2d`) stays readable and distinct from
        // an escaped control character.
        assert_eq!(escape(r"dev-disk-by\x2duuid"), r"dev-disk-by\\x2duuid");
        assert_ne!(escape("\\x1b"), escape("\x1b"));
        assert_ne!(escape("\\n"), escape("\n"));
    }

    #[test]
    fn nothing_dangerous_survives() {
        let nasty: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = escape(&nasty);
        assert!(!out.chars().any(super::needs_escape), "{out:?}");
        // Every character outside the escaped set is kept as it is.
        assert!(out.contains('é') && out.contains('✓'));
    }
}
