//! The oracle: what portguard's pure policy model says about one operation,
//! the syscall's answer (EPERM or not) and the one event it must write, or
//! none. Every verdict comes from the model itself (`portguard::policy`:
//! [`compile_all`] and [`apply_reserved`], [`CompiledPolicy::allows_bound_protocol`],
//! [`CompiledPolicy::allows_destination`], [`classify_ip`], and
//! [`rule_in_file`] for the event's `rule`); this module only says which
//! hook an operation reaches and which cgroup's policy governs it (the
//! nearest ancestor-or-self with a `cgroup:` policy).

use portguard::policy::{
    CompiledPolicy, PolicyFile, apply_reserved, compile_all,
    explain::{Dir, Judged, rule_in_file},
};
use portguard_common::{
    AddrClass, AddrRole, Family, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, classify_ip,
    in_ephemeral_range,
};

use super::cases::{Op, OpKind};

/// The model of one policy file, compiled once per batch.
pub struct Model {
    pub file: PolicyFile,
    pub compiled: Vec<CompiledPolicy>,
    /// The host's ephemeral range, packed as the kernel keeps it.
    pub host_range: u32,
    /// The file's text, as the agent was given it (for reports).
    pub file_text: String,
}

impl Model {
    pub fn new(file: PolicyFile, file_text: String, host_range: u32) -> Self {
        let mut compiled = compile_all(&file.policies);
        apply_reserved(&mut compiled, &file.reserved);
        Self {
            file,
            compiled,
            host_range,
            file_text,
        }
    }

    /// The policy governing `caller` (an absolute cgroup path): the nearest
    /// ancestor-or-self a `cgroup:` policy names.
    pub fn governing(&self, caller: &str) -> Option<&CompiledPolicy> {
        self.compiled
            .iter()
            .filter_map(|c| Some((c, c.selector.cgroup_path()?)))
            .filter(|(_, p)| caller == *p || caller.starts_with(&format!("{p}/")))
            .max_by_key(|(_, p)| p.len())
            .map(|(c, _)| c)
    }
}

/// The event an operation must produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub verdict: &'static str,
    pub hook: &'static str,
    pub policy: String,
    pub rule: String,
    pub port: u16,
    pub family: &'static str,
}

/// What the model predicts for one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    /// The hook that judges the operation (also when it is allowed);
    /// `none` when the kernel refuses it before any hook.
    pub hook: &'static str,
    /// The family it is judged as.
    pub family: &'static str,
    /// The caller gets EPERM.
    pub eperm: bool,
    /// The events, in order: a `sock_create` one, then the operation's.
    pub events: Vec<Expected>,
    /// Name of the governing policy, if any.
    pub policy: Option<String>,
}

impl Prediction {
    /// The verdict of the operation's own decision.
    pub fn verdict(&self) -> &'static str {
        self.events
            .iter()
            .find(|e| e.hook == self.hook)
            .map_or("allow", |e| e.verdict)
    }
}

/// The socket `op` creates: (type, protocol) as `socket()` gets them.
fn socket_kind(op: &Op) -> (u32, u32) {
    use portguard_common::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MPTCP, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM,
    };
    match op.proto {
        "tcp" => (SOCK_STREAM, 0),
        "mptcp" => (SOCK_STREAM, IPPROTO_MPTCP),
        "udp" => (SOCK_DGRAM, 0),
        "udplite" => (SOCK_DGRAM, IPPROTO_UDPLITE),
        "raw" if op.addr.is_ipv4() => (SOCK_RAW, IPPROTO_ICMP),
        "raw" => (SOCK_RAW, IPPROTO_ICMPV6),
        other => panic!("no socket kind for {other}"),
    }
}

fn ip_protocol(proto: &str) -> u8 {
    match proto {
        "tcp" | "mptcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "udplite" => IPPROTO_UDPLITE as u8,
        "raw" => 0,
        other => panic!("no IP protocol for {other}"),
    }
}

