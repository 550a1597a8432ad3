//! The top-level mapping and each `policies:` entry: required and unknown
//! keys, the policy name, `mode`, `allow_sockets`, `delegated`, exactly one selector,
//! and what makes two entries clash (a duplicate name, two policies on one
//! cgroup, equally specific selectors that may select the same pod).
//!
//! Owns `Cx::file` and `Cx::policy`. May import the other checks of the
//! parser (`super`), the policy model and its YAML tree.

use std::collections::HashMap;

use super::{
    Cx,
    rules::Dir,
    selectors::normalize_cgroup,
    walk::{join, peek_scalar},
};
use crate::policy::{
    Delegated, Mode, Policy, PolicyFile, Selector, SocketKind,
    yaml::{self, Kind, Node},
};

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
    "delegated",
];

impl Cx {
    /// The policies, and the position of each accepted entry.
    pub(super) fn file(&mut self, root: &Node) -> (PolicyFile, Vec<yaml::Pos>) {
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

    pub(super) fn policy(&mut self, node: &Node, field: &str) -> Option<Policy> {
        let entries = self.mapping(node, field, POLICY_KEYS)?;
        let before = self.diags.len();
        let mut name = None;
        let mut selectors: Vec<Selector> = Vec::new();
        let mut mode = Mode::Enforce;
        let mut bind = None;
        let mut connect = None;
        let mut allow_sockets = Vec::new();
        let mut delegated = None;
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
                "delegated" => {
                    delegated = self
                        .choice(
                            v,
                            &f,
                            &[("skip", Delegated::Skip), ("govern", Delegated::Govern)],
                        )
                        .map(|d| (d, *v));
                }
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
        if let Some((_, v)) = &delegated
            && given == ["cgroup"]
        {
            self.err(
                v,
                &join(field, "delegated"),
                "`delegated` applies to `unit:` and `pods:` selectors, which select cgroups by \
                 name; a `cgroup:` path is governed wherever it is",
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
            delegated: delegated.map(|(d, _)| d).unwrap_or_default(),
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
        // The built-in policies' names (`portguard:identifying`, the
        // `--fail-closed` stand-ins): a policy of the file named so would
        // share their id, and be taken for them.
        if name.starts_with(RESERVED_PREFIX) {
            self.err(
                node,
                field,
                format!(
                    "invalid policy name `{name}`: names starting with `{RESERVED_PREFIX}` are \
                     reserved for portguard's built-in policies"
                ),
            );
            return None;
        }
        Some(name)
    }
}

/// The prefix of the built-in policies' names.
const RESERVED_PREFIX: &str = "portguard:";
