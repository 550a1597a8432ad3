//! Re-parsing after an edit: when the text changed inside one `policies:`
//! entry only, that entry alone is parsed and validated, with positions in
//! the whole file; anything else falls back to a full parse.
//!
//! Owns [`reparse_policy_text`] and the layout index of [`ParsedPolicy`]
//! (where each entry starts). May import the rest of the parser (`super`),
//! the policy model and its YAML tree; no I/O.

use super::{Cx, ParsedPolicy, Reparse, normalize_cgroup, parse_policy_text, walk::peek_scalar};
use crate::policy::{
    Diagnostic,
    yaml::{self, Kind},
};

impl ParsedPolicy {
    /// Record where each entry starts; false if the layout does not allow
    /// incremental re-parsing.
    pub(super) fn index_items(&mut self, items: &[yaml::Pos]) -> bool {
        if !self.text.is_ascii() || items.len() != self.file.policies.len() {
            return false;
        }
        let line_starts: Vec<usize> = std::iter::once(0)
            .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let mut dash_col = None;
        for pos in items {
            let Some(&ls) = line_starts.get(pos.line - 1) else {
                return false;
            };
            let node = ls + pos.column - 1;
            let Some(prefix) = self.text.get(ls..node) else {
                return false;
            };
            // `<spaces>-<spaces>` and nothing else before the entry.
            let trimmed = prefix.trim_start_matches(' ');
            let indent = prefix.len() - trimmed.len();
            if !trimmed.starts_with('-')
                || !trimmed[1..].chars().all(|c| c == ' ')
                || trimmed.len() < 2
            {
                return false;
            }
            if *dash_col.get_or_insert(indent) != indent {
                return false;
            }
            self.item_lines.push(ls);
            self.item_nodes.push(node);
        }
        true
    }
}

/// Re-parse after an edit. When the text differs from `prev` only inside one
/// policy entry, only that entry is parsed and validated (with positions in
/// the whole file); otherwise the whole text is. Callers should confirm an
/// `Entry` result with a full [`parse_policy_text`] when they can afford it.
pub fn reparse_policy_text(
    prev: &ParsedPolicy,
    text: String,
) -> Result<(ParsedPolicy, Reparse), Vec<Diagnostic>> {
    if text == prev.text {
        return Ok((prev.clone(), Reparse::Unchanged));
    }
    if let Some(p) = reparse_entry(prev, &text) {
        return p.map(|(parsed, index)| (parsed, Reparse::Entry { index }));
    }
    parse_policy_text(text).map(|p| (p, Reparse::Full))
}

/// The single-entry path; `None` when it does not apply.
fn reparse_entry(
    prev: &ParsedPolicy,
    text: &str,
) -> Option<Result<(ParsedPolicy, usize), Vec<Diagnostic>>> {
    if !prev.incremental || !text.is_ascii() || prev.item_nodes.is_empty() {
        return None;
    }
    let (old, new) = (prev.text.as_bytes(), text.as_bytes());
    let max = old.len().min(new.len());
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(max - prefix)
        .take_while(|(a, b)| a == b)
        .count();
    let old_end = old.len() - suffix;
    // The entry whose text the change starts in (strictly after its `- `).
    let k = prev
        .item_nodes
        .partition_point(|&n| n <= prefix)
        .checked_sub(1)?;
    let region_end_old = prev.item_lines.get(k + 1).copied().unwrap_or(old.len());
    if old_end > region_end_old {
        return None;
    }
    let delta = new.len() as isize - old.len() as isize;
    let region_end_new = (region_end_old as isize + delta) as usize;
    let start = prev.item_lines[k];
    if region_end_new < prev.item_nodes[k]
        || (region_end_new < new.len() && new[region_end_new - 1] != b'\n')
    {
        return None;
    }
    // Parse the entry in the same indentation context as in the file: as the
    // only item of a top-level `policies:` list (indentation rules of flow
    // and block content depend on the enclosing block levels).
    let doc = format!("policies:\n{}", &text[start..region_end_new]);
    let (root, info) = match yaml::parse_with_info(&doc) {
        Ok((Some(root), info)) => (root, info),
        // Let the full parse report errors against the whole file.
        _ => return None,
    };
    if info.non_local {
        return None;
    }
    let Kind::Map(top) = root.kind else {
        return None;
    };
    let [(_, list)] = top.as_slice() else {
        return None;
    };
    let Kind::Seq(items) = &list.kind else {
        return None;
    };
    let [node] = items.as_slice() else {
        return None;
    };
    if !matches!(node.kind, Kind::Map(_)) {
        return None;
    }
    let mut node = node.clone();
    // The entry is on line 2 of `doc`.
    let first_line = prev.file.policies[k].line;
    node.shift_lines(first_line - 2);
    // A name or cgroup clashing with another entry (judged on the raw
    // values, as the full parse does): let the full parse report it.
    let name = peek_scalar(&node, "name").map(|(n, _)| n);
    let cgroup = peek_scalar(&node, "cgroup").and_then(|(c, _)| normalize_cgroup(&c).ok());
    if prev.file.policies.iter().enumerate().any(|(i, p)| {
        i != k
            && (name.as_deref() == Some(p.name.as_str())
                || cgroup.as_deref() == p.selector.cgroup_path())
    }) {
        return None;
    }
    let mut cx = Cx {
        ranges: prev.file.ranges.clone(),
        ..Cx::default()
    };
    let policy = cx.policy(&node, &format!("policies[{k}]"));
    if !cx.diags.is_empty() {
        cx.diags.sort_by_key(|d| (d.line, d.column));
        return Some(Err(cx.diags));
    }
    let policy = policy?;
    if prev
        .file
        .policies
        .iter()
        .enumerate()
        .any(|(i, p)| i != k && p.selector == policy.selector)
    {
        return None;
    }
    let lines_old = old[prefix..old_end].iter().filter(|b| **b == b'\n').count() as isize;
    let lines_new = new[prefix..new.len() - suffix]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as isize;
    let line_delta = lines_new - lines_old;
    let shift = |v: usize, d: isize| (v as isize + d) as usize;
    let mut file = prev.file.clone();
    file.policies[k] = policy;
    for p in &mut file.policies[k + 1..] {
        p.line = shift(p.line, line_delta);
        for r in p.bind.iter_mut().chain(p.connect.iter_mut()).flatten() {
            r.line = shift(r.line, line_delta);
        }
    }
    let mut parsed = ParsedPolicy {
        file,
        text: text.to_owned(),
        item_lines: prev.item_lines.clone(),
        item_nodes: prev.item_nodes.clone(),
        incremental: true,
    };
    for i in k + 1..parsed.item_lines.len() {
        parsed.item_lines[i] = shift(parsed.item_lines[i], delta);
        parsed.item_nodes[i] = shift(parsed.item_nodes[i], delta);
    }
    Some(Ok((parsed, k)))
}
