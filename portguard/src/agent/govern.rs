//! Hooks' "govern this cgroup now" ([`crate::hook::protocol::Govern`]):
//! answered in the serve loop, after asking the runtime and rescanning,
//! from what the kernel maps hold. And the files the agent shares with the
//! hooks in the status socket's directory: the pods its policies select
//! (for a hook's `--on-failure auto`) and the failures hooks spooled while
//! it did not answer, reported as `hook_failed` events.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use log::{debug, error, warn};

use crate::{
    events::EventWriter,
    hook::{
        protocol::{Govern, HookKind, Pending, Reply},
        spool,
    },
    policy::Selector,
    workload::identity,
};

use super::*;

/// How long a govern request for a container waits for the CRI runtime to
/// list it (it does from `CreateContainer`, before its hook runs; this
/// covers a runtime slow to answer).
const GOVERN_CRI_WAIT: Duration = Duration::from_millis(300);

/// Answer every queued govern request: ask the runtime (when `pods:`
/// policies need it), rescan, and answer each from the kernel maps.
pub(super) async fn govern_batch(
    agent: &mut Agent,
    mut batch: Vec<(Pending, Instant)>,
    rx: &mut tokio::sync::mpsc::Receiver<Pending>,
    cri: &mut CriLink,
    opts: &RunOptions,
) {
    while let Ok(p) = rx.try_recv() {
        batch.push((p, Instant::now()));
    }
    // The hooks' cgroups and their ancestors join the index: no walk of
    // the whole tree (thousands of cgroups) on a workload's start path.
    let mut paths = Vec::new();
    for (p, _) in &batch {
        if let Some(path) = agent.hierarchy.path_of(p.request.cgroup_id) {
            let mut at = path.as_str();
            while let Some(i) = at.rfind('/').filter(|i| *i > 0) {
                paths.push(at.to_owned());
                at = &at[..i];
            }
            paths.push(at.to_owned());
        }
    }
    if let Some(tree) = agent.tree.as_mut() {
        tree.add_paths(paths.iter().map(String::as_str));
    }
    let needs_cri = Agent::needs_cri(&agent.policies);
    let until = Instant::now() + GOVERN_CRI_WAIT;
    loop {
        if needs_cri {
            refresh_cri(agent, &mut cri.client, &opts.cri_socket).await;
        }
        agent.resolve_cache.clear();
        agent.writable_cache.clear();
        agent.rescan_with(false);
        // A container (not a sandbox: its pod is listed only once the
        // sandbox runs) the runtime does not list yet: ask again shortly.
        let waiting = batch.iter().any(|(p, _)| {
            let r = &p.request;
            r.hook == HookKind::Oci
                && !r.sandbox
                && !agent
                    .hierarchy
                    .path_of(r.cgroup_id)
                    .is_some_and(|path| agent.identified(&path))
        });
        if !needs_cri || !waiting || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (p, since) in batch {
        let reply = agent.answer_govern(&p.request, since);
        let _ = p.reply.send(reply);
    }
}

impl Agent {
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
    fn applied_governor(&self, path: &str) -> Option<(String, String)> {
        let mut by_id: HashMap<u64, &str> = HashMap::new();
        for (p, govs) in self.policies.iter().zip(&self.resolved) {
            for g in govs {
                by_id.insert(g.id, &p.name);
            }
        }
        for g in &self.unfit_hold {
            by_id.insert(g.id, UNFIT);
        }
        for g in &self.quarantine {
            by_id.insert(g.id, IDENTIFYING);
        }
        self.walk_up(path, |id| by_id.get(&id).map(|n| (*n).to_owned()))
    }

    /// The policy the kernel maps give `path` (itself or its nearest
    /// governed ancestor), and that ancestor.
    fn kernel_governor(&self, path: &str) -> Result<Option<(String, String)>, String> {
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
        let mut at = path.trim_end_matches('/').to_owned();
        loop {
            let here = if at.is_empty() { "/" } else { at.as_str() };
            if let Ok(Some((id, _))) = self.hierarchy.resolve(here)
                && let Some(name) = f(id)
            {
                return Some((name, here.to_owned()));
            }
            match at.rfind('/') {
                Some(i) if !at.is_empty() => at.truncate(i),
                _ => return None,
            }
        }
    }

    /// The answer to one govern request (after the rescan).
    pub(super) fn answer_govern(&mut self, req: &Govern, since: Instant) -> Reply {
        let reply = self.answer_inner(req);
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
                req.cgroup,
                reply.error.as_deref().unwrap_or("?")
            );
        }
        reply
    }

    fn answer_inner(&mut self, req: &Govern) -> Reply {
        let path = match self.hierarchy.path_of(req.cgroup_id) {
            Some(p) => p,
            // Without CAP_DAC_READ_SEARCH ids cannot be looked up: the
            // hook's path, if it names the same cgroup here.
            None => match self.hierarchy.resolve(&req.cgroup) {
                Ok(Some((id, _))) if id == req.cgroup_id => req.cgroup.clone(),
                _ => {
                    return Reply::error(
                        req.cgroup_id,
                        format!(
                            "no cgroup with id {} (the hook saw {}) in this agent's cgroup2 \
                             hierarchy {}: it is gone, or the agent runs on another one",
                            req.cgroup_id,
                            req.cgroup,
                            self.hierarchy.root().display()
                        ),
                    );
                }
            },
        };
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
