//! The comparison of one operation: the oracle's prediction against the
//! syscall's answer and the events the agent wrote for its thread.

use serde_json::Value;

use super::{Answer, oracle::Prediction};

/// The event of the operation itself among a thread's events: the first
/// one that is not the `socket()` call's (`sock_create`).
pub fn own_event(events: &[Value]) -> Option<&Value> {
    events
        .iter()
        .find(|e| e.get("hook").and_then(Value::as_str) != Some("sock_create"))
}

/// The differences between a prediction and what happened.
pub fn compare(p: &Prediction, a: &Answer, events: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let eperm = a.eperm();
    if eperm != p.eperm {
        problems.push(format!(
            "syscall: model says {}, kernel answered {}",
            if p.eperm { "EPERM" } else { "not EPERM" },
            if a.ok {
                "success".to_owned()
            } else {
                format!("errno {}", a.errno)
            }
        ));
    }
    if events.len() != p.events.len() {
        problems.push(format!(
            "events: model says {} ({}), kernel wrote {}: {}",
            p.events.len(),
            p.events
                .iter()
                .map(|e| format!("{} {} {}", e.verdict, e.hook, e.rule))
                .collect::<Vec<_>>()
                .join(", "),
            events.len(),
            events
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    for (x, e) in p.events.iter().zip(events) {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let mut fields = vec![
            ("verdict", x.verdict.to_owned(), s("verdict")),
            ("hook", x.hook.to_owned(), s("hook")),
            ("policy", x.policy.clone(), s("policy")),
            ("rule", x.rule.clone(), s("rule")),
            ("family", x.family.to_owned(), s("family")),
        ];
        if x.hook != "sock_create" {
            fields.push((
                "port",
                x.port.to_string(),
                e.get("port").map(Value::to_string).unwrap_or_default(),
            ));
        }
        for (k, want, got) in fields {
            if want != got {
                problems.push(format!(
                    "event {k}: model says {want:?}, event says {got:?}"
                ));
            }
        }
    }
    problems
}
