//! Policy file text -> [`PolicyFile`], reporting every problem at once with
//! its line, column and field path.
//!
//! Owns the parser's entry points (reading a policy file within its size
//! limit, parsing a whole text, [`ParsedPolicy`]) and wires the checks of
//! the submodules together:
//!
//! - `walk`: the checker's context, typed reads of raw YAML nodes and the
//!   diagnostics they produce;
//! - `file`: the top-level mapping and each `policies:` entry (names,
//!   duplicates, ties between selectors);
//! - `selectors`: `cgroup:`, `unit:` and `pods:`;
//! - `rules`: `bind:`/`connect:` rules and their `ports:` items;
//! - `plan`: the port plan, `ranges:` and `reserved:`;
//! - `incremental`: re-parsing only the entry an edit touched.
//!
//! May import: `std`, `portguard_common` constants, the policy model
//! (`super`) and its YAML tree ([`super::yaml`]). Nothing that touches the
//! kernel (no aya, tokio or libc): reading the policy file is the only I/O.

mod file;
mod incremental;
mod plan;
mod rules;
mod selectors;
mod walk;

use std::path::Path;

pub use incremental::{Replaced, reparse_policy_text};
pub use selectors::normalize_cgroup;
use walk::Cx;

use super::{
    Diagnostic, PolicyError, PolicyFile,
    yaml::{self, Node},
};

/// Largest policy file accepted. Far above any real policy; keeps a hostile
/// or mistaken input from exhausting memory.
pub const MAX_POLICY_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Read a policy file's text (bounded size).
pub fn read_policy_file(path: &Path) -> Result<String, PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: path.to_owned(),
        source,
    };
    // Read at most one byte more than allowed: the size is judged on what
    // was read (a file growing meanwhile, a FIFO or /dev/zero included).
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(read_err)?;
    // Room for what the file holds now (a hint only: it is read to the end).
    let hint = file
        .metadata()
        .map_or(0, |m| m.len().min(MAX_POLICY_FILE_BYTES));
    let mut bytes = Vec::with_capacity(hint as usize + 1);
    file.take(MAX_POLICY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(PolicyError::Invalid {
            path: path.to_owned(),
            diagnostics: vec![Diagnostic {
                line: 1,
                column: 1,
                field: String::new(),
                message: format!(
                    "file is larger than {MAX_POLICY_FILE_BYTES} bytes, the limit for policy files"
                ),
            }],
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        ))
    })
}

/// Read and validate a policy file.
pub fn parse_policy_file(path: &Path) -> Result<PolicyFile, PolicyError> {
    let text = read_policy_file(path)?;
    parse_policy_str(&text).map_err(|diagnostics| PolicyError::Invalid {
        path: path.to_owned(),
        diagnostics,
    })
}

/// Validate policy text. On failure, returns every problem found.
pub fn parse_policy_str(text: &str) -> Result<PolicyFile, Vec<Diagnostic>> {
    parse_policy_text(text.to_owned()).map(|p| p.file)
}

/// A validated policy file, with what is needed to re-parse only the entry
/// an edit touched (see [`reparse_policy_text`]).
#[derive(Clone, Debug)]
pub struct ParsedPolicy {
    pub file: PolicyFile,
    text: String,
    /// Per policy: byte offset of the start of the line holding its `-`.
    item_lines: Vec<usize>,
    /// Per policy: byte offset of the entry itself (after `- `).
    item_nodes: Vec<usize>,
    /// The layout allows incremental re-parsing: ASCII text, a block list of
    /// policies each starting on its own `- ` line, no anchors/aliases/tags.
    incremental: bool,
}

/// How [`reparse_policy_text`] produced its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reparse {
    /// The text did not change.
    Unchanged,
    /// Only policy `index` changed; only it was parsed.
    Entry { index: usize },
    /// The whole text was parsed.
    Full,
}

fn diagnostics_for_empty_or_syntax(
    parsed: Result<(Option<Node>, yaml::ParseInfo), yaml::SyntaxError>,
) -> Result<(Node, yaml::ParseInfo), Vec<Diagnostic>> {
    match parsed {
        Ok((Some(root), info)) => Ok((root, info)),
        Ok((None, _)) => Err(vec![Diagnostic {
            line: 1,
            column: 1,
            field: String::new(),
            message: "policy file is empty; expected a mapping with a `policies:` list".to_owned(),
        }]),
        Err(e) => Err(vec![Diagnostic {
            line: e.pos.line,
            column: e.pos.column,
            field: String::new(),
            message: format!("YAML syntax error: {}", e.message),
        }]),
    }
}

/// Parse and validate a whole policy text.
pub fn parse_policy_text(text: String) -> Result<ParsedPolicy, Vec<Diagnostic>> {
    let (root, info) = diagnostics_for_empty_or_syntax(yaml::parse_with_info(&text))?;
    let mut cx = Cx::default();
    let (file, items) = cx.file(&root);
    if !cx.diags.is_empty() {
        cx.diags.sort_by_key(|d| (d.line, d.column));
        return Err(cx.diags);
    }
    let mut parsed = ParsedPolicy {
        file,
        text,
        item_lines: Vec::new(),
        item_nodes: Vec::new(),
        incremental: false,
    };
    parsed.incremental = !info.non_local && root.pos.column == 1 && parsed.index_items(&items);
    Ok(parsed)
}

impl ParsedPolicy {
    /// The text this was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests;
