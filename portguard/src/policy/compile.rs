//! [`Policy`] -> port sets, one per (direction, protocol, family, address
//! class), in the layout of [`portguard_common::set_slot`]; and how the
//! kernel programs see a local address ([`classify`], the shared
//! classifier).
//!
//! May import: `crate::policy` and portguard-common only.

use std::sync::Arc;

use portguard_common::{
    AddrClass, Direction, Family, Proto, SOCK_ALLOW_L2TP, SOCK_ALLOW_RAW, SOCK_ALLOW_SCTP, set_slot,
};
use rustc_hash::FxHashMap;

use super::{
    AddressSel, FamilySel, Mode, Policy, PortSet, PortSpec, ProtocolSel, Rule, Selector,
    SocketKind,
    explain::{Dir, Judged},
};

/// The eight sets of one direction, indexed like the kernel's record
/// (`set_slot(dir, ..) - dir * 8`). The loopback-class set of a (protocol,
/// family) always includes its any-address set. Shared (`Arc`) between
/// policies with identical rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionSets(pub Arc<[PortSet; 8]>);

/// A policy reduced to what the kernel needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub name: String,
    pub selector: Selector,
    pub mode: Mode,
    /// `None`: unrestricted.
    pub bind: Option<DirectionSets>,
    /// `None`: unrestricted.
    pub connect: Option<DirectionSets>,
    /// `SOCK_ALLOW_*` bits.
    pub allow_sockets: u8,
    /// May govern cgroups inside delegated subtrees.
    pub delegated: super::Delegated,
}

/// The `SOCK_ALLOW_*` bits of socket kinds.
pub fn socket_bits(kinds: &[SocketKind]) -> u8 {
    kinds.iter().fold(0, |bits, k| {
        bits | match k {
            SocketKind::Raw => SOCK_ALLOW_RAW,
            SocketKind::Sctp => SOCK_ALLOW_SCTP,
            SocketKind::L2tp => SOCK_ALLOW_L2TP,
        }
    })
}

const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];
const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

fn local_slot(proto: Proto, family: Family, addr: AddrClass) -> usize {
    set_slot(Direction::Bind, proto, family, addr)
}

fn compile_rules(rules: &[Rule]) -> DirectionSets {
    let mut sets: [PortSet; 8] = Default::default();
    for rule in rules {
        let ports = PortSet::from_ranges(rule.ports.iter().map(|p| match *p {
            PortSpec::Port(n) => (n, n),
            PortSpec::Range(a, b) => (a, b),
            PortSpec::Ephemeral => (PortSet::EPHEMERAL, PortSet::EPHEMERAL),
        }));
        for proto in PROTOS {
            let proto_ok = match rule.protocol {
                ProtocolSel::Any => true,
                ProtocolSel::Tcp => proto == Proto::Tcp,
                ProtocolSel::Udp => proto == Proto::Udp,
            };
            for family in FAMILIES {
                let family_ok = match rule.family {
                    FamilySel::Any => true,
                    FamilySel::Ipv4 => family == Family::Ipv4,
                    FamilySel::Ipv6 => family == Family::Ipv6,
                };
                if !(proto_ok && family_ok) {
                    continue;
                }
                sets[local_slot(proto, family, AddrClass::Loopback)].union_with(&ports);
                if rule.address == AddressSel::Any {
                    sets[local_slot(proto, family, AddrClass::Any)].union_with(&ports);
                }
            }
        }
    }
    DirectionSets(Arc::new(sets))
}

/// Compile one validated policy.
pub fn compile(policy: &Policy) -> CompiledPolicy {
    CompiledPolicy {
        name: policy.name.clone(),
        selector: policy.selector.clone(),
        mode: policy.mode,
        bind: policy.bind.as_deref().map(compile_rules),
        connect: policy.connect.as_deref().map(compile_rules),
        allow_sockets: socket_bits(&policy.allow_sockets),
        delegated: policy.delegated,
    }
}

