//! Policy file text -> [`PolicyFile`], reporting every problem at once with
//! its line, column and field path.

use std::{collections::HashMap, path::Path};

use portguard_common::MAX_CGROUP_DEPTH;

use super::{
    AddressSel, Diagnostic, FamilySel, INFRASTRUCTURE_PORTS, Mode, PodSelector, Policy,
    PolicyError, PolicyFile, PortSet, PortSpec, ProtocolSel, Rule, Selector, SocketKind,
    yaml::{self, Kind, Node},
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
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_POLICY_FILE_BYTES + 1)
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

    /// Record where each entry starts; false if the layout does not allow
    /// incremental re-parsing.
    fn index_items(&mut self, items: &[yaml::Pos]) -> bool {
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

#[derive(Default)]
struct Cx {
    diags: Vec<Diagnostic>,
    /// The file's named ranges, known before any port list is read.
    ranges: std::collections::BTreeMap<String, (u16, u16)>,
}

const TOP_KEYS: &[&str] = &["policies", "ranges", "reserved"];
const POLICY_KEYS: &[&str] = &[
    "name",
    "cgroup",
    "pods",
    "unit",
    "mode",
    "bind",
    "connect",
    "allow_sockets",
];
const POD_KEYS: &[&str] = &["namespace", "labels", "container"];
const RULE_KEYS: &[&str] = &["ports", "protocol", "family", "address"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Bind,
    Connect,
}

impl Cx {
    fn err(&mut self, node: &Node, field: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            line: node.pos.line,
            column: node.pos.column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Entries of a mapping node, or an error. Unknown keys are reported.
    fn mapping<'n>(
        &mut self,
        node: &'n Node,
        field: &str,
        known: &[&str],
    ) -> Option<Vec<(&'n str, &'n Node, &'n Node)>> {
        let Kind::Map(entries) = &node.kind else {
            self.err(
                node,
                field,
                format!("expected a mapping, found {}", node.type_name()),
            );
            return None;
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let Kind::Scalar { text, .. } = &k.kind else {
                self.err(k, field, "mapping keys must be plain strings");
                continue;
            };
            if !known.contains(&text.as_str()) {
                let path = join(field, text);
                self.err(
                    k,
                    &path,
                    format!(
                        "unknown key `{text}` (expected one of: {})",
                        known.join(", ")
                    ),
                );
                continue;
            }
            out.push((text.as_str(), k, v));
        }
        Some(out)
    }

    fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { text, .. } if !node.is_null() => Some(text.clone()),
            _ => {
                self.err(
                    node,
                    field,
                    format!("expected a string, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(&mut self, node: &Node, field: &str, options: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, field)?;
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == text) {
            return Some(*v);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.err(
            node,
            field,
            format!(
                "unknown value `{text}` (expected one of: {})",
                names.join(", ")
            ),
        );
        None
    }

    /// The policies, and the position of each accepted entry.
    fn file(&mut self, root: &Node) -> (PolicyFile, Vec<yaml::Pos>) {
        let mut file = PolicyFile::default();
        let mut positions = Vec::new();
        let Some(entries) = self.mapping(root, "", TOP_KEYS) else {
            return (file, positions);
        };
        if let Some((_, _, node)) = entries.iter().find(|(k, _, _)| *k == "ranges") {
            self.named_ranges(node);
            file.ranges = self.ranges.clone();
        }
        if let Some((_, _, node)) = entries.iter().find(|(k, _, _)| *k == "reserved") {
            file.reserved = self.reserved(node);
        }
        let Some((_, _, list)) = entries.iter().find(|(k, _, _)| *k == "policies") else {
            self.err(root, "", "missing key `policies` (a list of policies)");
            return (file, positions);
        };
        let Kind::Seq(items) = &list.kind else {
            self.err(
                list,
                "policies",
                format!(
                    "expected a list of policies, found {}{}",
                    list.type_name(),
                    if list.is_null() {
                        "; write `policies: []` for none"
                    } else {
                        ""
                    }
                ),
            );
            return (file, positions);
        };
        // Duplicates are checked on the raw values, so a duplicate is reported
        // even when one of the two policies has other errors.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut cgroups: HashMap<String, (usize, String)> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("policies[{i}]");
            let policy = self.policy(item, &field);
            let mut duplicate = false;
            if let Some((name, node)) = peek_scalar(item, "name") {
                if let Some(first) = names.get(&name) {
                    self.err(
                        node,
                        &join(&field, "name"),
                        format!("duplicate policy name `{name}` (first used on line {first})"),
                    );
                    duplicate = true;
                } else {
                    names.insert(name, item.pos.line);
                }
            }
            if let Some((raw, node)) = peek_scalar(item, "cgroup")
                && let Ok(cg) = normalize_cgroup(&raw)
            {
                let name = peek_scalar(item, "name")
                    .map(|(n, _)| n)
                    .unwrap_or_default();
                if let Some((first, other)) = cgroups.get(&cg) {
                    self.err(
                        node,
                        &join(&field, "cgroup"),
                        format!(
                            "cgroup `{cg}` already has policy `{other}` (line {first}); \
                             one cgroup takes one policy"
                        ),
                    );
                    duplicate = true;
                } else {
                    cgroups.insert(cg, (item.pos.line, name));
                }
            }
            if let Some(p) = &policy
                && !matches!(p.selector, Selector::Cgroup(_))
                && let Some(other) = file
                    .policies
                    .iter()
                    .find(|o| o.selector.may_tie(&p.selector))
            {
                let msg = if other.selector == p.selector {
                    format!(
                        "policy `{}` selects the same as `{}` (line {}): {}; make one of them more \
                         specific, a cgroup can take only one policy",
                        p.name,
                        other.name,
                        other.line,
                        p.selector.describe()
                    )
                } else {
                    format!(
                        "policy `{}` ({}) and `{}` (line {}: {}) are equally specific and can \
                         select the same pod: a tie; make one more specific (a label, an exact \
                         namespace or a container) or make them exclusive (one label key with \
                         different values)",
                        p.name,
                        p.selector.describe(),
                        other.name,
                        other.line,
                        other.selector.describe()
                    )
                };
                self.err(item, &field, msg);
                duplicate = true;
            }
            if let Some(p) = policy
                && !duplicate
            {
                file.policies.push(p);
                positions.push(item.pos);
            }
        }
        (file, positions)
    }

    fn policy(&mut self, node: &Node, field: &str) -> Option<Policy> {
        let entries = self.mapping(node, field, POLICY_KEYS)?;
        let before = self.diags.len();
        let mut name = None;
        let mut selectors: Vec<Selector> = Vec::new();
        let mut mode = Mode::Enforce;
        let mut bind = None;
        let mut connect = None;
        let mut allow_sockets = Vec::new();
        for (key, _k, v) in &entries {
            let f = join(field, key);
            match *key {
                "name" => name = self.name(v, &f),
                "cgroup" => selectors.extend(self.cgroup(v, &f).map(Selector::Cgroup)),
                "pods" => selectors.extend(self.pods(v, &f).map(Selector::Pods)),
                "unit" => selectors.extend(self.unit(v, &f).map(Selector::Unit)),
                "mode" => {
                    if let Some(m) =
                        self.choice(v, &f, &[("enforce", Mode::Enforce), ("audit", Mode::Audit)])
                    {
                        mode = m;
                    }
                }
                "bind" => bind = self.rules(v, &f, Dir::Bind),
                "connect" => connect = self.rules(v, &f, Dir::Connect),
                "allow_sockets" => allow_sockets = self.socket_kinds(v, &f),
                _ => {}
            }
        }
        if !entries.iter().any(|(k, _, _)| *k == "name") {
            self.err(node, field, "missing key `name`");
        }
        let given: Vec<&str> = entries
            .iter()
            .map(|(k, _, _)| *k)
            .filter(|k| matches!(*k, "cgroup" | "pods" | "unit"))
            .collect();
        if given.is_empty() {
            self.err(
                node,
                field,
                "missing key `cgroup` (the cgroup path the policy governs, e.g. /system.slice/web.service), \
                 or a `pods:` or `unit:` selector instead",
            );
        } else if given.len() > 1 {
            self.err(
                node,
                field,
                format!(
                    "a policy takes exactly one of `cgroup`, `pods` or `unit`; found {}",
                    given.join(" and ")
                ),
            );
        }
        if self.diags.len() != before {
            return None;
        }
        let [selector] = <[Selector; 1]>::try_from(selectors).ok()?;
        Some(Policy {
            name: name?,
            selector,
            mode,
            bind,
            connect,
            allow_sockets,
            line: node.pos.line,
        })
    }

    fn socket_kinds(&mut self, node: &Node, field: &str) -> Vec<SocketKind> {
        let Kind::Seq(items) = &node.kind else {
            self.err(
                node,
                field,
                format!(
                    "expected a list such as [raw, sctp], found {}",
                    node.type_name()
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(k) = self.choice(
                item,
                &format!("{field}[{i}]"),
                &[
                    ("raw", SocketKind::Raw),
                    ("sctp", SocketKind::Sctp),
                    ("l2tp", SocketKind::L2tp),
                ],
            ) && !out.contains(&k)
            {
                out.push(k);
            }
        }
        out
    }

    fn name(&mut self, node: &Node, field: &str) -> Option<String> {
        let name = self.string(node, field)?;
        let ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
        if !ok {
            self.err(
                node,
                field,
                format!(
                    "invalid policy name `{name}`: use 1-253 characters from A-Z a-z 0-9 - _ . : /"
                ),
            );
            return None;
        }
        Some(name)
    }

    fn cgroup(&mut self, node: &Node, field: &str) -> Option<String> {
        let raw = self.string(node, field)?;
        match normalize_cgroup(&raw) {
            Ok(p) => Some(p),
            Err(msg) => {
                self.err(node, field, format!("invalid cgroup path `{raw}`: {msg}"));
                None
            }
        }
    }

    fn unit(&mut self, node: &Node, field: &str) -> Option<String> {
        let unit = self.string(node, field)?;
        let ok = unit.contains('.')
            && !unit.contains('/')
            && unit.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':' | '\\')
            });
        if !ok {
            self.err(
                node,
                field,
                format!(
                    "invalid unit name `{unit}`: expected a systemd unit such as nginx.service"
                ),
            );
            return None;
        }
        Some(unit)
    }

    fn pods(&mut self, node: &Node, field: &str) -> Option<PodSelector> {
        let entries = self.mapping(node, field, POD_KEYS)?;
        let before = self.diags.len();
        let mut sel = PodSelector::default();
        for (key, _k, v) in &entries {
            let f = join(field, key);
            match *key {
                "namespace" => {
                    if let Some(ns) = self.string(v, &f) {
                        if let Err(e) = glob::Pattern::new(&ns) {
                            self.err(v, &f, format!("invalid namespace pattern `{ns}`: {e}"));
                        } else {
                            sel.namespace = Some(ns);
                        }
                    }
                }
                "labels" => {
                    let Kind::Map(labels) = &v.kind else {
                        self.err(
                            v,
                            &f,
                            format!(
                                "expected a mapping such as {{app: web}}, found {}",
                                v.type_name()
                            ),
                        );
                        continue;
                    };
                    for (lk, lv) in labels {
                        let (Kind::Scalar { text: k, .. }, Kind::Scalar { text: val, .. }) =
                            (&lk.kind, &lv.kind)
                        else {
                            self.err(lk, &f, "label keys and values must be strings");
                            continue;
                        };
                        sel.labels.insert(k.clone(), val.clone());
                    }
                }
                "container" => sel.container = self.string(v, &f),
                _ => {}
            }
        }
        (self.diags.len() == before).then_some(sel)
    }

    fn rules(&mut self, node: &Node, field: &str, dir: Dir) -> Option<Vec<Rule>> {
        let Kind::Seq(items) = &node.kind else {
            let hint = if node.is_null() {
                "; write `[]` to deny everything, or remove the key to leave it unrestricted"
            } else {
                ""
            };
            self.err(
                node,
                field,
                format!("expected a list of rules, found {}{hint}", node.type_name()),
            );
            return None;
        };
        let mut rules = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(r) = self.rule(item, &format!("{field}[{i}]"), dir) {
                rules.push(r);
            }
        }
        Some(rules)
    }

    fn rule(&mut self, node: &Node, field: &str, dir: Dir) -> Option<Rule> {
        let entries = self.mapping(node, field, RULE_KEYS)?;
        let before = self.diags.len();
        let mut rule = Rule {
            ports: Vec::new(),
            protocol: ProtocolSel::Any,
            family: FamilySel::Any,
            address: AddressSel::Any,
            line: node.pos.line,
        };
        let mut has_ports = false;
        for (key, _k, v) in &entries {
            let f = join(field, key);
            match *key {
                "ports" => {
                    has_ports = true;
                    rule.ports = self.ports(v, &f, dir);
                }
                "protocol" => {
                    rule.protocol = self
                        .choice(
                            v,
                            &f,
                            &[
                                ("tcp", ProtocolSel::Tcp),
                                ("udp", ProtocolSel::Udp),
                                ("any", ProtocolSel::Any),
                            ],
                        )
                        .unwrap_or_default();
                }
                "family" => {
                    rule.family = self
                        .choice(
                            v,
                            &f,
                            &[
                                ("ipv4", FamilySel::Ipv4),
                                ("ipv6", FamilySel::Ipv6),
                                ("any", FamilySel::Any),
                            ],
                        )
                        .unwrap_or_default();
                }
                "address" => {
                    rule.address = self
                        .choice(
                            v,
                            &f,
                            &[("loopback", AddressSel::Loopback), ("any", AddressSel::Any)],
                        )
                        .unwrap_or_default();
                }
                _ => {}
            }
        }
        if !has_ports {
            self.err(node, field, "missing key `ports`");
        }
        (self.diags.len() == before).then_some(rule)
    }

    /// `ranges: {app: "3000-3999", db: "4000-4999", admin: 9000}`.
    fn named_ranges(&mut self, node: &Node) {
        let Kind::Map(entries) = &node.kind else {
            self.err(
                node,
                "ranges",
                format!(
                    "expected a mapping of names to port ranges, e.g. {{app: \"3000-3999\"}}, \
                     found {}",
                    node.type_name()
                ),
            );
            return;
        };
        for (k, v) in entries {
            let Kind::Scalar { text: name, .. } = &k.kind else {
                self.err(k, "ranges", "a range name must be a string");
                continue;
            };
            let f = join("ranges", name);
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid || matches!(name.as_str(), "ephemeral" | "infrastructure") {
                self.err(
                    k,
                    &f,
                    format!(
                        "`{name}` cannot name a range: use a letter then letters, digits, `-` or \
                         `_` (not `ephemeral` or `infrastructure`)"
                    ),
                );
                continue;
            }
            match parse_port_item(v, &Default::default()) {
                Ok(PortSpec::Port(p)) => {
                    self.ranges.insert(name.clone(), (p, p));
                }
                Ok(PortSpec::Range(a, b)) => {
                    self.ranges.insert(name.clone(), (a, b));
                }
                Ok(PortSpec::Ephemeral) => self.err(v, &f, "a named range cannot be `ephemeral`"),
                Err(msg) => self.err(v, &f, msg),
            }
        }
    }

    /// `reserved: [infrastructure, 7000, "8000-8099"]`.
    fn reserved(&mut self, node: &Node) -> PortSet {
        let mut set = PortSet::default();
        let Kind::Seq(items) = &node.kind else {
            self.err(
                node,
                "reserved",
                format!(
                    "expected a list of ports, ranges or `infrastructure`, e.g. \
                     [infrastructure, 7000], found {}",
                    node.type_name()
                ),
            );
            return set;
        };
        for (i, item) in items.iter().enumerate() {
            let f = format!("reserved[{i}]");
            if matches!(&item.kind, Kind::Scalar { text, plain: true } if text == "infrastructure")
            {
                for &(a, b) in INFRASTRUCTURE_PORTS {
                    set.insert_range(a, b);
                }
                continue;
            }
            match parse_port_item(item, &self.ranges) {
                Ok(PortSpec::Port(p)) => set.insert(p),
                Ok(PortSpec::Range(a, b)) => set.insert_range(a, b),
                Ok(PortSpec::Ephemeral) => self.err(
                    item,
                    &f,
                    "`ephemeral` cannot be reserved (kernel-chosen ports are not planned)",
                ),
                Err(msg) => self.err(item, &f, msg),
            }
        }
        set
    }

    fn ports(&mut self, node: &Node, field: &str, dir: Dir) -> Vec<PortSpec> {
        let Kind::Seq(items) = &node.kind else {
            self.err(
                node,
                field,
                format!(
                    "expected a list of ports, e.g. [8080, \"9000-9099\"], found {}",
                    node.type_name()
                ),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(
                node,
                field,
                "empty port list; a rule must allow at least one port (to deny everything, \
                 write `bind: []` or `connect: []`)",
            );
        }
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let f = format!("{field}[{i}]");
            match parse_port_item(item, &self.ranges) {
                Ok(PortSpec::Ephemeral) if dir == Dir::Connect => self.err(
                    item,
                    &f,
                    "`ephemeral` applies to bind rules only (it allows the port the kernel \
                     picks for a bind to port 0)",
                ),
                Ok(p) => out.push(p),
                Err(msg) => self.err(item, &f, msg),
            }
        }
        out
    }
}

