//! `portguard learn`: watch a workload in audit mode (nothing is denied) and
//! write the smallest policy that would have allowed exactly what it did.
//!
//! The agent runs with one policy on the selected workload, `mode: audit`,
//! `bind: []` and `connect: []`, so every bind, connect and send is reported
//! as `audit` (and sockets bound before learning started as
//! `preexisting`). [`synthesize`] turns those events into rules: one per
//! protocol, family and address class, listing the ports seen, each with a
//! comment giving how often and since when. Binds to port 0 become
//! `ephemeral`; ports bound or reached only on loopback become
//! `address: loopback`; a dual-stack `[::]` bind needs both families.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::Value;

use crate::policy::{PodSelector, Selector};

/// What was seen, one entry per event line (aggregates carry a count).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub connect: bool,
    pub tcp: bool,
    /// Families the operation needs: 4, 6, or both for a dual-stack bind.
    pub families: BTreeSet<u8>,
    pub loopback: bool,
    /// `None`: a port chosen by the kernel (`ephemeral`).
    pub port: Option<u16>,
    pub count: u64,
    pub first_seen: String,
    /// Socket kind for `sock_create` events (raw, sctp, l2tp).
    pub socket: Option<String>,
}

/// Parse an event line into what it shows, if it is a learnable decision.
pub fn seen(e: &Value) -> Option<Seen> {
    let verdict = e["verdict"].as_str()?;
    if !matches!(verdict, "audit" | "preexisting" | "reported") {
        return None;
    }
    let hook = e["hook"].as_str()?;
    let first_seen = e["first_seen"]
        .as_str()
        .or_else(|| e["time"].as_str())
        .unwrap_or_default()
        .to_owned();
    let count = e["count"].as_u64().unwrap_or(1);
    if hook == "sock_create" {
        return Some(Seen {
            connect: false,
            tcp: false,
            families: BTreeSet::new(),
            loopback: false,
            port: None,
            count,
            first_seen,
            socket: e["socket"].as_str().map(str::to_owned),
        });
    }
    let tcp = match e["protocol"].as_str()? {
        "tcp" => true,
        "udp" => false,
        _ => return None,
    };
    let connect = matches!(hook, "connect4" | "connect6" | "sendmsg4" | "sendmsg6");
    let mut families = BTreeSet::new();
    families.insert(if e["family"] == "ipv4" { 4 } else { 6 });
    if e["dual_stack"] == true {
        families.extend([4, 6]);
    }
    // The shared classifier, as the kernel program judged it.
    let role = if connect {
        portguard_common::AddrRole::Destination
    } else {
        portguard_common::AddrRole::Local
    };
    let loopback = e["address"]
        .as_str()
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
        .is_some_and(|a| {
            portguard_common::classify_ip(a, role).class == portguard_common::AddrClass::Loopback
        });
    let chosen = hook.starts_with("post_bind") || e["autobind"] == true;
    Some(Seen {
        connect,
        tcp,
        families,
        loopback,
        port: if chosen {
            None
        } else {
            Some(u16::try_from(e["port"].as_u64()?).ok()?)
        },
        count,
        first_seen,
        socket: None,
    })
}

/// Per port: how it was used.
#[derive(Default)]
struct PortUse {
    families: BTreeSet<u8>,
    /// Every use was on (or to) loopback.
    loopback_only: bool,
    count: u64,
    first_seen: String,
}

fn selector_yaml(sel: &Selector) -> String {
    match sel {
        Selector::Cgroup(p) => format!("    cgroup: {p}\n"),
        Selector::Unit(u) => format!("    unit: {u}\n"),
        Selector::Pods(p) => {
            let mut s = String::from("    pods:\n");
            if let Some(ns) = &p.namespace {
                let _ = writeln!(s, "      namespace: {}", yaml_str(ns));
            }
            if !p.labels.is_empty() {
                let labels: Vec<String> = p
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{}: {}", yaml_str(k), yaml_str(v)))
                    .collect();
                let _ = writeln!(s, "      labels: {{{}}}", labels.join(", "));
            }
            if let Some(c) = &p.container {
                let _ = writeln!(s, "      container: {}", yaml_str(c));
            }
            if p.namespace.is_none() && p.labels.is_empty() && p.container.is_none() {
                s = "    pods: {}\n".into();
            }
            s
        }
    }
}

