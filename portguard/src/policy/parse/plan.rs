//! The port plan around the policies: `ranges:` (named port ranges, usable
//! in `ports:` and `reserved:` lists) and `reserved:` (ports no governed
//! workload may bind, `infrastructure` standing for
//! [`INFRASTRUCTURE_PORTS`]).
//!
//! Owns the checks of those two keys. May import the port item grammar
//! (`super::rules`), the parser's node helpers, the policy model and its
//! YAML tree.

use super::{Cx, rules::parse_port_item, walk::join};
use crate::policy::{
    INFRASTRUCTURE_PORTS, PortSet, PortSpec,
    yaml::{Kind, Node},
};

impl Cx {
    /// `ranges: {app: "3000-3999", db: "4000-4999", admin: 9000}`.
    pub(super) fn named_ranges(&mut self, node: &Node) {
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
    pub(super) fn reserved(&mut self, node: &Node) -> PortSet {
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
}
