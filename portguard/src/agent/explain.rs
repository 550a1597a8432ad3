//! `portguard why`'s question on the status socket
//! ([`crate::hook::protocol::Explain`]): which policy governs a cgroup, as
//! the kernel maps say, which other policies select it or an ancestor, the
//! policy file's text as applied, and the last events there. Answered in
//! the serve loop from what the agent holds; nothing is rescanned or
//! applied.

use crate::{
    events::WorkloadIdentity,
    hook::protocol::{Explanation, Selecting},
    workload::{cgroupfs::ancestors, resolve},
};

use super::*;

impl Agent {
    /// The answer to an explain request for the cgroup with id `cgroup_id`.
    pub(super) fn explain(&mut self, cgroup_id: u64) -> Explanation {
        let Some(path) = self.hierarchy.path_of(cgroup_id) else {
            return Explanation {
                ok: false,
                error: Some(format!(
                    "no cgroup with id {cgroup_id} in this agent's cgroup2 hierarchy {}: it is \
                     gone, or the agent runs on another one",
                    self.hierarchy.root().display()
                )),
                cgroup_id,
                ..Explanation::default()
            };
        };
        let kernel = match self.kernel_governor(&path) {
            Ok(k) => k,
            Err(e) => {
                return Explanation {
                    ok: false,
                    error: Some(e),
                    cgroup: path,
                    cgroup_id,
                    ..Explanation::default()
                };
            }
        };
        let applied = self.applied_governor(&path);
        let warning = (kernel != applied).then(|| {
            let name = |g: &Option<(String, String)>| {
                g.as_ref().map_or("no policy".to_owned(), |(n, at)| {
                    format!("`{n}` (from {at})")
                })
            };
            format!(
                "the kernel maps give {path} {}, but the agent's policy gives it {} (an apply \
                 failed: see the agent's log)",
                name(&kernel),
                name(&applied)
            )
        });
        let chain: Vec<&str> = ancestors(&path).collect();
        let empty = resolve::TreeIndex::default();
        let tree = self.tree.as_ref().unwrap_or(&empty);
        let mut candidates = Vec::new();
        for p in &self.policies {
            for c in resolve::candidates(p, tree, self.cri.as_ref()) {
                if chain.contains(&c.as_str()) {
                    candidates.push(Selecting {
                        policy: p.name.clone(),
                        cgroup: c,
                    });
                }
            }
        }
        let identity = serde_json::to_value(WorkloadIdentity::of(&path, self.cri.as_ref()))
            .unwrap_or_default();
        let (policy, policy_cgroup) = kernel.unzip();
        Explanation {
            ok: true,
            error: None,
            events: self.shared.recent_under(&path),
            cgroup: path,
            cgroup_id,
            policy,
            policy_cgroup,
            warning,
            policy_file: self.policy_path.display().to_string(),
            policy_text: self.parsed.as_ref().map(|p| p.text().to_owned()),
            candidates,
            identity,
        }
    }
}