/// What a rule list compiles from (a rule's line does not matter).
type RulesKey = Vec<(Vec<PortSpec>, ProtocolSel, FamilySel, AddressSel)>;

fn rules_key(rules: &[Rule]) -> RulesKey {
    rules
        .iter()
        .map(|r| (r.ports.clone(), r.protocol, r.family, r.address))
        .collect()
}

/// Compile many policies; identical rule lists are compiled once and their
/// sets shared, so thousands of policies built from a few templates cost
/// little time and memory.
pub fn compile_all(policies: &[Policy]) -> Vec<CompiledPolicy> {
    let mut memo: FxHashMap<RulesKey, DirectionSets> = FxHashMap::default();
    let mut get = |rules: &[Rule]| -> DirectionSets {
        memo.entry(rules_key(rules))
            .or_insert_with(|| compile_rules(rules))
            .clone()
    };
    policies
        .iter()
        .map(|p| CompiledPolicy {
            name: p.name.clone(),
            selector: p.selector.clone(),
            mode: p.mode,
            bind: p.bind.as_deref().map(&mut get),
            connect: p.connect.as_deref().map(&mut get),
            allow_sockets: socket_bits(&p.allow_sockets),
            delegated: p.delegated,
        })
        .collect()
}

/// Take the file's `reserved:` ports out of every policy's bind sets; a
/// policy without `bind:` gets every port but those. The kernel then denies
/// reserved ports to every governed workload, whatever its policy allows
/// (an `audit` policy reports them instead). Shared sets stay shared.
pub fn apply_reserved(policies: &mut [CompiledPolicy], reserved: &PortSet) {
    if reserved.is_empty() {
        return;
    }
    let all = PortSet::from_ranges([(0, 65535)]).difference(reserved);
    let all_but = DirectionSets(Arc::new(std::array::from_fn(|_| all.clone())));
    let mut memo: FxHashMap<usize, DirectionSets> = FxHashMap::default();
    for p in policies {
        p.bind = Some(match &p.bind {
            None => all_but.clone(),
            Some(d) => memo
                .entry(Arc::as_ptr(&d.0) as usize)
                .or_insert_with(|| {
                    DirectionSets(Arc::new(std::array::from_fn(|i| {
                        d.0[i].difference(reserved)
                    })))
                })
                .clone(),
        });
    }
}

/// Every port a policy's bind rules allow (any protocol, family, address).
pub fn bind_ports(policy: &Policy) -> Option<PortSet> {
    let rules = policy.bind.as_deref()?;
    let mut set = PortSet::default();
    for r in rules {
        for p in &r.ports {
            match *p {
                PortSpec::Port(n) => set.insert(n),
                PortSpec::Range(a, b) => set.insert_range(a, b),
                PortSpec::Ephemeral => {}
            }
        }
    }
    Some(set)
}

/// How the kernel programs see a local address (the shared classifier,
/// [`portguard_common::classify_ip`], as a bind judges it): the family it is
/// judged as (an IPv4-mapped IPv6 address is IPv4), loopback or not, and
/// whether it is the IPv6 unspecified address (dual-stack unless
/// IPV6_V6ONLY).
pub use portguard_common::AddrView;

pub fn classify(addr: std::net::IpAddr) -> AddrView {
    portguard_common::classify_ip(addr, portguard_common::AddrRole::Local)
}

impl CompiledPolicy {
    /// Whether this policy lets a socket hold `port` on `addr` (the kernel's
    /// bind decision, restated). `dual_stack`: an IPv6 socket on `[::]`
    /// without IPV6_V6ONLY, which also needs the port for IPv4.
    /// `ephemeral_ok`: the policy's `ephemeral` also allows the port.
    pub fn allows_bound(
        &self,
        proto: Proto,
        view: AddrView,
        port: u16,
        dual_stack: bool,
        ephemeral_ok: bool,
    ) -> bool {
        sets_allow(
            self.bind.as_ref(),
            proto,
            view.family,
            view.class,
            port,
            dual_stack,
            ephemeral_ok,
        )
    }

