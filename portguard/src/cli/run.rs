//! `portguard run`: its arguments (the `--help` text) and their translation
//! into [`crate::agent::RunOptions`].

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;

use crate::apply::Capacity;

/// Enforce a policy file until stopped (needs root, or CAP_BPF, CAP_PERFMON,
/// CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH).
///
/// Loads the kernel programs, writes the policy into their maps, attaches
/// the decision programs on the parent of each governed cgroup and the
/// listen checks on the cgroup2 root (found in /proc/mounts; see
/// --decision-programs), and streams denial events
/// as JSON lines to standard output or --log. SIGHUP, or a change of the
/// policy file, reloads it: the new policy replaces the old one atomically,
/// or, if it is invalid, the old one stays in force and the error is logged.
///
/// Programs, links and maps are pinned in --pin-dir, so enforcement goes on
/// when the agent exits, crashes or is killed; the next `run` adopts the
/// pinned state without detaching anything (an upgraded agent switches each
/// link to its new program in place). `portguard uninstall` removes it all.
/// With `--pin-dir none`, SIGTERM or SIGINT detaches the programs and
/// enforcement stops with the agent.
///
/// Also serves Prometheus metrics (--metrics-addr, loopback by default), a
/// status socket for `portguard status`, and optional health probes.
/// Identical denials within --aggregate-window are written as one line with
/// a count.
///
/// Supports systemd `Type=notify-reload` (READY=1, RELOADING=1, STATUS=).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (YAML) to enforce; see docs/policy.md, the policy reference.
    #[arg(short, long, value_name = "FILE")]
    pub policy: PathBuf,

    /// Append events (one JSON object per line) to FILE, created with mode
    /// 0600, instead of writing them to standard output; or `journald` for
    /// native journal entries (the JSON as MESSAGE, each field as
    /// PORTGUARD_<FIELD>). Under systemd, when standard output is the
    /// journal, events go to it natively by default.
    #[arg(long, value_name = "FILE|journald")]
    pub log: Option<PathBuf>,

    /// The form of each event line: `json`, portguard's own JSON lines
    /// (docs/events.md; the default, and a contract: fields are added, never
    /// renamed); `ocsf`, OCSF 1.3.0 events a SIEM ingests without a custom
    /// parser (decisions as Network Activity, class 4001, with the actor
    /// process, user, container and pod, the device, and action_id /
    /// disposition_id Denied/Blocked or Allowed/Detected; loss and
    /// suppression reports as Event Log Activity, 1008; hook failures as
    /// Application Lifecycle, 6002); or `ecs`, Elastic Common Schema
    /// documents. OCSF and ECS keep every portguard field (under `unmapped`
    /// / `portguard`). Applies to standard output, --log FILE and journald
    /// alike; docs/ocsf.md has the field mapping. `portguard events
    /// --format` converts an existing JSON log.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = crate::events::Format::Json)]
    pub format: crate::events::Format,

    /// Rotate the --log file when it reaches this many bytes (0: never).
    #[arg(long, value_name = "BYTES", default_value_t = 100 << 20)]
    pub log_max_size: u64,

    /// Rotated --log files to keep (FILE.1 is the newest).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub log_max_files: u32,

    /// Do not reload when the policy file changes (SIGHUP still reloads).
    #[arg(long)]
    pub no_watch: bool,

    /// Most governed cgroups the kernel maps hold (fixed at start; a policy
    /// needing more is rejected whole).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_cgroups: u32,

    /// Most cgroups governed inside one delegated subtree (a cgroup
    /// directory a non-root user may write, e.g. systemd's user@UID.service)
    /// by `unit:`/`pods:` policies that say `delegated: govern`. Cgroups in
    /// root's subtrees are served first; those over this bound (or over
    /// --max-cgroups) are reported in status and metrics, and held
    /// fail-closed under --fail-closed.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_delegated_cgroups: usize,

    /// Most policies the kernel maps hold (fixed at start).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_policies: u32,

    /// Most 512-port chunks of distinct port sets the kernel maps hold
    /// (fixed at start). Identical port sets are stored once; a set uses one
    /// chunk per 512-port block it touches.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_port_chunks: u32,

    /// Event ring buffer size in bytes (a power of two, at least 4096).
    /// Events that do not fit are counted by the kernel and reported as
    /// {"lost": N} lines.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub ring_buffer_size: u32,

    /// Fairness between policies: events each policy may write per second,
    /// on each CPU (0: no limit). The kernel keeps a token bucket per policy
    /// and CPU; a decision beyond it is still enforced and counted, but
    /// writes no event: it is counted as suppressed under its policy,
    /// reported in {"suppressed": N, "policy": ...} lines and in
    /// portguard_events_suppressed_total{policy}. So one workload's flood
    /// cannot crowd out another's denials: the last quarter of the ring
    /// buffer is kept for each policy's first denials (its first
    /// min(4, burst/2) since its bucket was last full).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EVENT_RATE)]
    pub event_rate: u32,

    /// Burst of --event-rate: events a quiet policy may write at once, on
    /// each CPU, before the rate applies (at least 1).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EVENT_BURST,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub event_burst: u32,

    /// Flood control: identical decisions (same policy, cgroup, hook,
    /// verdict, protocol, family, address and port) within this window are
    /// written as one line with `count`, `first_seen` and `last_seen`; the
    /// first of them is written at once. 0 writes every decision.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub aggregate_window: Duration,

    /// How often to check the kernel's lost-event counter (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub lost_report_interval: Duration,

    /// Attach the host-wide programs (the fence keeper, the listen checks)
    /// to this cgroup (a path under the cgroup2 mount) instead of the
    /// cgroup2 root. Processes outside it run no portguard code at all;
    /// every policy must govern a cgroup at or below it (e.g.
    /// /kubepods.slice on a Kubernetes node).
    #[arg(long, value_name = "PATH", default_value = "/", value_parser = parse_cgroup_arg)]
    pub attach_cgroup: String,

    /// Where the decision programs (bind, connect, sendmsg, socket
    /// creation) run. `points`: on the parent of each governed cgroup (a
    /// unit's slice, a pod's QoS class, a container's pod) and below, so
    /// ungoverned processes run none of them. `root`: on --attach-cgroup,
    /// for every process: also judges the bind, connect and send of a
    /// socket made outside every attach point and handed to a governed
    /// process (a listen() on it is judged in both modes), at a cost for
    /// every socket on the host.
    #[arg(long, value_name = "WHERE", default_value = "points")]
    pub decision_programs: DecisionPrograms,

    /// The node's CRI runtime socket, used to resolve `pods:` selectors and to
    /// name the pod and container in events (containerd:
    /// /run/containerd/containerd.sock, CRI-O: /var/run/crio/crio.sock).
    #[arg(long, value_name = "PATH", default_value = crate::workload::cri::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,

    /// The largest answer accepted from the CRI runtime, in bytes.
    /// ListPodSandbox and ListContainers return every pod's labels and
    /// annotations in one message; on a node whose pods carry large
    /// annotations they outgrow gRPC's usual 4 MiB, and a runtime that
    /// cannot be read leaves `pods:` policies on its last answer. The
    /// default is 64 MiB (67108864).
    #[arg(long, value_name = "BYTES", default_value_t = crate::workload::cri::DEFAULT_MAX_MESSAGE_BYTES, value_parser = parse_message_bytes)]
    pub cri_max_message_bytes: usize,

    /// Exit with an error instead of a warning when the BPF LSM checks of
    /// listen() and accept() cannot be loaded (BPF LSM not active, or no
    /// kernel BTF).
    #[arg(long)]
    pub require_lsm: bool,

    /// Serve liveness (GET /healthz) and readiness (GET /readyz) probes over
    /// HTTP on this address (e.g. 0.0.0.0:9976 in a pod, 127.0.0.1:9976 on a
    /// host). The socket is bound before any program is attached, so the
    /// agent's own policy never blocks it. Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    pub health_listen: Option<std::net::SocketAddr>,

    /// Serve Prometheus metrics (GET /metrics) on this address, or `off`.
    /// Loopback by default: exposing it on every interface (0.0.0.0:9620,
    /// as in a pod) must be asked for.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9620", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,

    /// Answer `portguard status` on this unix socket (mode 0600: root
    /// only), or `off`.
    #[arg(long, value_name = "PATH|off", default_value = crate::observe::status::DEFAULT_SOCKET, value_parser = crate::observe::status::parse_socket_arg)]
    pub status_socket: crate::observe::status::SocketArg,

    /// Path of the host's cgroup2 mount, when /proc/mounts does not show it
    /// first: inside a container (a DaemonSet pod sees its own cgroup
    /// namespace; mount the host's /sys/fs/cgroup and name it here). By
    /// default the first cgroup2 mount that shows the whole hierarchy is used.
    #[arg(long, value_name = "PATH", env = "PORTGUARD_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// How often to re-resolve policy cgroups as a safety net besides
    /// inotify (e.g. 5s).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub rescan_interval: Duration,

    /// How often to list every TCP listener and bound UDP socket on the
    /// host (in every network namespace, by the cgroup the kernel says made
    /// it) and end those that break their policy, besides at start and
    /// after each change of what is governed (e.g. 60s; `0` for never).
    /// Each pass also rescans the cgroup tree first.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub inventory_interval: Duration,

    /// bpffs directory (created 0700) where programs, links and maps are
    /// pinned so enforcement survives the agent, or `none` to pin nothing
    /// (enforcement then ends when the agent exits). bpffs is mounted at
    /// /sys/fs/bpf if it is not. One agent per directory.
    #[arg(long, value_name = "DIR|none", default_value = crate::kernel::pins::DEFAULT_PIN_DIR, value_parser = parse_pin_dir)]
    pub pin_dir: PinDirArg,

    /// When a policy cannot be applied (a map is full, a cgroup is deeper
    /// than the kernel walks, a map write fails), deny every bind in the
    /// cgroups it governs (stand-in policies named `portguard:fail-closed:
    /// NAME`) instead of keeping the previous policy in force, or, at start,
    /// exiting with an error. Invalid policy files are still rejected whole.
    #[arg(long)]
    pub fail_closed: bool,

    /// Write Kubernetes PolicyReports (wgpolicyk8s.io/v1alpha2, as Kyverno
    /// and policy-reporter read them) every INTERVAL (5m when given
    /// without a value; off by default): in each namespace with denials or
    /// audits in the window, the report `portguard-<node>` summarises them
    /// per pod, container, policy and rule (`fail` for denials, `warn` for
    /// audits); a namespace quiet for a window gets an empty report. Uses
    /// the pod's service account (in-cluster) or the kubeconfig; needs the
    /// PolicyReport CRD and RBAC to patch policyreports (see
    /// deploy/kubernetes/rbac.yaml). `portguard report --policy-report`
    /// renders the same objects from an event log.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, require_equals = true,
          default_missing_value = "5m", value_parser = parse_report_interval)]
    pub policy_reports: Option<Duration>,
    /// Report what portguard's kernel programs cost: turn on the kernel's
    /// BPF run-time statistics (BPF_ENABLE_STATS, kernel 5.8+) while the
    /// agent runs, and export each program's runs and run time as
    /// portguard_program_runs_total and portguard_program_run_seconds_total
    /// (label `program`), with the mean cost of a run in `portguard status`.
    /// The kernel then times every BPF program on the host, not only
    /// portguard's (a clock read per run, some tens of nanoseconds). Off by
    /// default: without it these metrics are absent.
    #[arg(long)]
    pub program_stats: bool,

    /// Load this kernel object instead of the built-in one (testing
    /// upgrades over pinned state).
    #[arg(long, value_name = "FILE", hide = true)]
    pub kernel_object: Option<PathBuf>,

    /// Make every decision walk its cgroup's ancestry for the governing
    /// policy, as on kernels without the per-cgroup policy cache. By
    /// default, where the kernel accepts it (x86-64, kernel 6.2+ with BTF),
    /// the decision programs keep each cgroup's answer in the cgroup's own
    /// storage until a policy changes, which saves a helper call and a hash
    /// lookup per governed level on every bind, connect and send; a kernel
    /// that refuses any of those programs gets the walking ones instead.
    /// The agent's log says at start which one runs, and why.
    #[arg(long)]
    pub no_cgroup_cache: bool,
}

