//! Where the agent's decision programs run: the attach points of what an
//! apply governs (see `workload::cgroupfs::attach_points`; `kernel::points`
//! attaches and releases them), and publishing them for `status`.

use std::path::PathBuf;

use crate::workload::resolve::{Governed, Resolution};

use super::*;

impl Agent {
    /// Where the decision programs must run for what `resolved`, the
    /// quarantine and the hold govern (paths on the cgroup2 filesystem).
    pub(super) fn attach_points_of(
        &self,
        resolved: &Resolution,
        quarantine: &[Governed],
        hold: &[Governed],
    ) -> Vec<PathBuf> {
        if self.decide_everywhere {
            return vec![self.hierarchy.fs_path(&self.attach_cgroup)];
        }
        let governed = resolved
            .iter()
            .flatten()
            .chain(quarantine)
            .chain(hold)
            .map(|g| g.path.as_str());
        crate::workload::cgroupfs::attach_points(governed, &self.attach_cgroup)
            .iter()
            .map(|p| self.hierarchy.fs_path(p))
            .collect()
    }

    /// Publish where the decision programs run (cgroup paths).
    pub(super) fn publish_points(&mut self) {
        let root = self.hierarchy.root().to_owned();
        let points: Vec<String> = self
            .loaded
            .points()
            .iter()
            .map(|p| match p.strip_prefix(&root) {
                Ok(r) if r.as_os_str().is_empty() => "/".to_owned(),
                Ok(r) => format!("/{}", r.display()),
                Err(_) => p.display().to_string(),
            })
            .collect();
        self.shared.update(|f| f.attach_points = points);
    }
}
