//! Where the decision programs (bind, post_bind, connect, sendmsg,
//! sock_create: [`PROGRAMS`]) run: on each attach point the agent names
//! (`workload::cgroupfs::attach_points`: the parent of each governed cgroup),
//! never on the root, so a process outside every attach point runs none of
//! them. [`Loaded::attach_points`] adds the missing points (all of a point's
//! programs or none) and switches points a previous agent pinned to this
//! agent's programs in place; [`Loaded::release_points`] detaches the points
//! no longer wanted. The host-wide programs (fence keeper, listen checks,
//! packet guard) stay on `--attach-cgroup` ([`Loaded::attach`]).
//!
//! Pinned runs keep each point's links in `links/cg<cgroup id>-<program>`
//! (see [`pins::point_link`]); unpinned runs own them (they detach when the
//! agent exits).

use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use log::{info, warn};
use portguard_common::{Hook, PROGRAMS};

use super::*;
use crate::kernel::{
    attach::{Kind, ProgLink, expected_attach_type},
    bpfsys,
    pins::{self, new_point_link, point_link},
};

/// One attach point of the decision programs.
#[derive(Debug, Default)]
pub struct Point {
    /// Where it is (the cgroup2 filesystem path), as last attached.
    pub(super) path: PathBuf,
    /// Links this process owns (unpinned runs).
    pub(super) links: Vec<ProgLink>,
    /// Pinned by an earlier agent and not switched to this agent's
    /// programs yet.
    pub(super) adopted: bool,
}

/// The decision programs and how each attaches.
pub(super) fn decision_programs() -> impl Iterator<Item = (&'static str, Kind, Hook)> {
    PROGRAMS.iter().map(|&(name, hook)| {
        let kind = match hook {
            Hook::PostBind4 | Hook::PostBind6 | Hook::SockCreate => Kind::Sock,
            _ => Kind::SockAddr,
        };
        (name, kind, hook)
    })
}

impl Loaded {
    /// Make the decision programs run on every cgroup of `wanted` (paths
    /// on the cgroup2 filesystem), adding to what runs now; a point that no
    /// longer exists is skipped (nothing below it can be governed). Returns
    /// the cgroup ids of the points that now run them, for
    /// [`Loaded::release_points`] after the maps changed. On error, the
    /// point being attached is left as it was and the points attached
    /// earlier in this call stay (they decide nothing until the maps govern
    /// something below them).
    pub fn attach_points(&mut self, wanted: &[PathBuf]) -> Result<Vec<u64>, LoaderError> {
        if let Some(deferred) = &mut self.deferred_points {
            deferred.clear();
            deferred.extend_from_slice(wanted);
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(wanted.len());
        for path in wanted {
            let open_err = |source| LoaderError::OpenCgroup {
                path: path.display().to_string(),
                source,
            };
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(open_err(e)),
            };
            let id = file.metadata().map_err(open_err)?.ino();
            ids.push(id);
            if self.points.get(&id).is_some_and(|p| !p.adopted) {
                continue;
            }
            let adopted = self.points.get(&id).is_some_and(|p| p.adopted);
            let links = match self.attach_point(id, &file, path, adopted) {
                Ok(l) => l,
                // Removed while it was being attached (the kernel refuses a
                // cgroup going offline): nothing below it can be governed
                // any more, so it is no point; what was made is undone.
                Err(e) if vanished(path, id) => {
                    info!(
                        "loader: {} went away while the decision programs were attached to it \
                         ({e}); skipped",
                        path.display()
                    );
                    ids.pop();
                    continue;
                }
                Err(e) => return Err(e),
            };
            info!(
                "loader: decision programs {} on {} (cgroup id {id})",
                if adopted {
                    "switched to this agent in place"
                } else {
                    "attached"
                },
                path.display()
            );
            self.points.insert(
                id,
                Point {
                    path: path.clone(),
                    links,
                    adopted: false,
                },
            );
        }
        Ok(ids)
    }

