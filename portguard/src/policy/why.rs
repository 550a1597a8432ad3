//! `portguard why`'s judgement: one operation (bind, connect or listen; a
//! protocol, an address and a port) held against one policy of a file
//! ([`judge`]), and which of the policies selecting a cgroup applies
//! ([`precedence`]).
//!
//! The verdict is the kernel's: the policy is compiled as the agent
//! compiles it (`compile` and the file's `reserved:` taken out,
//! `apply_reserved`) and asked through [`CompiledPolicy::allows_bound`] /
//! [`CompiledPolicy::allows_connect`], with the address classified by the
//! shared classifier. The explanation (which rule, or why none) is
//! [`super::explain`]'s, the one events carry in their `rule` field. The
//! suggested fix is checked the same way: the rule is added to a copy of
//! the policy, compiled again, and offered only if the operation is then
//! allowed.
//!
//! May import: `crate::policy` and portguard-common only.

use std::net::IpAddr;

use portguard_common::{AddrClass, AddrRole, Family, Proto, classify_ip};

use super::{
    AddressSel, CompiledPolicy, FamilySel, Mode, Policy, PolicyFile, PortSpec, ProtocolSel, Rule,
    Selector, apply_reserved, builtin, compile,
    explain::{self, Dir, Judged},
    most_specific,
};

/// The operation asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Bind,
    Connect,
    /// `listen()`: judged on the port the socket is bound to, as a bind
    /// (an unbound socket's autobind: port 0, `ephemeral`).
    Listen,
}

impl Op {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bind" => Some(Self::Bind),
            "connect" => Some(Self::Connect),
            "listen" => Some(Self::Listen),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Connect => "connect",
            Self::Listen => "listen",
        }
    }

    /// The policy list that decides it.
    pub const fn direction(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Bind | Self::Listen => "bind",
        }
    }
}

/// One operation: `bind tcp [::]:8080`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub op: Op,
    pub proto: Proto,
    pub addr: IpAddr,
    /// Port 0 for a bind or listen: the port the kernel picks (judged as
    /// `ephemeral`).
    pub port: u16,
    /// An IPv6 socket with `IPV6_V6ONLY` (else a bind to `[::]` is
    /// dual-stack, Linux's default, and needs the port for IPv4 too).
    pub v6only: bool,
}

impl Query {
    /// From the command line's `OP PROTO ADDR:PORT` (`[::1]:53` for IPv6).
    pub fn parse(op: &str, proto: &str, addr_port: &str) -> Result<Self, String> {
        let op = Op::parse(op)
            .ok_or_else(|| format!("operation `{op}`: expected bind, connect or listen"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(format!("protocol `{proto}`: expected tcp or udp")),
        };
        if op == Op::Listen && proto != Proto::Tcp {
            return Err("listen: only tcp sockets listen".to_owned());
        }
        let sa: std::net::SocketAddr = addr_port.parse().map_err(|_| {
            format!(
                "`{addr_port}`: expected ADDRESS:PORT, e.g. 0.0.0.0:8080, 127.0.0.1:53 or \
                 [::]:443"
            )
        })?;
        if op == Op::Connect && sa.port() == 0 {
            return Err("connect: port 0 is no destination".to_owned());
        }
        Ok(Self {
            op,
            proto,
            addr: sa.ip(),
            port: sa.port(),
            v6only: false,
        })
    }

    /// `bind tcp [::]:8080`.
    pub fn describe(&self) -> String {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        format!(
            "{} {proto} {}",
            self.op.as_str(),
            std::net::SocketAddr::new(self.addr, self.port)
        )
    }

    fn role(&self) -> AddrRole {
        match self.op {
            Op::Connect => AddrRole::Destination,
            Op::Bind | Op::Listen => AddrRole::Local,
        }
    }

    /// A `[::]` bind on a dual-stack socket.
    pub fn dual_stack(&self) -> bool {
        self.op != Op::Connect && !self.v6only && classify_ip(self.addr, self.role()).unspecified_v6
    }

    /// What the kernel programs judge, as [`explain`] reads it.
    pub fn judged(&self) -> Judged {
        let view = classify_ip(self.addr, self.role());
        Judged {
            dir: match self.op {
                Op::Connect => Dir::Connect,
                Op::Bind | Op::Listen => Dir::Bind,
            },
            tcp: Some(self.proto == Proto::Tcp),
            ipv6: view.family == Family::Ipv6,
            loopback: view.class == AddrClass::Loopback,
            port: self.port,
            ephemeral: self.port == 0,
            dual_stack: self.dual_stack(),
        }
    }

    /// The kernel's decision under `policy` (compiled, reserved ports
    /// taken out).
    pub fn allowed_by(&self, policy: &CompiledPolicy) -> bool {
        let view = classify_ip(self.addr, self.role());
        match self.op {
            Op::Connect => policy.allows_connect(self.proto, view, self.port),
            // Port 0: the `ephemeral` bit, which is port 0 of the sets.
            Op::Bind | Op::Listen => {
                policy.allows_bound(self.proto, view, self.port, self.dual_stack(), false)
            }
        }
    }
}

/// What the operation gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// An audit-mode policy: allowed, and reported as enforce mode would
    /// deny it.
    Audit,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

/// The smallest change that would allow a denied operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Add `rule` (flow-style YAML) to the policy's `direction` list, after
    /// line `after_line` (the list's last rule, or the policy's entry line
    /// when the list is `[]`).
    AddRule {
        policy: String,
        direction: &'static str,
        rule: String,
        after_line: usize,
        /// The list is empty (`bind: []`): it must become a list.
        list_empty: bool,
    },
    /// No policy change allows it.
    Impossible { reason: String },
}