const fn family_name(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

/// Predict `op`, run by a process in `caller`. `chosen`: for a bind to
/// port 0, the port the kernel picked (observed: from the socket, or from
/// the event when the bind was denied).
pub fn predict(model: &Model, caller: &str, op: &Op, chosen: u16) -> Prediction {
    let v6_socket = op.addr.is_ipv6();
    let role = match op.kind {
        OpKind::Bind | OpKind::Listen | OpKind::Raw => AddrRole::Local,
        OpKind::Connect | OpKind::Sendto => AddrRole::Destination,
    };
    let view = classify_ip(op.addr, role);
    let mapped = view.v4_mapped;
    // udpv6_sendmsg refuses a mapped destination on an IPV6_V6ONLY socket
    // (ENETUNREACH) before any hook runs; a UDP-Lite connect() runs no hook
    // (`udplite_prot` has no `pre_connect`: its socket's creation is judged
    // instead, see `SocketClass::ConnectUnjudged`).
    let unjudged = (op.kind == OpKind::Sendto && mapped && op.v6only)
        || (op.kind == OpKind::Connect && op.proto == "udplite");
    // udpv6_sendmsg hands a mapped destination to udp_sendmsg (IPv4),
    // whose hook is sendmsg4.
    let v6_hook = v6_socket && !(op.kind == OpKind::Sendto && mapped);
    let hook = match (op.kind, v6_hook, op.port == 0) {
        _ if unjudged => "none",
        (OpKind::Bind, false, false) => "bind4",
        (OpKind::Bind, false, true) => "post_bind4",
        (OpKind::Bind, true, false) => "bind6",
        (OpKind::Bind, true, true) => "post_bind6",
        (OpKind::Connect, false, _) => "connect4",
        (OpKind::Connect, true, _) => "connect6",
        (OpKind::Sendto, false, _) => "sendmsg4",
        (OpKind::Sendto, true, _) => "sendmsg6",
        (OpKind::Listen, _, _) => "listen",
        (OpKind::Raw, _, _) => "sock_create",
    };
    let mut p = Prediction {
        hook,
        family: family_name(if op.kind == OpKind::Raw {
            if v6_socket {
                Family::Ipv6
            } else {
                Family::Ipv4
            }
        } else {
            view.family
        }),
        eperm: false,
        events: Vec::new(),
        policy: None,
    };
    let Some(policy) = model.governing(caller) else {
        return p;
    };
    p.policy = Some(policy.name.clone());
    let audit = policy.mode == portguard::policy::Mode::Audit;
    let verdict = if audit { "audit" } else { "deny" };
    let (ty, protocol) = socket_kind(op);
    if !policy.allows_socket(ty, protocol) {
        let judged = Judged {
            dir: Dir::Socket,
            tcp: None,
            ipv6: v6_socket,
            loopback: false,
            port: 0,
            ephemeral: false,
            dual_stack: false,
        };
        p.events.push(Expected {
            verdict,
            hook: "sock_create",
            policy: policy.name.clone(),
            rule: rule_in_file(&model.file, &policy.name, &judged, false)
                .expect("the governing policy is in the file"),
            port: 0,
            family: family_name(if v6_socket {
                Family::Ipv6
            } else {
                Family::Ipv4
            }),
        });
        if !audit {
            p.eperm = true;
            return p;
        }
    }
    if op.kind == OpKind::Raw || unjudged {
        return p;
    }
    // The kernel chose the port: a bind to port 0, or a listen() that
    // autobinds.
    let port0 = matches!(op.kind, OpKind::Bind | OpKind::Listen) && op.port == 0;
    let port = if port0 { chosen } else { op.port };
    let dual =
        matches!(op.kind, OpKind::Bind | OpKind::Listen) && view.unspecified_v6 && !op.v6only;
    let allowed = match op.kind {
        OpKind::Bind | OpKind::Listen => {
            let ephemeral_ok = port0 && in_ephemeral_range(model.host_range, port);
            policy.allows_bound_protocol(ip_protocol(op.proto), view, port, dual, ephemeral_ok)
        }
        OpKind::Connect | OpKind::Sendto => {
            policy.allows_destination(ip_protocol(op.proto), view, port)
        }
        OpKind::Raw => true,
    };
    if allowed {
        return p;
    }
    let dir = match op.kind {
        OpKind::Bind | OpKind::Listen => Dir::Bind,
        _ => Dir::Connect,
    };
    let judged = Judged {
        dir,
        tcp: match ip_protocol(op.proto) {
            IPPROTO_TCP => Some(true),
            IPPROTO_UDP => Some(false),
            _ => None,
        },
        ipv6: view.family == Family::Ipv6,
        loopback: view.class == AddrClass::Loopback,
        port,
        ephemeral: port0,
        dual_stack: dual,
    };
    let rule = rule_in_file(&model.file, &policy.name, &judged, dir == Dir::Bind)
        .expect("the governing policy is in the file");
    // listen() cannot be denied without the BPF LSM: the listener is cut
    // off instead (the agent of these hosts runs without it).
    let cut_off = op.kind == OpKind::Listen;
    p.eperm = !audit && !cut_off;
    p.events.push(Expected {
        verdict: if cut_off && !audit {
            "cut_off"
        } else {
            verdict
        },
        hook,
        policy: policy.name.clone(),
        rule,
        port,
        family: p.family,
    });
    p
}
