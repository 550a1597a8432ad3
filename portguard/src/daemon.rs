//! `portguard run`: load, apply, attach, then serve until SIGTERM/SIGINT.
//!
//! One single-threaded tokio loop owns everything and handles, in turn:
//! ring-buffer readiness (events -> JSON lines), SIGHUP and policy-file
//! changes (reload), cgroup directory changes (a policy's cgroup appearing,
//! disappearing or being recreated), and a timer that reports events the
//! kernel had to drop.
//!
//! Invariants:
//! - the first policy is written into the maps before any program is
//!   attached, so nothing ever runs against half-written state;
//! - a reload is applied whole (generation flip) or not at all; an invalid
//!   policy file leaves the previous policy in force and is logged;
//! - dropping the loaded object on exit detaches every program.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use inotify::{Inotify, WatchDescriptor, WatchMask};
use log::{debug, error, info, warn};
use sd_notify::NotifyState;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use rustc_hash::FxHashMap;

use crate::{
    cgroupfs::Hierarchy,
    cri,
    events::{self, EventWriter, LostRecord, PolicyNames},
    health::Health,
    inventory,
    loader::{ListenCheck, LoadOptions, Loaded},
    pins::PinDir,
    policy::{
        CompiledPolicy, ParsedPolicy, PolicyError, Reparse, Selector, classify, compile,
        compile_all, parse_policy_text, read_policy_file, reparse_policy_text,
    },
    resolve::{self, Governed, Resolution, TreeIndex},
    rules_map::{Applier, ApplyReport, Capacity, ResolvedCgroup, Target},
};

/// Options of `portguard run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    /// A file, `journald`, or standard output (`None`).
    pub log: Option<PathBuf>,
    pub log_rotation: events::Rotation,
    pub capacity: Capacity,
    pub ring_buffer_bytes: u32,
    /// Reload when the policy file changes (SIGHUP always reloads).
    pub watch: bool,
    /// How often to check the kernel's lost-event counter.
    pub lost_interval: Duration,
    /// How often to re-resolve policy cgroups even without inotify events.
    pub rescan_interval: Duration,
    /// Where to attach the programs (a normalised cgroup path; `/` = the
    /// whole host). Every policy must govern a cgroup at or below it.
    pub attach_cgroup: String,
    /// Refuse to run without the BPF LSM checks (listen/accept).
    pub require_lsm: bool,
    /// The CRI runtime's socket (for `pods:` policies and event identities).
    pub cri_socket: PathBuf,
    /// Identical decisions within this window are written as one line
    /// (zero: every decision is written).
    pub aggregate_window: Duration,
    /// Where to serve /healthz and /readyz.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Where to serve /metrics (`None`: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to answer `portguard status` (`None`: off).
    pub status_socket: Option<PathBuf>,
    /// The host's cgroup2 mount, when discovery from /proc/mounts is not
    /// wanted (a container).
    pub cgroup_root: Option<PathBuf>,
    /// Stop by itself after this long (`portguard learn`).
    pub stop_after: Option<Duration>,
    /// bpffs directory to pin programs, links and maps in (`None`: nothing
    /// pinned; enforcement ends with the agent).
    pub pin_dir: Option<PathBuf>,
    /// Load this kernel object instead of the built-in one (upgrade tests).
    pub kernel_object: Option<PathBuf>,
    /// When a policy cannot be applied (maps full, a cgroup too deep, a map
    /// write failing), deny every bind in the cgroups it governs instead of
    /// keeping the previous policy (or, at start, exiting).
    pub fail_closed: bool,
}

/// Prefix of the stand-in policies `--fail-closed` applies.
pub const FAIL_CLOSED: &str = "portguard:fail-closed";

/// Name of the built-in policy holding pod cgroups the runtime has not
/// identified yet (see `Agent::identifying_policy`).
pub const IDENTIFYING: &str = "portguard:identifying";

/// /healthz fails when the main loop has not turned for this long (or three
/// lost-report intervals, if longer).
const HEALTH_STALE_AFTER: Duration = Duration::from_secs(30);

/// Most ring-buffer records handled per turn of the main loop, and the
/// longest a turn reads for: signals, reloads and timers wait at most that.
const DRAIN_BATCH: usize = 4096;
const DRAIN_BATCH_TIME: Duration = Duration::from_millis(5);

/// Most kinds of decision the aggregator tracks at once.
const AGGREGATE_KINDS: usize = 65536;

/// How long a pod cgroup may stay unidentified before it is released.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// True when `cgroup` is `scope` or below it.
fn within(cgroup: &str, scope: &str) -> bool {
    scope == "/"
        || cgroup == scope
        || cgroup
            .strip_prefix(scope)
            .is_some_and(|r| r.starts_with('/'))
}

/// Policies outside the attach point could never be enforced: refuse them.
fn check_scope(policies: &[CompiledPolicy], scope: &str) -> anyhow::Result<()> {
    let outside: Vec<String> = policies
        .iter()
        .filter_map(|p| {
            let path = p.selector.cgroup_path()?;
            (!within(path, scope)).then(|| format!("`{}` ({path})", p.name))
        })
        .collect();
    if outside.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the programs are attached at {scope} (--attach-cgroup), so these policies could not be \
         enforced: {}",
        outside.join(", ")
    )
}

/// Stable small ids for policy names (events carry the id).
#[derive(Default)]
struct Registry {
    ids: HashMap<String, u32>,
    next: u32,
}

impl Registry {
    /// Continue a previous agent's numbering (ids in pinned maps and in
    /// events still queued keep their names).
    fn seed(&mut self, id: u32, name: &str) {
        self.ids.entry(name.to_owned()).or_insert(id);
        self.next = self.next.max(id);
    }

    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        self.next += 1;
        self.ids.insert(name.to_owned(), self.next);
        self.next
    }
}

struct Agent {
    policy_path: PathBuf,
    attach_cgroup: String,
    hierarchy: Hierarchy,
    applier: Applier,
    loaded: Loaded,
    policies: Vec<CompiledPolicy>,
    resolved: Resolution,
    registry: Registry,
    names: PolicyNames,
    name_map_full: bool,
    quiesce_warned: bool,
    fail_closed: bool,
    /// The kernel's lost-event count already reported (at start: by the
    /// previous agent, when the counters were adopted).
    lost_seen: u64,
    /// cgroup path -> (id, level) as last seen; emptied on every inotify
    /// event about watched cgroup directories and refreshed by each rescan,
    /// so a reload only stat()s paths it has not seen.
    resolve_cache: FxHashMap<String, Option<(u64, u32)>>,
    /// Where pods, containers and units are (for `pods:`/`unit:` policies).
    tree: Option<TreeIndex>,
    /// The CRI runtime's last answer (kept when it stops answering).
    cri: Option<cri::Snapshot>,
    /// Ties already logged (each once).
    ties_logged: HashSet<String>,
    /// Pod cgroups the runtime cannot identify yet (their sandbox is being
    /// created), governed by the built-in `portguard:identifying` policy.
    quarantine: Vec<Governed>,
    /// When each unidentified pod cgroup was first seen (uid -> time).
    unidentified_since: HashMap<String, Instant>,
    /// The quarantine the last `resolve` computed, applied by `apply`.
    next_quarantine: Vec<Governed>,
    /// When inotify last reported a cgroup directory change (for timing).
    last_cgroup_event: Option<Instant>,
    /// The policy file as last applied (for incremental reloads).
    parsed: Option<ParsedPolicy>,
    /// The last reload re-parsed one entry; confirm with a full parse.
    verify_pending: bool,
    /// The governed set changed: list pre-existing sockets again.
    inventory_pending: bool,
    /// What /healthz and /readyz report.
    health: std::sync::Arc<Health>,
    /// The host name events carry.
    host: String,
    /// Flood control for event lines.
    aggregator: crate::aggregate::Aggregator,
    /// Map capacities (for occupancy).
    capacity: Capacity,
    /// What /metrics and `status` report besides the kernel counters.
    shared: std::sync::Arc<crate::metrics::Shared>,
    /// Owner of each policy record slot and the slot's counters when it
    /// took it (a slot freed by a removed policy keeps its kernel counts).
    slot_owners: HashMap<u32, (String, crate::loader::Decisions)>,
    /// Cut-off sockets neither fenced nor destroyed.
    unended: Vec<Unended>,
    /// The packet guard's link on the cgroup2 root, while `unended` is not
    /// empty (see [`portguard_common::GUARD_PROGRAM`]).
    packet_guard: Option<crate::loader::ProgLink>,
}

impl Agent {
    fn needs_tree(policies: &[CompiledPolicy]) -> bool {
        policies
            .iter()
            .any(|p| !matches!(p.selector, Selector::Cgroup(_)))
    }

    /// Index the parts of the cgroup tree the selectors need: the kubelet's
    /// pod hierarchies for `pods:`, the whole tree only for `unit:`.
    fn scan_tree(&self, policies: &[CompiledPolicy]) -> TreeIndex {
        let root = self.hierarchy.root();
        if policies
            .iter()
            .any(|p| matches!(p.selector, Selector::Unit(_)))
        {
            return TreeIndex::scan(root, &["/"], 16);
        }
        TreeIndex::scan(root, &["/kubepods", "/kubepods.slice"], 4)
    }

