//! The agent's snapshot of itself ([`Snapshot`]): what it enforces, how it
//! has fared (reloads, events written and aggregated, map occupancy), and
//! the kernel counters read at request time ([`KernelReading`]), with the
//! programs' own run statistics when `--program-stats` asked for them; and
//! its last event lines, for `portguard why` ([`Snapshot::recent_under`]).

use std::sync::{Arc, Mutex};

use crate::events::EventRecord;
use crate::kernel::{CounterMaps, Decisions, ProgramCost, ProgramStats};

/// Verdict label of each `DECISION_*` kind.
pub const VERDICTS: [&str; 4] = ["allow", "deny", "audit", "reported"];

/// One policy as the metrics and status see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFacts {
    pub name: String,
    /// Its record slot (row of the kernel's policy counters).
    pub slot: u32,
    /// The slot's counters when this policy took it (a slot freed by a
    /// removed policy keeps its kernel counts).
    pub baseline: Decisions,
    pub mode: &'static str,
    /// Selector, as `check` describes it.
    pub selector: String,
    /// cgroups this policy governs now, with who they are when known.
    pub cgroups: Vec<(String, crate::events::WorkloadIdentity)>,
}

/// Map occupancy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapUse {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Cgroups policies selected by name but do not govern, because they lie in
/// delegated subtrees (see `workload::resolve`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftOut {
    /// The policy did not opt in (`delegated: skip`).
    pub skipped: usize,
    /// Opted in, but over `--max-delegated-cgroups` or the map's room.
    pub unfit: usize,
    /// Delegated subtrees with unfit cgroups.
    pub unfit_subtrees: Vec<String>,
    /// Of those, the ones `--fail-closed` holds (every bind denied).
    pub held_subtrees: Vec<String>,
}

/// What the agent knows beyond the kernel counters. Updated by the agent,
/// read by the endpoints.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Shared, so that copying the facts for a status document or a
    /// scrape (thousands of policies) is one reference count, not a copy
    /// of each policy's strings under the lock the agent's loop takes to
    /// publish.
    /// Each policy's facts shared too: an apply that left a policy as it was
    /// publishes the same facts again without building them anew.
    pub policies: Arc<Vec<Arc<PolicyFacts>>>,
    pub governed_cgroups: usize,
    /// Selected by name, not governed (delegated subtrees).
    pub left_out: LeftOut,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub events_aggregated: u64,
    pub events_written: u64,
    pub maps: Vec<MapUse>,
    /// Where the programs are attached, and which.
    pub attach_cgroup: String,
    /// Where the decision programs run (cgroup paths): the parent of each
    /// governed cgroup, or itself.
    pub attach_points: Vec<String>,
    pub hooks: Vec<&'static str>,
    /// How listen()/accept() are checked.
    pub listen_mode: String,
    pub status: String,
    /// What the agent runs without, and why (an endpoint it could not
    /// bind, a pin directory someone else made).
    pub degraded: Vec<String>,
    pub host: String,
    pub started: String,
    /// The CRI runtime link (`None`: no CRI call was made).
    pub cri: Option<CriFacts>,
    /// Requests from `portguard hook oci` / `hook unit`, and their failures.
    pub runtime_hooks: RuntimeHookFacts,
    /// What the inventory passes found.
    pub inventory: InventoryFacts,
}

/// The inventory's passes over the host's sockets (`agent::inventory`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InventoryFacts {
    /// Passes completed.
    pub passes: u64,
    /// Listening/bound sockets of governed cgroups the last pass checked.
    pub checked: u64,
    /// Of those, the ones that break their policy.
    pub violations: u64,
    /// Sockets passes ended (destroyed, fenced or closed), in all.
    pub ended: u64,
    /// How long the last pass took, in seconds.
    pub last_seconds: f64,
}

/// What the runtime hooks asked, and what they reported failing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeHookFacts {
    /// Govern requests answered.
    pub requests: u64,
    /// Of those, answered with `ok: false`.
    pub refused: u64,
    /// Seconds spent answering them (from reading to answering).
    pub seconds: f64,
    /// The slowest answer, in seconds.
    pub slowest: f64,
    /// Failures hooks reported (spooled), by `hook` and `action`.
    pub failures: std::collections::BTreeMap<(String, String), u64>,
}

/// Whether the CRI runtime answers the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CriFacts {
    /// The last call was answered.
    pub up: bool,
    /// Failed refreshes in this run.
    pub errors: u64,
    /// When it stopped answering (RFC 3339), while it does not.
    pub failing_since: Option<String>,
}

/// The agent's snapshot of itself: what it knows beyond the kernel
/// counters (updated by the agent) and the counters (read at request time).
/// `/metrics` and the status socket answer from it.
pub struct Snapshot {
    pub counters: Arc<CounterMaps>,
    pub facts: Mutex<Facts>,
    /// The last [`RECENT_EVENTS`] event records written (`portguard why`'s
    /// history), kept as records: made into JSON only when asked for (a
    /// JSON value per event cost the storm 4/5 of its write rate).
    pub recent: Mutex<std::collections::VecDeque<EventRecord>>,
    /// `--program-stats`: the agent's programs, whose run statistics are
    /// read at request time like the counters (None: off).
    pub programs: Option<ProgramStats>,
}

/// Status documents and `/metrics` pages built at once, at most
/// ([`Snapshot::off_loop`]).
pub const BUILDS: usize = 2;

