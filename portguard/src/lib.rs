//! portguard: a host-level port binding enforcer.
//!
//! Folders by concern; dependencies point one way (down this list):
//!
//! | folder | owns | start reading at |
//! |---|---|---|
//! | `cli/` | one file per verb (`run`, `check`, `learn`, `replay`, `status`, `events`, `report`, `why`, `hook`, `uninstall`): arguments and `--help` | `cli/mod.rs` |
//! | `agent/` | `portguard run`: start-up, the agent's state, reload, the event glue and the serve loop | `agent/mod.rs` (`run`) |
//! | `observe/` | what the agent shows: the status snapshot, `/metrics`, `/healthz`, the status socket, and the escaping of untrusted names in human-readable output | `observe/metrics.rs` |
//! | `report/` | Kubernetes-native reports: decisions summarised per workload and policy as `PolicyReport` objects, and the kube-rs client that applies them | `report/mod.rs` |
//! | `events/` | the typed event record: decode, enrich, aggregate, the writer, lost-event reports | `events/mod.rs` |
//! | `hook/` | `portguard hook oci` / `hook unit`: the runtime hooks that ask the agent to govern a cgroup before its first instruction; the request on the status socket; failures spooled for the agent to report; installing them (containerd base spec, CRI-O hooks.d, systemd drop-ins) | `hook/mod.rs` |
//! | `workload/` | where workloads are: cgroupfs, kubelet/systemd layouts, identity, resolve, CRI, their sockets | `workload/resolve.rs` |
//! | `kernel/` | the only aya importer: object, attach, pins, maps, counters, BTF, raw bpf calls | `kernel/mod.rs` |
//! | `apply/` | the pure map planner (`Applier`) and its `RuleSink` seam | `apply/mod.rs` |
//! | `policy/` | the pure policy model: YAML, selectors, compile, built-ins, verdict explanations | `policy/mod.rs` |
//! | `manifest/` | the CI port-plan check over Kubernetes, Compose and Dockerfiles | `manifest/mod.rs` |
//!
//! `policy/` and `apply/` import neither aya, tokio nor libc (`cargo xtask
//! lint` checks it); `manifest/` is pure too. `testgate.rs` holds the
//! debug-only points where integration tests park background work.

pub mod agent;
pub mod apply;
pub mod cli;
pub mod events;
pub mod hook;
pub mod kernel;
pub mod manifest;
pub mod observe;
pub mod policy;
pub mod report;
pub mod testgate;
pub mod workload;