    /// A pod selector's policy cannot be chosen before the runtime lists the
    /// pod's labels, which happens only once its sandbox exists. Meanwhile its
    /// cgroup (holding at most the pause process) is governed by this
    /// built-in policy that allows no bind and no connect, so no container can
    /// start ahead of its policy.
    fn identifying_policy() -> CompiledPolicy {
        compile(&crate::policy::Policy {
            name: IDENTIFYING.to_owned(),
            selector: Selector::Cgroup("/".to_owned()),
            mode: crate::policy::Mode::Enforce,
            bind: Some(Vec::new()),
            connect: Some(Vec::new()),
            allow_sockets: Vec::new(),
            line: 0,
        })
    }

    /// `--fail-closed` stand-ins for `policies`: same selectors, every bind
    /// denied, connects as the policy says. They need no port sets, so they
    /// fit where the real ones did not (unless the cgroups themselves do not).
    fn fail_closed_policies(policies: &[CompiledPolicy]) -> Vec<CompiledPolicy> {
        let deny = Self::identifying_policy();
        policies
            .iter()
            .map(|p| CompiledPolicy {
                name: format!("{FAIL_CLOSED}:{}", p.name),
                selector: p.selector.clone(),
                mode: crate::policy::Mode::Enforce,
                bind: deny.bind.clone(),
                connect: None,
                allow_sockets: 0,
            })
            .collect()
    }

    /// The `--fail-closed` stand-ins are in force.
    fn failed_closed(&self) -> bool {
        self.policies
            .iter()
            .any(|p| p.name.starts_with(FAIL_CLOSED))
    }

    /// Apply the `--fail-closed` stand-ins after `err` kept `policies` out.
    fn apply_fail_closed(
        &mut self,
        policies: &[CompiledPolicy],
        err: &dyn std::fmt::Display,
    ) -> anyhow::Result<ApplyReport> {
        let fallback = Self::fail_closed_policies(policies);
        let mut resolved = self.resolve(&fallback, true);
        // Cgroups deeper than the kernel walks cannot be governed at all.
        for govs in &mut resolved {
            govs.retain(|g| g.level < portguard_common::MAX_CGROUP_DEPTH);
        }
        let report = self
            .apply(fallback, resolved)
            .context("--fail-closed: even denying every bind does not fit")?;
        error!(
            "daemon: FAIL-CLOSED: the policy could not be applied ({err}); every bind in the {} \
             cgroups it governs is DENIED (policies `{FAIL_CLOSED}:<name>`) until a policy that \
             fits is loaded",
            report.cgroups
        );
        Ok(report)
    }

    /// Pod cgroups to hold in quarantine: unknown to the runtime, governed
    /// by no policy, first seen less than [`IDENTIFY_TIMEOUT`] ago. Only while
    /// the runtime answers (a wrong --cri-socket must not block every pod).
    fn compute_quarantine(&mut self, resolved: &Resolution) -> Vec<Governed> {
        let (Some(tree), Some(cri)) = (&self.tree, &self.cri) else {
            self.unidentified_since.clear();
            return Vec::new();
        };
        let unknown = tree.unknown_pods(cri);
        self.unidentified_since
            .retain(|uid, _| unknown.contains(uid));
        let governed: HashSet<u64> = resolved.iter().flatten().map(|g| g.id).collect();
        let mut out = Vec::new();
        for uid in unknown {
            let since = *self
                .unidentified_since
                .entry(uid.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() > IDENTIFY_TIMEOUT {
                continue;
            }
            let Some(path) = tree.pods.get(&uid) else {
                continue;
            };
            if let Ok(Some((id, level))) = self.hierarchy.resolve(path)
                && !governed.contains(&id)
            {
                out.push(Governed {
                    path: path.clone(),
                    id,
                    level,
                });
            }
        }
        out
    }

    fn needs_cri(policies: &[CompiledPolicy]) -> bool {
        policies
            .iter()
            .any(|p| matches!(p.selector, Selector::Pods(_)))
    }

    /// Resolve each policy's cgroups. `fresh`: stat every path and re-index
    /// the tree (rescans); otherwise reuse what is known (reloads).
    fn resolve(&mut self, policies: &[CompiledPolicy], fresh: bool) -> Resolution {
        if fresh {
            self.resolve_cache.clear();
        }
        if Self::needs_tree(policies) && (fresh || self.tree.is_none()) {
            self.tree = Some(self.scan_tree(policies));
        }
        let empty = TreeIndex::default();
        let tree = self.tree.as_ref().unwrap_or(&empty);
        let hierarchy = &self.hierarchy;
        let cache = &mut self.resolve_cache;
        let mut stat = |path: &str| -> Option<(u64, u32)> {
            if let Some(r) = cache.get(path) {
                return *r;
            }
            let r = hierarchy.resolve(path).unwrap_or_else(|e| {
                warn!("daemon: {e}; treating it as absent");
                None
            });
            cache.insert(path.to_owned(), r);
            r
        };
        let (mut resolved, ties) = resolve::resolve(policies, tree, self.cri.as_ref(), &mut stat);
        for t in ties {
            if self.ties_logged.insert(t.clone()) {
                error!("daemon: {t}");
            }
        }
        self.next_quarantine = if Self::needs_cri(policies) {
            self.compute_quarantine(&resolved)
        } else {
            Vec::new()
        };
        // Pod and unit selectors may find cgroups outside --attach-cgroup,
        // where the programs do not run: say so and leave them out.
        for (p, govs) in policies.iter().zip(&mut resolved) {
            govs.retain(|g| {
                let ok = within(&g.path, &self.attach_cgroup);
                if !ok {
                    warn!(
                        "daemon: policy `{}` selects {}, outside --attach-cgroup {}: not enforced there",
                        p.name, g.path, self.attach_cgroup
                    );
                }
                ok
            });
        }
        resolved
    }

    /// Keep a policy id's name in the kernel too, so an agent that adopts
    /// the pinned state can name events queued before it started.
    fn record_name(&mut self, id: u32, name: &str) {
        if let Err(e) = self.loaded.maps.put_name(id, name)
            && !self.name_map_full
        {
            self.name_map_full = true;
            warn!(
                "daemon: cannot record policy name `{name}` in the kernel ({e}); events queued \
                 across an agent restart may carry a policy id without its name"
            );
        }
    }

    /// Apply `policies` with `resolved` cgroups; on success they become current.
    fn apply(
        &mut self,
        policies: Vec<CompiledPolicy>,
        resolved: Resolution,
    ) -> Result<ApplyReport, crate::rules_map::ApplyError> {
        let mut ids = Vec::with_capacity(policies.len());
        for p in &policies {
            let id = self.registry.id(&p.name);
            if self.names.get(id).is_none() {
                self.names.insert(id, &p.name);
                self.record_name(id, &p.name);
            }
            ids.push(id);
        }
        let identifying = Self::identifying_policy();
        let quarantine = std::mem::take(&mut self.next_quarantine);
        let mut targets: Vec<Target<'_>> = policies
            .iter()
            .zip(&resolved)
            .zip(&ids)
            .map(|((p, r), id)| Target {
                policy_id: *id,
                policy: p,
                cgroups: r
                    .iter()
                    .map(|g| ResolvedCgroup {
                        id: g.id,
                        level: g.level,
                    })
                    .collect(),
            })
            .collect();
        if !quarantine.is_empty() {
            let id = self.registry.id(IDENTIFYING);
            if self.names.get(id).is_none() {
                self.names.insert(id, IDENTIFYING);
                self.record_name(id, IDENTIFYING);
            }
            targets.push(Target {
                policy_id: id,
                policy: &identifying,
                cgroups: quarantine
                    .iter()
                    .map(|g| ResolvedCgroup {
                        id: g.id,
                        level: g.level,
                    })
                    .collect(),
            });
        }
        let report = match self.applier.apply(&mut self.loaded.maps, &targets) {
            Ok(r) => r,
            Err(e) => {
                self.next_quarantine = quarantine;
                return Err(e);
            }
        };
        if self.applier.quiesce_unavailable && !self.quiesce_warned {
            self.quiesce_warned = true;
            warn!(
                "daemon: membarrier(MEMBARRIER_CMD_GLOBAL) is unavailable (nohz_full?): reloads \
                 wait a fixed {} ms for running programs instead of an RCU grace period",
                crate::rules_map::GRACE.as_millis()
            );
        }
        for g in &quarantine {
            if !self.quarantine.iter().any(|q| q.id == g.id) {
                let age = self.last_cgroup_event.map(|t| t.elapsed());
                info!(
                    "daemon: pod cgroup {} held by `{IDENTIFYING}` until the runtime lists its pod \
                     ({} after the cgroup change was noticed)",
                    g.path,
                    age.map_or("?".to_owned(), |a| format!(
                        "{:.1} ms",
                        a.as_secs_f64() * 1e3
                    ))
                );
            }
            self.hierarchy.remember(g.id, &g.path);
        }
        for g in &self.quarantine {
            if !quarantine.iter().any(|q| q.id == g.id) {
                let age = self.last_cgroup_event.map(|t| t.elapsed());
                info!(
                    "daemon: pod cgroup {} identified by the runtime; released from \
                     `{IDENTIFYING}` to its policy, if any ({} after the last cgroup change)",
                    g.path,
                    age.map_or("?".to_owned(), |a| format!(
                        "{:.1} ms",
                        a.as_secs_f64() * 1e3
                    ))
                );
            }
        }
        self.quarantine = quarantine;
        // Per-policy lines for small policy sets; large ones get the summary.
        let level = if policies.len() <= 50 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        let previous: HashMap<&str, &Vec<Governed>> = self
            .policies
            .iter()
            .zip(&self.resolved)
            .map(|(q, r)| (q.name.as_str(), r))
            .collect();
        for (p, r) in policies.iter().zip(&resolved) {
            let before = previous.get(p.name.as_str());
            for g in r {
                self.hierarchy.remember(g.id, &g.path);
                if before.is_none_or(|b| !b.iter().any(|x| x.id == g.id)) {
                    log::log!(
                        level,
                        "daemon: policy `{}` ({}) governs cgroup {} (id {})",
                        p.name,
                        p.mode.as_str(),
                        g.path,
                        g.id
                    );
                }
            }
            match (r.is_empty(), before) {
                (true, Some(b)) if !b.is_empty() => log::log!(
                    if level == log::Level::Info {
                        log::Level::Warn
                    } else {
                        level
                    },
                    "daemon: policy `{}` ({}) governs no cgroup any more; it applies again when one appears",
                    p.name,
                    p.selector.describe()
                ),
                (true, None) => log::log!(
                    level,
                    "daemon: policy `{}`: {} does not exist yet; it will be governed as soon as it appears",
                    p.name,
                    p.selector.describe()
                ),
                _ => {}
            }
        }
        self.policies = policies;
        self.resolved = resolved;
        self.inventory_pending = true;
        self.publish_facts(&report, &ids);
        Ok(report)
    }

    /// Refresh what /metrics and `status` report after an apply.
    fn publish_facts(&mut self, report: &ApplyReport, ids: &[u32]) {
        let counters = self.shared.counters.clone();
        let mut policies = Vec::with_capacity(self.policies.len() + 1);
        let cri = self.cri.as_ref();
        let who = |g: &Governed| (g.path.clone(), events::WorkloadIdentity::of(&g.path, cri));
        type Entry<'a> = (
            &'a CompiledPolicy,
            u32,
            Vec<(String, events::WorkloadIdentity)>,
        );
        let mut entries: Vec<Entry<'_>> = self
            .policies
            .iter()
            .zip(ids)
            .zip(&self.resolved)
            .map(|((p, id), r)| (p, *id, r.iter().map(who).collect()))
            .collect();
        let identifying = Self::identifying_policy();
        if !self.quarantine.is_empty()
            && let Some(&id) = self.registry.ids.get(IDENTIFYING)
        {
            entries.push((&identifying, id, self.quarantine.iter().map(who).collect()));
        }
        for (p, id, cgroups) in entries {
            let Some(slot) = self.applier.slot_of(id) else {
                continue;
            };
            let baseline = match self.slot_owners.get(&slot) {
                Some((name, b)) if *name == p.name => *b,
                _ => {
                    let b = counters.by_slot(slot).unwrap_or_default();
                    self.slot_owners.insert(slot, (p.name.clone(), b));
                    b
                }
            };
            policies.push(crate::metrics::PolicyFacts {
                name: p.name.clone(),
                slot,
                baseline,
                mode: p.mode.as_str(),
                selector: p.selector.describe(),
                cgroups,
            });
        }
        let caps = self.capacity;
        let maps = vec![
            crate::metrics::MapUse {
                name: "policies",
                entries: policies.len() as u64,
                capacity: u64::from(caps.policies),
            },
            crate::metrics::MapUse {
                name: "cgroups",
                entries: report.cgroups as u64,
                capacity: u64::from(caps.cgroups),
            },
            crate::metrics::MapUse {
                name: "port_chunks",
                entries: report.chunks_total as u64,
                capacity: u64::from(caps.chunks),
            },
        ];
        let governed = report.cgroups;
        self.shared.update(|f| {
            f.policies = policies;
            f.governed_cgroups = governed;
            f.maps = maps;
        });
    }