/// [`judge`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub policy: String,
    pub mode: Mode,
    /// A built-in stand-in (`portguard:identifying`, `--fail-closed`), not
    /// a policy of the file.
    pub builtin: bool,
    /// What the policy's rules (and the file's `reserved:`) say, whatever
    /// the mode.
    pub allowed: bool,
    pub verdict: Verdict,
    /// Allowed: the rules that allow it (`bind[0]`, `bind[0]+bind[2]` for a
    /// dual-stack bind two rules allow together), or `bind` when the list
    /// is absent (unrestricted). Denied: the event `rule` field
    /// ([`explain::rule_in_file`]).
    pub rule: String,
    /// The lines of the rules `rule` names (for `bind[N].address`, the
    /// loopback-only rule's).
    pub rule_lines: Vec<usize>,
    /// The port is in the file's `reserved:` ports (a bind or listen).
    pub reserved: bool,
    pub dual_stack: bool,
    pub loopback: bool,
    /// Denied or audited: what would allow it.
    pub fix: Option<Fix>,
}

/// A built-in stand-in policy by name, compiled.
fn builtin_policy(name: &str) -> Option<CompiledPolicy> {
    if name == builtin::IDENTIFYING {
        return Some(builtin::identifying());
    }
    if name == builtin::UNFIT {
        return Some(builtin::unfit());
    }
    name.strip_prefix(builtin::FAIL_CLOSED)
        .filter(|rest| rest.starts_with(':'))
        .map(|_| CompiledPolicy {
            name: name.to_owned(),
            connect: None,
            ..builtin::identifying()
        })
}

/// `policy` compiled as the agent compiles it: `reserved:` taken out.
fn compiled(policy: &Policy, file: &PolicyFile) -> CompiledPolicy {
    let mut c = [compile(policy)];
    apply_reserved(&mut c, &file.reserved);
    let [c] = c;
    c
}

