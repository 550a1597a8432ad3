//! Reloads (SIGHUP, a changed policy file), the full re-parse that
//! confirms an incremental one, cgroup rescans and the host's ephemeral
//! port range.

use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use sd_notify::NotifyState;

use crate::{
    apply::{ApplyError, ApplyReport, Target},
    policy::{
        CompiledPolicy, PolicyError, Reparse, Replaced, compile, compile_all, parse_policy_text,
        read_policy_file,
    },
    workload::sockets,
};

use super::*;

impl Agent {
    /// Read, validate and apply the policy file; on any error the previous
    /// policy stays in force.
    pub(super) fn reload(&mut self, why: &str) {
        // A survey's apply left unsettled (`serve`) publishes its facts
        // first: a rules-only reload publishes over them, never under them.
        self.settle();
        let started = Instant::now();
        sd_notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        ]);
        let result = self.reload_inner(started);
        match result {
            Ok((report, how, replaced)) => {
                let status = format!(
                    "enforcing {} policies (generation {}, reloaded on {why})",
                    report.policies, report.generation
                );
                let how = match how {
                    Reparse::Unchanged => "file unchanged".to_owned(),
                    Reparse::Entry { index } => format!(
                        "only policy `{}` changed",
                        self.policies.get(index).map_or("?", |p| p.name.as_str())
                    ),
                    Reparse::Full => "full parse".to_owned(),
                };
                info!(
                    "daemon: reloaded {} on {why} ({how}): {} policies, {} governed cgroups, {} port sets ({} written, {} freed), {} records and {} cgroup entries written, in {:.1} ms",
                    self.policy_path.display(),
                    report.policies,
                    report.cgroups,
                    report.sets_total,
                    report.sets_written,
                    report.sets_deleted,
                    report.records_written,
                    report.cgroups_written,
                    started.elapsed().as_secs_f64() * 1e3
                );
                sd_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                self.health.set_ready(&status);
                self.shared.update(|f| {
                    f.reloads_ok += 1;
                    f.status.clone_from(&status);
                });
                // The previous parse (the whole of it after a full parse):
                // freed once READY=1 is out.
                drop(replaced);
                release_free_memory();
            }
            Err(e) => {
                let status = if self.failed_closed() {
                    error!("daemon: reload on {why} could not be applied: {e:#}");
                    format!(
                        "reload failed; FAIL-CLOSED: binds denied in the cgroups of {} policies",
                        self.policies.len()
                    )
                } else {
                    error!(
                        "daemon: reload on {why} rejected; the previous policy stays in force: {e:#}"
                    );
                    format!(
                        "reload failed; previous policy ({} policies) still enforced",
                        self.policies.len()
                    )
                };
                sd_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                self.health.set_ready(&status);
                self.shared.update(|f| {
                    f.reloads_failed += 1;
                    f.status.clone_from(&status);
                });
            }
        }
    }

    pub(super) fn reload_inner(
        &mut self,
        started: Instant,
    ) -> anyhow::Result<(ApplyReport, Reparse, Option<Replaced>)> {
        let text = read_policy_file(&self.policy_path)?;
        // A new file replaces whatever a rescan could not apply.
        self.refused = None;
        let invalid = |diagnostics| PolicyError::Invalid {
            path: self.policy_path.clone(),
            diagnostics,
        };
        // Re-parsed in place: what it replaced is put back unless the
        // result is applied (or held by the --fail-closed stand-ins).
        let (how, replaced) = match &mut self.parsed {
            Some(prev) => {
                let (how, replaced) = prev.reparse(text).map_err(invalid)?;
                (how, Some(replaced))
            }
            None => {
                self.parsed = Some(parse_policy_text(text).map_err(invalid)?);
                (Reparse::Full, None)
            }
        };
        match self.apply_parsed(started, how) {
            Ok(report) => {
                self.verify_pending = matches!(how, Reparse::Entry { .. });
                Ok((report, how, replaced))
            }
            Err(Failed { error, in_force }) => {
                if !in_force {
                    match (replaced, &mut self.parsed) {
                        (Some(replaced), Some(parsed)) => parsed.restore(replaced),
                        (None, _) => self.parsed = None,
                        (Some(_), None) => {}
                    }
                }
                Err(error)
            }
        }
    }

    /// Compile and apply the policy file just parsed (`how` says what
    /// changed).
    fn apply_parsed(&mut self, started: Instant, how: Reparse) -> Result<ApplyReport, Failed> {
        let Some(file) = self.parsed.as_ref().map(|p| &p.file) else {
            return Err(Failed::rejected(anyhow::anyhow!("no policy file parsed")));
        };
        let parse_done = started.elapsed();
        let policies = match how {
            // Reuse the compiled form of every untouched policy.
            Reparse::Entry { index } if self.policies.len() == file.policies.len() => {
                let mut one = [compile(&file.policies[index])];
                crate::policy::apply_reserved(&mut one, &file.reserved);
                let [one] = one;
                if self.resolution_holds(index, &one) {
                    return self.reload_entry(index, one, started, parse_done);
                }
                let mut p = self.policies.clone();
                p[index] = one;
                p
            }
            _ => {
                let mut p = compile_all(&file.policies);
                crate::policy::apply_reserved(&mut p, &file.reserved);
                p
            }
        };
        check_scope(&policies, &self.attach_cgroup).map_err(Failed::rejected)?;
        let compiled = started.elapsed();
        let resolved = self.resolve(&policies, how == Reparse::Unchanged);
        let resolved_at = started.elapsed();
        let report = match self.apply(policies.clone(), resolved) {
            Ok(r) => r,
            Err(e) => return Err(self.apply_failed(&policies, e)),
        };
        debug!(
            "daemon: reload phases ({how:?}): parse {:?}, compile {:?}, resolve {:?}, apply {:?}",
            parse_done,
            compiled - parse_done,
            resolved_at - compiled,
            started.elapsed() - resolved_at
        );
        Ok(report)
    }

    /// Whether resolving the policies with `policy` in place of policy
    /// `index` would give `resolved` again: its name, selector and
    /// delegation are those of the policy it replaces, every policy selects
    /// by `cgroup:` (nothing but the resolve cache is read), that cache has
    /// not changed since `resolved` was resolved, and nothing is held by a
    /// built-in policy.
    fn resolution_holds(&self, index: usize, policy: &CompiledPolicy) -> bool {
        let Some(old) = self.policies.get(index) else {
            return false;
        };
        old.name == policy.name
            && old.selector == policy.selector
            && old.delegated == policy.delegated
            && self.resolved_with == Some(self.resolve_cache.changes())
            && self.resolved.len() == self.policies.len()
            && self.policy_ids.len() == self.policies.len()
            && self.quarantine.is_empty()
            && self.unfit_hold.is_empty()
            && self.provisional.is_empty()
            && self.cri.is_none()
            && !self.failed_closed()
    }

    /// Apply a reload that changed the rules or mode of policy `index`
    /// alone, when [`Agent::resolution_holds`]: what [`Agent::apply`] would
    /// do with the same policies and `resolved`, in work that does not grow
    /// with the number of policies (the applier plans from the live
    /// generation, `Applier::apply_one`; the facts of the other policies
    /// stay as published).
    fn reload_entry(
        &mut self,
        index: usize,
        policy: CompiledPolicy,
        started: Instant,
        parse_done: Duration,
    ) -> Result<ApplyReport, Failed> {
        // The same names and selectors as the policies in force.
        check_scope(&self.policies, &self.attach_cgroup).map_err(Failed::rejected)?;
        let compiled = started.elapsed();
        let target = Target {
            policy_id: self.policy_ids[index],
            policy: &policy,
            cgroups: resolved_cgroups(&self.resolved[index]).into(),
        };
        let applied = match self.applier.apply_one(&mut self.loaded.maps, &target) {
            Some(applied) => applied,
            // The applier does not show that policy as expected: plan from
            // every target.
            None => {
                let targets: Vec<Target<'_>> = self
                    .policies
                    .iter()
                    .zip(&self.policy_ids)
                    .zip(&self.resolved)
                    .enumerate()
                    .map(|(i, ((p, id), r))| Target {
                        policy_id: *id,
                        policy: if i == index { &policy } else { p },
                        cgroups: resolved_cgroups(r).into(),
                    })
                    .collect();
                self.applier.apply(&mut self.loaded.maps, &targets)
            }
        };
        let report = match applied {
            Ok(r) => r,
            Err(e) => {
                let mut policies = self.policies.clone();
                policies[index] = policy;
                return Err(self.apply_failed(&policies, e));
            }
        };
        self.warn_quiesce();
        self.policies[index] = policy;
        self.policies_version += 1;
        self.inventory_pending = true;
        self.publish_policy_facts(index, &report);
        debug!(
            "daemon: reload phases (Entry {{ index: {index} }}): parse {:?}, compile {:?}, \
             resolve: every policy's cgroups as before, apply {:?}",
            parse_done,
            compiled - parse_done,
            started.elapsed() - compiled
        );
        Ok(report)
    }

    /// `policies` could not be applied (`e`): under --fail-closed, the
    /// stand-ins hold their cgroups and the file counts as in force.
    fn apply_failed(&mut self, policies: &[CompiledPolicy], e: ApplyError) -> Failed {
        if !self.fail_closed {
            return Failed::rejected(e.into());
        }
        match self.apply_fail_closed(policies, &e) {
            Ok(_) => Failed {
                error: anyhow::anyhow!(
                    "{e}; --fail-closed: every bind in the cgroups the policy governs is denied"
                ),
                in_force: true,
            },
            Err(e2) => Failed::rejected(e2),
        }
    }

    /// After a reload that re-parsed a single entry, parse the whole text
    /// again and make sure the result is the same; if not (a bug), enforce the
    /// full parse's result and say so.
    pub(super) fn verify(&mut self) {
        self.verify_pending = false;
        let Some(parsed) = &self.parsed else {
            return;
        };
        let started = Instant::now();
        match parse_policy_text(parsed.text().to_owned()) {
            Ok(full) if full.file == parsed.file => debug!(
                "daemon: incremental reload verified by a full parse in {:?}",
                started.elapsed()
            ),
            Ok(full) => {
                warn!(
                    "daemon: the incremental reload disagreed with a full parse of {}; applying the full parse",
                    self.policy_path.display()
                );
                let mut policies = compile_all(&full.file.policies);
                crate::policy::apply_reserved(&mut policies, &full.file.reserved);
                let resolved = self.resolve(&policies, true);
                match self.apply(policies, resolved) {
                    Ok(_) => self.parsed = Some(full),
                    Err(e) => error!("daemon: applying the full parse failed: {e}"),
                }
            }
            Err(d) => error!(
                "daemon: the incremental reload accepted {} but a full parse rejects it ({} errors); \
                 keeping the applied policy",
                self.policy_path.display(),
                d.len()
            ),
        }
    }

    /// Publish the host's ephemeral port range (what `ephemeral` allows,
    /// and what a UDP autobind must stay inside) when it changed: at start,
    /// then on every rescan. `start`: say where it came from.
    pub(super) fn sync_ephemeral(&mut self, start: bool) {
        let ((lo, hi), fallback) = sockets::host_ephemeral_range();
        if let Some(why) = &fallback {
            if start {
                warn!(
                    "daemon: the host's ip_local_port_range could not be read ({why}); using \
                     {lo}-{hi}"
                );
            } else {
                debug!("daemon: host ip_local_port_range: {why}; using {lo}-{hi}");
            }
        }
        match self.applier.set_ephemeral(&mut self.loaded.maps, (lo, hi)) {
            Ok(true) => info!(
                "daemon: host ephemeral port range {lo}-{hi}: `ephemeral` allows kernel-chosen \
                 ports there, and a UDP autobind outside it is judged as a bind"
            ),
            Ok(false) => {}
            Err(e) => warn!("daemon: publishing the ephemeral port range: {e}"),
        }
    }

    pub(super) fn rescan(&mut self) {
        // Failures are logged where they happen.
        let _ = self.rescan_with(true);
    }

    /// [`Agent::rescan`]; `fresh`: walk the cgroup tree again, else use the
    /// index as it is (a hook added its cgroup to it) and stat only the
    /// candidates. An error: what was resolved could not be applied, and
    /// the kernel keeps the previous state (a hook must not be told its
    /// cgroup is governed as the policy says).
    pub(super) fn rescan_with(&mut self, fresh: bool) -> Result<(), String> {
        self.rescan_from(fresh, None)
    }

    /// [`Agent::rescan_with`], from `outcome` when given: what the resolver
    /// gives for the policies in force over what the loop holds now,
    /// resolved by a survey's thread (`Surveys::install` says when that
    /// holds). Debug builds resolve again and check that it does.
    pub(super) fn rescan_from(
        &mut self,
        fresh: bool,
        outcome: Option<crate::workload::resolve::Outcome>,
    ) -> Result<(), String> {
        // After a rescan failed closed: try the real policies again first.
        if let Some(real) = self.refused.take() {
            let resolved = self.resolve(&real, fresh);
            match self.apply(real.clone(), resolved) {
                Ok(r) => {
                    info!(
                        "daemon: the policies fit again; the --fail-closed stand-ins are lifted \
                         ({} cgroups governed)",
                        r.cgroups
                    );
                    return Ok(());
                }
                Err(e) => {
                    debug!("daemon: the policies still do not fit: {e}");
                    self.refused = Some(real);
                }
            }
        }
        let policies = std::mem::take(&mut self.policies);
        let resolved = match outcome {
            Some(outcome) if self.refused.is_none() => {
                let from_survey = self.finish_resolve(&policies, outcome);
                #[cfg(debug_assertions)]
                {
                    let here = self.resolve(&policies, fresh);
                    assert_eq!(
                        from_survey, here,
                        "a survey's resolution differs from the loop's"
                    );
                }
                from_survey
            }
            _ => self.resolve(&policies, fresh),
        };
        self.policies = policies;
        // A hook's quick answer is always followed by an apply: it plans
        // the cgroup with the others, and settles its facts.
        if resolved == self.resolved
            && self.provisional.is_empty()
            && self.next_quarantine == self.quarantine
            && self.next_unfit_hold == self.unfit_hold
        {
            // What is applied is what a resolve gives now.
            self.resolved_with = self.last_resolve;
            self.publish_left_out();
            return Ok(());
        }
        match self.apply_again(resolved) {
            Ok(r) => {
                debug!(
                    "daemon: cgroups changed; generation {} now governs {} cgroups",
                    r.generation, r.cgroups
                );
                Ok(())
            }
            // A cgroup that appeared cannot be governed: under --fail-closed
            // that is denied too, not only at start and on reload.
            Err(e) if self.fail_closed && !self.failed_closed() => {
                let real = self.policies.clone();
                match self.apply_fail_closed(&real, &e) {
                    Ok(_) => {
                        self.refused = Some(real);
                        Ok(())
                    }
                    Err(e2) => {
                        error!("daemon: applying cgroup changes failed: {e}; {e2:#}");
                        Err(format!("applying cgroup changes failed: {e}; {e2:#}"))
                    }
                }
            }
            Err(e) => {
                error!("daemon: applying cgroup changes failed: {e}");
                Err(format!("applying cgroup changes failed: {e}"))
            }
        }
    }
}

/// A reload that could not be applied.
pub(super) struct Failed {
    error: anyhow::Error,
    /// The --fail-closed stand-ins hold the new file's cgroups: the file
    /// counts as in force (its parse is kept).
    in_force: bool,
}

impl Failed {
    /// Rejected: the previous policy stays in force.
    fn rejected(error: anyhow::Error) -> Self {
        Self {
            error,
            in_force: false,
        }
    }
}