    /// Report every socket held by a governed process that its policy would
    /// not have allowed (bound before portguard governed it).
    fn inventory(&mut self, writer: &mut EventWriter) {
        self.inventory_pending = false;
        let started = Instant::now();
        let by_path: FxHashMap<&str, (usize, &Governed)> = self
            .resolved
            .iter()
            .enumerate()
            .flat_map(|(i, govs)| govs.iter().map(move |g| (g.path.as_str(), (i, g))))
            .collect();
        if by_path.is_empty() {
            return;
        }
        // Nearest ancestor-or-self with a policy, by path.
        let governing = |cg: &str| -> Option<(usize, &Governed)> {
            let mut path = cg;
            loop {
                if let Some(found) = by_path.get(path) {
                    return Some(*found);
                }
                if path == "/" || path.is_empty() {
                    return None;
                }
                path = match path.rfind('/') {
                    Some(0) => "/",
                    Some(i) => &path[..i],
                    None => return None,
                };
            }
        };
        let holders = inventory::holders(|cg| governing(cg).is_some());
        let netns = inventory::sockets_by_netns(&holders);
        let index: FxHashMap<(u64, u32), &inventory::DiagSocket> = netns
            .iter()
            .flat_map(|(ns, s)| s.sockets.iter().map(move |d| ((*ns, d.inode), d)))
            .collect();
        let mut seen = HashSet::new();
        let (mut checked, mut violations) = (0usize, 0usize);
        let mut holders = holders;
        holders.sort_by_key(|h| h.pid);
        for h in &holders {
            let Some((pi, gov)) = governing(&h.cgroup) else {
                continue;
            };
            let policy = &self.policies[pi];
            let ephemeral = netns
                .get(&h.netns.0)
                .map_or((32768, 60999), |n| n.ephemeral);
            for inode in &h.inodes {
                let Ok(inode32) = u32::try_from(*inode) else {
                    continue;
                };
                let Some(d) = index.get(&(h.netns.0, inode32)) else {
                    continue;
                };
                if !seen.insert((h.netns.0, inode32)) || d.connected {
                    continue;
                }
                let proto = if d.protocol == portguard_common::IPPROTO_TCP {
                    portguard_common::Proto::Tcp
                } else {
                    // An unconnected UDP socket on an ephemeral port is most
                    // likely a client that autobound by sending.
                    if (ephemeral.0..=ephemeral.1).contains(&d.port) {
                        continue;
                    }
                    portguard_common::Proto::Udp
                };
                checked += 1;
                let view = classify(d.local);
                let dual = view.unspecified_v6 && !d.v6only;
                if policy.allows_bound(proto, view, d.port, dual, true) {
                    continue;
                }
                violations += 1;
                let cgroup_id = std::fs::metadata(self.hierarchy.fs_path(&h.cgroup))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap_or(0);
                let policy_cgroup_id = gov.id;
                let record = events::EventRecord {
                    schema_version: events::SCHEMA_VERSION,
                    time: events::format_time(std::time::SystemTime::now()),
                    host: self.host.clone(),
                    verdict: "preexisting",
                    hook: "inventory",
                    policy: Some(policy.name.clone()),
                    rule: None,
                    cgroup: Some(h.cgroup.clone()),
                    cgroup_id,
                    pid: h.pid,
                    tid: h.pid,
                    uid: h.uid,
                    gid: h.gid,
                    comm: h.comm.clone(),
                    family: match view.family {
                        portguard_common::Family::Ipv4 => "ipv4",
                        portguard_common::Family::Ipv6 => "ipv6",
                    },
                    protocol: if proto == portguard_common::Proto::Tcp {
                        "tcp".to_owned()
                    } else {
                        "udp".to_owned()
                    },
                    address: d.local.to_string(),
                    port: d.port,
                    policy_cgroup: Some(gov.path.clone()),
                    policy_cgroup_id,
                    v4_mapped: view.v4_mapped,
                    dual_stack: dual,
                    autobind: false,
                    socket: None,
                    socket_inode: Some(*inode),
                    action: None,
                    identity: events::WorkloadIdentity::of(&h.cgroup, self.cri.as_ref()),
                    count: 1,
                    first_seen: None,
                    last_seen: None,
                };
                self.write_records(writer, vec![record]);
            }
        }
        let _ = writer.flush();
        let msg = format!(
            "daemon: inventory: {checked} listening/bound sockets in {} governed processes checked, \
             {violations} break their policy (reported as \"preexisting\") in {:?}",
            holders.len(),
            started.elapsed()
        );
        if violations > 0 {
            warn!("{msg}");
        } else {
            info!("{msg}");
        }
    }

