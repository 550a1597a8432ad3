//! Command-line interface. Doc comments here are the `--help` text.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    cgroupfs::Hierarchy,
    daemon::{self, RunOptions},
    rules_map::Capacity,
};

/// Kernel-enforced port policy for cgroups.
///
/// portguard attaches cgroup eBPF programs (bind, post_bind, connect, sendmsg;
/// IPv4 and IPv6) to the cgroup2 root and keeps the processes of each governed
/// cgroup (a container, a pod, a systemd service, any cgroup and everything
/// below it) from binding, and optionally connecting to, ports outside the
/// policy's allowed set. Every denial is reported as a JSON line.
///
/// `run` enforces; `check` validates a policy file (and, with --manifests,
/// holds deployment manifests against it); `status` shows what the
/// running agent enforces; `events` reads and summarises the event log;
/// `learn` watches a workload and writes its policy; `uninstall` removes the
/// pinned programs, links and maps that keep enforcing after the agent stops.
///
/// Agent logs go to standard error; set RUST_LOG (e.g. RUST_LOG=debug) to
/// change their level.
#[derive(Debug, Parser)]
#[command(name = "portguard", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(Box<RunArgs>),
    Check(CheckArgs),
    Learn(LearnArgs),
    Status(StatusArgs),
    Events(crate::query::EventsArgs),
    Uninstall(UninstallArgs),
}

/// Enforce a policy file until stopped (needs root, or CAP_BPF, CAP_PERFMON,
/// CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH).
///
/// Loads the kernel programs, writes the policy into their maps, attaches
/// them to the cgroup2 root (found in /proc/mounts) and streams denial events
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
    /// Policy file (YAML) to enforce; see the README's policy reference.
    #[arg(short, long, value_name = "FILE")]
    pub policy: PathBuf,

    /// Append events (one JSON object per line) to FILE, created with mode
    /// 0600, instead of writing them to standard output; or `journald` for
    /// native journal entries (the JSON as MESSAGE, each field as
    /// PORTGUARD_<FIELD>). Under systemd, when standard output is the
    /// journal, events go to it natively by default.
    #[arg(long, value_name = "FILE|journald")]
    pub log: Option<PathBuf>,

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

    /// Flood control: identical decisions (same policy, cgroup, hook,
    /// verdict, protocol, family, address and port) within this window are
    /// written as one line with `count`, `first_seen` and `last_seen`; the
    /// first of them is written at once. 0 writes every decision.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub aggregate_window: Duration,

    /// How often to check the kernel's lost-event counter (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub lost_report_interval: Duration,

    /// Attach the programs to this cgroup (a path under the cgroup2 mount)
    /// instead of the cgroup2 root. Processes outside it run no portguard
    /// code at all; every policy must govern a cgroup at or below it (e.g.
    /// /kubepods.slice on a Kubernetes node).
    #[arg(long, value_name = "PATH", default_value = "/", value_parser = parse_cgroup_arg)]
    pub attach_cgroup: String,

    /// The node's CRI runtime socket, used to resolve `pods:` selectors and to
    /// name the pod and container in events (containerd:
    /// /run/containerd/containerd.sock, CRI-O: /var/run/crio/crio.sock).
    #[arg(long, value_name = "PATH", default_value = crate::cri::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,

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
    #[arg(long, value_name = "PATH|off", default_value = crate::status::DEFAULT_SOCKET, value_parser = crate::status::parse_socket_arg)]
    pub status_socket: crate::status::SocketArg,

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

    /// bpffs directory (created 0700) where programs, links and maps are
    /// pinned so enforcement survives the agent, or `none` to pin nothing
    /// (enforcement then ends when the agent exits). bpffs is mounted at
    /// /sys/fs/bpf if it is not. One agent per directory.
    #[arg(long, value_name = "DIR|none", default_value = crate::pins::DEFAULT_PIN_DIR, value_parser = parse_pin_dir)]
    pub pin_dir: PinDirArg,

    /// When a policy cannot be applied (a map is full, a cgroup is deeper
    /// than the kernel walks, a map write fails), deny every bind in the
    /// cgroups it governs (stand-in policies named `portguard:fail-closed:
    /// NAME`) instead of keeping the previous policy in force, or, at start,
    /// exiting with an error. Invalid policy files are still rejected whole.
    #[arg(long)]
    pub fail_closed: bool,

    /// Load this kernel object instead of the built-in one (testing
    /// upgrades over pinned state).
    #[arg(long, value_name = "FILE", hide = true)]
    pub kernel_object: Option<PathBuf>,
}

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