    /// Every decision program on one point: pinned links of an earlier
    /// agent are switched in place (`BPF_LINK_UPDATE`), wrong or missing
    /// ones made anew. On error the links and pins this call made are
    /// undone; links it already switched stay switched (they run this
    /// agent's programs, which decide like the earlier ones from the same
    /// maps; the next start switches the rest).
    fn attach_point(
        &mut self,
        id: u64,
        file: &File,
        path: &Path,
        adopted: bool,
    ) -> Result<Vec<ProgLink>, LoaderError> {
        let mut owned = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for (name, kind, _) in decision_programs() {
                let Some(root) = self.pin_root.clone() else {
                    owned.push(self.attach_new(name, kind, file, path)?);
                    continue;
                };
                let pin = point_link(&root, id, name);
                let pin_err = |what: String| {
                    let dir = root.display().to_string();
                    move |source: std::io::Error| LoaderError::Pin { dir, what, source }
                };
                let existing = if adopted {
                    bpfsys::obj_get(&pin).ok()
                } else {
                    None
                };
                let fits = existing.as_ref().is_some_and(|fd| {
                    bpfsys::link_info(fd.as_fd()).is_ok_and(|i| {
                        i.link_type == bpfsys::LINK_TYPE_CGROUP
                            && i.cgroup_id == id
                            && i.attach_type == expected_attach_type(name)
                    })
                });
                if existing.is_some() && !fits {
                    warn!(
                        "loader: pinned link {} is not a link of {name} on cgroup id {id} \
                         (attached elsewhere, with another hook, or defunct): replaced by a \
                         new link on {}",
                        pin.display(),
                        path.display()
                    );
                }
                if let (Some(link), true) = (existing, fits) {
                    self.switch_link(name, kind, &link, path, &pin, &root)?;
                    continue;
                }
                let link = self.attach_new(name, kind, file, path)?;
                // Pin beside, then move in place: a wrong pin is replaced
                // only once the right link runs.
                let staged = new_point_link(&root, id, name);
                let _ = std::fs::remove_file(&staged);
                link.pin(&staged).map_err(|e| {
                    pin_err(format!("pinning {}", staged.display()))(std::io::Error::other(e))
                })?;
                pins::move_pin(&staged, &pin)
                    .map_err(pin_err(format!("pinning {}", pin.display())))?;
                made.push(pin);
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.pin_decision_programs();
                Ok(owned)
            }
            Err(e) => {
                for p in made {
                    let _ = std::fs::remove_file(p);
                }
                drop(owned);
                Err(e)
            }
        }
    }

    /// Pin the decision programs beside their links (once per agent).
    fn pin_decision_programs(&mut self) {
        let Some(root) = self.pin_root.clone() else {
            return;
        };
        if self.decision_programs_pinned {
            return;
        }
        self.decision_programs_pinned = true;
        for (name, _, _) in decision_programs() {
            let prog_path = root.join("progs").join(name);
            let _ = std::fs::remove_file(&prog_path);
            if let Some(p) = self.ebpf.program_mut(name)
                && let Err(e) = p.pin(&prog_path)
            {
                warn!("loader: pinning {}: {e}", prog_path.display());
            }
        }
    }

    /// Detach the decision programs from every point not in `keep` (cgroup
    /// ids, from [`Loaded::attach_points`]): their links are dropped and
    /// their pins removed.
    pub fn release_points(&mut self, keep: &[u64]) {
        if self.deferred_points.is_some() {
            return;
        }
        let gone: Vec<u64> = self
            .points
            .keys()
            .copied()
            .filter(|id| !keep.contains(id))
            .collect();
        for id in gone {
            let Some(point) = self.points.remove(&id) else {
                continue;
            };
            if let Some(root) = &self.pin_root {
                for (name, _, _) in decision_programs() {
                    for p in [point_link(root, id, name), new_point_link(root, id, name)] {
                        match std::fs::remove_file(&p) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                warn!("loader: removing {}: {e}", p.display());
                            }
                            _ => {}
                        }
                    }
                }
            }
            info!(
                "loader: decision programs detached from {} (cgroup id {id}): no policy governs \
                 below it any more",
                if point.path.as_os_str().is_empty() {
                    "a point pinned by an earlier agent".to_owned()
                } else {
                    point.path.display().to_string()
                }
            );
            // Unpinned: dropping the owned links detaches them.
            drop(point.links);
        }
    }

    /// Until [`Loaded::attach_deferred_points`], applies only note where
    /// the decision programs must run: the first policy is written into
    /// the maps before any program of this agent runs on them (over maps
    /// rebuilt for new sizes, the previous agent's pinned programs go on
    /// deciding from the previous maps meanwhile).
    pub fn defer_points(&mut self) {
        self.deferred_points = Some(Vec::new());
    }

    /// Attach the decision programs where the applies since
    /// [`Loaded::defer_points`] said (switching an earlier agent's pinned
    /// points in place), then release the points nothing is governed below.
    pub fn attach_deferred_points(&mut self) -> Result<(), LoaderError> {
        let Some(wanted) = self.deferred_points.take() else {
            return Ok(());
        };
        let keep = self.attach_points(&wanted)?;
        self.release_points(&keep);
        Ok(())
    }

    /// Whether this agent's decision programs run on one of the cgroups
    /// `ids` now: attached there, not an earlier agent's pinned point still
    /// to be switched, and not only noted while points are deferred.
    pub fn runs_on_any(&self, ids: &[u64]) -> bool {
        self.deferred_points.is_none()
            && ids
                .iter()
                .any(|id| self.points.get(id).is_some_and(|p| !p.adopted))
    }

    /// The attach points that run the decision programs now (paths).
    pub fn points(&self) -> Vec<PathBuf> {
        self.points
            .values()
            .filter(|p| !p.adopted)
            .map(|p| p.path.clone())
            .collect()
    }

    /// Attach points an earlier agent pinned in `root`: adopted, to be
    /// switched to this agent's programs or released by the first apply.
    pub(super) fn adopt_points(&mut self, root: &Path) {
        for id in pins::pinned_points(root) {
            self.points.insert(
                id,
                Point {
                    adopted: true,
                    ..Point::default()
                },
            );
        }
    }
}

/// Whether the cgroup at `path` is gone, or is another cgroup than `id`
/// now.
fn vanished(path: &Path, id: u64) -> bool {
    match std::fs::metadata(path) {
        Ok(md) => md.ino() != id,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}