    /// Read, validate and apply the policy file; on any error the previous
    /// policy stays in force.
    fn reload(&mut self, why: &str) {
        let started = Instant::now();
        sd_notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        ]);
        let result = self.reload_inner(started);
        match result {
            Ok((report, how)) => {
                let status = format!(
                    "enforcing {} policies (generation {}, reloaded on {why})",
                    report.policies, report.generation
                );
                let how = match how {
                    Reparse::Unchanged => "file unchanged".to_owned(),
                    Reparse::Entry { index } => format!(
                        "only policy `{}` changed",
                        self.policies.get(index).map_or("?", |p| p.name.as_str())
                    ),
                    Reparse::Full => "full parse".to_owned(),
                };
                info!(
                    "daemon: reloaded {} on {why} ({how}): {} policies, {} governed cgroups, {} port sets ({} written, {} freed), {} records and {} cgroup entries written, in {:.1} ms",
                    self.policy_path.display(),
                    report.policies,
                    report.cgroups,
                    report.sets_total,
                    report.sets_written,
                    report.sets_deleted,
                    report.records_written,
                    report.cgroups_written,
                    started.elapsed().as_secs_f64() * 1e3
                );
                sd_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                self.health.set_ready(&status);
                self.shared.update(|f| {
                    f.reloads_ok += 1;
                    f.status.clone_from(&status);
                });
                release_free_memory();
            }
            Err(e) => {
                let status = if self.failed_closed() {
                    error!("daemon: reload on {why} could not be applied: {e:#}");
                    format!(
                        "reload failed; FAIL-CLOSED: binds denied in the cgroups of {} policies",
                        self.policies.len()
                    )
                } else {
                    error!(
                        "daemon: reload on {why} rejected; the previous policy stays in force: {e:#}"
                    );
                    format!(
                        "reload failed; previous policy ({} policies) still enforced",
                        self.policies.len()
                    )
                };
                sd_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                self.health.set_ready(&status);
                self.shared.update(|f| {
                    f.reloads_failed += 1;
                    f.status.clone_from(&status);
                });
            }
        }
    }

    fn reload_inner(&mut self, started: Instant) -> anyhow::Result<(ApplyReport, Reparse)> {
        let text = read_policy_file(&self.policy_path)?;
        let invalid = |diagnostics| PolicyError::Invalid {
            path: self.policy_path.clone(),
            diagnostics,
        };
        let (parsed, how) = match &self.parsed {
            Some(prev) => reparse_policy_text(prev, text).map_err(invalid)?,
            None => (parse_policy_text(text).map_err(invalid)?, Reparse::Full),
        };
        let parse_done = started.elapsed();
        let policies = match how {
            // Reuse the compiled form of every untouched policy.
            Reparse::Entry { index } if self.policies.len() == parsed.file.policies.len() => {
                let mut p = self.policies.clone();
                let mut one = [compile(&parsed.file.policies[index])];
                crate::policy::apply_reserved(&mut one, &parsed.file.reserved);
                let [one] = one;
                p[index] = one;
                p
            }
            _ => {
                let mut p = compile_all(&parsed.file.policies);
                crate::policy::apply_reserved(&mut p, &parsed.file.reserved);
                p
            }
        };
        check_scope(&policies, &self.attach_cgroup)?;
        let compiled = started.elapsed();
        let resolved = self.resolve(&policies, how == Reparse::Unchanged);
        let resolved_at = started.elapsed();
        let report = match self.apply(policies.clone(), resolved) {
            Ok(r) => r,
            Err(e) if self.fail_closed => {
                self.apply_fail_closed(&policies, &e)?;
                self.parsed = Some(parsed);
                return Err(anyhow::anyhow!(
                    "{e}; --fail-closed: every bind in the cgroups the policy governs is denied"
                ));
            }
            Err(e) => return Err(e.into()),
        };
        debug!(
            "daemon: reload phases ({how:?}): parse {:?}, compile {:?}, resolve {:?}, apply {:?}",
            parse_done,
            compiled - parse_done,
            resolved_at - compiled,
            started.elapsed() - resolved_at
        );
        self.verify_pending = matches!(how, Reparse::Entry { .. });
        self.parsed = Some(parsed);
        Ok((report, how))
    }

    /// After a reload that re-parsed a single entry, parse the whole text
    /// again and make sure the result is the same; if not (a bug), enforce the
    /// full parse's result and say so.
    fn verify(&mut self) {
        self.verify_pending = false;
        let Some(parsed) = &self.parsed else {
            return;
        };
        let started = Instant::now();
        match parse_policy_text(parsed.text().to_owned()) {
            Ok(full) if full.file == parsed.file => debug!(
                "daemon: incremental reload verified by a full parse in {:?}",
                started.elapsed()
            ),
            Ok(full) => {
                warn!(
                    "daemon: the incremental reload disagreed with a full parse of {}; applying the full parse",
                    self.policy_path.display()
                );
                let mut policies = compile_all(&full.file.policies);
                crate::policy::apply_reserved(&mut policies, &full.file.reserved);
                let resolved = self.resolve(&policies, true);
                match self.apply(policies, resolved) {
                    Ok(_) => self.parsed = Some(full),
                    Err(e) => error!("daemon: applying the full parse failed: {e}"),
                }
            }
            Err(d) => error!(
                "daemon: the incremental reload accepted {} but a full parse rejects it ({} errors); \
                 keeping the applied policy",
                self.policy_path.display(),
                d.len()
            ),
        }
    }

    /// Which part of its policy decided `rec` (the `rule` field).
    fn rule_for(&self, rec: &events::EventRecord) -> Option<String> {
        let name = rec.policy.as_deref()?;
        if name == IDENTIFYING {
            return Some(IDENTIFYING.to_owned());
        }
        let file = &self.parsed.as_ref()?.file;
        let policy = file.policies.iter().find(|p| p.name == name)?;
        if rec.verdict != "allow"
            && rec.hook.contains("bind")
            && file.reserved.contains(rec.port)
            && crate::policy::bind_ports(policy).is_none_or(|b| b.contains(rec.port))
        {
            return Some("reserved".to_owned());
        }
        Some(crate::policy::explain::deciding_rule(policy, &rec.judged()))
    }

    /// Publish the host's ephemeral port range (what `ephemeral` allows,
    /// and what a UDP autobind must stay inside) when it changed: at start,
    /// then on every rescan. `start`: say where it came from.
    fn sync_ephemeral(&mut self, start: bool) {
        let ((lo, hi), fallback) = inventory::host_ephemeral_range();
        if let Some(why) = &fallback {
            if start {
                warn!(
                    "daemon: the host's ip_local_port_range could not be read ({why}); using \
                     {lo}-{hi}"
                );
            } else {
                debug!("daemon: host ip_local_port_range: {why}; using {lo}-{hi}");
            }
        }
        match self.applier.set_ephemeral(&mut self.loaded.maps, (lo, hi)) {
            Ok(true) => info!(
                "daemon: host ephemeral port range {lo}-{hi}: `ephemeral` allows kernel-chosen \
                 ports there, and a UDP autobind outside it is judged as a bind"
            ),
            Ok(false) => {}
            Err(e) => warn!("daemon: publishing the ephemeral port range: {e}"),
        }
    }

    /// Decode and enrich one ring-buffer record (`from` says where it was
    /// read, for the warning about a malformed one).
    fn record_of(&mut self, bytes: &[u8], from: &str) -> Option<events::EventRecord> {
        match events::decode(bytes) {
            Ok(ev) => {
                let mut record = events::enrich(&ev, &self.names, &mut self.hierarchy, &self.host);
                if must_end(&ev) {
                    record.action = Some(self.end_cut_off_socket(&ev));
                }
                Some(record)
            }
            Err(e) => {
                warn!("daemon: skipping a malformed event{from}: {e}");
                None
            }
        }
    }

    /// Name the workload of each record, pass them through flood control
    /// (with whatever aggregates expired) and write what comes out.
    fn publish(&mut self, writer: &mut EventWriter, records: Vec<events::EventRecord>) {
        let now = Instant::now();
        let mut out = self.aggregator.expire(now);
        for mut record in records {
            if let Some(path) = &record.cgroup {
                record.identity = events::WorkloadIdentity::of(path, self.cri.as_ref());
            }
            out.extend(self.aggregator.push(record, now));
        }
        self.write_records(writer, out);
    }

    /// Write event lines, each with its `rule`.
    fn write_records(&self, writer: &mut EventWriter, records: Vec<events::EventRecord>) {
        if records.is_empty() {
            return;
        }
        let mut written = 0;
        for mut r in records {
            r.rule = self.rule_for(&r);
            if writer.line(&r).is_ok() {
                written += 1;
            }
        }
        let aggregated = self.aggregator.aggregated;
        self.shared.update(|f| {
            f.events_written += written;
            f.events_aggregated = aggregated;
        });
    }

    /// End the socket a `cut_off` event names, and say what was done:
    /// `destroyed`, `fenced` (the kernel would not destroy it, the fence
    /// holds it), `closed` (already gone), or `dropped` (neither fenced nor
    /// destroyable: the packet guard is attached until it is gone).
    fn end_cut_off_socket(&mut self, ev: &portguard_common::Event) -> &'static str {
        let pid = (ev.pid_tgid >> 32) as u32;
        let family = event_socket_family(ev);
        let ns = match event_netns(ev) {
            Ok(ns) => ns,
            Err(e) => {
                // The task is gone; so is its network namespace, unless
                // another process shares it.
                debug!("daemon: the cut-off socket's task is gone ({e})");
                return "closed";
            }
        };
        match inventory::end(&ns, family, ev.protocol, ev.port, ev.sock_cookie) {
            Ok(inventory::Ended::Destroyed) => "destroyed",
            Ok(inventory::Ended::Fenced) => "fenced",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "closed",
            Err(e) => {
                warn!(
                    "daemon: the cut-off socket on port {} of pid {pid} is neither fenced nor \
                     destroyable ({e}); the packet guard drops its traffic until it is gone",
                    ev.port
                );
                self.unended.push(Unended {
                    ns,
                    family,
                    protocol: ev.protocol,
                    port: ev.port,
                    cookie: ev.sock_cookie,
                });
                if self.packet_guard.is_none() {
                    let root = self.hierarchy.fs_path(&self.attach_cgroup);
                    match self.loaded.attach_packet_guard(&root) {
                        Ok(link) => {
                            info!("daemon: packet guard attached to {}", root.display());
                            self.packet_guard = Some(link);
                        }
                        Err(e) => {
                            error!("daemon: cannot attach the packet guard: {e}");
                            return "failed";
                        }
                    }
                }
                "dropped"
            }
        }
    }

    /// Forget unended cut-off sockets that are gone; detach the packet
    /// guard with the last one.
    fn sweep_unended(&mut self) {
        if self.unended.is_empty() {
            return;
        }
        self.unended.retain(|u| {
            !matches!(
                inventory::find(&u.ns, u.family, u.protocol, u.port, u.cookie),
                Ok(None)
            )
        });
        if self.unended.is_empty() && self.packet_guard.take().is_some() {
            info!("daemon: the last unended cut-off socket is gone: packet guard detached");
        }
    }

    fn rescan(&mut self) {
        let policies = std::mem::take(&mut self.policies);
        let resolved = self.resolve(&policies, true);
        self.policies = policies;
        if resolved == self.resolved && self.next_quarantine == self.quarantine {
            return;
        }
        match self.apply(self.policies.clone(), resolved) {
            Ok(r) => debug!(
                "daemon: cgroups changed; generation {} now governs {} cgroups",
                r.generation, r.cgroups
            ),
            Err(e) => error!("daemon: applying cgroup changes failed: {e}"),
        }
    }

    /// Directories to watch so that each policy cgroup's appearance,
    /// disappearance or re-creation is noticed.
    fn cgroup_watch_dirs(&self) -> HashSet<PathBuf> {
        let root = self.hierarchy.root();
        // Directories whose children matter: the parent of each `cgroup:`
        // path (it may appear, vanish, be recreated), the kubelet's QoS
        // levels for `pods:` (new pods), pod cgroups for `container:`
        // selectors (new containers), and the units' parents.
        let mut parents: HashSet<PathBuf> = HashSet::new();
        for (p, govs) in self.policies.iter().zip(&self.resolved) {
            match &p.selector {
                Selector::Cgroup(path) => {
                    let fs = self.hierarchy.fs_path(path);
                    if fs != root
                        && let Some(parent) = fs.parent()
                    {
                        parents.insert(parent.to_path_buf());
                    }
                }
                Selector::Pods(sel) => {
                    for d in [
                        "/kubepods",
                        "/kubepods/besteffort",
                        "/kubepods/burstable",
                        "/kubepods.slice",
                        "/kubepods.slice/kubepods-besteffort.slice",
                        "/kubepods.slice/kubepods-burstable.slice",
                    ] {
                        parents.insert(self.hierarchy.fs_path(d).join("x"));
                    }
                    // New containers of governed pods (to learn their names
                    // early), and of every pod for `container:` selectors.
                    parents.extend(
                        govs.iter()
                            .map(|g| self.hierarchy.fs_path(&g.path).join("x")),
                    );
                    if sel.container.is_some()
                        && let Some(tree) = &self.tree
                    {
                        parents.extend(
                            tree.pods
                                .values()
                                .map(|p| self.hierarchy.fs_path(p).join("x")),
                        );
                    }
                }
                Selector::Unit(_) => {
                    // Units start in slices: the root's children and every
                    // slice (system.slice, user.slice/user-1000.slice, ...).
                    parents.insert(root.join("x"));
                    if let Some(tree) = &self.tree {
                        parents.extend(
                            tree.slices
                                .iter()
                                .map(|s| self.hierarchy.fs_path(s).join("x")),
                        );
                    }
                    parents.extend(govs.iter().filter_map(|g| {
                        self.hierarchy
                            .fs_path(&g.path)
                            .parent()
                            .map(Path::to_path_buf)
                    }));
                }
            }
        }
        // Each wanted directory, or its nearest existing ancestor (whose
        // new child may be on the way to it).
        let mut dirs = HashSet::new();
        for parent in parents {
            let mut dir = Some(parent);
            while let Some(d) = dir {
                if d.is_dir() {
                    dirs.insert(d);
                    break;
                }
                if d == root {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
        dirs
    }
}

struct Watcher {
    fd: AsyncFd<Inotify>,
    file_wd: Option<WatchDescriptor>,
    file_name: Option<std::ffi::OsString>,
    dirs: HashMap<PathBuf, WatchDescriptor>,
}

enum Change {
    PolicyFile,
    Cgroups,
}

impl Watcher {
    fn new(policy: &Path, watch_file: bool) -> anyhow::Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mut file_wd = None;
        let mut file_name = None;
        if watch_file {
            let abs = std::path::absolute(policy).unwrap_or_else(|_| policy.to_owned());
            if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
                // Watch the directory: editors and config managers replace the
                // file (rename), which a watch on the file itself would miss.
                file_wd = Some(
                    inotify
                        .watches()
                        .add(
                            dir,
                            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
                        )
                        .with_context(|| format!("watching {}", dir.display()))?,
                );
                file_name = Some(name.to_owned());
            }
        }
        Ok(Self {
            // SAFETY: Inotify owns its fd for as long as the AsyncFd owns it.
            fd: unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("registering inotify with tokio")?,
            file_wd,
            file_name,
            dirs: HashMap::new(),
        })
    }

    fn set_dirs(&mut self, want: &HashSet<PathBuf>) {
        let mut watches = self.fd.get_ref().watches();
        self.dirs.retain(|d, wd| {
            if want.contains(d) {
                return true;
            }
            let _ = watches.remove(wd.clone());
            false
        });
        for d in want {
            if self.dirs.contains_key(d) {
                continue;
            }
            debug!("daemon: watching {}", d.display());
            match watches.add(
                d,
                WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::MOVED_TO
                    | WatchMask::ONLYDIR,
            ) {
                Ok(wd) => {
                    self.dirs.insert(d.clone(), wd);
                }
                Err(e) => debug!("daemon: cannot watch {}: {e}", d.display()),
            }
        }
    }

    /// Drain pending inotify events into the kinds of change they signal.
    fn drain(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let events = match self.fd.get_mut().read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("daemon: reading inotify events: {e}");
                    break;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                debug!("daemon: inotify {:?} {:?}", ev.mask, ev.name);
                if Some(&ev.wd) == self.file_wd.as_ref() {
                    // The file itself, or a Kubernetes ConfigMap/Secret
                    // volume's `..data` symlink, which the kubelet swaps
                    // (rename) on every update while `policy.yaml ->
                    // ..data/policy.yaml` stays as it is.
                    if let Some(name) = ev.name
                        && (Some(name) == self.file_name.as_deref() || name == "..data")
                    {
                        out.push(Change::PolicyFile);
                    }
                } else {
                    out.push(Change::Cgroups);
                }
            }
            if !any {
                break;
            }
        }
        out
    }
}

