//! Fixtures for portguard's privileged integration tests.
//!
//! Every test follows the same shape:
//! 1. create real cgroups under the cgroup2 mount ([`Cgroup`], removed on drop,
//!    processes inside killed first);
//! 2. start the real agent binary on a policy naming them ([`Agent`]; it
//!    attaches to the cgroup2 root; dropped = SIGTERM, programs detached);
//! 3. run `pgprobe` inside a cgroup, in its own network namespace so that ports
//!    never collide with the host or other tests ([`Probe`]), and assert the
//!    kernel's answer (success, EPERM, ...);
//! 4. assert the JSON event the agent logged for each denial.
//!
//! Several agents may run at once (tests run in parallel): each one only
//! governs the cgroups its own policy names, so they do not interfere.
//!
//! The agent binary is taken from `$PORTGUARD_BIN`, else from the cargo
//! target directory next to this test binary; `cargo xtask integration-test`
//! builds it first.
//!
//! The fixtures, one module each: cgroups (`cgroups`), the binaries under
//! test (`binaries`), the agent (`agent`), `pgprobe` runs (`probe`), looping
//! probes (`load`), JSON Schema and OCSF checks (`schema`), Kubernetes
//! stand-ins, a ConfigMap volume and an API server (`k8s`) and a private containerd ([`containerd`]). Everything is
//! re-exported here.

mod agent;
mod binaries;
mod cgroups;
pub mod containerd;
pub mod difftest;
mod k8s;
mod load;
mod probe;
mod schema;

pub use agent::{
    Agent, EVENT_TIMEOUT, MINIMAL_CAPS, Stopped, TEST_PIN_ROOT, TestBpffs, matches, portguard,
    uninstall,
};
pub use binaries::{agent_bin, pgbench_bin, probe_batch, probe_bin};
pub use cgroups::{Cgroup, cgroup2_root, is_root, join_before_exec};
pub use k8s::{ApiRequest, ConfigMapVolume, FakeApiServer};
pub use load::{Loop, Tally};
pub use probe::{Held, Probe, ProbeResult};
pub use schema::{
    event_schema_path, every_kind_of_event, json_schema_errors, ocsf_errors, schema_errors,
};

/// Skip (return early with a message) unless running as root. CI runs as
/// root, so there these tests never skip.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipping: needs root (CAP_BPF, CAP_SYS_ADMIN) to load and attach programs");
            return;
        }
    };
}