/// Event lines the agent keeps in memory for `portguard why`.
pub const RECENT_EVENTS: usize = 1024;

impl Snapshot {
    pub fn facts(&self) -> Facts {
        self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Look at the facts without copying them (the lock is held meanwhile:
    /// keep `f` short).
    pub fn read<R>(&self, f: impl FnOnce(&Facts) -> R) -> R {
        f(&self.facts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn update(&self, f: impl FnOnce(&mut Facts)) {
        f(&mut self.facts.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// `build(facts, kernel reading)` run on tokio's blocking pool, not on
    /// the thread that called it: with thousands of policies a status
    /// document or a scrape takes a tenth of a second and more, and the
    /// agent's loop (which answers the runtime hooks) shares that thread.
    /// The facts are copied under their lock (a reference count for the
    /// policies), the rest is built without it. At most [`BUILDS`] at once:
    /// `/metrics` answers whoever connects, and a flood of scrapes must not
    /// take the CPU the loop needs (a client that leaves while it waits
    /// gives its turn up; one being built runs to its end).
    pub async fn off_loop<R: Send + 'static>(
        self: &Arc<Self>,
        build: impl FnOnce(&Facts, Result<KernelReading, String>) -> R + Send + 'static,
    ) -> Result<R, String> {
        static TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BUILDS);
        let turn = TURNS
            .acquire()
            .await
            .map_err(|e| format!("building the answer failed: {e}"))?;
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            // Held until the build ends, whoever still waits for it.
            let _turn = turn;
            let facts = shared.facts();
            crate::testgate::park_next("PORTGUARD_TEST_STATUS_GATE");
            let kernel = shared.read_kernel(&facts);
            build(&facts, kernel)
        })
        .await
        .map_err(|e| format!("building the answer failed: {e}"))
    }

    /// Keep written event records (the oldest go beyond
    /// [`RECENT_EVENTS`]); one lock for the batch.
    pub fn remember(&self, records: impl IntoIterator<Item = EventRecord>) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for record in records {
            if r.len() >= RECENT_EVENTS {
                r.pop_front();
            }
            r.push_back(record);
        }
    }

    /// The kept event lines about cgroup `path` or a cgroup below it
    /// (oldest first).
    pub fn recent_under(&self, path: &str) -> Vec<serde_json::Value> {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .filter(|e| {
                e.cgroup.as_deref().is_some_and(|c| {
                    c == path
                        || path == "/"
                        || c.strip_prefix(path)
                            .is_some_and(|rest| rest.starts_with('/'))
                })
            })
            .filter_map(|e| serde_json::to_value(e).ok())
            .collect()
    }

    /// The kernel counters for `facts` and, with `--program-stats`, each
    /// program's run statistics, read now (a few syscalls per program,
    /// taking no lock the agent holds).
    pub fn read_kernel(&self, facts: &Facts) -> Result<KernelReading, String> {
        let mut k = KernelReading::read(&self.counters, facts).map_err(|e| e.to_string())?;
        k.programs = self
            .programs
            .as_ref()
            .map(ProgramStats::read)
            .transpose()
            .map_err(|e| format!("the programs' run statistics: {e}"))?;
        Ok(k)
    }
}

/// Counters since a policy took its slot.
pub fn since(now: Decisions, baseline: Decisions) -> Decisions {
    let mut d = Decisions::default();
    for i in 0..d.len() {
        d[i] = now[i].saturating_sub(baseline[i]);
    }
    d
}

/// Kernel counters read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct KernelReading {
    pub by_hook: Vec<(&'static str, Decisions)>,
    /// Per policy (same order as `Facts::policies`), since it took its slot.
    pub by_policy: Vec<Decisions>,
    pub events_lost: u64,
    /// Packets the packet guard dropped (addressed to cut-off sockets).
    pub guard_drops: u64,
    /// Cut-off sockets the kernel would not fence.
    pub fence_failures: u64,
    /// Cut-off sockets the kernel could not mark for the packet guard.
    pub mark_failures: u64,
    /// Each program's runs and run time (`--program-stats`; None: off).
    pub programs: Option<Vec<ProgramCost>>,
}

impl KernelReading {
    pub fn read(counters: &CounterMaps, facts: &Facts) -> Result<Self, crate::kernel::MapError> {
        Ok(Self {
            by_hook: counters
                .by_hook()?
                .into_iter()
                .map(|(h, d)| (h.name(), d))
                .collect(),
            by_policy: Self::by_policy(
                counters,
                facts.policies.iter().map(|p| (p.slot, p.baseline)),
            )?,
            events_lost: counters.events_lost()?,
            guard_drops: counters.guard_drops()?,
            fence_failures: counters.fence_failures()?,
            mark_failures: counters.mark_failures()?,
            programs: None,
        })
    }

    /// The counters of the policies in `slots` (slot, baseline) since each
    /// took its slot, read together.
    pub fn by_policy(
        counters: &CounterMaps,
        slots: impl Iterator<Item = (u32, Decisions)> + Clone,
    ) -> Result<Vec<Decisions>, crate::kernel::MapError> {
        let end = slots.clone().map(|(slot, _)| slot + 1).max();
        let all = counters.first_slots(end.unwrap_or(0))?;
        slots
            .map(|(slot, baseline)| match all.get(slot as usize) {
                Some(d) => Ok(since(*d, baseline)),
                None => counters.by_slot(slot).map(|d| since(d, baseline)),
            })
            .collect()
    }
}
