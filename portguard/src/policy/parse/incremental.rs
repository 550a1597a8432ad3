//! Re-parsing after an edit: when the text changed inside one `policies:`
//! entry only, that entry alone is parsed and validated, with positions in
//! the whole file; anything else falls back to a full parse.
//!
//! Owns [`reparse_policy_text`], its in-place form [`ParsedPolicy::reparse`]
//! (which hands back what it replaced, [`Replaced`], so a caller that cannot
//! use the result puts it back without keeping a copy of the whole file),
//! and the layout index of [`ParsedPolicy`] (where each entry starts). May
//! import the rest of the parser (`super`), the policy model and its YAML
//! tree; no I/O.

use super::{Cx, ParsedPolicy, Reparse, normalize_cgroup, parse_policy_text, walk::peek_scalar};
use crate::policy::{
    Diagnostic, Policy,
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
    let mut parsed = prev.clone();
    let (how, _) = parsed.reparse(text)?;
    Ok((parsed, how))
}

/// What [`ParsedPolicy::reparse`] replaced: enough to put it back
/// ([`ParsedPolicy::restore`]).
#[derive(Debug)]
pub struct Replaced(Undo);

#[derive(Debug)]
enum Undo {
    Nothing,
    /// Entry `index` was replaced; later entries moved by `delta` bytes and
    /// `line_delta` lines.
    Entry {
        index: usize,
        policy: Box<Policy>,
        text: String,
        delta: isize,
        line_delta: isize,
    },
    Whole(Box<ParsedPolicy>),
}

impl ParsedPolicy {
    /// [`reparse_policy_text`] in place: on success `self` is the new parse
    /// and the returned [`Replaced`] holds what it replaced; on error `self`
    /// is unchanged. An edit inside one entry costs that entry, not a copy of
    /// the whole file.
    pub fn reparse(&mut self, text: String) -> Result<(Reparse, Replaced), Vec<Diagnostic>> {
        if text == self.text {
            return Ok((Reparse::Unchanged, Replaced(Undo::Nothing)));
        }
        if let Some(edit) = entry_edit(self, &text) {
            let edit = edit?;
            let index = edit.index;
            let undo = self.apply_edit(edit, text);
            return Ok((Reparse::Entry { index }, Replaced(undo)));
        }
        let parsed = parse_policy_text(text)?;
        let old = std::mem::replace(self, parsed);
        Ok((Reparse::Full, Replaced(Undo::Whole(Box::new(old)))))
    }

    /// Undo the [`ParsedPolicy::reparse`] that returned `replaced` (the last
    /// one made on `self`).
    pub fn restore(&mut self, replaced: Replaced) {
        match replaced.0 {
            Undo::Nothing => {}
            Undo::Whole(old) => *self = *old,
            Undo::Entry {
                index,
                policy,
                text,
                delta,
                line_delta,
            } => {
                self.file.policies[index] = *policy;
                self.text = text;
                self.shift_after(index, -delta, -line_delta);
            }
        }
    }

    /// Put `edit` in place; what it replaced, to undo it.
    fn apply_edit(&mut self, edit: EntryEdit, text: String) -> Undo {
        let EntryEdit {
            index,
            policy,
            delta,
            line_delta,
        } = edit;
        let policy = std::mem::replace(&mut self.file.policies[index], policy);
        let text = std::mem::replace(&mut self.text, text);
        self.shift_after(index, delta, line_delta);
        Undo::Entry {
            index,
            policy: Box::new(policy),
            text,
            delta,
            line_delta,
        }
    }

    /// Move the entries after `index` by `delta` bytes and `line_delta` lines.
    fn shift_after(&mut self, index: usize, delta: isize, line_delta: isize) {
        if delta == 0 && line_delta == 0 {
            return;
        }
        let shift = |v: &mut usize, d: isize| *v = (*v as isize + d) as usize;
        for p in &mut self.file.policies[index + 1..] {
            shift(&mut p.line, line_delta);
            for r in p.bind.iter_mut().chain(p.connect.iter_mut()).flatten() {
                shift(&mut r.line, line_delta);
            }
        }
        for i in index + 1..self.item_lines.len() {
            shift(&mut self.item_lines[i], delta);
            shift(&mut self.item_nodes[i], delta);
        }
    }
}

/// An edit confined to one entry, parsed: the entry's new policy and how far
/// the entries after it moved.
struct EntryEdit {
    index: usize,
    policy: Policy,
    delta: isize,
    line_delta: isize,
}

/// The single-entry path; `None` when it does not apply.
fn entry_edit(prev: &ParsedPolicy, text: &str) -> Option<Result<EntryEdit, Vec<Diagnostic>>> {
    if !prev.incremental || !text.is_ascii() || prev.item_nodes.is_empty() {
        return None;
    }
    let (old, new) = (prev.text.as_bytes(), text.as_bytes());
    let max = old.len().min(new.len());
    let prefix = common_prefix(old, new);
    let suffix = common_suffix(&old[prefix..], &new[prefix..]).min(max - prefix);
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
    Some(Ok(EntryEdit {
        index: k,
        policy,
        delta,
        line_delta: lines_new - lines_old,
    }))
}

/// Bytes compared at once by [`common_prefix`] and [`common_suffix`] (a
/// `memcmp` each) before the byte that differs is looked for.
const BLOCK: usize = 256;

/// The length of the longest common prefix of `a` and `b`.
pub(super) fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// The length of the longest common suffix of `a` and `b`.
pub(super) fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + BLOCK <= n && a[n - i - BLOCK..n - i] == b[n - i - BLOCK..n - i] {
        i += BLOCK;
    }
    i + a[..n - i]
        .iter()
        .rev()
        .zip(b[..n - i].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}
