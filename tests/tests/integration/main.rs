//! portguard's privileged integration tests. See `portguard_tests` (src/lib.rs)
//! for the shape every test follows. One file per behaviour:
//!
//! - `bind`: TCP/UDP, IPv4/IPv6, IPv4-mapped IPv6, loopback-only ports,
//!   dual-stack `[::]`, range edges, port 0 and `ephemeral`, `bind: []`, and
//!   that an allowed bind still gets the kernel's CAP_NET_BIND_SERVICE check.
//! - `cgroups`: inheritance by child cgroups (existing and created later),
//!   untouched siblings, nearest policy wins, forked processes and threads, a
//!   policy cgroup that appears (or is recreated) after the agent started.
//! - `connect`: connect4/6, IPv4-mapped destinations, UDP connect, unconnected
//!   UDP sendto (sendmsg4/6), loopback-only destinations.
//! - `difftest`: the kernel and the policy model agree on random policy
//!   files and operations through real syscalls (the fixed-seed CI slice of
//!   `cargo xtask difftest`), and the regressions it found.
//! - `aggregate`: flood control (a storm becomes a few lines; counts add up).
//! - `audit`: audit mode allows and reports.
//! - `reload`: tighten and loosen under a running workload, invalid reloads,
//!   reload on file change.
//! - `events`: every event field, and lost events counted and reported.
//! - `ocsf`: `--format ocsf` events from a real agent (every kind of
//!   decision, an aggregate, a loss report) validate against the OCSF
//!   schema and carry the process, user, container, pod and device;
//!   `portguard events --format ocsf` converts a real JSON log.
//! - `fairness`: one policy's flood cannot hide another's denial (the
//!   kernel's per-policy event budget); suppressed and lost events are
//!   counted and reported per policy, and add up exactly.
//! - `guard`: no governed socket serves on a port outside its policy, with or
//!   without the BPF LSM (unbound listeners, handed-in sockets, UDP autobind
//!   in a narrowed range, the IPV6_V6ONLY race, listeners through reloads).
//! - `govern_now`: the agent's quick answer to a hook: a restarted unit
//!   governed by one insert, by the policy the full rescan gives it; none
//!   where the decision programs do not run yet (a recreated slice).
//! - `hooks`: `portguard hook unit` and the agent's "govern this cgroup
//!   now" request: a restarted unit governed before its first instruction,
//!   root-only requests, a starved agent failing the hook closed or open.
//! - `hostile`: oversized and alias-bomb policies refused in bounded memory;
//!   unprivileged users kept away from pins, socket and log.
//! - `learn`: `portguard learn` writes a policy that allows exactly what it saw.
//! - `metrics`: /metrics counters follow real decisions.
//! - `replay`: `portguard replay` judges a real agent's log under a
//!   candidate policy (exact table and JSON; exit status).
//! - `program_stats`: `--program-stats` (the programs' own run statistics)
//!   moves with real binds on every attach point, is absent without the
//!   flag, and the Grafana dashboard asks only for exported metrics.
//! - `plan`: `reserved:` ports denied whatever a policy allows; `check` warns.
//! - `probes`: `check --manifests` on health probes aimed at ports the plan
//!   forbids or the container does not declare.
//! - `policy_reports`: `portguard report --policy-report` over a real
//!   agent's log (pods named by a private containerd): the exact
//!   PolicyReport objects, valid against the CRD's schema.
//! - `pinning`: enforcement survives SIGKILL and upgrades (pinned programs,
//!   links and maps, adopted without detaching); `uninstall`.
//! - `cli`: `check`, `--help`, and `run` refusing bad input.
//! - `cri`: `pods:` selectors against a private containerd through the CRI.
//! - `cri_runtime`: CRI answers over 4 MiB; the runtime down (pods stay held).
//! - `oci_hook`: `portguard hook oci` as containerd's `createRuntime` hook:
//!   each container governed before its first instruction; a starved agent
//!   fails the hook closed or open; what containerd 1.6 hands a hook.
//! - `status`: `portguard status` and `portguard events`.
//! - `terminal`: hostile cgroup names are escaped in logs, tables and status.
//! - `units`: `unit:` selectors on a bare host.
//! - `why`: `portguard why` against a running agent (allowed, denied with
//!   the exact answer, audit, reserved, ungoverned) and offline.
//! - `unit_hook`: the `ExecStartPre=` drop-ins `portguard::hook::systemd`
//!   writes, as `systemd-analyze verify` and systemd's own parser read them.

mod aggregate;
mod audit;
mod bind;
mod bypass;
mod cache;
mod cgroups;
mod cli;
mod connect;
mod cri;
mod cri_runtime;
mod delegation;
mod deploy;
mod difftest;
mod events;
mod fairness;
mod govern_now;
mod guard;
mod hooks;
mod hostile;
mod inventory;
mod learn;
mod manifests;
mod metrics;
mod oci_hook;
mod ocsf;
mod pinning;
mod plan;
mod points;
mod policy_reports;
mod probes;
mod program_stats;
mod reload;
mod replay;
mod status;
mod terminal;
mod unit_hook;
mod units;
mod why;