/// The scalar value of `key` in a mapping node, if present.
fn peek_scalar<'n>(node: &'n Node, key: &str) -> Option<(String, &'n Node)> {
    let Kind::Map(entries) = &node.kind else {
        return None;
    };
    entries.iter().find_map(|(k, v)| match (&k.kind, &v.kind) {
        (Kind::Scalar { text: kt, .. }, Kind::Scalar { text, .. }) if kt == key => {
            Some((text.clone(), v))
        }
        _ => None,
    })
}

fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_owned()
    } else {
        format!("{field}.{key}")
    }
}

fn parse_port_number(s: &str) -> Result<u16, String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a port number"));
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(0) => Err(
            "port 0 is not a port; to allow binds to port 0 (kernel-chosen ports), use `ephemeral`"
                .to_owned(),
        ),
        _ => Err(format!("port {s} is out of range (1-65535)")),
    }
}

fn parse_port_item(
    node: &Node,
    ranges: &std::collections::BTreeMap<String, (u16, u16)>,
) -> Result<PortSpec, String> {
    let Kind::Scalar { text, plain } = &node.kind else {
        return Err(format!(
            "expected a port, a range \"a-b\" or `ephemeral`, found {}",
            node.type_name()
        ));
    };
    let t = text.trim();
    if t == "ephemeral" {
        return Ok(PortSpec::Ephemeral);
    }
    if t.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return match ranges.get(t) {
            Some(&(a, b)) if a == b => Ok(PortSpec::Port(a)),
            Some(&(a, b)) => Ok(PortSpec::Range(a, b)),
            None if ranges.is_empty() => Err(format!(
                "`{t}` is not a port, a range \"a-b\" or `ephemeral` (named ranges are defined \
                 under the top-level `ranges:` key)"
            )),
            None => Err(format!(
                "unknown range name `{t}` (defined: {})",
                ranges.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        };
    }
    if *plain && node.is_null() {
        return Err("expected a port, found null".to_owned());
    }
    if let Some((a, b)) = t.split_once('-') {
        let lo = parse_port_number(a).map_err(|e| format!("in range `{t}`: {e}"))?;
        let hi = parse_port_number(b).map_err(|e| format!("in range `{t}`: {e}"))?;
        if lo > hi {
            return Err(format!(
                "inverted range `{t}`: the first port must not exceed the second"
            ));
        }
        return Ok(if lo == hi {
            PortSpec::Port(lo)
        } else {
            PortSpec::Range(lo, hi)
        });
    }
    parse_port_number(t)
        .map(PortSpec::Port)
        .map_err(|e| format!("{e}; expected a port 1-65535, a range \"a-b\" or `ephemeral`"))
}

/// `/a/b` (or `/`) from user input; rejects relative paths, `.`/`..`, empty
/// components and paths deeper than the kernel's ancestor walk.
pub fn normalize_cgroup(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(
            "must be an absolute path under the cgroup2 mount, e.g. /system.slice/web.service"
                .to_owned(),
        );
    }
    if raw.contains('\0') {
        return Err("contains a NUL byte".to_owned());
    }
    let trimmed = raw.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_owned());
    }
    let parts: Vec<&str> = trimmed[1..].split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err("empty path component (`//`)".to_owned()),
            "." | ".." => return Err("`.` and `..` are not allowed".to_owned()),
            _ => {}
        }
    }
    if parts.len() as u32 >= MAX_CGROUP_DEPTH {
        return Err(format!(
            "{} levels deep; portguard supports cgroups up to {} levels below the root",
            parts.len(),
            MAX_CGROUP_DEPTH - 1
        ));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> PolicyFile {
        parse_policy_str(text).unwrap_or_else(|d| panic!("unexpected errors: {d:#?}"))
    }

    fn errs(text: &str) -> Vec<Diagnostic> {
        parse_policy_str(text).expect_err("expected errors")
    }

    #[test]
    fn named_ranges_are_usable_in_rules_and_reserved() {
        let f = ok(
            "ranges: {app: \"3000-3999\", db: \"4000-4999\", admin: 9000}\nreserved: [db]\npolicies:\n  - {name: a, cgroup: /a, bind: [{ports: [app, admin, 8080]}]}\n",
        );
        let ports = &f.policies[0].bind.as_ref().unwrap()[0].ports;
        assert_eq!(
            ports,
            &[
                PortSpec::Range(3000, 3999),
                PortSpec::Port(9000),
                PortSpec::Port(8080)
            ]
        );
        assert!(
            f.reserved.contains(4000) && f.reserved.contains(4999) && !f.reserved.contains(3999)
        );
        assert_eq!(f.ranges.get("app"), Some(&(3000, 3999)));
        // Order of the top-level keys does not matter.
        let g =
            ok("policies:\n  - {name: a, cgroup: /a, bind: [{ports: [app]}]}\nranges: {app: 7}\n");
        assert_eq!(
            g.policies[0].bind.as_ref().unwrap()[0].ports,
            [PortSpec::Port(7)]
        );
        let d = errs(
            "ranges: {app: \"4000-3000\", 9lives: 1, ephemeral: 2, ok: 5}\npolicies:\n  - {name: a, cgroup: /a, bind: [{ports: [web]}]}\n",
        );
        assert_eq!(d.len(), 4, "{d:#?}");
        assert!(
            d.iter()
                .any(|x| x.field == "ranges.app" && x.message.contains("inverted"))
        );
        assert!(d.iter().any(|x| x.field == "ranges.9lives"));
        assert!(d.iter().any(|x| x.field == "ranges.ephemeral"));
        assert!(
            d.iter()
                .any(|x| x.message.contains("unknown range name `web` (defined: ok)"))
        );
    }

    #[test]
    fn an_entry_reparsed_alone_resolves_named_ranges() {
        let a = "ranges: {app: \"3000-3999\", db: 5432}\npolicies:\n  - name: a\n    cgroup: /a\n    bind: [{ports: [app]}]\n  - name: b\n    cgroup: /b\n    bind: [{ports: [8080]}]\n";
        let b = a.replace("ports: [8080]", "ports: [db, app]");
        let prev = parse_policy_text(a.to_owned()).unwrap();
        let (re, how) = reparse_policy_text(&prev, b.clone()).unwrap();
        assert_eq!(how, Reparse::Entry { index: 1 });
        assert_eq!(re.file, parse_policy_text(b).unwrap().file);
        assert_eq!(
            re.file.policies[1].bind.as_ref().unwrap()[0].ports,
            [PortSpec::Port(5432), PortSpec::Range(3000, 3999)]
        );
    }

    #[test]
    fn reserved_ports_and_the_infrastructure_list() {
        let f = ok("reserved: [infrastructure, 7000, \"8000-8009\"]\npolicies: []\n");
        for p in [
            22, 2379, 2380, 6443, 9100, 10250, 10255, 10256, 10257, 10259, 7000, 8005,
        ] {
            assert!(f.reserved.contains(p), "{p}");
        }
        for p in [21, 2378, 2381, 10258, 7001, 8010] {
            assert!(!f.reserved.contains(p), "{p}");
        }
        // Overriding the built-in list: just do not name it.
        let f = ok("reserved: [7000]\npolicies: []\n");
        assert!(f.reserved.contains(7000) && !f.reserved.contains(22));
        assert!(ok("policies: []\n").reserved.is_empty());
        let d = errs("reserved: [ephemeral, 0, kubelet]\npolicies: []\n");
        assert_eq!(d.len(), 3, "{d:#?}");
        assert!(d.iter().all(|x| x.field.starts_with("reserved[")), "{d:#?}");
        assert!(
            errs("reserved: 22\npolicies: []\n")[0]
                .message
                .contains("infrastructure")
        );
    }

    const ISSUE_EXAMPLE: &str = r#"
policies:
  - name: web                     # unique
    cgroup: /portguard-demo/web   # path under the cgroup2 mount
    mode: enforce
    bind:
      - ports: [8080, "9000-9099"]
        protocol: tcp
        family: any
        address: loopback
    connect:
      - ports: [5432]
"#;

    #[test]
    fn parses_the_documented_example() {
        let f = ok(ISSUE_EXAMPLE);
        assert_eq!(f.policies.len(), 1);
        let p = &f.policies[0];
        assert_eq!(p.name, "web");
        assert_eq!(p.selector, Selector::Cgroup("/portguard-demo/web".into()));
        assert_eq!(p.mode, Mode::Enforce);
        let bind = p.bind.as_ref().unwrap();
        assert_eq!(
            bind[0].ports,
            vec![PortSpec::Port(8080), PortSpec::Range(9000, 9099)]
        );
        assert_eq!(bind[0].protocol, ProtocolSel::Tcp);
        assert_eq!(bind[0].address, AddressSel::Loopback);
        let connect = p.connect.as_ref().unwrap();
        assert_eq!(connect[0].ports, vec![PortSpec::Port(5432)]);
        assert_eq!(connect[0].protocol, ProtocolSel::Any);
        assert_eq!(connect[0].family, FamilySel::Any);
        assert_eq!(connect[0].address, AddressSel::Any);
    }

    #[test]
    fn absent_and_empty_directions_differ() {
        let f = ok("policies:\n  - name: a\n    cgroup: /a\n    bind: []\n");
        assert_eq!(f.policies[0].bind, Some(vec![]));
        assert_eq!(f.policies[0].connect, None);
    }

    #[test]
    fn null_direction_is_an_error_not_a_guess() {
        let d = errs("policies:\n  - name: a\n    cgroup: /a\n    bind:\n");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "policies[0].bind");
        assert!(d[0].message.contains("`[]`"), "{}", d[0].message);
    }

    #[test]
    fn mode_defaults_to_enforce_and_audit_parses() {
        let f =
            ok("policies:\n  - {name: a, cgroup: /a, mode: audit}\n  - {name: b, cgroup: /b}\n");
        assert_eq!(f.policies[0].mode, Mode::Audit);
        assert_eq!(f.policies[1].mode, Mode::Enforce);
    }

    #[test]
    fn every_error_is_listed_with_line_and_field() {
        let text = r#"policies:
  - name: a
    cgroup: /a
    colour: blue
    bind:
      - ports: [0, 70000, "9100-9000", "http", ephemeral]
        protocol: sctp
  - name: a
    cgroup: /a/
  - name: c
    cgroup: relative/path
    mode: strict
    connect:
      - ports: [ephemeral]
        addres: loopback
"#;
        let d = errs(text);
        let find = |field: &str| {
            d.iter()
                .find(|x| x.field == field)
                .unwrap_or_else(|| panic!("no diagnostic for {field}: {d:#?}"))
        };
        let unknown = find("policies[0].colour");
        assert_eq!((unknown.line, unknown.column), (4, 5));
        assert!(unknown.message.contains("unknown key `colour`"));
        assert!(
            find("policies[0].bind[0].ports[0]")
                .message
                .contains("ephemeral")
        );
        assert!(
            find("policies[0].bind[0].ports[1]")
                .message
                .contains("out of range")
        );
        assert!(
            find("policies[0].bind[0].ports[2]")
                .message
                .contains("inverted")
        );
        assert!(
            find("policies[0].bind[0].ports[3]")
                .message
                .contains("not a port")
        );
        let proto = find("policies[0].bind[0].protocol");
        assert_eq!(proto.line, 7);
        assert!(proto.message.contains("unknown value `sctp`"));
        assert!(find("policies[2].cgroup").message.contains("absolute"));
        // The second `a` duplicates both the name and the cgroup of the first,
        // even though the first has errors of its own.
        assert!(
            find("policies[1].name")
                .message
                .contains("duplicate policy name `a`")
        );
        assert!(
            find("policies[1].cgroup")
                .message
                .contains("already has policy `a`")
        );
        assert!(find("policies[2].mode").message.contains("enforce, audit"));
        assert!(
            find("policies[2].connect[0].ports[0]")
                .message
                .contains("bind rules only")
        );
        assert!(
            find("policies[2].connect[0].addres")
                .message
                .contains("unknown key")
        );
        // ephemeral in a bind rule is fine: no diagnostic for ports[4].
        assert!(!d.iter().any(|x| x.field == "policies[0].bind[0].ports[4]"));
        // Sorted by position.
        assert!(
            d.windows(2)
                .all(|w| (w[0].line, w[0].column) <= (w[1].line, w[1].column))
        );
    }

    #[test]
    fn duplicate_names_are_reported_once_valid_policies_are_known() {
        let d = errs("policies:\n  - {name: a, cgroup: /a}\n  - {name: a, cgroup: /b}\n");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 3);
        assert_eq!(d[0].field, "policies[1].name");
        assert!(d[0].message.contains("duplicate policy name `a`"));
        assert!(d[0].message.contains("line 2"));
    }

    #[test]
    fn one_policy_per_cgroup() {
        let d = errs("policies:\n  - {name: a, cgroup: /x}\n  - {name: b, cgroup: /x/}\n");
        assert_eq!(d.len(), 1);
        assert!(
            d[0].message.contains("already has policy `a`"),
            "{}",
            d[0].message
        );
    }

    #[test]
    fn missing_keys() {
        let d = errs("policies:\n  - mode: audit\n");
        assert!(d.iter().any(|x| x.message.contains("missing key `name`")));
        assert!(d.iter().any(|x| x.message.contains("missing key `cgroup`")));
        let d = errs("policies:\n  - {name: a, cgroup: /a, bind: [{protocol: tcp}]}\n");
        assert!(d[0].message.contains("missing key `ports`"));
        let d = errs("other: 1\n");
        assert!(d.iter().any(|x| x.message.contains("unknown key `other`")));
        assert!(
            d.iter()
                .any(|x| x.message.contains("missing key `policies`"))
        );
    }

    #[test]
    fn empty_file_and_syntax_errors() {
        assert!(errs("")[0].message.contains("empty"));
        let d = errs("policies:\n  - name: [\n");
        assert!(d[0].message.starts_with("YAML syntax error"));
    }

    #[test]
    fn allow_sockets() {
        let f = ok("policies: [{name: a, cgroup: /a, bind: [], allow_sockets: [raw, sctp, raw]}]");
        assert_eq!(
            f.policies[0].allow_sockets,
            vec![SocketKind::Raw, SocketKind::Sctp]
        );
        assert!(
            ok("policies: [{name: a, cgroup: /a}]").policies[0]
                .allow_sockets
                .is_empty()
        );
        let d = errs("policies: [{name: a, cgroup: /a, allow_sockets: [packet]}]");
        assert!(d[0].message.contains("unknown value `packet`"), "{d:?}");
        assert_eq!(d[0].field, "policies[0].allow_sockets[0]");
    }

    #[test]
    fn empty_port_list_is_an_error() {
        let d = errs("policies:\n  - {name: a, cgroup: /a, bind: [{ports: []}]}\n");
        assert!(d[0].message.contains("empty port list"));
    }

    #[test]
    fn quoted_and_plain_ports_and_ranges() {
        let f = ok(
            "policies:\n  - {name: a, cgroup: /a, bind: [{ports: [\"80\", 443, 1-1024, \" 5 - 6 \", \"7-7\"]}]}\n",
        );
        assert_eq!(
            f.policies[0].bind.as_ref().unwrap()[0].ports,
            vec![
                PortSpec::Port(80),
                PortSpec::Port(443),
                PortSpec::Range(1, 1024),
                PortSpec::Range(5, 6),
                PortSpec::Port(7),
            ]
        );
    }

    #[test]
    fn range_edges() {
        assert!(
            errs("policies: [{name: a, cgroup: /a, bind: [{ports: [\"1-65536\"]}]}]").len() == 1
        );
        assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [\"0-10\"]}]}]").len() == 1);
        assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [-1]}]}]").len() == 1);
        assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [1.5]}]}]").len() == 1);
        ok("policies: [{name: a, cgroup: /a, bind: [{ports: [\"1-65535\", 65535, 1]}]}]");
    }

    #[test]
    fn cgroup_paths_are_normalised_and_checked() {
        assert_eq!(normalize_cgroup("/a/b/").unwrap(), "/a/b");
        assert_eq!(normalize_cgroup("/").unwrap(), "/");
        assert!(normalize_cgroup("a/b").is_err());
        assert!(normalize_cgroup("/a//b").is_err());
        assert!(normalize_cgroup("/a/../b").is_err());
        let deep = "/x".repeat(31);
        assert!(normalize_cgroup(&deep).is_ok());
        let too_deep = "/x".repeat(32);
        assert!(normalize_cgroup(&too_deep).unwrap_err().contains("levels"));
    }

    fn sample(n: usize) -> String {
        let mut s = String::from("# header comment\npolicies:\n");
        for i in 0..n {
            if i % 3 == 0 {
                s.push_str(&format!(
                    "  - name: p{i}\n    cgroup: /c{i}\n    bind:\n      - ports: [{}, \"9000-9099\"]\n        protocol: tcp\n    # trailing comment {i}\n",
                    1000 + i
                ));
            } else {
                s.push_str(&format!(
                    "  - {{name: p{i}, cgroup: /c{i}, bind: [{{ports: [{}]}}], connect: []}}\n",
                    1000 + i
                ));
            }
        }
        s
    }

    #[test]
    fn an_edited_entry_is_reparsed_alone_and_matches_a_full_parse() {
        let text = sample(9);
        let prev = parse_policy_text(text.clone()).unwrap();
        // Change one port in a flow entry and in a block entry.
        for (from, to) in [("1004]", "2004]"), ("1003, ", "3003, 3004, ")] {
            let new = text.replacen(from, to, 1);
            let (p, how) = reparse_policy_text(&prev, new.clone()).unwrap();
            assert!(matches!(how, Reparse::Entry { .. }), "{how:?}");
            assert_eq!(p.file, parse_policy_str(&new).unwrap());
        }
        // Lines added inside an entry shift the lines of later entries.
        let new = text.replacen(
            "        protocol: tcp\n",
            "        protocol: tcp\n        family: ipv4\n\n",
            1,
        );
        let (p, how) = reparse_policy_text(&prev, new.clone()).unwrap();
        assert_eq!(how, Reparse::Entry { index: 0 });
        assert_eq!(p.file, parse_policy_str(&new).unwrap());
        // An invalid edit is reported at its position in the whole file.
        let new = text.replacen("1004]", "99999]", 1);
        let e = reparse_policy_text(&prev, new.clone()).unwrap_err();
        assert_eq!(e, parse_policy_str(&new).unwrap_err());
        assert_eq!(e[0].field, "policies[4].bind[0].ports[0]");
        // A new entry, or a name clash, takes the full path.
        let new = format!("{text}  - {{name: extra, cgroup: /extra}}\n");
        assert_eq!(reparse_policy_text(&prev, new).unwrap().1, Reparse::Full);
        let new = text.replacen("name: p4,", "name: p5,", 1);
        let e = reparse_policy_text(&prev, new).unwrap_err();
        assert!(e[0].message.contains("duplicate policy name"), "{e:?}");
        assert_eq!(
            reparse_policy_text(&prev, text).unwrap().1,
            Reparse::Unchanged
        );
    }

    /// Random edits: whatever path is taken, the result equals a full parse.
    #[test]
    fn reparse_always_agrees_with_a_full_parse() {
        let base = sample(12);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let pieces = [
            "",
            "\n",
            " ",
            "-",
            "  - ",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "#",
            "\"",
            "'",
            "7",
            "80",
            "name: q",
            "ports: [1]",
            "\n    mode: audit",
            "\n  - {name: z, cgroup: /z}",
            "&a",
            "*a",
        ];
        let mut prev = parse_policy_text(base.clone()).unwrap();
        let mut agreed = (0, 0);
        for _ in 0..20000 {
            let mut new = prev.text.clone();
            let at = rnd(new.len() + 1);
            let del = rnd(4).min(new.len() - at);
            new.replace_range(at..at + del, pieces[rnd(pieces.len())]);
            let full = parse_policy_str(&new);
            match (reparse_policy_text(&prev, new.clone()), full) {
                (Ok((p, how)), Ok(f)) => {
                    assert_eq!(p.file, f, "{how:?} after editing at {at}:\n{new}");
                    if matches!(how, Reparse::Entry { .. }) {
                        agreed.0 += 1;
                    }
                    prev = p;
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a, b, "errors differ for:\n{new}");
                    agreed.1 += 1;
                }
                (a, b) => panic!("disagree for:\n{new}\nreparse {a:?}\nfull {b:?}"),
            }
            if rnd(20) == 0 {
                prev = parse_policy_text(base.clone()).unwrap();
            }
        }
        assert!(agreed.0 > 500, "the entry path was exercised: {agreed:?}");
    }

    #[test]
    fn pod_and_unit_selectors_parse() {
        let f = ok("policies:
  - name: web
    pods: {namespace: 'team-*', labels: {app: web, tier: front}, container: server}
    bind: []
  - name: every
    pods: {}
    bind: []
  - {name: nginx, unit: nginx.service, bind: []}
");
        let Selector::Pods(p) = &f.policies[0].selector else {
            panic!("{:?}", f.policies[0].selector)
        };
        assert_eq!(p.namespace.as_deref(), Some("team-*"));
        assert_eq!(p.labels.len(), 2);
        assert_eq!(p.container.as_deref(), Some("server"));
        assert_eq!(
            f.policies[1].selector,
            Selector::Pods(PodSelector::default())
        );
        assert_eq!(
            f.policies[2].selector,
            Selector::Unit("nginx.service".into())
        );
    }

    #[test]
    fn selector_errors_name_the_field() {
        let d = errs("policies:\n  - {name: a, cgroup: /a, unit: a.service, bind: []}\n");
        assert!(
            d[0].message
                .contains("exactly one of `cgroup`, `pods` or `unit`"),
            "{d:?}"
        );
        let d = errs("policies:\n  - {name: a, unit: nginx, bind: []}\n");
        assert_eq!(d[0].field, "policies[0].unit");
        assert!(d[0].message.contains("invalid unit name `nginx`"), "{d:?}");
        let d = errs("policies:\n  - {name: a, pods: {namespace: '[x'}, bind: []}\n");
        assert_eq!(d[0].field, "policies[0].pods.namespace");
        let d = errs("policies:\n  - {name: a, pods: {labels: [app]}, bind: []}\n");
        assert_eq!(d[0].field, "policies[0].pods.labels");
        let d = errs("policies:\n  - {name: a, pods: {nmespace: x}, bind: []}\n");
        assert!(d[0].message.contains("nmespace"), "{d:?}");
    }

    #[test]
    fn identical_and_equally_specific_overlapping_selectors_are_ties() {
        // Identical.
        let d = errs(
            "policies:\n  - {name: a, unit: x.service, bind: []}\n  - {name: b, unit: x.service, bind: []}\n",
        );
        assert!(d[0].message.contains("selects the same as `a`"), "{d:?}");
        // Different labels, equally specific, both may match one pod.
        let d = errs(
            "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {labels: {tier: front}}, bind: []}\n",
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 3);
        assert!(d[0].message.contains("equally specific"), "{d:?}");
        assert!(d[0].message.contains("`a` (line 2"), "{d:?}");
        // Two namespace globs that could overlap.
        assert!(!errs(
            "policies:\n  - {name: a, pods: {namespace: 'team-*'}, bind: []}\n  - {name: b, pods: {namespace: '*-a'}, bind: []}\n",
        )
        .is_empty());
        // Exclusive: one label key with different values, different exact
        // namespaces, a glob that cannot match the other namespace, or
        // different containers.
        for text in [
            "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {labels: {app: db}}, bind: []}\n",
            "policies:\n  - {name: a, pods: {namespace: x}, bind: []}\n  - {name: b, pods: {namespace: y}, bind: []}\n",
            "policies:\n  - {name: a, pods: {namespace: 'team-*'}, bind: []}\n  - {name: b, pods: {namespace: 'ops-*'}, bind: []}\n",
            "policies:\n  - {name: a, pods: {container: x}, bind: []}\n  - {name: b, pods: {container: y}, bind: []}\n",
            // Different specificity: the more specific one wins, no tie.
            "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {namespace: x}, bind: []}\n",
            "policies:\n  - {name: a, unit: x.service, bind: []}\n  - {name: b, unit: y.service, bind: []}\n",
        ] {
            ok(text);
        }
    }

    #[test]
    fn policies_must_be_a_list() {
        let d = errs("policies:\n");
        assert!(d[0].message.contains("`policies: []`"));
        ok("policies: []\n");
    }
}
