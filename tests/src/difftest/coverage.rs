//! Which parts of the decision space the cases reached: a count per
//! (policy key value x hook x family) cell, where the key values are those
//! of the policy governing the case (and of the operation), and the hook
//! and family are what judged it. A cell the generator could reach but did
//! not is a gap in the generator, not a pass: [`Coverage::gaps`].

use std::collections::BTreeMap;

use super::{
    Config,
    cases::{FileSpec, Op, OpKind, PortItem, RuleSpec, policy_name},
    oracle::Prediction,
};

/// Every hook the generator aims at, and the families each can judge.
pub const HOOKS: &[(&str, &[&str])] = &[
    ("bind4", &["ipv4"]),
    ("bind6", &["ipv4", "ipv6"]),
    ("post_bind4", &["ipv4"]),
    ("post_bind6", &["ipv4", "ipv6"]),
    ("connect4", &["ipv4"]),
    ("connect6", &["ipv4", "ipv6"]),
    ("sendmsg4", &["ipv4"]),
    // A mapped destination takes the IPv4 path (sendmsg4).
    ("sendmsg6", &["ipv6"]),
    ("listen", &["ipv4", "ipv6"]),
    ("sock_create", &["ipv4", "ipv6"]),
];

const fn is_bind(hook: &str) -> bool {
    matches!(hook.as_bytes(), [b'b', ..] | [b'p', ..] | [b'l', ..])
}

const fn is_dest(hook: &str) -> bool {
    matches!(hook.as_bytes(), [b'c', ..] | [b's', b'e', ..])
}

/// The key values a cell can have, and whether (key value, hook, family)
/// is reachable at all.
fn reachable(key: &str, hook: &str, family: &str) -> bool {
    let (k, v) = key.split_once('=').unwrap_or((key, ""));
    let v6hook = hook.ends_with('6');
    match k {
        "bind" | "reserved" | "event.rule" => is_bind(hook),
        "connect" => is_dest(hook),
        "allow_sockets" => hook == "sock_create",
        "rule.protocol" | "rule.family" | "rule.address" => !hook.starts_with("sock"),
        "rule.ports" => match v {
            "ephemeral" => is_bind(hook),
            _ => !hook.starts_with("sock"),
        },
        "op.port0" => hook.starts_with("post_bind"),
        // listen() cannot be denied here: the listener is cut off.
        "verdict" if hook == "listen" => v != "deny",
        "verdict" => v != "cut_off",
        "op.protocol" => match v {
            "raw" => hook == "sock_create",
            _ if hook == "listen" => v == "tcp" || v == "mptcp",
            "udp" => !hook.starts_with("sock"),
            // A UDP-Lite connect() runs no hook (see the oracle).
            "udplite" => !hook.starts_with("sock") && !hook.starts_with("connect"),
            _ => !hook.starts_with("sock") && !hook.starts_with("sendmsg"),
        },
        "op.variant" if hook == "listen" => match v {
            "v4" => family == "ipv4",
            "v6" | "dual-stack" => family == "ipv6",
            _ => false,
        },
        "op.variant" => match v {
            "v4" => !v6hook && family == "ipv4" && hook != "sock_create",
            "v6" => v6hook && family == "ipv6",
            "v4-mapped" if hook.starts_with("sendmsg") => hook == "sendmsg4" && family == "ipv4",
            "v4-mapped" => v6hook && family == "ipv4" && hook != "sock_create",
            "dual-stack" => (hook == "bind6" || hook == "post_bind6") && family == "ipv6",
            _ => false,
        },
        _ => true,
    }
}

/// Every key value the table has a row for.
const KEYS: &[&str] = &[
    "policy=none",
    "policy=own",
    "policy=inherited",
    "mode=enforce",
    "mode=audit",
    "verdict=allow",
    "verdict=deny",
    "verdict=audit",
    "verdict=cut_off",
    "bind=absent",
    "bind=[]",
    "bind=rules",
    "connect=absent",
    "connect=[]",
    "connect=rules",
    "reserved=yes",
    "reserved=no",
    "allow_sockets=raw",
    "allow_sockets=none",
    "rule.protocol=tcp",
    "rule.protocol=udp",
    "rule.protocol=any",
    "rule.protocol=(default)",
    "rule.family=ipv4",
    "rule.family=ipv6",
    "rule.family=any",
    "rule.family=(default)",
    "rule.address=loopback",
    "rule.address=any",
    "rule.address=(default)",
    "rule.ports=port",
    "rule.ports=range",
    "rule.ports=named",
    "rule.ports=ephemeral",
    "op.protocol=tcp",
    "op.protocol=udp",
    "op.protocol=udplite",
    "op.protocol=mptcp",
    "op.protocol=raw",
    "op.variant=v4",
    "op.variant=v6",
    "op.variant=v4-mapped",
    "op.variant=dual-stack",
    "op.port0=yes",
    "event.rule=reserved",
];

#[derive(Clone, Debug, Default)]
pub struct Coverage {
    cells: BTreeMap<(String, &'static str, &'static str), u64>,
}

