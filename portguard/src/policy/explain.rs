//! Which part of a policy decided a denial: the `rule` field of events.
//! Pure: a policy and what the kernel judged in, a short path out.
//!
//! Values (documented in docs/events.md):
//! - `bind[]`, `connect[]`: the list is empty, everything in that direction
//!   is denied;
//! - `bind[N].address`, `connect[N].address`: rule N (0-based) lists the
//!   port, protocol and family, but only on loopback;
//! - `bind.dual_stack`: the port is allowed for IPv6, but a dual-stack `[::]`
//!   bind also needs it for IPv4;
//! - `bind`, `connect`: no rule lists the protocol, family and port;
//! - `allow_sockets`: a socket kind the policy does not allow;
//! - `reserved`: a bind to a port the file's `reserved:` list takes away
//!   from every policy, though this policy lists it ([`rule_in_file`]).
//!
//! May import: `crate::policy` and portguard-common only.

use super::{AddressSel, FamilySel, Policy, PortSpec, ProtocolSel, Rule};

/// What a denial was about, as the kernel judged it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    pub dir: Dir,
    /// `Some(true)` TCP, `Some(false)` UDP, `None` any other protocol.
    pub tcp: Option<bool>,
    pub ipv6: bool,
    pub loopback: bool,
    /// The port; for a bind to port 0, the port the kernel chose.
    pub port: u16,
    /// A bind to port 0 (`ephemeral` rules apply).
    pub ephemeral: bool,
    /// A `[::]` bind on a dual-stack socket.
    pub dual_stack: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Bind,
    Connect,
    /// Socket creation (`sock_create`).
    Socket,
}

fn port_listed(rule: &Rule, port: u16, ephemeral: bool) -> bool {
    rule.ports.iter().any(|p| match *p {
        PortSpec::Port(q) => q == port,
        PortSpec::Range(a, b) => (a..=b).contains(&port),
        PortSpec::Ephemeral => ephemeral,
    })
}

fn proto_ok(rule: &Rule, tcp: Option<bool>) -> bool {
    matches!(
        (rule.protocol, tcp),
        (ProtocolSel::Any, Some(_))
            | (ProtocolSel::Tcp, Some(true))
            | (ProtocolSel::Udp, Some(false))
    )
}

fn family_ok(rule: &Rule, ipv6: bool) -> bool {
    match rule.family {
        FamilySel::Any => true,
        FamilySel::Ipv4 => !ipv6,
        FamilySel::Ipv6 => ipv6,
    }
}

/// The rule (or lack of one) that denied `j` under the policy named `name`
/// in `file`: for a decision on a bound port (`bind_hook`: bind4/6,
/// post_bind4/6, a listen or accept, the inventory), `reserved` when the
/// file reserves the port (the kernel denies it whatever the policy lists);
/// else [`deciding_rule`].
pub fn rule_in_file(
    file: &super::PolicyFile,
    name: &str,
    j: &Judged,
    bind_hook: bool,
) -> Option<String> {
    let policy = file.policies.iter().find(|p| p.name == name)?;
    if bind_hook
        && file.reserved.contains(j.port)
        && super::bind_ports(policy).is_none_or(|b| b.contains(j.port))
    {
        return Some("reserved".to_owned());
    }
    Some(deciding_rule(policy, j))
}

/// The rule (or lack of one) that denied `j` under `policy`.
pub fn deciding_rule(policy: &Policy, j: &Judged) -> String {
    let (name, rules) = match j.dir {
        Dir::Socket => return "allow_sockets".to_owned(),
        Dir::Bind => ("bind", policy.bind.as_deref()),
        Dir::Connect => ("connect", policy.connect.as_deref()),
    };
    let Some(rules) = rules else {
        // Unrestricted now: the policy changed since the decision.
        return name.to_owned();
    };
    if rules.is_empty() {
        return format!("{name}[]");
    }
    let allows = |ipv6: bool, loopback: bool| {
        rules.iter().any(|r| {
            proto_ok(r, j.tcp)
                && family_ok(r, ipv6)
                && port_listed(r, j.port, j.ephemeral)
                && (r.address == AddressSel::Any || loopback)
        })
    };
    if let Some(i) = rules.iter().position(|r| {
        proto_ok(r, j.tcp)
            && family_ok(r, j.ipv6)
            && port_listed(r, j.port, j.ephemeral)
            && r.address == AddressSel::Loopback
            && !j.loopback
    }) && !allows(j.ipv6, j.loopback)
    {
        return format!("{name}[{i}].address");
    }
    if j.dual_stack && allows(true, j.loopback) && !allows(false, j.loopback) {
        return format!("{name}.dual_stack");
    }
    name.to_owned()
}

