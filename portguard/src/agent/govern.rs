//! Hooks' "govern this cgroup now" ([`crate::hook::protocol::Govern`]):
//! answered in the serve loop, after asking the runtime and rescanning,
//! from what the kernel maps hold. And the files the agent shares with the
//! hooks in the status socket's directory: the pods its policies select
//! (for a hook's `--on-failure auto`) and the failures hooks spooled while
//! it did not answer, reported as `hook_failed` events.

use std::time::{Duration, Instant};

use log::{debug, error, warn};

use crate::{
    events::EventWriter,
    hook::{
        protocol::{Govern, HookKind, Pending, Reply},
        spool,
    },
    policy::Selector,
    workload::{cgroupfs::ancestors, identity},
};

use super::*;

/// How long a govern request for a container waits for the CRI runtime to
/// list it (it does from `CreateContainer`, before its hook runs; this
/// covers a runtime slow to answer).
const GOVERN_CRI_WAIT: Duration = Duration::from_millis(300);

/// Answer every queued govern request: ask the runtime (when `pods:`
/// policies need it), add the hooks' cgroups to the index, apply, and
/// answer each from the kernel maps, as soon as it can be answered.
pub(super) async fn govern_batch(
    agent: &mut Agent,
    batch: Vec<(Pending, Instant)>,
    rx: &mut tokio::sync::mpsc::Receiver<Pending>,
    cri: &mut CriLink,
    surveys: &mut Surveys,
    opts: &RunOptions,
) {
    let mut pending: Vec<(Pending, Instant, Option<String>)> =
        batch.into_iter().map(|(p, t)| (p, t, None)).collect();
    while let Ok(p) = rx.try_recv() {
        pending.push((p, Instant::now(), None));
    }
    // Each cgroup as this agent sees it; the cgroups and their ancestors
    // join the index: no walk of the whole tree (thousands of cgroups) on a
    // workload's start path.
    let mut paths = Vec::new();
    for (p, _, path) in &mut pending {
        *path = agent.cgroup_path(&p.request);
        if let Some(path) = path.as_deref() {
            paths.extend(ancestors(path).filter(|a| *a != "/").map(str::to_owned));
        }
    }
    // Already governed by a policy of its own, as the kernel says: nothing
    // to ask or apply (a hook run twice, a unit restarted in place).
    let mut rest = Vec::new();
    for (p, since, path) in pending {
        match path
            .as_deref()
            .and_then(|path| agent.already_governed(&p.request, path))
        {
            // The hook may have given up: nothing to do then.
            Some(reply) => drop(p.reply.send(agent.answered(&p.request, reply, since))),
            None => rest.push((p, since, path)),
        }
    }
    let pending = rest;
    if pending.is_empty() {
        return;
    }
    if let Some(tree) = agent.tree.as_mut() {
        tree.add_paths(paths.iter().map(String::as_str));
        agent.watch_inputs += 1;
    }
    // A survey in flight may predate these cgroups: it must not undo them.
    surveys.hook_added(&paths);
    agent.forget_cached(&paths);
    // A cgroup a policy names itself is governed and answered at once; a
    // survey makes the full resolve and apply (the same restart's inotify
    // event asks for one anyway): the loop stays free for the next hook.
    let mut rest = Vec::new();
    for (p, since, path) in pending {
        match path
            .as_deref()
            .and_then(|path| agent.govern_now(&p.request, path))
        {
            Some(reply) => drop(p.reply.send(agent.answered(&p.request, reply, since))),
            None => rest.push((p, since, path)),
        }
    }
    if rest.is_empty() {
        // Let the socket's tasks write the answers first.
        tokio::task::yield_now().await;
        crate::testgate::park_next("PORTGUARD_TEST_GOVERN_NOW_GATE");
        surveys.follow_up(agent);
        return;
    }
    let mut pending = rest;
    let needs_cri = Agent::needs_cri(&agent.policies);
    let until = Instant::now() + GOVERN_CRI_WAIT;
    loop {
        if needs_cri {
            // Bounded: a runtime that hangs must not hold every hook.
            let left = until
                .saturating_duration_since(Instant::now())
                .max(GOVERN_CRI_MIN);
            let refresh = refresh_cri(agent, &mut cri.client, &opts.cri_socket);
            if tokio::time::timeout(left, refresh).await.is_err() {
                cri.client = None;
                warn!("daemon: the CRI runtime did not answer a hook's refresh within {left:?}");
            }
            agent.provisional_containers(&pending);
        }
        // Looked at again after the runtime's answer, too.
        agent.forget_cached(&paths);
        // Answered before the bookkeeping (logs, event paths, status facts),
        // which follows at once (`Agent::settle`).
        agent.settle_later = true;
        let applied = agent.rescan_with(false);
        agent.settle_later = false;
        // Answer what can be answered; a container (not a sandbox: its pod
        // is listed only once the sandbox runs) the runtime does not list
        // yet waits a little for it.
        let mut waiting = Vec::new();
        for (p, since, path) in pending {
            let r = &p.request;
            let wait = needs_cri
                && applied.is_ok()
                && r.hook == HookKind::Oci
                && !r.sandbox
                && Instant::now() < until
                && path.as_deref().is_some_and(|path| !agent.identified(path));
            if wait {
                waiting.push((p, since, path));
            } else {
                let reply = agent.answer_govern(r, path.as_deref(), applied.as_ref().err(), since);
                let _ = p.reply.send(reply);
            }
        }
        if waiting.is_empty() {
            break;
        }
        settle_after_answers(agent).await;
        pending = waiting;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle_after_answers(agent).await;
}

/// Let the socket's tasks write the answers just sent (they share this
/// thread, which would otherwise go on to the bookkeeping first), then
/// settle the apply.
async fn settle_after_answers(agent: &mut Agent) {
    tokio::task::yield_now().await;
    crate::testgate::park_next("PORTGUARD_TEST_SETTLE_GATE");
    agent.settle();
}

/// The least time a hook's CRI refresh is given.
const GOVERN_CRI_MIN: Duration = Duration::from_millis(50);

impl Agent {
    /// Look `paths` (the hooks' cgroups and their ancestors) up again when
    /// next asked: a restarted unit's path has a new id. The rest is as the
    /// last rescan left it, and the next one refreshes it.
    fn forget_cached(&mut self, paths: &[String]) {
        for p in paths {
            self.resolve_cache.remove(p);
            self.writable_cache.remove(p);
        }
    }

    /// Whether the agent knows who the cgroup at `path` is: no `pods:`
    /// policy needs the runtime, or the runtime lists its pod and
    /// container.
    pub(super) fn identified(&self, path: &str) -> bool {
        if !Self::needs_cri(&self.policies) {
            return true;
        }
        let who = identity::parse(path);
        let Some(uid) = who.pod_uid else {
            return true;
        };
        let Some(cri) = &self.cri else {
            return false;
        };
        let Some(pod) = cri.pod_by_uid(&uid) else {
            return false;
        };
        who.container_id
            .is_none_or(|c| c == pod.sandbox_id || cri.container(&c).is_some())
    }

    /// The policy governing `path` (itself or its nearest governed
    /// ancestor) as the agent applied it, and that ancestor.
    pub(super) fn applied_governor(&self, path: &str) -> Option<(String, String)> {
        // Scanned for the few ancestors' ids, not indexed: an index of every
        // governed cgroup, built per request, cost milliseconds at 10,000.
        // The holds win over the policies, the later policy over the earlier
        // (as the kernel maps are written).
        let has =
            |govs: &[crate::workload::resolve::Governed], id: u64| govs.iter().any(|g| g.id == id);
        self.walk_up(path, |id| {
            if has(&self.quarantine, id) {
                return Some(IDENTIFYING.to_owned());
            }
            if has(&self.unfit_hold, id) {
                return Some(UNFIT.to_owned());
            }
            if let Some((i, _)) = self.provisional.iter().find(|(_, g)| g.id == id) {
                return self.policies.get(*i).map(|p| p.name.clone());
            }
            self.policies
                .iter()
                .zip(&self.resolved)
                .rev()
                .find(|(_, govs)| has(govs, id))
                .map(|(p, _)| p.name.clone())
        })
    }

    /// The policy the kernel maps give `path` (itself or its nearest
    /// governed ancestor), and that ancestor.
    pub(super) fn kernel_governor(&self, path: &str) -> Result<Option<(String, String)>, String> {
        let mut err = None;
        let found = self.walk_up(path, |id| match self.loaded.maps.policy_of(id) {
            Ok(Some(pid)) => Some(
                self.names
                    .get(pid)
                    .map_or_else(|| format!("policy id {pid}"), str::to_owned),
            ),
            Ok(None) => None,
            Err(e) => {
                err.get_or_insert_with(|| format!("reading the kernel's cgroup map: {e}"));
                None
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }

    /// The first of `path` and its ancestors (deepest first) for which
    /// `f(cgroup id)` answers, with that cgroup's path.
    fn walk_up(
        &self,
        path: &str,
        mut f: impl FnMut(u64) -> Option<String>,
    ) -> Option<(String, String)> {
        ancestors(path).find_map(|here| {
            let (id, _) = self.hierarchy.resolve(here).ok()??;
            Some((f(id)?, here.to_owned()))
        })
    }

    /// The path of a request's cgroup as this agent sees it: by id, else
    /// the hook's path if it names the same cgroup here (without
    /// CAP_DAC_READ_SEARCH ids cannot be looked up).
    pub(super) fn cgroup_path(&mut self, req: &Govern) -> Option<String> {
        if let Some(p) = self.hierarchy.path_of(req.cgroup_id) {
            return Some(p);
        }
        match self.hierarchy.resolve(&req.cgroup) {
            Ok(Some((id, _))) if id == req.cgroup_id => Some(req.cgroup.clone()),
            _ => None,
        }
    }

    /// Containers of the requests that the runtime does not list yet but
    /// whose pod and sandbox it does (CRI-O lists a container only once its
    /// hooks have run): known by the id in the cgroup path (the kernel's),
    /// the pod by the uid there, and the name the runtime's annotations
    /// give, which the pod's own spec chose anyway. The next answer of the
    /// runtime replaces them.
    fn provisional_containers(&mut self, pending: &[(Pending, Instant, Option<String>)]) {
        let Some(cri) = self.cri.as_mut() else {
            return;
        };
        for (p, _, path) in pending {
            let r = &p.request;
            let Some(path) = path.as_deref() else {
                continue;
            };
            let who = identity::parse(path);
            let (Some(uid), Some(cid)) = (who.pod_uid, who.container_id) else {
                continue;
            };
            if r.sandbox || cri.container(&cid).is_some() {
                continue;
            }
            let Some(pod) = cri.pod_by_uid(&uid) else {
                continue;
            };
            let consistent = cid != pod.sandbox_id
                && r.container_id.as_deref() == Some(cid.as_str())
                && r.sandbox_id.as_deref() == Some(pod.sandbox_id.as_str());
            let Some(name) = r.container_name.clone().filter(|_| consistent) else {
                continue;
            };
            debug!(
                "daemon: container {cid} ({name}) of pod {uid} named by its hook before the \
                 runtime lists it"
            );
            let sandbox_id = pod.sandbox_id.clone();
            cri.containers.push(crate::workload::cri::Container {
                id: cid,
                sandbox_id,
                name,
            });
        }
    }

    /// The answer to one govern request (after the rescan): `path` is the
    /// cgroup as this agent sees it, `failed` why applying failed.
    pub(super) fn answer_govern(
        &mut self,
        req: &Govern,
        path: Option<&str>,
        failed: Option<&String>,
        since: Instant,
    ) -> Reply {
        let reply = match (path, failed) {
            (None, _) => Reply::error(
                req.cgroup_id,
                format!(
                    "no cgroup with id {} (the hook saw {}) in this agent's cgroup2 hierarchy \
                     {}: it is gone, or the agent runs on another one",
                    req.cgroup_id,
                    req.cgroup,
                    self.hierarchy.root().display()
                ),
            ),
            (Some(_), Some(e)) => Reply::error(req.cgroup_id, e.clone()),
            (Some(path), None) => self.answer_inner(req, path),
        };
        self.answered(req, reply, since)
    }

    /// An answer as sent: timed (the request taken at `since`), counted and
    /// logged.
    fn answered(&self, req: &Govern, reply: Reply, since: Instant) -> Reply {
        let took = since.elapsed();
        let reply = Reply {
            micros: took.as_micros() as u64,
            ..reply
        };
        let ok = reply.ok;
        self.shared.update(|f| {
            let h = &mut f.runtime_hooks;
            h.requests += 1;
            h.refused += u64::from(!ok);
            h.seconds += took.as_secs_f64();
            h.slowest = h.slowest.max(took.as_secs_f64());
        });
        if ok {
            debug!(
                "daemon: {} hook: {} governed by {:?} (answered in {took:?})",
                req.hook.as_str(),
                reply.cgroup,
                reply.policy
            );
        } else {
            warn!(
                "daemon: {} hook for {}: {}",
                req.hook.as_str(),
                crate::observe::text::escape(&req.cgroup),
                reply.error.as_deref().unwrap_or("?")
            );
        }
        reply
    }

    /// The answer for a cgroup a policy governs itself (not through an
    /// ancestor), as the kernel says, with nothing left to identify: no
    /// rescan can change what governs it short of a reload.
    fn already_governed(&mut self, req: &Govern, path: &str) -> Option<Reply> {
        if !self.identified(path) {
            return None;
        }
        let (_, at) = self.applied_governor(path)?;
        if at != path {
            return None;
        }
        let reply = self.answer_inner(req, path);
        reply.ok.then_some(reply)
    }

    pub(super) fn answer_inner(&mut self, req: &Govern, path: &str) -> Reply {
        let path = path.to_owned();
        let applied = self.applied_governor(&path);
        let kernel = match self.kernel_governor(&path) {
            Ok(k) => k,
            Err(e) => return Reply::error(req.cgroup_id, e),
        };
        let mut reply = Reply {
            ok: true,
            cgroup: path.clone(),
            cgroup_id: req.cgroup_id,
            identified: self.identified(&path),
            ..Reply::default()
        };
        if kernel != applied {
            let name = |g: &Option<(String, String)>| {
                g.as_ref().map_or("no policy".to_owned(), |(n, at)| {
                    format!("`{n}` (from {at})")
                })
            };
            reply.ok = false;
            reply.error = Some(format!(
                "the kernel maps give {path} {}, but the agent's policy gives it {} (an apply \
                 failed: see the agent's log)",
                name(&kernel),
                name(&applied)
            ));
        }
        if let Some((policy, at)) = kernel {
            reply.policy = Some(policy);
            reply.policy_cgroup = Some(at);
        }
        reply
    }

    /// Tell hooks which pods the policies select (after each apply), when
    /// it changed.
    pub(super) fn publish_selection(&mut self) {
        let Some(dir) = self.hook_dir.clone() else {
            return;
        };
        let mut pods: Vec<String> = self
            .policies
            .iter()
            .zip(&self.resolved)
            .filter(|(p, _)| matches!(p.selector, Selector::Pods(_)))
            .flat_map(|(_, govs)| govs.iter())
            .chain(&self.quarantine)
            .filter_map(|g| identity::parse(&g.path).pod_uid)
            .collect();
        pods.sort();
        pods.dedup();
        let mut namespaces: Vec<String> = self
            .policies
            .iter()
            .filter_map(|p| match &p.selector {
                Selector::Pods(s) => Some(s.namespace.clone().unwrap_or_else(|| "*".into())),
                _ => None,
            })
            .collect();
        namespaces.sort();
        namespaces.dedup();
        if self
            .selection_published
            .as_ref()
            .is_some_and(|(p, n)| *p == pods && *n == namespaces)
        {
            return;
        }
        let sel = spool::Selection {
            time: events::format_time(std::time::SystemTime::now()),
            pods: pods.clone(),
            namespaces: namespaces.clone(),
        };
        match spool::write_selection(&dir, &sel) {
            Ok(()) => self.selection_published = Some((pods, namespaces)),
            Err(e) => warn!(
                "daemon: cannot write {}: {e}; a hook that cannot reach the agent fails open",
                dir.join(spool::SELECTION_FILE).display()
            ),
        }
    }

    /// Report the failures hooks left in the spool while the agent did not
    /// answer: one `hook_failed` event each.
    pub(super) fn report_hook_failures(&mut self, writer: &mut EventWriter) {
        let Some(dir) = self.hook_dir.as_deref() else {
            return;
        };
        let (records, bad) = match spool::drain(dir) {
            Ok(r) => r,
            Err(e) => {
                debug!("daemon: reading the hook spool in {}: {e}", dir.display());
                return;
            }
        };
        if bad > 0 {
            warn!(
                "daemon: {bad} unreadable line(s) in {}",
                dir.join(spool::SPOOL_FILE).display()
            );
        }
        for mut rec in records {
            rec.host.clone_from(&self.host);
            rec.verdict = "hook_failed".into();
            error!(
                "daemon: {} hook FAILED for {} ({}): {}",
                crate::observe::text::escape(&rec.hook),
                crate::observe::text::escape(&rec.cgroup),
                crate::observe::text::escape(&rec.action),
                crate::observe::text::escape(&rec.reason)
            );
            let key = (rec.hook.clone(), rec.action.clone());
            self.shared
                .update(|f| *f.runtime_hooks.failures.entry(key).or_default() += 1);
            let _ = writer.line(&rec);
        }
        let _ = writer.flush();
    }
}