/// Remove everything portguard pinned: links first (enforcement stops),
/// then programs and maps, then the directory if nothing else is in it.
///
/// Touches only the names portguard creates in --pin-dir; anything else
/// there is listed and left alone. Refuses while an agent runs on that
/// directory (stop it first). Exits 1 on error.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The agent's --pin-dir.
    #[arg(long, value_name = "DIR", default_value = crate::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// List what would be removed (with kernel ids) and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Validate a policy file, and check deployment manifests against its port
/// plan, without loading anything into the kernel.
///
/// Prints every policy error as FILE:LINE:COLUMN: error: FIELD: MESSAGE, and
/// warnings (for example a cgroup that does not exist yet, which is governed
/// as soon as it appears, or a policy that allows a reserved port).
///
/// With --manifests, reads Kubernetes YAML (Pods, Deployments, StatefulSets,
/// DaemonSets, ReplicaSets, Jobs, CronJobs and Services), docker-compose
/// files and Dockerfiles (files, or directories searched for *.yaml, *.yml,
/// *.json, Dockerfile*, *.Dockerfile, Containerfile), matches each container
/// to its policy by the agent's `pods:` selectors, and reports, each with
/// file and line:
///
///   port-not-allowed       a declared port the governing policy does not
///                          allow (or allows on loopback only)
///   host-port-conflict     a hostPort, hostNetwork or published port
///                          claimed by two workloads
///   reserved-port          a declared port in the plan's `reserved:` ports
///   target-port-unmatched  a Service targetPort no selected container
///                          declares
///   port-mismatch          one service, different ports in its Dockerfile,
///                          compose file and Kubernetes manifests
///
/// plus manifest-invalid, manifest-unresolved (a ${VAR} without a default)
/// and service-selects-nothing. No cluster or network is needed.
///
/// Exits 0 when there is no error (warnings allowed), 1 otherwise; with
/// --warn-only, manifest findings never fail the run (an invalid policy file
/// still does).
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CheckArgs {
    /// Policy file (YAML) to validate; or give it with --policy.
    #[arg(
        value_name = "FILE",
        required_unless_present = "policy",
        conflicts_with = "policy"
    )]
    pub file: Option<PathBuf>,
    /// Policy file (YAML): the port plan to hold the manifests against.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Kubernetes manifests, compose files, Dockerfiles, or directories of
    /// them.
    #[arg(long, value_name = "PATH", num_args = 1..)]
    pub manifests: Vec<PathBuf>,
    /// Namespace of Kubernetes objects whose metadata names none (as
    /// `kubectl apply -n`).
    #[arg(long, value_name = "NS", default_value = "default")]
    pub namespace: String,
    /// Output: `human` (FILE:LINE:COLUMN lines), `json`, or `sarif` (SARIF
    /// 2.1.0, for GitHub code scanning and other code-scanning UIs).
    #[arg(long, value_enum, default_value_t = CheckFormat::Human)]
    pub format: CheckFormat,
    /// Report manifest findings but exit 0 (a first rollout). An invalid
    /// policy file still exits 1.
    #[arg(long)]
    pub warn_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Human,
    Json,
    Sarif,
}

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
    #[arg(long, value_name = "PATH", default_value = crate::cri::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,
    /// The host's cgroup2 mount, if not the first one in /proc/mounts.
    #[arg(long, value_name = "PATH", env = "PORTGUARD_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
}

/// Show what the running agent enforces: programs, policies with their
/// decision counters, governed cgroups with their pod, container or unit,
/// events written, aggregated and lost, reloads and map occupancy.
///
/// Asks the agent over its status socket (root only). When no agent
/// answers but pinned state exists (--pin-dir), shows what the pinned
/// programs still enforce, from the kernel maps. Exits 1 if neither.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's --status-socket.
    #[arg(long, value_name = "PATH", default_value = crate::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the agent's JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// When no agent answers, read what is still enforced from the pinned
    /// programs and maps in this directory (the agent's --pin-dir).
    #[arg(long, value_name = "DIR", default_value = crate::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

