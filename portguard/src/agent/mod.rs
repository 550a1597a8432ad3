//! `portguard run`: load, apply, attach, then serve until SIGTERM/SIGINT.
//!
//! One single-threaded tokio loop owns everything and handles, in turn:
//! ring-buffer readiness (events -> JSON lines), SIGHUP and policy-file
//! changes (reload), cgroup directory changes (a policy's cgroup appearing,
//! disappearing or being recreated), and a timer that reports events the
//! kernel had to drop; and the status socket's requests that need the
//! agent's state (a hook's govern, `portguard why`'s explain).
//!
//! Invariants:
//! - the first policy is written into the maps before any program is
//!   attached, so nothing ever runs against half-written state;
//! - the decision programs run only on the attach points (the parent of
//!   each governed cgroup): attached before the maps govern anything below
//!   a point, detached only after nothing is governed below it;
//! - a reload is applied whole (generation flip) or not at all; an invalid
//!   policy file leaves the previous policy in force and is logged;
//! - dropping the loaded object on exit detaches every program;
//! - a hook's govern request is answered from the kernel maps, after the
//!   runtime was asked and the tree rescanned (`govern`); a cgroup a policy
//!   names itself, below a point the programs already run on, is governed
//!   first by one insert into the live generation, as the full resolve and
//!   apply of the survey that follows will govern it (`govern_now`);
//! - a rescan's walk of the whole tree runs on a thread of its own
//!   (`survey`): installing it never undoes what a hook governed while it
//!   ran;
//! - a hook's answer leaves once the kernel maps hold it; the apply's
//!   bookkeeping (log lines, event paths, status facts) follows at once,
//!   before the loop serves anything else (`settle`);
//! - nothing slow runs on the loop's thread for a client: the status
//!   document and `/metrics` are built on tokio's blocking pool.

use std::{path::PathBuf, time::Duration};

use crate::{
    apply::Capacity,
    events::{self},
};

mod delegated;
mod endpoints;
mod explain;
mod facts;
mod govern;
mod govern_now;
mod inventory;
mod losses;
mod pipeline;
mod points;
mod reload;
mod reports;
mod resolving;
mod serve;
mod settle;
mod start;
mod state;
mod survey;
mod watch;

use self::{
    endpoints::Endpoints,
    govern::*,
    inventory::{inventory_finish, inventory_pass},
    losses::*,
    pipeline::*,
    resolving::*,
    serve::*,
    settle::*,
    start::*,
    state::*,
    survey::*,
    watch::*,
};

/// Free `x` (thousands of paths: milliseconds) on the runtime's blocking
/// pool rather than on the serve loop; here, outside a runtime.
fn free_later<T: Send + 'static>(x: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(x))),
        Err(_) => drop(x),
    }
}

/// Options of `portguard run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    /// A file, `journald`, or standard output (`None`).
    pub log: Option<PathBuf>,
    pub log_rotation: events::Rotation,
    /// The form of each event line (portguard's JSON, OCSF, ECS).
    pub log_format: events::Format,
    pub capacity: Capacity,
    pub ring_buffer_bytes: u32,
    /// Kernel event budget of each policy, per CPU: events per second (0:
    /// unlimited) and burst (`portguard_common::EventBudget`).
    pub event_rate: u32,
    pub event_burst: u32,
    /// Reload when the policy file changes (SIGHUP always reloads).
    pub watch: bool,
    /// How often to check the kernel's lost-event counter.
    pub lost_interval: Duration,
    /// How often to re-resolve policy cgroups even without inotify events.
    pub rescan_interval: Duration,
    /// How often the inventory lists every socket of the governed cgroups
    /// (besides at start and after each change of what is governed).
    pub inventory_interval: Duration,
    /// Most cgroups governed in one delegated subtree (`delegated: govern`).
    pub max_delegated_cgroups: usize,
    /// Where to attach the programs (a normalised cgroup path; `/` = the
    /// whole host). Every policy must govern a cgroup at or below it.
    pub attach_cgroup: String,
    /// Run the decision programs on `attach_cgroup` for every process
    /// (`--decision-programs root`) instead of on the attach points.
    pub decide_everywhere: bool,
    /// Refuse to run without the BPF LSM checks (listen/accept).
    pub require_lsm: bool,
    /// The CRI runtime's socket (for `pods:` policies and event identities).
    pub cri_socket: PathBuf,
    /// The largest CRI answer accepted (ListPodSandbox, ListContainers).
    pub cri_max_message_bytes: usize,
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
    /// Load the programs with the per-cgroup policy cache where the kernel
    /// accepts them (`--no-cgroup-cache`: false).
    pub cgroup_cache: bool,
    /// When a policy cannot be applied (maps full, a cgroup too deep, a map
    /// write failing), deny every bind in the cgroups it governs instead of
    /// keeping the previous policy (or, at start, exiting).
    pub fail_closed: bool,
    /// Write PolicyReports to the API server every this long
    /// (`--policy-reports`; `None`: off).
    pub policy_reports: Option<Duration>,
    /// Turn the kernel's BPF run-time statistics on and report what each
    /// program costs (/metrics, `status`); see `kernel::ProgramStats`.
    pub program_stats: bool,
}

