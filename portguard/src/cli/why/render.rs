//! `why`'s answer as text (every name from a workload escaped) or as one
//! JSON document.

use serde_json::{Value, json};

use super::{Answer, Fix, Verdict};
use crate::observe::text::escape;

/// Line `n` (1-based) of `text`.
fn line(text: &str, n: usize) -> &str {
    n.checked_sub(1)
        .and_then(|i| text.lines().nth(i))
        .unwrap_or("")
}

/// The line of the file's `reserved:` key, if any.
fn reserved_line(text: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.starts_with("reserved:"))
        .map(|i| i + 1)
}

/// Who the workload is, from its identity (empty when nothing is known).
fn who(identity: &Value) -> String {
    let s = |k: &str| identity[k].as_str().map(|v| escape(v).into_owned());
    if let (Some(ns), Some(pod)) = (s("k8s_namespace"), s("k8s_pod")) {
        return match s("container_name") {
            Some(c) => format!("pod {ns}/{pod}, container {c}"),
            None => format!("pod {ns}/{pod}"),
        };
    }
    if let Some(uid) = s("k8s_pod_uid") {
        return format!("pod uid {uid}");
    }
    if let Some(u) = s("unit") {
        return format!("unit {u}");
    }
    String::new()
}

/// What the deciding rule (or its absence) means, in a sentence.
fn rule_sentence(a: &Answer) -> String {
    let j = &a.judgement;
    let q = &a.query;
    let dir = q.op.direction();
    let proto = match q.proto {
        portguard_common::Proto::Tcp => "tcp",
        portguard_common::Proto::Udp => "udp",
    };
    let jd = q.judged();
    let family = if jd.ipv6 { "IPv6" } else { "IPv4" };
    let rule_at = |i: usize| {
        let n = j.rule_lines.get(i).copied().unwrap_or(0);
        format!("line {n}: {}", line(&a.policy_text, n).trim())
    };
    if j.builtin {
        return format!(
            "the built-in policy `{}` denies every {dir} it restricts",
            j.policy
        );
    }
    if j.allowed {
        if !j.rule.contains('[') {
            return format!(
                "`{}` has no `{dir}:` list: every {dir} is allowed",
                j.policy
            );
        }
        let parts: Vec<String> = j
            .rule
            .split('+')
            .enumerate()
            .map(|(i, r)| format!("{r} ({})", rule_at(i)))
            .collect();
        return format!("allowed by {}", parts.join(" and "));
    }
    let port = if q.port == 0 {
        "the port the kernel picks (`ephemeral`)".to_owned()
    } else {
        format!("{proto} port {}", q.port)
    };
    match j.rule.as_str() {
        "reserved" => format!(
            "port {} is in the file's `reserved:` ports (`reserved`)",
            q.port
        ),
        r if r.ends_with("[]") => {
            format!("`{dir}: []` in `{}`: every {dir} is denied ({r})", j.policy)
        }
        r if r.ends_with(".address") => format!(
            "{} allows {port} on loopback only ({}) (`{r}`)",
            r.trim_end_matches(".address"),
            rule_at(0)
        ),
        r if r.ends_with(".dual_stack") => format!(
            "a dual-stack [::] bind needs {port} for IPv4 too; `{}` allows it for IPv6 only \
             (`{r}`)",
            j.policy
        ),
        r => format!(
            "no `{dir}:` rule of `{}` allows {port} for {family}{} (`{r}`)",
            j.policy,
            if jd.loopback { " on loopback" } else { "" }
        ),
    }
}