impl Cli {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(a) => {
                daemon::run(RunOptions {
                    policy: a.policy,
                    log: a.log,
                    log_rotation: crate::events::Rotation {
                        max_bytes: a.log_max_size,
                        keep: a.log_max_files,
                    },
                    capacity: Capacity {
                        cgroups: a.max_cgroups,
                        policies: a.max_policies,
                        chunks: a.max_port_chunks,
                    },
                    ring_buffer_bytes: a.ring_buffer_size,
                    watch: !a.no_watch,
                    lost_interval: a.lost_report_interval,
                    rescan_interval: a.rescan_interval,
                    attach_cgroup: a.attach_cgroup,
                    require_lsm: a.require_lsm,
                    cri_socket: a.cri_socket,
                    aggregate_window: a.aggregate_window,
                    health_listen: a.health_listen,
                    metrics_addr: a.metrics_addr.0,
                    status_socket: a.status_socket.0,
                    cgroup_root: a.cgroup_root,
                    stop_after: None,
                    pin_dir: a.pin_dir.0,
                    kernel_object: a.kernel_object,
                    fail_closed: a.fail_closed,
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Status(a) => {
                let doc = match crate::status::fetch(&a.socket) {
                    Ok(doc) => doc,
                    // No agent: say what the pinned programs still enforce.
                    Err(e) if a.pin_dir.exists() => {
                        eprintln!("portguard status: {e:#}; reading the pinned state instead");
                        crate::status::pinned_document(&a.pin_dir)?
                    }
                    Err(e) => return Err(e),
                };
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    print!("{}", crate::status::render(&doc));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Events(a) => crate::query::run(&a),
            Command::Uninstall(a) => {
                use std::io::Write as _;
                let (ours, foreign) = crate::pins::uninstall(&a.pin_dir, a.dry_run)?;
                let verb = if a.dry_run { "would remove" } else { "removed" };
                // A closed pipe (`| head`) is not an error worth a panic.
                let mut out = std::io::stdout().lock();
                for p in &ours {
                    let id = p.id.map_or(String::new(), |i| format!(" id {i}"));
                    let detail = if p.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", p.detail)
                    };
                    let _ = writeln!(out, "{verb} {}{id}{detail}: {}", p.kind, p.path.display());
                }
                for f in &foreign {
                    let _ = writeln!(out, "left alone (not portguard's): {}", f.display());
                }
                let _ = writeln!(
                    out,
                    "{verb} {} pinned objects from {}",
                    ours.len(),
                    a.pin_dir.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Learn(a) => {
                let selector = match (a.cgroup, a.pods, a.unit) {
                    (Some(c), None, None) => crate::policy::Selector::Cgroup(
                        crate::policy::normalize_cgroup(&c)
                            .map_err(|e| anyhow::anyhow!("--cgroup {c}: {e}"))?,
                    ),
                    (None, Some(p), None) => crate::policy::Selector::Pods(
                        crate::learn::parse_pods(&p)
                            .map_err(|e| anyhow::anyhow!("--pods {p}: {e}"))?,
                    ),
                    (None, None, Some(u)) => crate::policy::Selector::Unit(u),
                    _ => anyhow::bail!("give exactly one of --cgroup, --pods or --unit"),
                };
                let n = crate::learn::run(&crate::learn::LearnOptions {
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
            Command::Check(a) => {
                let hierarchy = Hierarchy::discover().ok();
                let policy = a.policy.as_ref().or(a.file.as_ref()).ok_or_else(|| {
                    anyhow::anyhow!("check: give the policy file (FILE or --policy FILE)")
                })?;
                let report = crate::check::check_plan(&crate::check::PlanCheck {
                    policy,
                    manifests: &a.manifests,
                    namespace: &a.namespace,
                    hierarchy: hierarchy.as_ref(),
                })?;
                use crate::manifest::report;
                print!(
                    "{}",
                    match a.format {
                        CheckFormat::Human => report::human(&report),
                        CheckFormat::Json => report::json(&report),
                        CheckFormat::Sarif => report::sarif(&report),
                    }
                );
                let failed = !report.summary.policy_valid || (report.errors() > 0 && !a.warn_only);
                Ok(if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
        }
    }
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
