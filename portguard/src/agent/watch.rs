//! inotify: the policy file and the cgroup directories whose children
//! matter to the selectors (a policy's cgroup appearing, disappearing or
//! being recreated; new pods, containers and units).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use log::{debug, warn};
use tokio::io::{Interest, unix::AsyncFd};

use crate::policy::Selector;

use super::*;

impl Agent {
    /// Directories to watch so that each policy cgroup's appearance,
    /// disappearance or re-creation is noticed.
    pub(super) fn cgroup_watch_dirs(&self) -> HashSet<PathBuf> {
        let root = self.hierarchy.root();
        // Directories whose children matter: the parent of each `cgroup:`
        // path (it may appear, vanish, be recreated), the kubelet's QoS
        // levels for `pods:` (new pods), pod cgroups for `container:`
        // selectors (new containers), and the units' parents.
        let mut parents: HashSet<PathBuf> = HashSet::new();
        // `cgroup:` paths' parents, as paths under the mount first: thousands
        // of policies often share a handful of parents.
        let mut cgroup_parents: HashSet<&str> = HashSet::new();
        for (p, govs) in self.policies.iter().zip(&self.resolved) {
            match &p.selector {
                Selector::Cgroup(path) => {
                    if let Some((parent, name)) = path.trim_end_matches('/').rsplit_once('/')
                        && !name.is_empty()
                    {
                        cgroup_parents.insert(if parent.is_empty() { "/" } else { parent });
                    }
                }
                Selector::Pods(sel) => {
                    for d in crate::workload::identity::KUBEPODS_PARENTS {
                        parents.insert(self.hierarchy.fs_path(d).join("x"));
                    }
                    // New containers of governed pods (to learn their names
                    // early), and of every pod for `container:` selectors.
                    parents.extend(
                        govs.iter()
                            .map(|g| self.hierarchy.fs_path(&g.path).join("x")),
                    );
                    if sel.container.is_some()
                        && let Some(tree) = &self.tree
                    {
                        parents.extend(
                            tree.pods
                                .values()
                                .map(|p| self.hierarchy.fs_path(p).join("x")),
                        );
                    }
                }
                Selector::Unit(_) => {
                    // Units start in slices: the root's children and every
                    // slice (system.slice, user.slice/user-1000.slice, ...).
                    parents.insert(root.join("x"));
                    if let Some(tree) = &self.tree {
                        parents.extend(
                            tree.slices
                                .iter()
                                .map(|s| self.hierarchy.fs_path(s).join("x")),
                        );
                    }
                    parents.extend(govs.iter().filter_map(|g| {
                        self.hierarchy
                            .fs_path(&g.path)
                            .parent()
                            .map(Path::to_path_buf)
                    }));
                }
            }
        }
        parents.extend(
            cgroup_parents
                .into_iter()
                .map(|p| self.hierarchy.fs_path(p)),
        );
        // Each wanted directory, or its nearest existing ancestor (whose
        // new child may be on the way to it).
        let mut dirs = HashSet::new();
        for parent in parents {
            let mut dir = Some(parent);
            while let Some(d) = dir {
                if d.is_dir() {
                    dirs.insert(d);
                    break;
                }
                if d == root {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
        dirs
    }
}

pub(super) struct Watcher {
    pub(super) fd: AsyncFd<Inotify>,
    pub(super) file_wd: Option<WatchDescriptor>,
    pub(super) file_name: Option<std::ffi::OsString>,
    pub(super) dirs: HashMap<PathBuf, WatchDescriptor>,
    /// Events on the cgroup directories drained so far.
    cgroup_events: u64,
    /// (`Agent::watch_inputs`, `cgroup_events`) when the watched set was
    /// last computed ([`Watcher::refresh`]).
    computed_for: Option<(u64, u64)>,
}

pub(super) enum Change {
    PolicyFile,
    Cgroups,
}

impl Watcher {
    pub(super) fn new(policy: &Path, watch_file: bool) -> anyhow::Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mut file_wd = None;
        let mut file_name = None;
        if watch_file {
            let abs = std::path::absolute(policy).unwrap_or_else(|_| policy.to_owned());
            if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
                // Watch the directory: editors and config managers replace the
                // file (rename), which a watch on the file itself would miss.
                file_wd = Some(
                    inotify
                        .watches()
                        .add(
                            dir,
                            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
                        )
                        .with_context(|| format!("watching {}", dir.display()))?,
                );
                file_name = Some(name.to_owned());
            }
        }
        Ok(Self {
            // SAFETY: Inotify owns its fd for as long as the AsyncFd owns it.
            fd: unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("registering inotify with tokio")?,
            file_wd,
            file_name,
            dirs: HashMap::new(),
            cgroup_events: 0,
            computed_for: None,
        })
    }

    /// Watch what [`Agent::cgroup_watch_dirs`] names, computed again only
    /// when what it depends on may have changed since: an apply, the tree
    /// index, or an event on a watched directory (one appears where a
    /// missing one was wanted). With thousands of policies the computation
    /// takes milliseconds, and the loop wakes for every timer.
    pub(super) fn refresh(&mut self, agent: &Agent) {
        let key = (agent.watch_inputs, self.cgroup_events);
        if self.computed_for != Some(key) {
            self.set_dirs(&agent.cgroup_watch_dirs());
            self.computed_for = Some(key);
        }
    }

    pub(super) fn set_dirs(&mut self, want: &HashSet<PathBuf>) {
        let mut watches = self.fd.get_ref().watches();
        self.dirs.retain(|d, wd| {
            if want.contains(d) {
                return true;
            }
            let _ = watches.remove(wd.clone());
            false
        });
        for d in want {
            if self.dirs.contains_key(d) {
                continue;
            }
            debug!("daemon: watching {}", d.display());
            match watches.add(
                d,
                WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::MOVED_TO
                    | WatchMask::ONLYDIR,
            ) {
                Ok(wd) => {
                    self.dirs.insert(d.clone(), wd);
                }
                Err(e) => debug!("daemon: cannot watch {}: {e}", d.display()),
            }
        }
    }

    /// Drain pending inotify events into the kinds of change they signal.
    pub(super) fn drain(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let events = match self.fd.get_mut().read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("daemon: reading inotify events: {e}");
                    break;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                debug!("daemon: inotify {:?} {:?}", ev.mask, ev.name);
                if Some(&ev.wd) == self.file_wd.as_ref() {
                    // The file itself, or a Kubernetes ConfigMap/Secret
                    // volume's `..data` symlink, which the kubelet swaps
                    // (rename) on every update while `policy.yaml ->
                    // ..data/policy.yaml` stays as it is.
                    if let Some(name) = ev.name
                        && (Some(name) == self.file_name.as_deref() || name == "..data")
                    {
                        out.push(Change::PolicyFile);
                    }
                } else {
                    self.cgroup_events += 1;
                    // The watched directory is gone (removed, or its watch
                    // dropped): forget its watch, so that a directory made
                    // again at that path is watched anew, not taken for the
                    // dead one.
                    if ev.mask.contains(EventMask::IGNORED) {
                        self.dirs.retain(|_, wd| *wd != ev.wd);
                    }
                    out.push(Change::Cgroups);
                }
            }
            if !any {
                break;
            }
        }
        out
    }
}