/// Judge `q` under policy `name` of `file` (or a built-in stand-in of that
/// name). `Err` names a policy the file does not have.
pub fn judge(file: &PolicyFile, name: &str, q: &Query) -> Result<Judgement, String> {
    let j = q.judged();
    let bindish = q.op != Op::Connect;
    let reserved = bindish && file.reserved.contains(q.port) && q.port != 0;
    let Some(policy) = file.policies.iter().find(|p| p.name == name) else {
        let b = builtin_policy(name)
            .ok_or_else(|| format!("policy `{name}` is not in the policy file"))?;
        let allowed = q.allowed_by(&b);
        return Ok(Judgement {
            policy: name.to_owned(),
            mode: b.mode,
            builtin: true,
            allowed,
            verdict: if allowed {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            rule: if allowed {
                q.op.direction().to_owned()
            } else {
                format!("{}[]", q.op.direction())
            },
            rule_lines: Vec::new(),
            reserved,
            dual_stack: j.dual_stack,
            loopback: j.loopback,
            fix: (!allowed).then(|| Fix::Impossible {
                reason: builtin_reason(name),
            }),
        });
    };
    let allowed = q.allowed_by(&compiled(policy, file));
    let list = match q.op {
        Op::Connect => policy.connect.as_deref(),
        Op::Bind | Op::Listen => policy.bind.as_deref(),
    };
    let line_of = |i: usize| list.and_then(|l| l.get(i)).map_or(0, |r| r.line);
    let (rule, rule_lines) = if allowed {
        let which = explain::allowing_rules(policy, &j);
        if which.is_empty() {
            (q.op.direction().to_owned(), Vec::new())
        } else {
            (
                which
                    .iter()
                    .map(|i| format!("{}[{i}]", q.op.direction()))
                    .collect::<Vec<_>>()
                    .join("+"),
                which.iter().map(|&i| line_of(i)).collect(),
            )
        }
    } else {
        let rule = explain::rule_in_file(file, name, &j, bindish)
            .unwrap_or_else(|| q.op.direction().to_owned());
        let lines = rule
            .strip_prefix(q.op.direction())
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.split(']').next())
            .and_then(|n| n.parse::<usize>().ok())
            .map(|i| vec![line_of(i)])
            .unwrap_or_default();
        (rule, lines)
    };
    let verdict = match (allowed, policy.mode) {
        (true, _) => Verdict::Allow,
        (false, Mode::Audit) => Verdict::Audit,
        (false, Mode::Enforce) => Verdict::Deny,
    };
    let fix = (!allowed).then(|| fix(file, policy, q, reserved));
    Ok(Judgement {
        policy: name.to_owned(),
        mode: policy.mode,
        builtin: false,
        allowed,
        verdict,
        rule,
        rule_lines,
        reserved,
        dual_stack: j.dual_stack,
        loopback: j.loopback,
        fix,
    })
}

fn builtin_reason(name: &str) -> String {
    if name == builtin::IDENTIFYING {
        "the cgroup is held by the built-in `portguard:identifying` policy (every bind and \
         connect denied) until the CRI runtime names its pod; then its own policy applies"
            .to_owned()
    } else {
        format!(
            "the cgroup is held by the built-in `{name}` policy (every bind denied): the \
             agent could not apply the policy file (see its log and `portguard status`)"
        )
    }
}

/// The rule that would allow `q` under `policy`, in flow style: the port,
/// the protocol, the family when one family is enough, and `address:
/// loopback` when the address is loopback: nothing wider than needed.
fn rule_for(policy: &Policy, file: &PolicyFile, q: &Query) -> Rule {
    let j = q.judged();
    let family = if j.dual_stack {
        // Allowed for IPv6 alone already? Then IPv4 is what is missing.
        let v6 = Query { v6only: true, ..*q };
        if v6.allowed_by(&compiled(policy, file)) {
            FamilySel::Ipv4
        } else {
            FamilySel::Any
        }
    } else if j.ipv6 {
        FamilySel::Ipv6
    } else {
        FamilySel::Ipv4
    };
    Rule {
        ports: vec![if q.port == 0 {
            PortSpec::Ephemeral
        } else {
            PortSpec::Port(q.port)
        }],
        protocol: match q.proto {
            Proto::Tcp => ProtocolSel::Tcp,
            Proto::Udp => ProtocolSel::Udp,
        },
        family,
        address: if j.loopback {
            AddressSel::Loopback
        } else {
            AddressSel::Any
        },
        line: 0,
    }
}

/// A rule in the flow style of the policy grammar.
pub fn rule_text(r: &Rule) -> String {
    let ports: Vec<String> = r
        .ports
        .iter()
        .map(|p| match *p {
            PortSpec::Port(n) => n.to_string(),
            PortSpec::Range(a, b) => format!("\"{a}-{b}\""),
            PortSpec::Ephemeral => "ephemeral".to_owned(),
        })
        .collect();
    let mut s = format!("{{ports: [{}]", ports.join(", "));
    match r.protocol {
        ProtocolSel::Tcp => s.push_str(", protocol: tcp"),
        ProtocolSel::Udp => s.push_str(", protocol: udp"),
        ProtocolSel::Any => {}
    }
    match r.family {
        FamilySel::Ipv4 => s.push_str(", family: ipv4"),
        FamilySel::Ipv6 => s.push_str(", family: ipv6"),
        FamilySel::Any => {}
    }
    if r.address == AddressSel::Loopback {
        s.push_str(", address: loopback");
    }
    s.push('}');
    s
}