    /// Whether this policy allows the operation `j` as the kernel judged it
    /// (the kernel's decision restated over the same sets: bind, connect,
    /// or the creation of a socket of kind `socket`, a `SOCK_ALLOW_*` bit).
    /// A chosen port (`j.ephemeral`) is allowed by `ephemeral` without the
    /// host's ephemeral range being checked (the caller may not know it).
    /// Protocols no rule can name are outside every allowed set.
    pub fn allows(&self, j: &Judged, socket: u8) -> bool {
        let sets = match j.dir {
            Dir::Socket => {
                return (self.bind.is_none() && self.connect.is_none())
                    || self.allow_sockets & socket != 0;
            }
            Dir::Bind => self.bind.as_ref(),
            Dir::Connect => self.connect.as_ref(),
        };
        if sets.is_none() {
            return true;
        }
        let proto = match j.tcp {
            Some(true) => Proto::Tcp,
            Some(false) => Proto::Udp,
            None => return false,
        };
        let family = if j.ipv6 { Family::Ipv6 } else { Family::Ipv4 };
        let class = if j.loopback {
            AddrClass::Loopback
        } else {
            AddrClass::Any
        };
        sets_allow(
            sets,
            proto,
            family,
            class,
            j.port,
            j.dual_stack,
            j.ephemeral,
        )
    }
}

/// One direction's decision (`None`: unrestricted): the port in the set of
/// its (protocol, family, address class), and for a dual-stack bind in the
/// IPv4 any-address set too; a chosen port also by the set's `ephemeral`.
fn sets_allow(
    sets: Option<&DirectionSets>,
    proto: Proto,
    family: Family,
    class: AddrClass,
    port: u16,
    dual_stack: bool,
    ephemeral_ok: bool,
) -> bool {
    let Some(sets) = sets else {
        return true;
    };
    let ok =
        |set: &PortSet| set.contains(port) || (ephemeral_ok && set.contains(PortSet::EPHEMERAL));
    ok(sets.get(proto, family, class))
        && (!dual_stack || ok(sets.get(proto, Family::Ipv4, AddrClass::Any)))
}

impl CompiledPolicy {
    /// Whether this policy lets a socket of raw IP `protocol` connect or
    /// send to `port` on the destination `view` (classified with
    /// [`portguard_common::AddrRole::Destination`]).
    pub fn allows_destination(&self, protocol: u8, view: AddrView, port: u16) -> bool {
        let Some(sets) = &self.connect else {
            return true;
        };
        Proto::from_ip_protocol(protocol)
            .is_some_and(|proto| sets.get(proto, view.family, view.class).contains(port))
    }

    /// Whether this policy lets its cgroups create an IPv4/IPv6 socket of
    /// `ty` (`SOCK_STREAM`, ...) and `protocol` (the `sock_create`
    /// decision; see [`portguard_common::classify_socket`]).
    pub fn allows_socket(&self, ty: u32, protocol: u32) -> bool {
        use portguard_common::SocketClass;
        let restricted = self.bind.is_some() || self.connect.is_some();
        match portguard_common::classify_socket(ty, protocol) {
            SocketClass::Judged => true,
            SocketClass::OwnBind(_, bit) => !restricted || self.allow_sockets & bit != 0,
            SocketClass::ConnectUnjudged => self.connect.is_none(),
            SocketClass::Unknown => !restricted,
        }
    }

    /// [`Self::allows_bound`] for a socket of raw IP `protocol`: a protocol
    /// no rule can name (UDP-Lite, ...) is outside every allowed set, so it
    /// is denied wherever binds are restricted.
    pub fn allows_bound_protocol(
        &self,
        protocol: u8,
        view: AddrView,
        port: u16,
        dual_stack: bool,
        ephemeral_ok: bool,
    ) -> bool {
        match Proto::from_ip_protocol(protocol) {
            Some(proto) => self.allows_bound(proto, view, port, dual_stack, ephemeral_ok),
            None => self.bind.is_none(),
        }
    }
}