/// Parsing the kernel's BTF (twice: aya for relocations, us for one field
/// offset) and large policy files leaves freed heap that glibc keeps; hand it
/// back so the agent's resident size reflects what it actually holds.
fn release_free_memory() {
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
}

fn notify_status(status: &str) {
    sd_notify(&[NotifyState::Status(status)]);
}

/// Tell the service manager (`$NOTIFY_SOCKET`) about `states`, never
/// blocking: sd_notify::notify waits when the receiver's queue is full (its
/// default length is 10 datagrams), and an agent must not stall on its
/// supervisor. A notification that does not fit is dropped.
fn sd_notify(states: &[NotifyState<'_>]) {
    use std::{fmt::Write as _, os::linux::net::SocketAddrExt as _, os::unix::net::UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    if sock.set_nonblocking(true).is_err() {
        return;
    }
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let res = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a)),
        None => sock.send_to(msg.as_bytes(), &path),
    };
    if let Err(e) = res {
        debug!("daemon: sd_notify {msg:?}: {e}");
    }
}

/// The signals the agent handles, registered before anything else.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// The network namespace of the task an event names (its thread's, else
/// its process's), opened.
fn event_netns(ev: &portguard_common::Event) -> Result<std::fs::File, String> {
    let (pid, tid) = ((ev.pid_tgid >> 32) as u32, ev.pid_tgid as u32);
    let mut errors = Vec::new();
    for ns in [
        format!("/proc/{pid}/task/{tid}/ns/net"),
        format!("/proc/{pid}/ns/net"),
    ] {
        match std::fs::File::open(&ns) {
            Ok(f) => return Ok(f),
            Err(e) => errors.push(format!("{ns}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// The sock_diag family of the socket an event names (a v4-mapped address
/// belongs to an IPv6 socket).
fn event_socket_family(ev: &portguard_common::Event) -> u8 {
    use portguard_common::{EVENT_F_V4_MAPPED, Family};
    if ev.family == Family::Ipv6 as u8 || ev.flags & EVENT_F_V4_MAPPED != 0 {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

/// Whether the agent must end the socket an event names: one a hook that
/// cannot deny cut off (a listener without the BPF LSM), or a UDP socket
/// whose autobind a send hook refused (the port stays taken).
fn must_end(ev: &portguard_common::Event) -> bool {
    use portguard_common::{EVENT_F_AUTOBIND, VERDICT_CUT_OFF, VERDICT_DENY};
    ev.sock_cookie != 0
        && (ev.verdict == VERDICT_CUT_OFF
            || (ev.verdict == VERDICT_DENY && ev.flags & EVENT_F_AUTOBIND != 0))
}

/// A cut-off socket that is neither fenced nor destroyed (the kernel would
/// not fence it: a process without `CAP_NET_RAW` bound it to a device; and
/// would not destroy it: an MPTCP listener). The packet guard stays
/// attached until the last one is gone.
struct Unended {
    ns: std::fs::File,
    family: u8,
    protocol: u8,
    port: u16,
    cookie: u64,
}

/// Run the agent until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP during start-up must not kill the
    // agent (its default action); it is handled once the agent serves.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let signals = {
        let _guard = rt.enter();
        Signals {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        }
    };
    // Validate the policy before touching the kernel.
    let parsed = parse_policy_text(read_policy_file(&opts.policy)?).map_err(|diagnostics| {
        PolicyError::Invalid {
            path: opts.policy.clone(),
            diagnostics,
        }
    })?;
    let mut policies = compile_all(&parsed.file.policies);
    crate::policy::apply_reserved(&mut policies, &parsed.file.reserved);
    check_scope(&policies, &opts.attach_cgroup)?;
    let hierarchy = match &opts.cgroup_root {
        Some(root) => Hierarchy::at(root.clone()).context("--cgroup-root")?,
        None => Hierarchy::discover()?,
    };
    let attach_path = hierarchy.fs_path(&opts.attach_cgroup);
    if !attach_path.is_dir() {
        anyhow::bail!(
            "--attach-cgroup {}: no such cgroup ({} does not exist)",
            opts.attach_cgroup,
            attach_path.display()
        );
    }
    info!(
        "daemon: cgroup2 mounted at {}; {} policies in {}",
        hierarchy.root().display(),
        policies.len(),
        opts.policy.display()
    );
    let mut writer = match &opts.log {
        Some(p) if p.as_os_str() == "journald" => EventWriter::journald(),
        Some(p) => EventWriter::file(p, opts.log_rotation)
            .with_context(|| format!("cannot open event log {}", p.display()))?,
        None if EventWriter::stdout_is_journal() => {
            info!(
                "daemon: standard output is the journal: events go to it natively \
                 (journalctl -t portguard PORTGUARD_VERDICT=deny)"
            );
            EventWriter::journald()
        }
        None => EventWriter::stdout(),
    };
    match crate::caps::Caps::effective() {
        Ok(caps) => {
            let (errors, warnings) = crate::caps::assess(caps);
            for w in &warnings {
                warn!("daemon: without {w}");
            }
            if !errors.is_empty() {
                anyhow::bail!(
                    "portguard run lacks {} (effective capabilities {:#x}); run it as root or, in a \
                     container, grant the capabilities listed in the README",
                    errors.join(", "),
                    caps.0
                );
            }
        }
        Err(e) => warn!("daemon: cannot read this process's capabilities: {e}"),
    }
    // Bound before anything is attached: a bad address fails here, and the
    // agent's own policy (if it governs the agent) never blocks it.
    let health_socket = match opts.health_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--health-listen {addr}: cannot listen"))?;
            l.set_nonblocking(true)
                .context("--health-listen: set_nonblocking")?;
            info!(
                "daemon: serving /healthz and /readyz on http://{}",
                l.local_addr()?
            );
            Some(l)
        }
        None => None,
    };
    let metrics_socket = match opts.metrics_addr {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
            l.set_nonblocking(true)
                .context("--metrics-addr: set_nonblocking")?;
            info!("daemon: serving /metrics on http://{}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let status_socket = match &opts.status_socket {
        Some(p) => {
            let l = crate::status::bind(p)?;
            info!("daemon: answering `portguard status` on {}", p.display());
            Some(l)
        }
        None => None,
    };
    let pins = match &opts.pin_dir {
        Some(dir) => Some(PinDir::open(dir)?),
        None => None,
    };
    let object = match &opts.kernel_object {
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("--kernel-object {}", p.display()))?)
        }
        None => None,
    };
    let mut loaded = Loaded::load(
        &LoadOptions {
            capacity: opts.capacity,
            ring_buffer_bytes: opts.ring_buffer_bytes,
            object,
        },
        pins.as_ref(),
    )?;
    if let Some(p) = &pins {
        describe_adoption(p, &loaded.adoption);
    }
    let events = loaded
        .take_events()
        .context("event ring buffer already taken")?;
    let counter_maps = loaded.maps.counters.clone();
    let mut agent = Agent {
        policy_path: opts.policy.clone(),
        attach_cgroup: opts.attach_cgroup.clone(),
        hierarchy,
        applier: Applier::new(opts.capacity),
        loaded,
        policies: Vec::new(),
        resolved: Vec::new(),
        registry: Registry::default(),
        names: PolicyNames::default(),
        name_map_full: false,
        quiesce_warned: false,
        fail_closed: opts.fail_closed,
        lost_seen: 0,
        resolve_cache: FxHashMap::default(),
        tree: None,
        cri: None,
        ties_logged: HashSet::new(),
        quarantine: Vec::new(),
        unidentified_since: HashMap::new(),
        next_quarantine: Vec::new(),
        last_cgroup_event: None,
        parsed: Some(parsed),
        verify_pending: false,
        inventory_pending: false,
        health: Health::new(HEALTH_STALE_AFTER.max(opts.lost_interval * 3)),
        host: events::host_name(),
        capacity: opts.capacity,
        shared: std::sync::Arc::new(crate::metrics::Shared {
            counters: counter_maps,
            facts: std::sync::Mutex::new(crate::metrics::Facts {
                attach_cgroup: opts.attach_cgroup.clone(),
                status: "starting".into(),
                host: events::host_name(),
                started: events::format_time(std::time::SystemTime::now()),
                ..Default::default()
            }),
        }),
        slot_owners: HashMap::new(),
        unended: Vec::new(),
        packet_guard: None,
        aggregator: crate::aggregate::Aggregator::new(opts.aggregate_window, AGGREGATE_KINDS),
    };
    if Agent::needs_cri(&policies) {
        match rt.block_on(async {
            let mut c = cri::connect(&opts.cri_socket).await?;
            cri::snapshot(&mut c, &opts.cri_socket).await
        }) {
            Ok(snap) => {
                info!(
                    "daemon: CRI runtime at {}: {} pods, {} containers",
                    opts.cri_socket.display(),
                    snap.pods.len(),
                    snap.containers.len()
                );
                agent.cri = Some(snap);
            }
            Err(e) => warn!(
                "daemon: {e}; `pods:` policies govern nothing until the runtime answers (retried on \
                 every cgroup change and every --rescan-interval); events carry cgroup-path \
                 identities only"
            ),
        }
    }
    // Name ids as the previous agent did (its events may still be queued).
    for (id, name) in agent.loaded.maps.names() {
        agent.registry.seed(id, &name);
        agent.names.insert(id, &name);
    }
    // Programs of a previous agent may be running on the adopted maps: the
    // applier continues from what they hold, and flips generations with the
    // usual grace periods; fresh maps are read by nothing yet.
    let adopted = agent.loaded.adoption.policy_maps_reused;
    if adopted {
        agent.applier = agent
            .loaded
            .maps
            .read_back(opts.capacity)
            .context("reading back the pinned policy maps")?;
    }
    let started = Instant::now();
    let mut resolved = agent.resolve(&policies, true);
    let report = match agent.apply(policies.clone(), resolved.clone()) {
        Ok(r) => r,
        Err(e) if opts.fail_closed => {
            let r = agent.apply_fail_closed(&policies, &e)?;
            policies = agent.policies.clone();
            resolved = agent.resolved.clone();
            r
        }
        Err(e) => return Err(e).context("applying the policy to the kernel maps"),
    };
    // Fill the standby generation too (with fresh maps nothing reads them
    // yet, so no grace period applies): reloads then only ever write what
    // changed.
    if !adopted {
        agent.applier.unattached();
    }
    agent
        .apply(policies, resolved)
        .context("applying the policy to the kernel maps")?;
    // With fresh maps still nothing is attached: no program can be reading
    // the old generation, so the first reload need not wait.
    if !adopted {
        agent.applier.unattached();
    }
    info!(
        "daemon: applied {} policies ({} governed cgroups, {} port sets in {} chunks) to both generations in {:.1} ms",
        report.policies,
        report.cgroups,
        report.sets_total,
        report.chunks_total,
        started.elapsed().as_secs_f64() * 1e3
    );
    agent.sync_ephemeral(true);
    if let Some(why) = crate::kernel_btf::port0_unenforced(crate::kernel_btf::running_release()) {
        warn!("daemon: bind(port 0) is NOT fully enforced: {why}");
    }
    match &pins {
        Some(p) => {
            agent.loaded.attach_pinned(&attach_path, p)?;
            // The previous programs' ring, if it was replaced: what they
            // queued is read before it goes.
            if let Some(mut old) = agent.loaded.replaced_events(p) {
                let n = drain_replaced(&mut old, &mut agent, &mut writer);
                info!("daemon: read {n} events queued in the replaced ring buffer");
            }
            agent.loaded.drop_replaced_maps(p);
            report_restart_losses(&mut agent, &mut writer);
        }
        None => agent.loaded.attach(&attach_path)?,
    }
    if let Err(e) = agent.loaded.write_stamp(agent.lost_seen) {
        warn!("daemon: writing the version stamp: {e}");
    }
    match agent.loaded.listen_check() {
        ListenCheck::Denied => info!(
            "daemon: listen() and accept() are enforced (BPF LSM): an unbound listen() or a \
             socket bound outside the policy is denied"
        ),
        ListenCheck::Reported { why } | ListenCheck::Unchecked { why } if opts.require_lsm => {
            anyhow::bail!("--require-lsm: listen()/accept() cannot be denied on this host: {why}");
        }
        ListenCheck::Reported { why } => warn!(
            "daemon: listen() cannot be denied here ({why}): a listener on a port outside the \
             policy (including an unbound listen() that the kernel autobinds, and a socket bound \
             elsewhere and handed in) is CUT OFF instead: the kernel fences it (no packet reaches \
             it; a client is refused) and the agent destroys it (verdict \"cut_off\"). Binds, \
             connects, sends and socket creation are denied."
        ),
        ListenCheck::Unchecked { why } => warn!(
            "daemon: listen() and accept() are NOT checked: {why}. Binds, connects, sends and \
             socket creation are enforced."
        ),
    }
    release_free_memory();
    let hooks: Vec<&'static str> = agent.loaded.attached().iter().map(|h| h.name()).collect();
    info!(
        "daemon: enforcing {} policies ({} governed cgroups) with hooks {}",
        report.policies,
        report.cgroups,
        hooks.join(", ")
    );
    let listen_mode = match agent.loaded.listen_check() {
        ListenCheck::Denied => "denied (BPF LSM)".to_owned(),
        ListenCheck::Reported { why } => format!("cut off, not denied: {why}"),
        ListenCheck::Unchecked { why } => format!("not checked: {why}"),
    };
    agent.shared.update(|f| {
        f.hooks = hooks;
        f.listen_mode = listen_mode;
    });

    if let Some(l) = status_socket {
        let shared = agent.shared.clone();
        let _guard = rt.enter();
        let listener = tokio::net::UnixListener::from_std(l).context("--status-socket")?;
        rt.spawn(crate::status::serve(listener, shared));
    }
    if let Some(l) = metrics_socket {
        let shared = agent.shared.clone();
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(l).context("--metrics-addr")?;
        rt.spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, shared).await {
                error!("daemon: metrics endpoint stopped: {e}");
            }
        });
    }
    let health = agent.health.clone();
    if let Some(l) = health_socket {
        let h = health.clone();
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(l).context("--health-listen")?;
        rt.spawn(async move {
            if let Err(e) = crate::health::serve(listener, h).await {
                error!("daemon: health endpoint stopped: {e}");
            }
        });
    }
    let result = rt.block_on(serve(&mut agent, events, writer, &opts, &health, signals));
    if let Some(p) = &opts.status_socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &pins {
        info!(
            "daemon: stopped; enforcement continues through the links pinned in {} (the next \
             `portguard run` adopts them; `portguard uninstall` removes them)",
            p.root().display()
        );
    } else {
        info!("daemon: detaching programs; enforcement stops (--pin-dir none)");
    }
    sd_notify(&[NotifyState::Stopping]);
    drop(agent);
    result
}