fn fix(file: &PolicyFile, policy: &Policy, q: &Query, reserved: bool) -> Fix {
    let direction = q.op.direction();
    if reserved {
        return Fix::Impossible {
            reason: format!(
                "port {} is in the file's `reserved:` ports: no policy may bind it; take it \
                 out of `reserved:` or move the service to another port",
                q.port
            ),
        };
    }
    let rule = rule_for(policy, file, q);
    // Offered only if it works: the policy with the rule, compiled again.
    let mut with = policy.clone();
    let list = match q.op {
        Op::Connect => with.connect.get_or_insert_with(Vec::new),
        Op::Bind | Op::Listen => with.bind.get_or_insert_with(Vec::new),
    };
    let (after_line, list_empty) = match list.last() {
        Some(last) => (last.line, false),
        None => (policy.line, true),
    };
    list.push(rule.clone());
    if !q.allowed_by(&compiled(&with, file)) {
        return Fix::Impossible {
            reason: format!("no single `{direction}:` rule allows it"),
        };
    }
    Fix::AddRule {
        policy: policy.name.clone(),
        direction,
        rule: rule_text(&rule),
        after_line,
        list_empty,
    }
}

/// A policy that selects the target cgroup or one of its ancestors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Index in the policy file.
    pub index: usize,
    /// The cgroup it selects (the target or an ancestor).
    pub cgroup: String,
}

/// Why a candidate applies or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranked {
    pub policy: String,
    pub cgroup: String,
    pub selector: String,
    pub specificity: u32,
    /// `chosen`, `less-specific`, `tie`, `farther` or `not-governing`.
    pub outcome: &'static str,
    pub reason: String,
}

/// Which candidate governs, and why each other one does not. `chain` is
/// the target cgroup and its ancestors, deepest first; `governing` the
/// policy (file index) and cgroup that govern it, as the agent applied it
/// or an offline resolution found it.
pub fn precedence(
    policies: &[Policy],
    chain: &[String],
    candidates: &[Candidate],
    governing: Option<(usize, &str)>,
) -> Vec<Ranked> {
    let depth = |c: &str| chain.iter().position(|x| x == c).unwrap_or(usize::MAX);
    let mut out: Vec<Ranked> = Vec::new();
    let mut sorted = candidates.to_vec();
    sorted.sort_by_key(|c| (depth(&c.cgroup), c.index));
    sorted.dedup();
    for c in &sorted {
        let Some(p) = policies.get(c.index) else {
            continue;
        };
        let spec = p.selector.specificity();
        let how = |s: &Selector| s.describe();
        let (outcome, reason) = match governing {
            Some((w, at)) if w == c.index && at == c.cgroup => (
                "chosen",
                if at == chain.first().map_or("", String::as_str) {
                    format!("selects the cgroup itself ({})", how(&p.selector))
                } else {
                    format!(
                        "selects {at}, the nearest governed ancestor ({})",
                        how(&p.selector)
                    )
                },
            ),
            Some((w, at)) if at == c.cgroup => {
                let winner = &policies[w];
                let ws = winner.selector.specificity();
                if most_specific([(w, &winner.selector), (c.index, &p.selector)]) == Some(w)
                    && ws == spec
                {
                    (
                        "tie",
                        format!(
                            "as specific as `{}` ({spec}); `{}` comes first in the file",
                            winner.name, winner.name
                        ),
                    )
                } else if ws > spec {
                    (
                        "less-specific",
                        format!(
                            "less specific than `{}` ({spec} < {ws}: a cgroup path beats a unit, \
                             a unit beats pods, a container name, namespace and labels add)",
                            winner.name
                        ),
                    )
                } else {
                    (
                        "not-governing",
                        "selects the same cgroup but does not govern it (see the agent's log)"
                            .to_owned(),
                    )
                }
            }
            Some((_, at)) if depth(&c.cgroup) > depth(at) => (
                "farther",
                format!(
                    "selects {}, an ancestor of {at}: the nearest governed cgroup's policy applies",
                    c.cgroup
                ),
            ),
            _ => (
                "not-governing",
                format!(
                    "selects {} but does not govern it (a delegated subtree without \
                     `delegated: govern`, over the bounds, or outside --attach-cgroup)",
                    c.cgroup
                ),
            ),
        };
        out.push(Ranked {
            policy: p.name.clone(),
            cgroup: c.cgroup.clone(),
            selector: how(&p.selector),
            specificity: spec,
            outcome,
            reason,
        });
    }
    // The chosen one first.
    out.sort_by_key(|r| r.outcome != "chosen");
    out
}

#[cfg(test)]
mod tests;
