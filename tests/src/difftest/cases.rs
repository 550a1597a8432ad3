//! The generator: random policy files ([`FileSpec`]) and operations
//! ([`Op`]) over the decision space, from a seeded [`Rng`] (same seed, same
//! cases), rendered as the YAML the agent reads and as the JSON line the
//! batch executor (`pgprobe batch`) reads.

use std::{fmt::Write as _, net::IpAddr};

/// splitmix64: small, fast, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u64) -> bool {
        self.next_u64() % 100 < p
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// The cgroup tree every run builds under its root, relative to it: the
/// root itself, a chain three deep, and a second branch. Policies sit on
/// any of them; callers run in any of them.
pub const NODES: &[&str] = &["", "/a", "/a/b", "/a/b/c", "/d", "/d/e"];

/// Ports the generator likes: well-known, privileged edge, the reserved
/// infrastructure ports, the host's ephemeral range edges, the extremes.
const PORT_POOL: &[u16] = &[
    1, 22, 53, 80, 443, 1023, 1024, 2379, 2380, 6443, 8080, 8081, 9000, 9099, 9100, 10250, 10255,
    10257, 32767, 32768, 40000, 60999, 61000, 65535,
];

/// One item of a `ports:` or `reserved:` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortItem {
    Port(u16),
    Range(u16, u16),
    /// A name from the file's `ranges:` (index).
    Named(usize),
    Ephemeral,
    /// `reserved:` only: the built-in infrastructure ports.
    Infrastructure,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub ports: Vec<PortItem>,
    /// `None`: key omitted (default `any`).
    pub protocol: Option<&'static str>,
    pub family: Option<&'static str>,
    pub address: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    /// Index into [`NODES`].
    pub node: usize,
    pub audit: bool,
    /// `None`: key absent; `Some([])`: `bind: []`.
    pub bind: Option<Vec<RuleSpec>>,
    pub connect: Option<Vec<RuleSpec>>,
    /// `allow_sockets: [raw]`.
    pub allow_raw: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSpec {
    pub policies: Vec<PolicySpec>,
    /// `ranges:` (name, low, high).
    pub ranges: Vec<(String, u16, u16)>,
    pub reserved: Vec<PortItem>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Bind,
    Connect,
    Sendto,
    /// `listen()` on an unbound socket (the kernel autobinds): `listen`.
    Listen,
    /// `socket(AF_INET or AF_INET6, SOCK_RAW, ICMP)`: `sock_create`.
    Raw,
}

impl OpKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Bind => "bind",
            Self::Connect => "connect",
            Self::Sendto => "sendto",
            Self::Listen => "listen",
            Self::Raw => "raw",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Index into [`NODES`]: the cgroup whose executor runs it.
    pub caller: usize,
    pub kind: OpKind,
    /// `tcp`, `udp`, `udplite`, `mptcp`.
    pub proto: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    pub v6only: bool,
}

impl Op {
    /// The executor's request line.
    pub fn request(&self) -> String {
        format!(
            r#"{{"op":"{}","proto":"{}","addr":"{}","port":{},"v6only":{}}}"#,
            self.kind.as_str(),
            self.proto,
            self.addr,
            self.port,
            self.v6only
        )
    }

    /// The address variant, for coverage: v4, v6, v4-mapped, dual-stack.
    pub fn variant(&self) -> &'static str {
        match self.addr {
            IpAddr::V4(_) => "v4",
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => "v4-mapped",
            IpAddr::V6(a)
                if a.is_unspecified()
                    && !self.v6only
                    && matches!(self.kind, OpKind::Bind | OpKind::Listen) =>
            {
                "dual-stack"
            }
            IpAddr::V6(_) => "v6",
        }
    }
}

const V4_ADDRS: &[&str] = &["0.0.0.0", "127.0.0.1", "127.1.2.3", "10.1.2.3"];
const V6_ADDRS: &[&str] = &["::", "::1", "2001:db8::1"];
const MAPPED_ADDRS: &[&str] = &["::ffff:0.0.0.0", "::ffff:127.0.0.1", "::ffff:10.1.2.3"];

fn gen_port(rng: &mut Rng) -> u16 {
    if rng.pct(70) {
        rng.pick(PORT_POOL)
    } else {
        1 + rng.below(65535) as u16
    }
}

fn gen_range(rng: &mut Rng) -> (u16, u16) {
    let a = gen_port(rng);
    let len = match rng.below(4) {
        0 => 0,
        1 => rng.below(10) as u16,
        2 => rng.below(200) as u16,
        _ => rng.below(20000) as u16,
    };
    (a, a.saturating_add(len))
}