impl CompiledPolicy {
    /// Whether this policy lets a socket `connect()` (or send) to `port` at
    /// `view` (classified as a destination: [`portguard_common::AddrRole::Destination`]),
    /// the kernel's connect decision restated.
    pub fn allows_connect(&self, proto: Proto, view: AddrView, port: u16) -> bool {
        let Some(sets) = &self.connect else {
            return true;
        };
        sets.get(proto, view.family, view.class).contains(port)
    }
}

impl DirectionSets {
    pub fn get(&self, proto: Proto, family: Family, addr: AddrClass) -> &PortSet {
        &self.0[local_slot(proto, family, addr)]
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reserved_ports_leave_every_bind_set() {
        use super::super::parse_policy_str;
        let f = parse_policy_str(
            "reserved: [22, \"10250-10259\"]\npolicies:\n  - {name: a, cgroup: /a, bind: [{ports: [22, 80, \"10000-10300\"]}]}\n  - {name: b, cgroup: /b, connect: [{ports: [22]}]}\n",
        )
        .unwrap();
        let mut c = compile_all(&f.policies);
        apply_reserved(&mut c, &f.reserved);
        let any = |p: &CompiledPolicy, port: u16| {
            let b = p.bind.as_ref().unwrap();
            b.0.iter().all(|s| s.contains(port))
        };
        let none = |p: &CompiledPolicy, port: u16| {
            let b = p.bind.as_ref().unwrap();
            b.0.iter().all(|s| !s.contains(port))
        };
        assert!(any(&c[0], 80) && any(&c[0], 10249) && any(&c[0], 10260));
        assert!(none(&c[0], 22) && none(&c[0], 10250) && none(&c[0], 10259));
        // No `bind:` key: every port but the reserved ones (and port 0).
        assert!(any(&c[1], 0) && any(&c[1], 80) && any(&c[1], 65535));
        assert!(none(&c[1], 22) && none(&c[1], 10255));
        // Connect rules are untouched.
        assert!(
            c[1].connect
                .as_ref()
                .unwrap()
                .0
                .iter()
                .all(|s| s.contains(22))
        );
        // Nothing reserved: nothing changes.
        let mut d = compile_all(&f.policies);
        apply_reserved(&mut d, &PortSet::default());
        assert!(d[1].bind.is_none());
    }

    use super::*;
    use crate::policy::parse_policy_str;

    fn one(text: &str) -> CompiledPolicy {
        let f = parse_policy_str(text).unwrap();
        compile(&f.policies[0])
    }

    #[test]
    fn loopback_rule_only_fills_loopback_sets() {
        let c = one(
            "policies: [{name: a, cgroup: /a, bind: [{ports: [8080], protocol: tcp, family: ipv4, address: loopback}]}]",
        );
        let b = c.bind.unwrap();
        assert!(
            b.get(Proto::Tcp, Family::Ipv4, AddrClass::Loopback)
                .contains(8080)
        );
        assert!(
            !b.get(Proto::Tcp, Family::Ipv4, AddrClass::Any)
                .contains(8080)
        );
        assert!(
            !b.get(Proto::Tcp, Family::Ipv6, AddrClass::Loopback)
                .contains(8080)
        );
        assert!(
            !b.get(Proto::Udp, Family::Ipv4, AddrClass::Loopback)
                .contains(8080)
        );
        assert!(c.connect.is_none());
    }

    #[test]
    fn any_address_rule_fills_both_classes_and_rules_union() {
        let c = one(
            "policies: [{name: a, cgroup: /a, connect: [{ports: [\"10-12\"], protocol: udp}, {ports: [53], family: ipv6}]}]",
        );
        let s = c.connect.unwrap();
        for fam in FAMILIES {
            for addr in [AddrClass::Any, AddrClass::Loopback] {
                assert!(s.get(Proto::Udp, fam, addr).contains(10));
                assert!(s.get(Proto::Udp, fam, addr).contains(12));
                assert!(!s.get(Proto::Udp, fam, addr).contains(13));
                assert!(!s.get(Proto::Tcp, fam, addr).contains(10));
            }
        }
        assert!(s.get(Proto::Tcp, Family::Ipv6, AddrClass::Any).contains(53));
        assert!(!s.get(Proto::Tcp, Family::Ipv4, AddrClass::Any).contains(53));
    }

    #[test]
    fn empty_rule_list_is_restricted_with_empty_sets() {
        let c = one("policies: [{name: a, cgroup: /a, bind: []}]");
        let b = c.bind.unwrap();
        assert!(b.0.iter().all(PortSet::is_empty));
    }

    #[test]
    fn compile_all_shares_identical_rules_and_matches_compile() {
        let f = parse_policy_str(
            "policies:\n  - {name: a, cgroup: /a, bind: [{ports: [80]}]}\n  - {name: b, cgroup: /b, bind: [{ports: [80]}], connect: []}\n  - {name: c, cgroup: /c, bind: [{ports: [81]}]}\n",
        )
        .unwrap();
        let all = compile_all(&f.policies);
        for (p, c) in f.policies.iter().zip(&all) {
            assert_eq!(&compile(p), c);
        }
        let (a, b) = (all[0].bind.as_ref().unwrap(), all[1].bind.as_ref().unwrap());
        assert!(
            Arc::ptr_eq(&a.0, &b.0),
            "identical rules share one compiled set"
        );
        assert!(!Arc::ptr_eq(&a.0, &all[2].bind.as_ref().unwrap().0));
    }

    #[test]
    fn userspace_judgement_matches_the_kernel_rules() {
        let c = one(
            "policies: [{name: a, cgroup: /a, bind: [{ports: [80], family: ipv6}, {ports: [53], address: loopback}, {ports: [ephemeral], protocol: udp}]}]",
        );
        let at = |s: &str| classify(s.parse().unwrap());
        assert!(c.allows_bound(Proto::Tcp, at("::"), 80, false, false));
        assert!(
            !c.allows_bound(Proto::Tcp, at("::"), 80, true, false),
            "dual-stack needs IPv4 too"
        );
        assert!(!c.allows_bound(Proto::Tcp, at("0.0.0.0"), 80, false, false));
        assert!(
            !c.allows_bound(Proto::Tcp, at("::ffff:0.0.0.0"), 80, false, false),
            "mapped is IPv4"
        );
        assert!(c.allows_bound(Proto::Udp, at("127.0.0.1"), 53, false, false));
        assert!(c.allows_bound(Proto::Udp, at("::ffff:127.0.0.1"), 53, false, false));
        assert!(!c.allows_bound(Proto::Udp, at("10.0.0.1"), 53, false, false));
        assert!(c.allows_bound(Proto::Udp, at("10.0.0.1"), 40000, false, true));
        assert!(!c.allows_bound(Proto::Tcp, at("10.0.0.1"), 40000, false, true));
        let open = one("policies: [{name: a, cgroup: /a}]");
        assert!(open.allows_bound(Proto::Tcp, at("0.0.0.0"), 1, false, false));
    }

    #[test]
    fn a_judged_operation_is_allowed_as_the_kernel_decides() {
        use super::super::explain::{Dir, Judged};
        let c = one(
            "policies: [{name: a, cgroup: /a, bind: [{ports: [80], family: ipv6}, {ports: [ephemeral], protocol: udp}], connect: [{ports: [5432], address: loopback}], allow_sockets: [sctp]}]",
        );
        let j = |dir, tcp, ipv6, loopback, port| Judged {
            dir,
            tcp,
            ipv6,
            loopback,
            port,
            ephemeral: false,
            dual_stack: false,
        };
        assert!(c.allows(&j(Dir::Bind, Some(true), true, false, 80), 0));
        assert!(!c.allows(&j(Dir::Bind, Some(true), false, false, 80), 0));
        let dual = Judged {
            dual_stack: true,
            ..j(Dir::Bind, Some(true), true, false, 80)
        };
        assert!(!c.allows(&dual, 0), "dual-stack needs IPv4 too");
        let chosen = Judged {
            ephemeral: true,
            ..j(Dir::Bind, Some(false), false, false, 40000)
        };
        assert!(c.allows(&chosen, 0));
        assert!(!c.allows(&j(Dir::Bind, Some(false), false, false, 40000), 0));
        assert!(
            !c.allows(&j(Dir::Bind, None, true, false, 80), 0),
            "no rule names SCTP"
        );
        assert!(c.allows(&j(Dir::Connect, Some(true), false, true, 5432), 0));
        assert!(!c.allows(&j(Dir::Connect, Some(true), false, false, 5432), 0));
        let sock = j(Dir::Socket, None, false, false, 0);
        assert!(c.allows(&sock, SOCK_ALLOW_SCTP));
        assert!(!c.allows(&sock, SOCK_ALLOW_RAW));
        let open = one("policies: [{name: a, cgroup: /a}]");
        assert!(open.allows(&sock, SOCK_ALLOW_RAW), "nothing restricted");
        assert!(open.allows(&j(Dir::Connect, None, false, false, 1), 0));
    }

    #[test]
    fn ephemeral_is_bit_zero() {
        let c =
            one("policies: [{name: a, cgroup: /a, bind: [{ports: [ephemeral], protocol: udp}]}]");
        let b = c.bind.unwrap();
        assert!(
            b.get(Proto::Udp, Family::Ipv4, AddrClass::Any)
                .contains(PortSet::EPHEMERAL)
        );
        assert!(
            !b.get(Proto::Tcp, Family::Ipv4, AddrClass::Any)
                .contains(PortSet::EPHEMERAL)
        );
    }

    #[test]
    fn destinations_sockets_and_unnamed_protocols() {
        use portguard_common::{
            AddrRole, IPPROTO_ICMP, IPPROTO_UDPLITE, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM, classify_ip,
        };
        let c = one(
            "policies: [{name: a, cgroup: /a, bind: [{ports: [53]}], connect: [{ports: [443], protocol: tcp, address: loopback}]}]",
        );
        let dest = |s: &str| classify_ip(s.parse().unwrap(), AddrRole::Destination);
        assert!(c.allows_destination(6, dest("127.0.0.1"), 443));
        assert!(c.allows_destination(6, dest("0.0.0.0"), 443), "this host");
        assert!(c.allows_destination(6, dest("::ffff:127.0.0.1"), 443));
        assert!(!c.allows_destination(6, dest("10.0.0.1"), 443));
        assert!(!c.allows_destination(17, dest("127.0.0.1"), 443));
        assert!(!c.allows_destination(IPPROTO_UDPLITE as u8, dest("127.0.0.1"), 443));
        let at = |s: &str| classify(s.parse().unwrap());
        assert!(c.allows_bound_protocol(17, at("0.0.0.0"), 53, false, false));
        assert!(
            !c.allows_bound_protocol(IPPROTO_UDPLITE as u8, at("0.0.0.0"), 53, false, false),
            "no rule can name UDP-Lite"
        );
        assert!(c.allows_socket(SOCK_STREAM, 0) && c.allows_socket(SOCK_DGRAM, 0));
        assert!(!c.allows_socket(SOCK_RAW, IPPROTO_ICMP));
        assert!(
            !c.allows_socket(SOCK_DGRAM, IPPROTO_UDPLITE),
            "its connects run no hook"
        );
        let binds_only = one("policies: [{name: a, cgroup: /a, bind: []}]");
        assert!(binds_only.allows_socket(SOCK_DGRAM, IPPROTO_UDPLITE));
        assert!(!binds_only.allows_socket(SOCK_RAW, IPPROTO_ICMP));
        assert!(binds_only.allows_destination(IPPROTO_UDPLITE as u8, dest("10.0.0.1"), 1));
    }
}