/// The rules of `policy` that allow `j` (indices into its `bind:` or
/// `connect:` list): each alone, or, for a dual-stack `[::]` bind, the
/// rules that allow it for IPv6 and those that allow it for IPv4. Empty
/// when the direction is unrestricted (no list) or nothing allows it.
/// `portguard why` names them; the verdict itself comes from the compiled
/// sets (`CompiledPolicy::allows_*`).
pub fn allowing_rules(policy: &Policy, j: &Judged) -> Vec<usize> {
    let rules = match j.dir {
        Dir::Socket => return Vec::new(),
        Dir::Bind => policy.bind.as_deref(),
        Dir::Connect => policy.connect.as_deref(),
    };
    let Some(rules) = rules else {
        return Vec::new();
    };
    let allows = |r: &Rule, ipv6: bool| {
        proto_ok(r, j.tcp)
            && family_ok(r, ipv6)
            && port_listed(r, j.port, j.ephemeral)
            && (r.address == AddressSel::Any || j.loopback)
    };
    let own: Vec<usize> = (0..rules.len())
        .filter(|&i| allows(&rules[i], j.ipv6))
        .collect();
    if !j.dual_stack || own.is_empty() {
        return own;
    }
    // A dual-stack bind needs the port for IPv4 on any address too.
    let v4: Vec<usize> = (0..rules.len())
        .filter(|&i| {
            let r = &rules[i];
            proto_ok(r, j.tcp)
                && family_ok(r, false)
                && port_listed(r, j.port, j.ephemeral)
                && r.address == AddressSel::Any
        })
        .collect();
    if v4.is_empty() {
        return Vec::new();
    }
    if own.iter().any(|i| v4.contains(i)) {
        return own.into_iter().filter(|i| v4.contains(i)).take(1).collect();
    }
    vec![own[0], v4[0]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy_str;

    fn policy(rules: &str) -> Policy {
        parse_policy_str(&format!("policies:\n  - name: p\n    cgroup: /p\n{rules}"))
            .unwrap()
            .policies
            .remove(0)
    }

    fn bind(port: u16) -> Judged {
        Judged {
            dir: Dir::Bind,
            tcp: Some(true),
            ipv6: false,
            loopback: false,
            port,
            ephemeral: false,
            dual_stack: false,
        }
    }

    #[test]
    fn names_the_part_that_decided() {
        let p = policy(
            "    bind:\n      - {ports: [8080], protocol: tcp}\n      - {ports: ['9000-9099'], address: loopback}\n      - {ports: [7000], family: ipv6}\n    connect: []\n",
        );
        assert_eq!(deciding_rule(&p, &bind(8081)), "bind");
        assert_eq!(deciding_rule(&p, &bind(9050)), "bind[1].address");
        let udp = Judged {
            tcp: Some(false),
            ..bind(8080)
        };
        assert_eq!(deciding_rule(&p, &udp), "bind", "rule 0 is TCP only");
        let sctp = Judged {
            tcp: None,
            ..bind(8080)
        };
        assert_eq!(deciding_rule(&p, &sctp), "bind");
        let dual = Judged {
            ipv6: true,
            dual_stack: true,
            ..bind(7000)
        };
        assert_eq!(deciding_rule(&p, &dual), "bind.dual_stack");
        let connect = Judged {
            dir: Dir::Connect,
            ..bind(443)
        };
        assert_eq!(deciding_rule(&p, &connect), "connect[]");
        let sock = Judged {
            dir: Dir::Socket,
            ..bind(0)
        };
        assert_eq!(deciding_rule(&p, &sock), "allow_sockets");
        // Allowed on loopback but judged on another address, and a loopback
        // rule elsewhere does not make it an address problem.
        let p = policy(
            "    bind:\n      - {ports: [53], address: loopback}\n      - {ports: [53], protocol: udp}\n",
        );
        assert_eq!(deciding_rule(&p, &bind(53)), "bind[0].address");
        assert_eq!(deciding_rule(&p, &bind(54)), "bind");
    }

    #[test]
    fn ephemeral_counts_only_for_port_zero_binds() {
        let p = policy("    bind:\n      - {ports: [ephemeral], address: loopback}\n");
        let chosen = Judged {
            ephemeral: true,
            ..bind(40001)
        };
        assert_eq!(deciding_rule(&p, &chosen), "bind[0].address");
        assert_eq!(deciding_rule(&p, &bind(40001)), "bind");
    }
}
