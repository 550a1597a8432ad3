//! Rescans off the serve loop: a [`Survey`] walks the cgroup tree and
//! stat()s every path the policies resolve to on a thread of its own (at
//! nice 10: where the agent has one CPU the loop runs first, and a survey
//! still gets a tenth of a CPU against busy neighbours, so rescans are
//! slowed, never starved), while
//! the loop goes on answering hooks, signals and events; the loop then
//! installs what it found and applies the policies in force over it: from
//! the resolution the survey's thread made when that is what a resolve on
//! the loop gives ([`up_to_date`]; debug builds check it), else from a
//! resolve on the loop (cache hits only). On a host with 10,000 cgroups the walk takes hundreds of
//! milliseconds: on the loop, every hook that arrived meanwhile waited for
//! it.
//!
//! What changed while a survey ran wins over what it saw:
//! - a hook's cgroup (and its ancestors) added to the index meanwhile is
//!   added to the survey's index too, and forgotten by its stat cache (a
//!   restarted unit's path has a new id), so installing a survey taken
//!   before a hook never undoes what the hook governed;
//! - when inotify reported a change meanwhile, another survey follows (the
//!   walk may have passed the changed directory before the change);
//! - a survey started before a reload (other selectors) is discarded, and
//!   another one follows; one started before the loop itself walked and
//!   stat()ed afresh (the pod tree after a CRI refresh, a reload, the
//!   `--fail-closed` stand-ins) is older than what the loop holds, and is
//!   discarded.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use log::{debug, error, warn};

use crate::{
    policy::CompiledPolicy,
    workload::{
        cgroupfs::{Hierarchy, ResolveCache},
        cri::Snapshot,
        resolve::{Limits, Outcome, TreeIndex},
    },
};

use super::*;

/// What one walk of the tree found.
pub(super) struct Survey {
    /// Which survey (1, 2, ...), for logs and the tests' gate.
    seq: u64,
    /// [`Surveys::epoch`] when it started: a reload since makes it stale.
    epoch: u64,
    /// `Agent::fresh_resolves` when it started.
    fresh_resolves: u64,
    tree: Option<TreeIndex>,
    cache: ResolveCache,
    writable: HashMap<String, bool>,
    /// What the resolver gave for the first policy set (the policies in
    /// force when it started), with the inputs it had beside the tree and
    /// the caches.
    outcome: Option<Outcome>,
    sets: Arc<Vec<Vec<CompiledPolicy>>>,
    /// `Agent::policies_version` that `sets` is a copy of (`None`: not
    /// known, or a refused set beside it).
    version: Option<u64>,
    limits: Limits,
    took: Duration,
}

/// What a survey needs, copied off the agent (selectors, not port sets).
struct Inputs {
    seq: u64,
    epoch: u64,
    fresh_resolves: u64,
    hierarchy: Hierarchy,
    /// Each policy set to resolve: the current one, and the policies a
    /// rescan could not apply when the `--fail-closed` stand-ins hold.
    sets: Arc<Vec<Vec<CompiledPolicy>>>,
    version: Option<u64>,
    tree: Option<(Vec<&'static str>, usize)>,
    cri: Option<Snapshot>,
    limits: Limits,
}

/// The survey in flight, and what happened while it ran.
#[derive(Default)]
pub(super) struct Surveys {
    running: Option<(u64, tokio::sync::oneshot::Receiver<Survey>)>,
    /// Another survey is due when this one is in.
    again: bool,
    /// Surveys started so far.
    started: u64,
    /// Bumped by every reload: a survey of other selectors is stale.
    epoch: u64,
    /// Paths hooks added to the index while the survey ran.
    hook_paths: std::collections::BTreeSet<String>,
    /// inotify reported a cgroup change while the survey ran.
    changed: bool,
    /// The selector-only copies of the policy sets the last survey took:
    /// taken again while they say the same (copying 10,000 policies took
    /// over a millisecond of the loop for every survey).
    sets: Arc<Vec<Vec<CompiledPolicy>>>,
    /// `Agent::policies_version` that `sets` is a copy of, when no refused
    /// set is beside it: while the agent's is the same, so are the
    /// policies, and 10,000 selectors need not be compared.
    version: Option<u64>,
}

impl Surveys {
    /// Start a survey, or (one runs) start another when it is in.
    pub(super) fn request(&mut self, agent: &Agent) {
        if self.running.is_some() {
            self.again = true;
            return;
        }
        self.again = false;
        self.hook_paths.clear();
        self.changed = false;
        self.started += 1;
        let seq = self.started;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inputs = self.inputs(agent, seq);
        let spawned = std::thread::Builder::new()
            .name("portguard-survey".into())
            .spawn(move || {
                background_priority();
                let _ = tx.send(walk(inputs));
            });
        if let Err(e) = spawned {
            // Never without a rescan: walk on the loop instead.
            warn!("daemon: no thread for cgroup survey {seq} ({e}); walking on the loop");
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(walk(self.inputs(agent, seq)));
            self.running = Some((seq, rx));
            return;
        }
        self.running = Some((seq, rx));
    }

