//! Rescans off the serve loop: a [`Survey`] walks the cgroup tree and
//! stat()s every path the policies resolve to on a thread of its own (at
//! nice 10: where the agent has one CPU the loop runs first, and a survey
//! still gets a tenth of a CPU against busy neighbours, so rescans are
//! slowed, never starved), while
//! the loop goes on answering hooks, signals and events; the loop then
//! installs what it found and re-resolves from it (cache hits only) and
//! applies. On a host with 10,000 cgroups the walk takes hundreds of
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
    time::{Duration, Instant},
};

use log::{debug, error, warn};

use crate::{
    policy::CompiledPolicy,
    workload::{
        cgroupfs::{Hierarchy, ResolveCache},
        cri::Snapshot,
        resolve::{Limits, TreeIndex},
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
    sets: Vec<Vec<CompiledPolicy>>,
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
    fn inputs(&self, agent: &Agent, seq: u64) -> Inputs {
        Inputs {
            seq,
            epoch: self.epoch,
            fresh_resolves: agent.fresh_resolves,
            hierarchy: Hierarchy::new(agent.hierarchy.root().to_path_buf()),
            sets: std::iter::once(&agent.policies)
                .chain(agent.refused.as_ref())
                .map(|set| set.iter().map(selector_only).collect())
                .collect(),
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
        if let Some(tree) = s.tree.as_mut() {
            tree.add_paths(hooks.iter().map(String::as_str));
        }
        for p in &hooks {
            s.cache.remove(p);
            s.writable.remove(p);
        }
        if std::mem::take(&mut self.changed) {
            self.again = true;
        }
        agent.resolve_cache.adopt(s.cache);
        agent.writable_cache = s.writable;
        if s.tree.is_some() || !Agent::needs_tree(&agent.policies) {
            agent.tree = s.tree;
            agent.watch_inputs += 1;
        }
        let t = Instant::now();
        let _ = agent.rescan_with(false);
        debug!(
            "daemon: cgroup survey {} installed (walk {:?} off the loop, {} hook paths kept; \
             resolve and apply {:?})",
            s.seq,
            s.took,
            hooks.len(),
            t.elapsed()
        );
    }
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
    for set in &i.sets {
        let _ = resolve_on_disk(
            &i.hierarchy,
            set,
            tree.as_ref().unwrap_or(&empty),
            i.cri.as_ref(),
            (&mut cache, &mut writable),
            i.limits,
        );
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
        took,
    }
}

/// Debug builds only: park survey `seq` after its walk
/// ([`crate::testgate`], `PORTGUARD_TEST_SURVEY_GATE`).
fn test_gate(seq: u64) {
    crate::testgate::park("PORTGUARD_TEST_SURVEY_GATE", seq);
}