pub use crate::policy::builtin::{FAIL_CLOSED, IDENTIFYING, UNFIT};

/// /healthz fails when the main loop has not turned for this long (or three
/// lost-report intervals, if longer).
const HEALTH_STALE_AFTER: Duration = Duration::from_secs(30);

/// Most ring-buffer records handled per turn of the main loop, and the
/// longest a turn reads for: signals, reloads and timers wait at most that.
const DRAIN_BATCH: usize = 4096;
const DRAIN_BATCH_TIME: Duration = Duration::from_millis(5);

/// Most kinds of decision the aggregator tracks at once.
const AGGREGATE_KINDS: usize = 65536;

/// Least time between two inventory passes that changes of what is
/// governed ask for (the periodic pass and the first one are not delayed).
const INVENTORY_GAP: Duration = Duration::from_millis(500);
/// An inventory pass this late runs after whatever the loop did last, not
/// only when its timer comes round (see `serve`).
const INVENTORY_OVERDUE: Duration = Duration::from_secs(2);
/// Yields of the serve loop before each turn (`serve`): the status
/// socket's listener accepts a hook's connection in one, the connection's
/// task reads and hands over its request in the next.
const HANDOVER_YIELDS: usize = 2;

/// Most govern requests queued for the serve loop (more wait to be sent).
const GOVERN_QUEUE: usize = 256;

/// Most explain requests (`portguard why`) queued for the serve loop.
const EXPLAIN_QUEUE: usize = 16;

/// How long a pod cgroup may stay unidentified before it is released.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Run the agent until SIGTERM/SIGINT: load the policy, preflight, load the
/// kernel object, apply, attach, serve, shut down.
pub fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP during start-up must not kill the
    // agent (its default action); it is handled once the agent serves.
    let (rt, signals) = runtime_and_signals()?;
    // Validate the policy before touching the kernel.
    let (parsed, policies) = load_policy(&opts)?;
    let hierarchy = hierarchy(&opts, policies.len())?;
    let mut writer = event_writer(&opts)?;
    preflight_capabilities()?;
    // Squatters (a port held first, a pin directory made first) cost
    // observability or persistence, loudly, never enforcement.
    let (endpoints, mut degraded) = Endpoints::bind(&opts);
    let pins = match opts.pin_dir.as_deref() {
        Some(dir) => open_pins(dir, &mut degraded)?,
        None => None,
    };
    let loaded = load_kernel(&opts, pins.as_ref())?;
    // Before anything is attached, so every run is counted.
    let programs = program_stats(&opts, &loaded, &mut degraded);
    let (mut agent, events) = Agent::new(&opts, hierarchy, loaded, parsed, programs)?;
    agent.shared.update(|f| f.degraded = degraded);
    agent.connect_cri(&rt, &opts, &policies);
    let report = agent.first_apply(&opts, policies)?;
    agent.attach(&opts, pins.as_ref(), &mut writer)?;
    agent.announce(&opts, &report)?;
    // Hooks' govern requests: from the status socket to the serve loop.
    let (govern_tx, govern_rx) = tokio::sync::mpsc::channel(GOVERN_QUEUE);
    // `portguard why`'s questions: likewise.
    let (explain_tx, explain_rx) = tokio::sync::mpsc::channel(EXPLAIN_QUEUE);
    endpoints.spawn(&rt, &agent, govern_tx, explain_tx)?;
    let health = agent.health.clone();
    let result = rt.block_on(serve(
        &mut agent,
        events,
        writer,
        &opts,
        &health,
        signals,
        (govern_rx, explain_rx),
    ));
    shut_down(&opts, pins.as_ref());
    drop(agent);
    result
}

/// After the serve loop: remove the status socket, say what keeps
/// enforcing, tell the service manager.
fn shut_down(opts: &RunOptions, pins: Option<&crate::kernel::pins::PinDir>) {
    if let Some(p) = &opts.status_socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = pins {
        log::info!(
            "daemon: stopped; enforcement continues through the links pinned in {} (the next \
             `portguard run` adopts them; `portguard uninstall` removes them)",
            p.root().display()
        );
    } else {
        log::info!("daemon: detaching programs; enforcement stops (--pin-dir none)");
    }
    sd_notify(&[sd_notify::NotifyState::Stopping]);
}