fn gen_item(rng: &mut Rng, ranges: usize, bind: bool) -> PortItem {
    match rng.below(10) {
        0..=3 => PortItem::Port(gen_port(rng)),
        4..=6 => {
            let (a, b) = gen_range(rng);
            PortItem::Range(a, b)
        }
        7 if ranges > 0 => PortItem::Named(rng.below(ranges)),
        8 | 9 if bind => PortItem::Ephemeral,
        _ => PortItem::Port(gen_port(rng)),
    }
}

fn gen_rule(rng: &mut Rng, ranges: usize, bind: bool) -> RuleSpec {
    let n = 1 + rng.below(3);
    let mut ports: Vec<PortItem> = (0..n).map(|_| gen_item(rng, ranges, bind)).collect();
    // Sometimes the whole range the kernel picks ports from, so a port-0
    // bind or an unbound listen is judged by a port rule, not `ephemeral`
    // (and lands on a reserved port when the file reserves part of it).
    if bind && rng.pct(30) {
        let a = 30000 + rng.below(2768) as u16;
        ports.push(PortItem::Range(a, 61000 + rng.below(4000) as u16));
    }
    RuleSpec {
        ports,
        protocol: rng.pick(&[None, Some("tcp"), Some("udp"), Some("any")]),
        family: rng.pick(&[None, Some("ipv4"), Some("ipv6"), Some("any")]),
        address: rng.pick(&[None, None, Some("loopback"), Some("any")]),
    }
}

fn gen_rules(rng: &mut Rng, ranges: usize, bind: bool) -> Option<Vec<RuleSpec>> {
    match rng.below(10) {
        0..=1 => None,
        2 => Some(Vec::new()),
        _ => Some(
            (0..1 + rng.below(3))
                .map(|_| gen_rule(rng, ranges, bind))
                .collect(),
        ),
    }
}

/// A random policy file: one to four policies on distinct nodes of the
/// tree, sometimes named ranges and reserved ports.
pub fn gen_file(rng: &mut Rng) -> FileSpec {
    let mut ranges = Vec::new();
    if rng.pct(30) {
        for i in 0..1 + rng.below(2) {
            let (a, b) = gen_range(rng);
            ranges.push((format!("r{i}"), a, b));
        }
    }
    let mut reserved = Vec::new();
    if rng.pct(25) {
        for _ in 0..1 + rng.below(2) {
            reserved.push(match rng.below(4) {
                0 => PortItem::Infrastructure,
                1 if !ranges.is_empty() => PortItem::Named(rng.below(ranges.len())),
                2 => {
                    let (a, b) = gen_range(rng);
                    PortItem::Range(a, b)
                }
                _ => PortItem::Port(gen_port(rng)),
            });
        }
        // Where the kernel picks ports (the default ephemeral range,
        // 32768-60999): port-0 binds and unbound listens land on a reserved
        // port.
        // Half of those reserve all of it, so that the kernel's pick lands
        // on a reserved port whichever port it picks: the CI slice reaches
        // the `event.rule=reserved` cells of post_bind4/6 on every run, not
        // by the luck of the picks (a run once missed post_bind6 x ipv6).
        if rng.pct(80) {
            if rng.pct(60) {
                reserved.push(PortItem::Range(32768, 60999));
            } else {
                let a = 32768 + rng.below(10000) as u16;
                reserved.push(PortItem::Range(a, a + 10000 + rng.below(10000) as u16));
            }
        }
    }
    let mut nodes: Vec<usize> = (0..NODES.len()).collect();
    let mut policies = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let node = nodes.remove(rng.below(nodes.len()));
        policies.push(PolicySpec {
            node,
            audit: rng.pct(20),
            bind: gen_rules(rng, ranges.len(), true),
            connect: gen_rules(rng, ranges.len(), false),
            allow_raw: rng.pct(30),
        });
    }
    FileSpec {
        policies,
        ranges,
        reserved,
    }
}

/// Ports the file names, and their neighbours: operations aim at range
/// edges as often as at the middle.
fn file_ports(file: &FileSpec) -> Vec<u16> {
    let mut v = Vec::new();
    let mut add = |a: u16, b: u16| {
        for p in [a, b] {
            v.extend([p.saturating_sub(1).max(1), p, p.saturating_add(1)]);
        }
    };
    for (_, a, b) in &file.ranges {
        add(*a, *b);
    }
    for p in &file.policies {
        for rules in [&p.bind, &p.connect].into_iter().flatten() {
            for r in rules {
                for item in &r.ports {
                    match *item {
                        PortItem::Port(n) => add(n, n),
                        PortItem::Range(a, b) => add(a, b),
                        _ => {}
                    }
                }
            }
        }
    }
    for item in &file.reserved {
        match *item {
            PortItem::Port(n) => add(n, n),
            PortItem::Range(a, b) => add(a, b),
            _ => {}
        }
    }
    v
}