async fn serve(
    agent: &mut Agent,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    mut writer: EventWriter,
    opts: &RunOptions,
    health: &Health,
    signals: Signals,
) -> anyhow::Result<()> {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns it.
    let mut rb = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with tokio")?;
    let mut watcher = Watcher::new(&opts.policy, opts.watch)?;
    watcher.set_dirs(&agent.cgroup_watch_dirs());
    // First ticks one period from now: start-up has just resolved everything.
    let now = tokio::time::Instant::now();
    let mut lost_tick = tokio::time::interval_at(now + opts.lost_interval, opts.lost_interval);
    let mut rescan_tick =
        tokio::time::interval_at(now + opts.rescan_interval, opts.rescan_interval);
    let mut lost_seen = agent.lost_seen;
    let mut pending_reload: Option<Instant> = None;
    let mut pending_rescan: Option<Instant> = None;
    // CRI refresh: when due, since when a pod cgroup exists that the runtime
    // does not list yet, and the event that started the wait (for timing).
    let mut cri_due: Option<Instant> = None;
    let mut cri_miss_since: Option<Instant> = None;
    let mut cri_link = CriLink {
        client: None,
        last_event_refresh: None,
    };
    let mut write_error_logged = false;

    let stop_at = opts.stop_after.map(|d| Instant::now() + d);
    let status = if agent.failed_closed() {
        format!(
            "FAIL-CLOSED: the policy could not be applied; binds denied in {} policies' cgroups",
            agent.policies.len()
        )
    } else {
        format!("enforcing {} policies", agent.policies.len())
    };
    sd_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    health.set_ready(&status);
    agent.shared.update(|f| f.status.clone_from(&status));
    // Sockets bound before we governed them.
    agent.inventory(&mut writer);
    debug!("daemon: ring buffer fd {}", rb.get_ref().as_raw_fd());

    loop {
        health.beat();
        let deadline = [
            pending_reload,
            pending_rescan,
            cri_due,
            agent.aggregator.next_deadline(),
            stop_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = hup.recv() => {
                info!("daemon: SIGHUP: reloading {}", agent.policy_path.display());
                agent.reload("SIGHUP");
                watcher.set_dirs(&agent.cgroup_watch_dirs());
            }
            _ = term.recv() => { info!("daemon: SIGTERM"); break; }
            _ = int.recv() => { info!("daemon: SIGINT"); break; }
            guard = watcher.fd.readable_mut() => {
                let mut guard = guard.context("polling inotify")?;
                guard.clear_ready();
                drop(guard);
                let changes = watcher.drain();
                if changes.iter().any(|c| matches!(c, Change::Cgroups)) {
                    agent.resolve_cache.clear();
                    agent.last_cgroup_event = Some(Instant::now());
                    if Agent::needs_cri(&agent.policies) {
                        // A new pod or container cgroup: ask the runtime now.
                        cri_due = Some(Instant::now());
                        cri_miss_since.get_or_insert_with(Instant::now);
                    }
                }
                for change in changes {
                    let now = Instant::now();
                    match change {
                        // Editors write in several steps: wait for quiet.
                        Change::PolicyFile => pending_reload = Some(now + Duration::from_millis(100)),
                        Change::Cgroups => {
                            pending_rescan.get_or_insert(now + Duration::from_millis(5));
                        }
                    }
                }
            }
            () = sleep => {
                let now = Instant::now();
                if stop_at.is_some_and(|t| t <= now) {
                    info!("daemon: the requested time is up");
                    break;
                }
                let closed = agent.aggregator.expire(now);
                if !closed.is_empty() {
                    agent.write_records(&mut writer, closed);
                    let _ = writer.flush();
                }
                if cri_due.is_some_and(|d| d <= now) {
                    cri_due = None;
                    let t = Instant::now();
                    refresh_cri(agent, &mut cri_link.client, &opts.cri_socket).await;
                    let asked = t.elapsed();
                    agent.rescan();
                    debug!(
                        "daemon: CRI refresh took {asked:?} ({} pods), rescan {:?}",
                        agent.cri.as_ref().map_or(0, |c| c.pods.len()),
                        t.elapsed() - asked
                    );
                    let waiting = agent
                        .tree
                        .as_ref()
                        .zip(agent.cri.as_ref())
                        .map_or(0, |(t, c)| t.unknown_pods(c).len());
                    match cri_miss_since {
                        // A pod cgroup the runtime does not list yet: its
                        // sandbox is being created; ask again shortly.
                        Some(since) if waiting > 0 && since.elapsed() < Duration::from_secs(10) => {
                            cri_due = Some(Instant::now() + Duration::from_millis(10));
                        }
                        Some(since) => {
                            debug!("daemon: pod cgroups settled {:?} after the first change", since.elapsed());
                            cri_miss_since = None;
                        }
                        None => {}
                    }
                    watcher.set_dirs(&agent.cgroup_watch_dirs());
                    continue;
                }
                if pending_reload.is_some_and(|d| d <= now) {
                    pending_reload = None;
                    pending_rescan = None;
                    info!("daemon: {} changed: reloading", agent.policy_path.display());
                    agent.reload("file change");
                } else if pending_rescan.is_some_and(|d| d <= now) {
                    pending_rescan = None;
                    agent.rescan();
                }
                if deadline.is_some() {
                    watcher.set_dirs(&agent.cgroup_watch_dirs());
                }
            }
            _ = rescan_tick.tick() => {
                if Agent::needs_cri(&agent.policies) {
                    cri_due = Some(Instant::now());
                }
                agent.rescan();
                agent.sync_ephemeral(false);
                watcher.set_dirs(&agent.cgroup_watch_dirs());
            }
            _ = lost_tick.tick() => {
                agent.sweep_unended();
                report_lost(agent, &mut writer, &mut lost_seen);
                if let Err(e) = agent.loaded.write_stamp(lost_seen) {
                    warn!("daemon: writing the version stamp: {e}");
                }
            }
            // Last, and `biased`: signals, timers and cgroup changes are
            // never starved by a ring buffer that a storm keeps readable.
            guard = rb.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                let (n, more) = drain_events(guard.get_inner_mut(), agent, &mut writer, &mut cri_link, &opts.cri_socket).await;
                if !more {
                    guard.clear_ready();
                }
                drop(guard);
                if n > 0 {
                    match writer.flush() {
                        Ok(()) => write_error_logged = false,
                        Err(e) if !write_error_logged => {
                            error!("daemon: cannot write events: {e}; {} events dropped so far", writer.failed);
                            write_error_logged = true;
                        }
                        Err(_) => {}
                    }
                }
                if more {
                    // The ring stays readable through a storm: let the
                    // runtime poll its drivers (signals, timers, sockets)
                    // before the next batch, or SIGTERM would wait for the
                    // storm to end.
                    tokio::task::yield_now().await;
                }
            }
        }
        if agent.verify_pending {
            agent.verify();
        }
        if agent.inventory_pending {
            agent.inventory(&mut writer);
        }
    }
    // What was queued when the stop came (at most a ring's worth: a storm
    // refills it as fast as it drains; with pinning the rest waits in the
    // ring for the next agent), and a final loss report.
    let ring_records =
        opts.ring_buffer_bytes as usize / (size_of::<portguard_common::Event>() + 8) + DRAIN_BATCH;
    let mut drained = 0;
    loop {
        let (n, more) = drain_events(
            rb.get_mut(),
            agent,
            &mut writer,
            &mut cri_link,
            &opts.cri_socket,
        )
        .await;
        drained += n;
        if !more || drained >= ring_records {
            break;
        }
    }
    let pending = agent.aggregator.drain();
    agent.write_records(&mut writer, pending);
    report_lost(agent, &mut writer, &mut lost_seen);
    writer.flush().context("flushing the event log")?;
    Ok(())
}

