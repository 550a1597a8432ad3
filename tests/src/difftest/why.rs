//! `portguard why` against the kernel: for each case `why` can be asked
//! about (a bind to a named port, a connect or an unconnected send; tcp,
//! mptcp or udp; a socket the policy lets the caller create), its offline
//! judgement ([`portguard::policy::why::judge`], the code behind `portguard
//! why --policy`) must be what the kernel did: the same verdict (allow,
//! deny or audit) and, for a denial or audit, the event's `rule`.
//!
//! A bind to port 0 is judged by `why` as the `ephemeral` rule; the kernel
//! judges the port it picks, which may also be allowed by a port rule that
//! covers it. So for port 0 only one direction holds, and is checked: what
//! `why` allows, the kernel allows.

use portguard::policy::why::{Op as WhyOp, Query, Verdict, judge};
use portguard_common::Proto;
use serde_json::Value;

use super::{
    Answer,
    cases::{Op, OpKind},
    oracle::{Model, Prediction},
};

/// The `why` question for `op`, if `why` can be asked it.
pub fn query(op: &Op) -> Option<Query> {
    let kind = match op.kind {
        OpKind::Bind => WhyOp::Bind,
        OpKind::Connect | OpKind::Sendto => WhyOp::Connect,
        // An unbound listen's port is the kernel's pick (cut off, not
        // denied, here); a raw socket is no bind or connect.
        OpKind::Listen | OpKind::Raw => return None,
    };
    let proto = match op.proto {
        "tcp" | "mptcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        // `why` asks about tcp and udp only.
        _ => return None,
    };
    Some(Query {
        op: kind,
        proto,
        addr: op.addr,
        port: op.port,
        v6only: op.v6only,
    })
}

/// Where `why`'s judgement of `op` differs from what the kernel did (`a`,
/// `events`); `p` is the oracle's prediction (which hook judges, which
/// policy governs). `None`: `why` cannot be asked about this case.
pub fn compare(
    model: &Model,
    op: &Op,
    p: &Prediction,
    a: &Answer,
    events: &[Value],
) -> Option<Vec<String>> {
    let policy = p.policy.as_ref()?;
    // Refused before the operation's hook (a socket kind the policy does
    // not allow, a send the kernel refuses first): nothing `why` judges.
    if p.hook == "none" || p.events.iter().any(|e| e.hook == "sock_create") {
        return None;
    }
    let q = query(op)?;
    let j = match judge(&model.file, policy, &q) {
        Ok(j) => j,
        Err(e) => return Some(vec![format!("why: {e}")]),
    };
    let own = super::compare::own_event(events);
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let kernel = match own {
        Some(e) => s(e, "verdict"),
        None if a.eperm() => "deny".to_owned(),
        None => "allow".to_owned(),
    };
    let mut problems = Vec::new();
    let port0 = op.kind == OpKind::Bind && op.port == 0;
    if port0 {
        if j.verdict == Verdict::Allow && kernel != "allow" {
            problems.push(format!(
                "why: allows the port-0 bind (`{}`), the kernel's verdict is {kernel}",
                j.rule
            ));
        }
        return Some(problems);
    }
    if j.verdict.as_str() != kernel {
        problems.push(format!(
            "why: says {} (rule {}), the kernel's verdict is {kernel}",
            j.verdict.as_str(),
            j.rule
        ));
    } else if let Some(e) = own
        && j.rule != s(e, "rule")
    {
        problems.push(format!(
            "why: names rule {:?}, the event names {:?}",
            j.rule,
            s(e, "rule")
        ));
    }
    Some(problems)
}