/// A random operation against `file`.
pub fn gen_op(rng: &mut Rng, file: &FileSpec) -> Op {
    let near = file_ports(file);
    let kind = match rng.below(22) {
        0..=9 => OpKind::Bind,
        10..=14 => OpKind::Connect,
        15..=18 => OpKind::Sendto,
        19 | 20 => OpKind::Listen,
        _ => OpKind::Raw,
    };
    let proto = match kind {
        OpKind::Sendto => rng.pick(&["udp", "udp", "udp", "udplite"]),
        OpKind::Raw => "raw",
        OpKind::Listen => rng.pick(&["tcp", "tcp", "mptcp"]),
        _ => rng.pick(&["tcp", "tcp", "udp", "udp", "udplite", "mptcp"]),
    };
    // An unbound listener's address is the wildcard of its family.
    let family = if kind == OpKind::Listen {
        rng.below(2)
    } else {
        rng.below(3)
    };
    let pool = match family {
        0 => V4_ADDRS,
        1 => V6_ADDRS,
        _ => MAPPED_ADDRS,
    };
    let addr: IpAddr = if kind == OpKind::Listen {
        pool[0]
    } else {
        rng.pick(pool)
    }
    .parse()
    .expect("a valid address");
    let v6only = addr.is_ipv6() && rng.pct(40);
    let mut port = if !near.is_empty() && rng.pct(60) {
        rng.pick(&near)
    } else {
        gen_port(rng)
    };
    // A bind to port 0 is judged after the kernel picked the port, which
    // only happens where the bind succeeds: a local address, and not a
    // mapped one on an IPV6_V6ONLY socket (EINVAL).
    let local = !matches!(
        addr.to_string().as_str(),
        "10.1.2.3" | "2001:db8::1" | "::ffff:10.1.2.3"
    );
    let mapped = matches!(addr, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    if kind == OpKind::Bind && local && !(mapped && v6only) && rng.pct(15) {
        port = 0;
    }
    if kind == OpKind::Listen {
        port = 0;
    }
    Op {
        caller: rng.below(NODES.len()),
        kind,
        proto,
        addr,
        port,
        v6only,
    }
}

fn render_item(item: &PortItem, ranges: &[(String, u16, u16)], out: &mut String) {
    match *item {
        PortItem::Port(n) => write!(out, "{n}"),
        PortItem::Range(a, b) => write!(out, "\"{a}-{b}\""),
        PortItem::Named(i) => write!(out, "{}", ranges[i].0),
        PortItem::Ephemeral => write!(out, "ephemeral"),
        PortItem::Infrastructure => write!(out, "infrastructure"),
    }
    .expect("writing to a String");
}

fn render_rules(key: &str, rules: &Option<Vec<RuleSpec>>, file: &FileSpec, out: &mut String) {
    let Some(rules) = rules else { return };
    if rules.is_empty() {
        out.push_str(&format!("    {key}: []\n"));
        return;
    }
    out.push_str(&format!("    {key}:\n"));
    for r in rules {
        out.push_str("      - ports: [");
        for (i, item) in r.ports.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            render_item(item, &file.ranges, out);
        }
        out.push_str("]\n");
        for (k, v) in [
            ("protocol", r.protocol),
            ("family", r.family),
            ("address", r.address),
        ] {
            if let Some(v) = v {
                out.push_str(&format!("        {k}: {v}\n"));
            }
        }
    }
}

/// The policy of the batch marker (see `difftest::MARKER`).
pub fn marker_policy(root: &str) -> String {
    format!(
        "  - name: {}\n    cgroup: {root}/marker\n    bind: []\n",
        super::MARKER
    )
}

/// The policy file's text, with the tree under `root` (`/pgtest-...`).
pub fn render(file: &FileSpec, root: &str) -> String {
    let mut out = String::new();
    if !file.ranges.is_empty() {
        out.push_str("ranges:\n");
        for (name, a, b) in &file.ranges {
            out.push_str(&format!("  {name}: \"{a}-{b}\"\n"));
        }
    }
    if !file.reserved.is_empty() {
        out.push_str("reserved: [");
        for (i, item) in file.reserved.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            render_item(item, &file.ranges, &mut out);
        }
        out.push_str("]\n");
    }
    out.push_str("policies:\n");
    for p in &file.policies {
        out.push_str(&format!(
            "  - name: {}\n    cgroup: {root}{}\n",
            policy_name(p.node),
            NODES[p.node]
        ));
        if p.audit {
            out.push_str("    mode: audit\n");
        }
        render_rules("bind", &p.bind, file, &mut out);
        render_rules("connect", &p.connect, file, &mut out);
        if p.allow_raw {
            out.push_str("    allow_sockets: [raw]\n");
        }
    }
    out.push_str(&marker_policy(root));
    out
}

/// A policy's name: the node it sits on (one policy per node).
pub fn policy_name(node: usize) -> String {
    format!("dt-n{node}")
}