fn rule_keys(rules: &[RuleSpec], keys: &mut Vec<String>) {
    for r in rules {
        keys.push(format!(
            "rule.protocol={}",
            r.protocol.unwrap_or("(default)")
        ));
        keys.push(format!("rule.family={}", r.family.unwrap_or("(default)")));
        keys.push(format!("rule.address={}", r.address.unwrap_or("(default)")));
        for p in &r.ports {
            keys.push(
                match p {
                    PortItem::Port(_) => "rule.ports=port",
                    PortItem::Range(..) => "rule.ports=range",
                    PortItem::Named(_) => "rule.ports=named",
                    PortItem::Ephemeral => "rule.ports=ephemeral",
                    PortItem::Infrastructure => continue,
                }
                .to_owned(),
            );
        }
    }
}

impl Coverage {
    /// Count one case: `op` under `file`, judged as `p` says.
    pub fn record(&mut self, file: &FileSpec, op: &Op, p: &Prediction) {
        let mut keys = vec![
            format!("op.protocol={}", op.proto),
            format!("verdict={}", p.verdict()),
        ];
        if op.kind != OpKind::Raw {
            keys.push(format!("op.variant={}", op.variant()));
        }
        if op.kind == OpKind::Bind && op.port == 0 {
            keys.push("op.port0=yes".to_owned());
        }
        // Denied (or audited, or cut off) for a reserved port.
        if p.events
            .iter()
            .any(|e| e.hook == p.hook && e.rule == "reserved")
        {
            keys.push("event.rule=reserved".to_owned());
        }
        let gov = p
            .policy
            .as_ref()
            .and_then(|name| file.policies.iter().find(|q| policy_name(q.node) == *name));
        match gov {
            None => keys.push("policy=none".to_owned()),
            Some(g) => {
                keys.push(
                    if g.node == op.caller {
                        "policy=own"
                    } else {
                        "policy=inherited"
                    }
                    .to_owned(),
                );
                keys.push(format!(
                    "mode={}",
                    if g.audit { "audit" } else { "enforce" }
                ));
                let dir = |name: &str, rules: &Option<Vec<RuleSpec>>, keys: &mut Vec<String>| {
                    let value = match rules {
                        None => format!("{name}=absent"),
                        Some(r) if r.is_empty() => format!("{name}=[]"),
                        Some(r) => {
                            rule_keys(r, keys);
                            format!("{name}=rules")
                        }
                    };
                    keys.push(value);
                };
                match op.kind {
                    OpKind::Bind | OpKind::Listen => {
                        dir("bind", &g.bind, &mut keys);
                        keys.push(format!(
                            "reserved={}",
                            if file.reserved.is_empty() {
                                "no"
                            } else {
                                "yes"
                            }
                        ));
                    }
                    OpKind::Connect | OpKind::Sendto => dir("connect", &g.connect, &mut keys),
                    OpKind::Raw => keys.push(format!(
                        "allow_sockets={}",
                        if g.allow_raw { "raw" } else { "none" }
                    )),
                }
            }
        }
        keys.sort();
        keys.dedup();
        if p.hook == "none" {
            return; // refused before any hook (see the oracle)
        }
        let hook = HOOKS
            .iter()
            .map(|(h, _)| *h)
            .find(|h| *h == p.hook)
            .expect("a known hook");
        let family = if p.family == "ipv4" { "ipv4" } else { "ipv6" };
        for k in keys {
            *self.cells.entry((k, hook, family)).or_default() += 1;
        }
    }

    /// Reachable cells no case hit.
    pub fn gaps(&self) -> Vec<String> {
        let mut out = Vec::new();
        for key in KEYS {
            for (hook, fams) in HOOKS {
                for fam in *fams {
                    if reachable(key, hook, fam)
                        && !self.cells.contains_key(&((*key).to_owned(), *hook, *fam))
                    {
                        out.push(format!("{key} x {hook} x {fam}"));
                    }
                }
            }
        }
        out
    }

    /// The table, as markdown: a row per key value, a column per (hook,
    /// family); `-` where the cell cannot be reached, **0** for a gap.
    pub fn markdown(&self, cfg: &Config) -> String {
        let mut s = format!(
            "# difftest coverage\n\nCases per (key value x hook x family), seed {}, {} cases. \
             `-`: cannot happen; **0**: a gap in the generator.\n\n| key value |",
            cfg.seed, cfg.cases
        );
        let cols: Vec<(&str, &str)> = HOOKS
            .iter()
            .flat_map(|(h, fams)| fams.iter().map(move |f| (*h, *f)))
            .collect();
        for (h, f) in &cols {
            s.push_str(&format!(
                " {h} {} |",
                if *f == "ipv4" { "v4" } else { "v6" }
            ));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(cols.len()));
        s.push('\n');
        for key in KEYS {
            s.push_str(&format!("| `{key}` |"));
            for (h, f) in &cols {
                let n = self.cells.get(&((*key).to_owned(), *h, *f)).copied();
                s.push_str(&match (reachable(key, h, f), n) {
                    (false, None) => " - |".to_owned(),
                    (true, None) => " **0** |".to_owned(),
                    (_, Some(n)) => format!(" {n} |"),
                });
            }
            s.push('\n');
        }
        let gaps = self.gaps();
        s.push_str(&format!("\n{} gap(s)", gaps.len()));
        for g in gaps {
            s.push_str(&format!("\n- {g}"));
        }
        s.push('\n');
        s
    }
}