/// A YAML scalar, quoted when it could be read as something else.
fn yaml_str(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !s.chars().next().is_some_and(|c| c.is_ascii_digit())
        && !matches!(s, "true" | "false" | "null" | "yes" | "no" | "on" | "off")
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

fn rules_yaml(dir: &str, uses: &BTreeMap<(bool, Option<u16>), PortUse>, out: &mut String) {
    if uses.is_empty() {
        let _ = writeln!(
            out,
            "    # No {dir} was seen while learning: every {dir} is denied. Remove this key to \
             leave {dir}s unrestricted."
        );
        let _ = writeln!(out, "    {dir}: []");
        return;
    }
    // Ports with the same protocol, families and address class share a rule.
    // (tcp, family, loopback only) -> ports.
    type RuleKey = (bool, String, bool);
    let mut rules: BTreeMap<RuleKey, Vec<(Option<u16>, &PortUse)>> = BTreeMap::new();
    for ((tcp, port), u) in uses {
        let family = match (u.families.contains(&4), u.families.contains(&6)) {
            (true, true) => "any",
            (true, false) => "ipv4",
            _ => "ipv6",
        };
        rules
            .entry((*tcp, family.to_owned(), u.loopback_only))
            .or_default()
            .push((*port, u));
    }
    let _ = writeln!(out, "    {dir}:");
    for ((tcp, family, loopback), mut ports) in rules {
        // Numbers in order, then `ephemeral`.
        ports.sort_by_key(|(p, _)| p.map_or(u32::MAX, u32::from));
        let proto = if tcp { "tcp" } else { "udp" };
        for (port, u) in &ports {
            let what = port.map_or("ephemeral (a port the kernel chose)".to_owned(), |p| {
                p.to_string()
            });
            let _ = writeln!(
                out,
                "      # {what}/{proto}: {} time{}, first seen {}",
                u.count,
                if u.count == 1 { "" } else { "s" },
                u.first_seen
            );
        }
        let list: Vec<String> = ports
            .iter()
            .map(|(p, _)| p.map_or("ephemeral".to_owned(), |p| p.to_string()))
            .collect();
        let _ = write!(
            out,
            "      - ports: [{}]\n        protocol: {proto}\n",
            list.join(", ")
        );
        if family != "any" {
            let _ = writeln!(out, "        family: {family}");
        }
        if loopback {
            let _ = writeln!(out, "        address: loopback");
        }
    }
}

/// The policy (YAML text) that allows exactly `seen`.
pub fn synthesize(name: &str, selector: &Selector, seen: &[Seen], header: &str) -> String {
    let mut binds: BTreeMap<(bool, Option<u16>), PortUse> = BTreeMap::new();
    let mut connects: BTreeMap<(bool, Option<u16>), PortUse> = BTreeMap::new();
    let mut sockets: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for s in seen {
        if let Some(kind) = &s.socket {
            let e = sockets
                .entry(kind.clone())
                .or_insert((0, s.first_seen.clone()));
            e.0 += s.count;
            if s.first_seen < e.1 {
                e.1.clone_from(&s.first_seen);
            }
            continue;
        }
        let map = if s.connect { &mut connects } else { &mut binds };
        let u = map.entry((s.tcp, s.port)).or_insert_with(|| PortUse {
            loopback_only: true,
            first_seen: s.first_seen.clone(),
            ..PortUse::default()
        });
        u.families.extend(&s.families);
        u.loopback_only &= s.loopback;
        u.count += s.count;
        if s.first_seen < u.first_seen {
            u.first_seen.clone_from(&s.first_seen);
        }
    }
    let mut out = String::new();
    for line in header.lines() {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(out, "policies:\n  - name: {}", yaml_str(name));
    out.push_str(&selector_yaml(selector));
    out.push_str(
        "    # Learned in audit mode. Try it as `mode: audit` first if the learning \
         window may have missed something.\n    mode: enforce\n",
    );
    rules_yaml("bind", &binds, &mut out);
    rules_yaml("connect", &connects, &mut out);
    if !sockets.is_empty() {
        for (kind, (n, first)) in &sockets {
            let _ = writeln!(out, "    # {kind} sockets: {n} created, first seen {first}");
        }
        let kinds: Vec<&str> = sockets.keys().map(String::as_str).collect();
        let _ = writeln!(out, "    allow_sockets: [{}]", kinds.join(", "));
    }
    out
}

/// `--pods "namespace=payments,app=web,container=server"`: `namespace` and
/// `container` are the selector's keys, anything else is a label.
pub fn parse_pods(s: &str) -> Result<PodSelector, String> {
    let mut sel = PodSelector::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected KEY=VALUE"))?;
        let (k, v) = (k.trim(), v.trim());
        match k {
            "namespace" => sel.namespace = Some(v.to_owned()),
            "container" => sel.container = Some(v.to_owned()),
            _ => {
                sel.labels.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    Ok(sel)
}

/// What `portguard learn` needs from the command line.
pub struct LearnOptions {
    pub selector: Selector,
    pub name: String,
    pub duration: Duration,
    pub out: PathBuf,
    pub cri_socket: PathBuf,
    pub cgroup_root: Option<PathBuf>,
}

/// Learn for `opts.duration`, then write the policy to `opts.out`.
pub fn run(opts: &LearnOptions) -> anyhow::Result<usize> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let policy_path = dir.path().join("learn.yaml");
    let log = dir.path().join("events.jsonl");
    let learning = format!(
        "policies:\n  - name: {}\n{}    mode: audit\n    bind: []\n    connect: []\n",
        yaml_str(&opts.name),
        selector_yaml(&opts.selector)
    );
    std::fs::write(&policy_path, &learning).context("writing the learning policy")?;
    log::info!(
        "learn: watching {} for {} (audit mode: nothing is denied)",
        opts.selector.describe(),
        humantime::format_duration(opts.duration)
    );
    let started = crate::events::format_time(std::time::SystemTime::now());
    crate::agent::run(crate::agent::RunOptions {
        policy_reports: None,
        policy: policy_path,
        log: Some(log.clone()),
        log_rotation: crate::events::Rotation {
            max_bytes: 0,
            keep: 0,
        },
        // learn reads portguard's own lines back.
        log_format: crate::events::Format::Json,
        capacity: crate::apply::Capacity {
            cgroups: 4096,
            policies: 16,
            chunks: 64,
        },
        ring_buffer_bytes: 1 << 22,
        // Learning needs every decision: no kernel event budget.
        event_rate: 0,
        event_burst: 0,
        watch: false,
        lost_interval: Duration::from_secs(1),
        max_delegated_cgroups: 64,
        inventory_interval: Duration::ZERO,
        rescan_interval: Duration::from_secs(5),
        attach_cgroup: "/".into(),
        decide_everywhere: false,
        require_lsm: false,
        cri_socket: opts.cri_socket.clone(),
        cri_max_message_bytes: crate::workload::cri::DEFAULT_MAX_MESSAGE_BYTES,
        aggregate_window: Duration::from_secs(1),
        health_listen: None,
        metrics_addr: None,
        status_socket: None,
        cgroup_root: opts.cgroup_root.clone(),
        stop_after: Some(opts.duration),
        pin_dir: None,
        kernel_object: None,
        cgroup_cache: true,
        program_stats: false,
        fail_closed: false,
    })?;
    let events = super::events::read_log(&log).unwrap_or_default();
    let lost = events
        .iter()
        .filter_map(|e| e["lost_total"].as_u64())
        .max()
        .unwrap_or(0);
    let seen: Vec<Seen> = events.iter().filter_map(seen).collect();
    let mut header = format!(
        "Written by `portguard learn` for {}: observed from {started} for {}.\n\
         Validate with `portguard check`; review before enforcing.",
        opts.selector.describe(),
        humantime::format_duration(opts.duration)
    );
    if lost > 0 {
        let _ = write!(
            header,
            "\nWARNING: {lost} events were lost while learning; the policy may be incomplete."
        );
    }
    let yaml = synthesize(&opts.name, &opts.selector, &seen, &header);
    write_out(&opts.out, &yaml)?;
    Ok(seen.len())
}

fn write_out(path: &Path, text: &str) -> anyhow::Result<()> {
    if path == Path::new("-") {
        print!("{text}");
        return Ok(());
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// The verb: its arguments (the `--help` text) and what it does.

use std::process::ExitCode;

use clap::Args;

/// Watch a workload and write the policy that allows what it does.
///
/// Runs the agent with one audit-mode policy on the workload (nothing is
/// denied; needs the same privileges as `run`), records every bind,
/// connect and send, and sockets it already holds, for --duration, then
/// writes the smallest policy that would have allowed exactly that, with
/// comments giving counts and first-seen times. `portguard check` accepts
/// it; review it, and roll it out in audit mode first if the window may
/// have missed something (a nightly job, a failover port).
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("workload").required(true).args(["cgroup", "pods", "unit"])))]
pub struct LearnArgs {
    /// The workload: a cgroup path under the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// The workload: Kubernetes pods, as
    /// "namespace=NS,LABEL=VALUE,...,container=NAME" (every part optional).
    #[arg(long, value_name = "SELECTOR")]
    pub pods: Option<String>,
    /// The workload: a systemd unit (nginx.service).
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// How long to watch (e.g. 10m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Where to write the policy (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Name of the policy written.
    #[arg(long, value_name = "NAME", default_value = "learned")]
    pub name: String,
    /// The node's CRI runtime socket (for --pods).
    #[arg(long, value_name = "PATH", default_value = crate::workload::cri::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,
    /// The host's cgroup2 mount, if not the first one in /proc/mounts.
    #[arg(long, value_name = "PATH", env = "PORTGUARD_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
}

/// Carry out the verb.
pub fn execute(a: LearnArgs) -> anyhow::Result<ExitCode> {
    let selector = match (a.cgroup, a.pods, a.unit) {
        (Some(c), None, None) => Selector::Cgroup(
            crate::policy::normalize_cgroup(&c)
                .map_err(|e| anyhow::anyhow!("--cgroup {c}: {e}"))?,
        ),
        (None, Some(p), None) => {
            Selector::Pods(parse_pods(&p).map_err(|e| anyhow::anyhow!("--pods {p}: {e}"))?)
        }
        (None, None, Some(u)) => Selector::Unit(u),
        _ => anyhow::bail!("give exactly one of --cgroup, --pods or --unit"),
    };
    let n = run(&LearnOptions {
        selector,
        name: a.name,
        duration: a.duration,
        out: a.out.clone(),
        cri_socket: a.cri_socket,
        cgroup_root: a.cgroup_root,
    })?;
    eprintln!(
        "portguard learn: {n} observations; policy written to {}",
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::parse_policy_str;

    fn ev(hook: &str, proto: &str, family: &str, addr: &str, port: u16) -> Value {
        json!({"verdict": "audit", "hook": hook, "protocol": proto, "family": family,
               "address": addr, "port": port, "count": 1, "time": "2026-11-22T00:00:00Z"})
    }

    #[test]
    fn writes_the_smallest_policy_that_allows_what_was_seen() {
        let mut dual = ev("bind6", "tcp", "ipv6", "::", 8443);
        dual["dual_stack"] = json!(true);
        let mut agg = ev("bind4", "tcp", "ipv4", "0.0.0.0", 8080);
        agg["count"] = json!(41);
        agg["first_seen"] = json!("2026-11-21T23:59:00Z");
        let events = [
            ev("bind4", "tcp", "ipv4", "0.0.0.0", 8080),
            agg,
            ev("bind4", "udp", "ipv4", "127.0.0.1", 5353),
            ev("post_bind4", "udp", "ipv4", "127.0.0.1", 40123),
            dual,
            ev("connect4", "tcp", "ipv4", "127.0.0.1", 5432),
            ev("sendmsg6", "udp", "ipv6", "2001:db8::1", 53),
            json!({"verdict": "deny", "hook": "bind4", "protocol": "tcp", "family": "ipv4",
                   "address": "0.0.0.0", "port": 1}),
            json!({"verdict": "audit", "hook": "sock_create", "protocol": "raw",
                   "family": "ipv4", "address": "0.0.0.0", "port": 0, "socket": "raw",
                   "time": "2026-11-22T00:00:01Z"}),
        ];
        let seen: Vec<Seen> = events.iter().filter_map(seen).collect();
        assert_eq!(seen.len(), 8, "the deny line is not learned");
        let yaml = synthesize(
            "web",
            &Selector::Cgroup("/app/web".into()),
            &seen,
            "learned",
        );
        let file = parse_policy_str(&yaml).unwrap_or_else(|d| panic!("{d:?}\n{yaml}"));
        let p = &file.policies[0];
        assert_eq!(p.name, "web");
        let bind = p.bind.as_ref().unwrap();
        let connect = p.connect.as_ref().unwrap();
        assert_eq!(bind.len(), 3, "{yaml}");
        assert_eq!(connect.len(), 2, "{yaml}");
        assert!(
            yaml.contains("# 8080/tcp: 42 times, first seen 2026-11-21T23:59:00Z"),
            "{yaml}"
        );
        assert!(yaml.contains("- ports: [5353, ephemeral]\n        protocol: udp\n        family: ipv4\n        address: loopback"), "{yaml}");
        assert!(
            yaml.contains("- ports: [8080]\n        protocol: tcp\n        family: ipv4\n"),
            "{yaml}"
        );
        assert!(
            yaml.contains("- ports: [8443]\n        protocol: tcp\n"),
            "dual-stack needs any family: {yaml}"
        );
        assert!(yaml.contains("- ports: [5432]\n        protocol: tcp\n        family: ipv4\n        address: loopback"), "{yaml}");
        assert!(
            yaml.contains("- ports: [53]\n        protocol: udp\n        family: ipv6\n"),
            "{yaml}"
        );
        assert!(yaml.contains("allow_sockets: [raw]"), "{yaml}");
        assert!(yaml.starts_with("# learned\n"));
    }

    #[test]
    fn nothing_seen_means_nothing_allowed() {
        let yaml = synthesize(
            "quiet",
            &Selector::Pods(parse_pods("namespace=team-a, app=api ,container=server").unwrap()),
            &[],
            "",
        );
        let file = parse_policy_str(&yaml).unwrap_or_else(|d| panic!("{d:?}\n{yaml}"));
        let p = &file.policies[0];
        assert_eq!(p.bind.as_deref(), Some(&[][..]));
        assert_eq!(p.connect.as_deref(), Some(&[][..]));
        let Selector::Pods(sel) = &p.selector else {
            panic!()
        };
        assert_eq!(sel.namespace.as_deref(), Some("team-a"));
        assert_eq!(sel.labels["app"], "api");
        assert_eq!(sel.container.as_deref(), Some("server"));
        assert!(parse_pods("oops").is_err());
    }

    #[test]
    fn odd_names_are_quoted() {
        assert_eq!(yaml_str("web"), "web");
        assert_eq!(yaml_str("team-*"), "'team-*'");
        assert_eq!(yaml_str("true"), "'true'");
        assert_eq!(yaml_str("8080"), "'8080'");
        assert_eq!(yaml_str("it's"), "'it''s'");
    }
}