/// Ask the CRI runtime for its pods and containers; keep the last answer
/// when it does not reply.
async fn refresh_cri(
    agent: &mut Agent,
    client: &mut Option<
        k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    >,
    socket: &Path,
) {
    if client.is_none() {
        match cri::connect(socket).await {
            Ok(c) => *client = Some(c),
            Err(e) => {
                debug!("daemon: {e}");
                return;
            }
        }
    }
    let Some(c) = client.as_mut() else {
        return;
    };
    match cri::snapshot(c, socket).await {
        Ok(s) => {
            if agent.cri.is_none() {
                info!("daemon: CRI runtime at {} answers", socket.display());
            }
            agent.cri = Some(s);
        }
        Err(e) => {
            warn!("daemon: {e}; keeping its last answer");
            *client = None;
        }
    }
}

/// The CRI client and when it was last asked because of an unknown name.
struct CriLink {
    client: Option<
        k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    >,
    last_event_refresh: Option<Instant>,
}

async fn drain_events(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    agent: &mut Agent,
    writer: &mut EventWriter,
    cri_link: &mut CriLink,
    cri_socket: &Path,
) -> (usize, bool) {
    let mut records = Vec::new();
    let mut more = false;
    let started = Instant::now();
    loop {
        if records.len() >= DRAIN_BATCH
            || (records.len() % 64 == 63 && started.elapsed() >= DRAIN_BATCH_TIME)
        {
            // A storm refills the ring as fast as it drains: write what we
            // have and come back (the ring stays readable), so that memory
            // stays bounded, lines keep flowing and the loop keeps turning.
            more = true;
            break;
        }
        let Some(item) = rb.next() else {
            break;
        };
        records.extend(agent.record_of(&item, ""));
    }
    // Name pods and containers the runtime's last snapshot does not know
    // yet (started since): ask it again, at most every 100 ms.
    if agent.cri.is_some() || Agent::needs_cri(&agent.policies) {
        let unknown = records.iter().any(|r| {
            r.cgroup.as_deref().is_some_and(|p| {
                let id = events::WorkloadIdentity::of(p, agent.cri.as_ref());
                (id.k8s_pod_uid.is_some() && id.k8s_pod.is_none())
                    || (id.container_id.is_some()
                        && id.container_name.is_none()
                        && id.k8s_pod_uid.is_some())
            })
        });
        if unknown
            && cri_link
                .last_event_refresh
                .is_none_or(|t| t.elapsed() > Duration::from_millis(100))
        {
            cri_link.last_event_refresh = Some(Instant::now());
            refresh_cri(agent, &mut cri_link.client, cri_socket).await;
        }
    }
    let n = records.len();
    agent.publish(writer, records);
    (n, more)
}

