//! Cgroups a policy selects by name inside delegated subtrees but does not
//! govern (see `workload::resolve`): logging each subtree once, holding
//! those over the bounds under `--fail-closed` (the built-in
//! `portguard:fail-closed:unfit` policy), and publishing the counts to
//! `status` and the metrics.

use std::collections::HashSet;

use log::{error, warn};

use crate::{
    policy::CompiledPolicy,
    workload::resolve::{self, Governed, Resolution},
};

use super::*;

impl Agent {
    /// Report what `resolve` left out of delegated subtrees, and (under
    /// `--fail-closed`) hold each subtree with unfit cgroups.
    pub(super) fn left_out(
        &mut self,
        policies: &[CompiledPolicy],
        skipped: &[resolve::LeftOut],
        unfit: &[resolve::LeftOut],
        resolved: &Resolution,
    ) {
        let mut per: std::collections::BTreeMap<(usize, &str, &str), usize> = Default::default();
        for (l, why) in skipped
            .iter()
            .map(|l| (l, "skip"))
            .chain(unfit.iter().map(|l| (l, "unfit")))
        {
            *per.entry((l.policy, l.subtree.as_str(), why)).or_default() += 1;
        }
        for ((i, subtree, why), n) in per {
            let key = format!("{}\0{subtree}\0{why}", policies[i].name);
            if !self.left_out_logged.insert(key) {
                continue;
            }
            if why == "skip" {
                warn!(
                    "daemon: policy `{}` ({}) selects {n} cgroups in {subtree}, a subtree a user \
                     other than root may write (anyone there can name a cgroup so); not governed \
                     there: they keep the policy of their ancestors (`delegated: govern` opts in)",
                    policies[i].name,
                    policies[i].selector.describe(),
                );
            } else {
                error!(
                    "daemon: policy `{}` ({}) selects {n} cgroups in delegated subtree {subtree} \
                     that do not fit (--max-delegated-cgroups {} per subtree, --max-cgroups {}); {}",
                    policies[i].name,
                    policies[i].selector.describe(),
                    self.max_delegated,
                    self.capacity.cgroups,
                    if self.fail_closed {
                        format!("--fail-closed: every bind in the subtree is DENIED (`{UNFIT}`)")
                    } else {
                        "they keep the policy of their ancestors".to_owned()
                    }
                );
            }
        }
        let mut subtrees: Vec<String> = unfit.iter().map(|l| l.subtree.clone()).collect();
        subtrees.sort();
        subtrees.dedup();
        let governed: HashSet<u64> = resolved.iter().flatten().map(|g| g.id).collect();
        self.next_unfit_hold = if self.fail_closed {
            subtrees
                .iter()
                .filter_map(|s| match self.hierarchy.resolve(s) {
                    Ok(Some((id, level))) if !governed.contains(&id) => Some(Governed {
                        path: s.clone(),
                        id,
                        level,
                    }),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        self.next_left_out = crate::observe::snapshot::LeftOut {
            skipped: skipped.len(),
            unfit: unfit.len(),
            held_subtrees: self
                .next_unfit_hold
                .iter()
                .map(|g| g.path.clone())
                .collect(),
            unfit_subtrees: subtrees,
        };
    }

    /// Publish what the last `resolve` left out (when nothing else changed).
    pub(super) fn publish_left_out(&self) {
        let left_out = self.next_left_out.clone();
        self.shared.update(|f| f.left_out = left_out);
    }
}