/// The text view.
pub fn human(a: &Answer) -> String {
    let j = &a.judgement;
    let file = escape(&a.policy_file);
    let cgroup = escape(&a.target.cgroup);
    let mut out = format!(
        "{} by {} (cgroup {cgroup})\n",
        a.query.describe(),
        escape(&a.target.named)
    );
    let w = who(&a.identity);
    if !w.is_empty() {
        out += &format!("workload: {w}\n");
    }
    out += &format!(
        "verdict: {}\n",
        match j.verdict {
            Verdict::Allow => "ALLOWED".to_owned(),
            Verdict::Deny => "DENIED".to_owned(),
            Verdict::Audit => format!(
                "AUDIT: allowed, and reported as a denial (`{}` is in audit mode; enforce mode \
                 would deny it)",
                j.policy
            ),
        }
    );
    let policy_line = if j.builtin {
        "built-in".to_owned()
    } else {
        let n = a.ranked_line();
        format!("{file} line {n}")
    };
    out += &format!(
        "policy:  `{}` ({}), {policy_line}; governs {}{}\n",
        escape(&j.policy),
        j.mode.as_str(),
        escape(&a.policy_cgroup),
        if a.source == "offline" {
            " (offline: no agent asked)"
        } else {
            ""
        }
    );
    for r in &a.ranked {
        let who = if r.outcome == "chosen" {
            "chosen".to_owned()
        } else {
            format!("not `{}`", escape(&r.policy))
        };
        out += &format!("  {who}: {}\n", escape(&r.reason));
    }
    out += &format!("rule:    {}\n", escape(&rule_sentence(a)));
    if j.reserved {
        out += &format!(
            "reserved: port {} is reserved{}: the kernel denies it to every governed workload\n",
            a.query.port,
            reserved_line(&a.policy_text).map_or(String::new(), |n| format!(" ({file} line {n})"))
        );
    }
    match &j.fix {
        None => {}
        Some(Fix::Impossible { reason }) => out += &format!("fix:     none: {reason}\n"),
        Some(Fix::AddRule {
            policy,
            direction,
            rule,
            after_line,
            list_empty,
        }) => {
            if *list_empty {
                out += &format!(
                    "fix:     make `{direction}: []` of `{}` ({file} line {after_line}) a list with \
                     this rule:\n           - {rule}\n",
                    escape(policy)
                );
            } else {
                let indent: String = line(&a.policy_text, *after_line)
                    .chars()
                    .take_while(|c| *c == ' ')
                    .collect();
                out += &format!(
                    "fix:     add to the `{direction}:` list of `{}`, after {file} line \
                     {after_line}:\n{indent}- {rule}\n",
                    escape(policy)
                );
            }
        }
    }
    if let Some(w) = &a.warning {
        out += &format!("warning: {}\n", escape(w));
    }
    if a.events.is_empty() {
        out += &format!(
            "history: no event on port {} for this workload\n",
            a.query.port
        );
    } else {
        out += &format!("history: last events on port {}:\n", a.query.port);
        for e in &a.events {
            out += &format!("  {}\n", escape(&event_line(e)));
        }
    }
    out
}

/// One event, in a line.
fn event_line(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("-");
    let addr = s("address");
    let addr = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    };
    let count = e["count"].as_u64().unwrap_or(1);
    format!(
        "{} {} {} {} {addr}:{} pid {} ({}){} rule {}",
        s("time"),
        s("verdict"),
        s("hook"),
        s("protocol"),
        e["port"].as_u64().unwrap_or(0),
        e["pid"].as_u64().unwrap_or(0),
        s("comm"),
        if count > 1 {
            format!(" x{count}")
        } else {
            String::new()
        },
        s("rule"),
    )
}

impl Answer {
    /// The line of the governing policy's entry in the file.
    fn ranked_line(&self) -> usize {
        crate::policy::parse_policy_str(&self.policy_text)
            .ok()
            .and_then(|f| {
                f.policies
                    .iter()
                    .find(|p| p.name == self.judgement.policy)
                    .map(|p| p.line)
            })
            .unwrap_or(0)
    }
}

/// The JSON view.
pub fn json(a: &Answer) -> Value {
    let j = &a.judgement;
    let q = &a.query;
    let fix = match &j.fix {
        None => Value::Null,
        Some(Fix::Impossible { reason }) => json!({"kind": "none", "reason": reason}),
        Some(Fix::AddRule {
            policy,
            direction,
            rule,
            after_line,
            list_empty,
        }) => json!({
            "kind": "add_rule", "policy": policy, "list": direction, "rule": rule,
            "after_line": after_line, "list_empty": list_empty,
        }),
    };
    json!({
        "ok": true,
        "operation": {
            "op": q.op.as_str(),
            "protocol": match q.proto {
                portguard_common::Proto::Tcp => "tcp",
                portguard_common::Proto::Udp => "udp",
            },
            "address": q.addr.to_string(),
            "port": q.port,
            "dual_stack": j.dual_stack,
            "loopback": j.loopback,
        },
        "target": {
            "named": a.target.named,
            "cgroup": a.target.cgroup,
            "cgroup_id": a.target.cgroup_id,
            "identity": a.identity,
        },
        "source": a.source,
        "policy_file": a.policy_file,
        "policy": j.policy,
        "policy_line": a.ranked_line(),
        "builtin": j.builtin,
        "policy_cgroup": a.policy_cgroup,
        "mode": j.mode.as_str(),
        "verdict": j.verdict.as_str(),
        "allowed": j.allowed,
        "rule": j.rule,
        "rule_lines": j.rule_lines,
        "explanation": rule_sentence(a),
        "reserved": j.reserved,
        "fix": fix,
        "candidates": a.ranked.iter().map(|r| json!({
            "policy": r.policy, "cgroup": r.cgroup, "selector": r.selector,
            "specificity": r.specificity, "outcome": r.outcome, "reason": r.reason,
        })).collect::<Vec<_>>(),
        "warning": a.warning,
        "events": a.events,
    })
}