/// `--event-rate` default: with aggregation, 100 lines a second per policy
/// and CPU is more than anyone reads, and far less than the agent writes.
pub const DEFAULT_EVENT_RATE: u32 = 100;
/// `--event-burst` default: a policy's usual start-up denials fit.
pub const DEFAULT_EVENT_BURST: u32 = 200;

/// `--pin-dir`: a directory, or `none`.
#[derive(Clone, Debug)]
pub struct PinDirArg(pub Option<PathBuf>);

fn parse_pin_dir(s: &str) -> Result<PinDirArg, String> {
    if s == "none" {
        return Ok(PinDirArg(None));
    }
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(format!("{s}: give an absolute path on bpffs, or `none`"));
    }
    Ok(PinDirArg(Some(p)))
}

fn parse_cgroup_arg(s: &str) -> Result<String, String> {
    crate::policy::parse::normalize_cgroup(s)
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("expected ADDR:PORT (e.g. 127.0.0.1:9620) or `off`: {e}"))
}

/// Carry out the verb.
pub fn execute(a: Box<RunArgs>) -> anyhow::Result<ExitCode> {
    crate::agent::run(crate::agent::RunOptions {
        policy: a.policy,
        log: a.log,
        log_rotation: crate::events::Rotation {
            max_bytes: a.log_max_size,
            keep: a.log_max_files,
        },
        log_format: a.format,
        capacity: Capacity {
            cgroups: a.max_cgroups,
            policies: a.max_policies,
            chunks: a.max_port_chunks,
        },
        ring_buffer_bytes: a.ring_buffer_size,
        event_rate: a.event_rate,
        event_burst: a.event_burst,
        watch: !a.no_watch,
        lost_interval: a.lost_report_interval,
        rescan_interval: a.rescan_interval,
        max_delegated_cgroups: a.max_delegated_cgroups,
        inventory_interval: a.inventory_interval,
        attach_cgroup: a.attach_cgroup,
        decide_everywhere: a.decision_programs == DecisionPrograms::Root,
        require_lsm: a.require_lsm,
        cri_socket: a.cri_socket,
        cri_max_message_bytes: a.cri_max_message_bytes,
        aggregate_window: a.aggregate_window,
        health_listen: a.health_listen,
        metrics_addr: a.metrics_addr.0,
        status_socket: a.status_socket.0,
        cgroup_root: a.cgroup_root,
        stop_after: None,
        pin_dir: a.pin_dir.0,
        kernel_object: a.kernel_object,
        cgroup_cache: !a.no_cgroup_cache,
        fail_closed: a.fail_closed,
        policy_reports: a.policy_reports,
        program_stats: a.program_stats,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `--cri-max-message-bytes`: a byte count, at least 1 MiB (a smaller
/// limit would fail on an ordinary node).
fn parse_message_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if n < 1 << 20 {
        return Err(format!("{n} is below the minimum, 1048576 (1 MiB)"));
    }
    Ok(n)
}

/// `--policy-reports`: a duration of at least 10 seconds (the API server
/// is written once per namespace each window).
fn parse_report_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 5m)"))?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s}: below the minimum, 10s"));
    }
    Ok(d)
}

/// `--decision-programs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecisionPrograms {
    /// On the parent of each governed cgroup.
    Points,
    /// On --attach-cgroup, for every process.
    Root,
}