fn report_lost(agent: &Agent, writer: &mut EventWriter, seen: &mut u64) {
    match agent.loaded.maps.counters() {
        Ok(c) if c.events_lost > *seen => {
            let lost = c.events_lost - *seen;
            *seen = c.events_lost;
            warn!(
                "daemon: the kernel dropped {lost} events (ring buffer full; {} in total)",
                c.events_lost
            );
            // At most every 10 s: a supervisor's queue is small.
            static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
            if let Ok(mut last) = LAST.lock()
                && last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                *last = Some(Instant::now());
                notify_status(&format!("{} events lost in total", c.events_lost));
            }
            let _ = writer.line(&LostRecord {
                schema_version: events::SCHEMA_VERSION,
                host: agent.host.clone(),
                time: events::format_time(std::time::SystemTime::now()),
                lost,
                lost_total: c.events_lost,
                since: None,
                until: None,
                agent_restarted: false,
            });
            let _ = writer.flush();
        }
        Ok(_) => {}
        Err(e) => warn!("daemon: reading counters: {e}"),
    }
}

/// Say what was found in the pin directory and what will happen to it.
fn describe_adoption(pins: &PinDir, a: &crate::loader::Adoption) {
    let Some(prev) = a.previous else {
        info!(
            "daemon: no pinned state in {}: installing (programs, links and maps are pinned \
             there and keep enforcing if the agent stops)",
            pins.root().display()
        );
        return;
    };
    let hex = |b: &[u8; 32]| {
        b[..6]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let programs = if a.same_object() {
        format!("same kernel programs ({})", hex(&a.object_sha256))
    } else {
        format!(
            "kernel programs changed ({} -> {}): each link is switched to the new program in \
             place",
            hex(&prev.object_sha256),
            hex(&a.object_sha256)
        )
    };
    let maps = if a.replaced.is_empty() && a.policy_maps_reused {
        "every map reused".to_owned()
    } else if a.replaced.is_empty() {
        "the policy maps were missing: created and filled before any link switches to them"
            .to_owned()
    } else {
        format!(
            "maps rebuilt because their layout or size changed: {} (filled before any link \
             switches to them)",
            a.replaced.join(", ")
        )
    };
    info!(
        "daemon: adopting the pinned state in {} left by agent pid {}, without detaching: {programs}; {maps}",
        pins.root().display(),
        prev.pid
    );
}

/// Read a replaced ring buffer to the end (events decoded as current ones).
fn drain_replaced(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    agent: &mut Agent,
    writer: &mut EventWriter,
) -> usize {
    let mut records = Vec::new();
    while let Some(item) = rb.next() {
        records.extend(agent.record_of(&item, " from the replaced ring"));
    }
    let n = records.len();
    agent.publish(writer, records);
    n
}

/// Events the kernel dropped while no agent was reading: the adopted
/// counter against what the previous agent had reported, with the period.
fn report_restart_losses(agent: &mut Agent, writer: &mut EventWriter) {
    let a = &agent.loaded.adoption;
    let Some(prev) = a.previous else {
        return;
    };
    if a.replaced.contains(&portguard_common::MAP_COUNTERS) {
        return;
    }
    let Ok(now_lost) = agent.loaded.maps.counters.events_lost() else {
        return;
    };
    agent.lost_seen = now_lost;
    if now_lost <= prev.lost_reported {
        return;
    }
    let lost = now_lost - prev.lost_reported;
    let since = std::time::UNIX_EPOCH + Duration::from_millis(prev.alive_unix_ms);
    let until = std::time::SystemTime::now();
    warn!(
        "daemon: the kernel dropped {lost} events while no agent was reading (since {})",
        events::format_time(since)
    );
    let _ = writer.line(&LostRecord {
        schema_version: events::SCHEMA_VERSION,
        host: agent.host.clone(),
        time: events::format_time(until),
        lost,
        lost_total: now_lost,
        since: Some(events::format_time(since)),
        until: Some(events::format_time(until)),
        agent_restarted: true,
    });
    let _ = writer.flush();
}

#[cfg(test)]
mod scope_tests {
    use super::within;

    #[test]
    fn scope() {
        assert!(within("/a/b", "/"));
        assert!(within("/a/b", "/a"));
        assert!(within("/a", "/a"));
        assert!(!within("/ab", "/a"));
        assert!(!within("/", "/a"));
    }
}