    /// What survey `seq` needs from `agent`.
    fn inputs(&mut self, agent: &Agent, seq: u64) -> Inputs {
        let current = std::iter::once(&agent.policies).chain(agent.refused.as_ref());
        let version = agent.refused.is_none().then_some(agent.policies_version);
        let same = unchanged(version.filter(|v| self.version == Some(*v)), agent, || {
            self.sets.len() == 1 + usize::from(agent.refused.is_some())
                && self
                    .sets
                    .iter()
                    .zip(current.clone())
                    .all(|(kept, set)| same_selectors(kept, set))
        });
        self.version = version;
        if !same {
            self.sets = Arc::new(
                current
                    .map(|set| set.iter().map(selector_only).collect())
                    .collect(),
            );
        }
        Inputs {
            seq,
            epoch: self.epoch,
            fresh_resolves: agent.fresh_resolves,
            hierarchy: Hierarchy::new(agent.hierarchy.root().to_path_buf()),
            sets: Arc::clone(&self.sets),
            version,
            tree: Agent::tree_scope(&agent.policies),
            cri: agent.cri.clone(),
            limits: agent.resolve_limits(&agent.policies),
        }
    }

    /// The survey in flight, when it is in (pending while none runs): its
    /// number, and what it found (`None`: its thread died; the next
    /// change or `--rescan-interval` tries again).
    pub(super) async fn done(&mut self) -> (u64, Option<Survey>) {
        let Some((seq, job)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let r = job.await;
        let seq = *seq;
        self.running = None;
        match r {
            Ok(s) => (seq, Some(s)),
            Err(e) => {
                error!("daemon: cgroup survey {seq} failed: {e}");
                (seq, None)
            }
        }
    }

    /// Surveys started so far (the next one is this plus one).
    pub(super) const fn started(&self) -> u64 {
        self.started
    }

    /// A hook added `paths` to the index (they exist now).
    pub(super) fn hook_added(&mut self, paths: &[String]) {
        if self.running.is_some() {
            self.hook_paths.extend(paths.iter().cloned());
        }
    }

    /// A full resolve and apply must follow (a hook answered at once,
    /// `govern_now`): the survey in flight makes them when it is installed
    /// (it takes the hooks' paths, [`Surveys::hook_added`]), else a new one.
    pub(super) fn follow_up(&mut self, agent: &Agent) {
        if self.running.is_none() {
            self.request(agent);
        }
    }

    /// inotify reported a cgroup change.
    pub(super) fn cgroups_changed(&mut self) {
        if self.running.is_some() {
            self.changed = true;
        }
    }

    /// Another survey is due now (one was asked for while one ran).
    pub(super) fn take_again(&mut self) -> bool {
        std::mem::take(&mut self.again)
    }

    /// After a reload: a survey in flight resolved other selectors (it is
    /// discarded), and the reload resolved from what was known; a survey
    /// follows.
    pub(super) fn reloaded(&mut self, agent: &Agent) {
        self.epoch += 1;
        self.request(agent);
    }

    /// Install `s` into `agent` (see the module's rules) and re-resolve and
    /// apply from it, as a rescan does; a stale survey is discarded.
    pub(super) fn install(&mut self, agent: &mut Agent, mut s: Survey) {
        if s.epoch != self.epoch {
            debug!(
                "daemon: cgroup survey {} predates a reload: discarded",
                s.seq
            );
            self.again = true;
            return;
        }
        if s.fresh_resolves != agent.fresh_resolves {
            debug!(
                "daemon: cgroup survey {} predates the loop's own fresh resolve: discarded",
                s.seq
            );
            self.hook_paths.clear();
            // A change may have come after that resolve too.
            if std::mem::take(&mut self.changed) {
                self.again = true;
            }
            return;
        }
        let hooks = std::mem::take(&mut self.hook_paths);
        let tree_changed = match s.tree.as_mut() {
            Some(tree) => tree.add_paths(hooks.iter().map(String::as_str)),
            None => false,
        };
        // What the survey saw of the hooks' paths, before they are looked
        // up again.
        let seen: Vec<Seen> = hooks
            .iter()
            .map(|p| Seen {
                path: p.clone(),
                stat: s.cache.peek(p),
                open: s.writable.get(p).copied(),
            })
            .collect();
        for p in &hooks {
            s.cache.remove(p);
            s.writable.remove(p);
        }
        if std::mem::take(&mut self.changed) {
            self.again = true;
        }
        // What is replaced is freed off the loop (10,000 paths take a
        // millisecond to free).
        let old_cache = agent.resolve_cache.adopt(s.cache);
        let old_writable = std::mem::replace(&mut agent.writable_cache, s.writable);
        let old_tree = if s.tree.is_some() || !Agent::needs_tree(&agent.policies) {
            agent.watch_inputs += 1;
            std::mem::replace(&mut agent.tree, s.tree)
        } else {
            None
        };
        free_later((old_cache, old_writable, old_tree));
        let t = Instant::now();
        // Settled by the loop once the hooks that came meanwhile are
        // answered (see `serve`).
        let outcome = s
            .outcome
            .take()
            .filter(|_| !tree_changed)
            .and_then(|o| up_to_date(agent, o, &seen, &s.sets, s.version, s.limits));
        let resolved_here = if outcome.is_some() {
            "taken"
        } else {
            "resolved again"
        };
        agent.settle_later = true;
        let _ = agent.rescan_from(false, outcome);
        agent.settle_later = false;
        debug!(
            "daemon: cgroup survey {} installed (walk {:?} off the loop, {} hook paths kept; \
             its resolution {resolved_here}; resolve and apply {:?})",
            s.seq,
            s.took,
            hooks.len(),
            t.elapsed()
        );
    }
}

/// A hook's path as a survey saw it: its id and level (`None`: not looked
/// up; `Some(None)`: absent) and whether others may write it (`None`: not
/// asked).
struct Seen {
    path: String,
    stat: Option<Option<(u64, u32)>>,
    open: Option<bool>,
}

/// The survey's resolution `o` of the policies in force, as a resolve on
/// the loop would give it now (the survey's tree and caches installed, the
/// hooks' paths looked up again); `None` where only that resolve can say.
///
/// The resolver reads a path's id only to tell cgroups apart (on cgroup2
/// no two paths share one, and ids are not reused): a hook's path that is
/// still there as a new directory (a restart) is the same candidate with
/// another id, placed the same way, so `o` holds with that id put in. A path that came or went, a
/// directory whose writers changed (delegated subtrees), a tree index the
/// hooks added to, other policies, bounds or a CRI snapshot (`pods:`) all
/// take the full resolve. Debug builds check every outcome taken against
/// it (`Agent::rescan_from`).
fn up_to_date(
    agent: &mut Agent,
    mut o: Outcome,
    seen: &[Seen],
    sets: &[Vec<CompiledPolicy>],
    version: Option<u64>,
    limits: Limits,
) -> Option<Outcome> {
    let same_policies = unchanged(version, agent, || {
        sets.first()
            .is_some_and(|set| same_selectors(set, &agent.policies))
    });
    if agent.refused.is_some()
        || Agent::needs_cri(&agent.policies)
        || !same_policies
        || agent.resolve_limits(&agent.policies) != limits
    {
        return None;
    }
    let mut moved: Vec<(&str, u64)> = Vec::new();
    for h in seen {
        if let Some(open) = h.open {
            if agent.hierarchy.open_to_others(&h.path) != open {
                return None;
            }
            agent.writable_cache.insert(h.path.clone(), open);
        }
        let Some(before) = h.stat else {
            // No candidate of these policies over this tree.
            continue;
        };
        let now = agent.hierarchy.resolve(&h.path).ok()?;
        match (before, now) {
            (Some(b), Some(n)) if b.1 == n.1 => {
                if b.0 != n.0 {
                    moved.push((&h.path, n.0));
                }
            }
            (None, None) => {}
            _ => return None,
        }
        agent.resolve_cache.get_or(&h.path, || now);
    }
    if !moved.is_empty() {
        for g in o.resolution.iter_mut().flatten() {
            if let Some((_, id)) = moved.iter().find(|(p, _)| *p == g.path) {
                g.id = *id;
            }
        }
    }
    Some(o)
}

/// Whether copies taken at `Agent::policies_version` `version` still
/// select as the agent's policies do: while the version is the agent's,
/// without comparing (debug builds compare all the same); else `alike`.
fn unchanged(version: Option<u64>, agent: &Agent, alike: impl Fn() -> bool) -> bool {
    if version == Some(agent.policies_version) {
        debug_assert!(alike(), "policies_version kept over other selectors");
        true
    } else {
        alike()
    }
}

/// `kept` selects as `set` does, policy by policy.
fn same_selectors(kept: &[CompiledPolicy], set: &[CompiledPolicy]) -> bool {
    kept.len() == set.len() && kept.iter().zip(set).all(|(k, p)| selects_alike(k, p))
}

/// A policy's selector and name, without its port sets (a survey only
/// resolves which cgroups it governs).
fn selector_only(p: &CompiledPolicy) -> CompiledPolicy {
    CompiledPolicy {
        name: p.name.clone(),
        selector: p.selector.clone(),
        mode: p.mode,
        bind: None,
        connect: None,
        allow_sockets: p.allow_sockets,
        delegated: p.delegated,
    }
}

/// `kept` is [`selector_only`] of `p` (compared without copying).
fn selects_alike(kept: &CompiledPolicy, p: &CompiledPolicy) -> bool {
    kept.name == p.name
        && kept.selector == p.selector
        && kept.mode == p.mode
        && kept.allow_sockets == p.allow_sockets
        && kept.delegated == p.delegated
}

/// A survey thread's nice value (see the module's notes).
const SURVEY_NICE: libc::c_int = 10;

/// Lower the calling thread's priority to [`SURVEY_NICE`] (raising a nice
/// value needs no privilege); a failure leaves it as it was.
fn background_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, SURVEY_NICE)
    };
    if rc != 0 {
        debug!(
            "daemon: cgroup survey thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The survey itself, on a thread of its own.
fn walk(i: Inputs) -> Survey {
    let started = Instant::now();
    let root = i.hierarchy.root().to_path_buf();
    let tree = i
        .tree
        .as_ref()
        .map(|(starts, depth)| TreeIndex::scan(&root, starts, *depth));
    let empty = TreeIndex::default();
    let mut cache = ResolveCache::default();
    let mut writable = HashMap::new();
    let mut outcome = None;
    for set in i.sets.iter() {
        let o = resolve_on_disk(
            &i.hierarchy,
            set,
            tree.as_ref().unwrap_or(&empty),
            i.cri.as_ref(),
            (&mut cache, &mut writable),
            i.limits,
        );
        outcome.get_or_insert(o);
    }
    let took = started.elapsed();
    test_gate(i.seq);
    Survey {
        seq: i.seq,
        epoch: i.epoch,
        fresh_resolves: i.fresh_resolves,
        tree,
        cache,
        writable,
        outcome,
        sets: i.sets,
        version: i.version,
        limits: i.limits,
        took,
    }
}

/// Debug builds only: park survey `seq` after its walk
/// ([`crate::testgate`], `PORTGUARD_TEST_SURVEY_GATE`).
fn test_gate(seq: u64) {
    crate::testgate::park("PORTGUARD_TEST_SURVEY_GATE", seq);
}
