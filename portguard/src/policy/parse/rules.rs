//! `bind:` and `connect:` rules: `ports`, `protocol`, `family`, `address`,
//! and each `ports:` item (a port, a range `"a-b"`, a named range, or
//! `ephemeral` in bind rules).
//!
//! Owns the rule checks and the port item grammar. May import the parser's
//! node helpers (`super::walk`), the policy model and its YAML tree.

use std::collections::BTreeMap;

use super::{Cx, walk::join};
use crate::policy::{
    AddressSel, FamilySel, PortSpec, ProtocolSel, Rule,
    yaml::{Kind, Node},
};

const RULE_KEYS: &[&str] = &["ports", "protocol", "family", "address"];

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Bind,
    Connect,
}

impl Cx {
    pub(super) fn rules(&mut self, node: &Node, field: &str, dir: Dir) -> Option<Vec<Rule>> {
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

pub(super) fn parse_port_item(
    node: &Node,
    ranges: &BTreeMap<String, (u16, u16)>,
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
