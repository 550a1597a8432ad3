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
    /// Directories whose children matter to the selectors, whether they
    /// exist or not: the parent of each `cgroup:` path (it may appear,
    /// vanish, be recreated), the kubelet's QoS levels for `pods:` (new
    /// pods), pod cgroups for `container:` selectors (new containers), and
    /// the units' parents. [`Watcher`] watches each one, or its nearest
    /// existing ancestor while it is missing.
    pub(super) fn cgroup_watch_dirs(&self, cache: &mut ParentsCache) -> HashSet<PathBuf> {
        let root = self.hierarchy.root();
        let mut parents: HashSet<PathBuf> = cache.cgroup_parents(self).clone();
        for (p, govs) in self.policies.iter().zip(&self.resolved) {
            match &p.selector {
                Selector::Cgroup(_) => {}
                Selector::Pods(sel) => {
                    for d in crate::workload::identity::KUBEPODS_PARENTS {
                        parents.insert(self.hierarchy.fs_path(d));
                    }
                    // New containers of governed pods (to learn their names
                    // early), and of every pod for `container:` selectors.
                    parents.extend(govs.iter().map(|g| self.hierarchy.fs_path(&g.path)));
                    if sel.container.is_some()
                        && let Some(tree) = &self.tree
                    {
                        parents.extend(tree.pods.values().map(|p| self.hierarchy.fs_path(p)));
                    }
                }
                Selector::Unit(_) => {
                    // Units start in slices: the root's children and every
                    // slice (system.slice, user.slice/user-1000.slice, ...).
                    parents.insert(root.to_path_buf());
                    if let Some(tree) = &self.tree {
                        parents.extend(tree.slices.iter().map(|s| self.hierarchy.fs_path(s)));
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
        parents
    }
}

/// The parents of the `cgroup:` selectors' paths, as paths under the mount,
/// kept while the selectors and the mount are the same: they depend on
/// nothing else, and with thousands of policies computing them took
/// milliseconds of the loop after every hook's answer (thousands of
/// policies often share a handful of parents). Whether they are the same
/// is compared path by path (no hash a policy author could collide).
#[derive(Default)]
pub(super) struct ParentsCache {
    root: PathBuf,
    paths: Vec<String>,
    parents: HashSet<PathBuf>,
}

impl ParentsCache {
    fn cgroup_parents(&mut self, agent: &Agent) -> &HashSet<PathBuf> {
        let paths = agent.policies.iter().filter_map(|p| match &p.selector {
            Selector::Cgroup(path) => Some(path.as_str()),
            _ => None,
        });
        let same = self.root == agent.hierarchy.root()
            && self.paths.iter().map(String::as_str).eq(paths.clone());
        if !same {
            let mut parents: HashSet<&str> = HashSet::new();
            for path in paths.clone() {
                if let Some((parent, name)) = path.trim_end_matches('/').rsplit_once('/')
                    && !name.is_empty()
                {
                    parents.insert(if parent.is_empty() { "/" } else { parent });
                }
            }
            self.parents = parents
                .into_iter()
                .map(|p| agent.hierarchy.fs_path(p))
                .collect();
            self.root = agent.hierarchy.root().to_path_buf();
            self.paths = paths.map(str::to_owned).collect();
        }
        &self.parents
    }
}

/// What to watch for `wanted` (see [`Agent::cgroup_watch_dirs`]): each
/// directory, or its nearest existing ancestor below `root` while it is
/// missing (its creation is on the way to it), and the parent of each of
/// those. cgroupfs tells a watched directory nothing when it is removed
/// (no `IN_DELETE_SELF`, no `IN_IGNORED`): only its parent hears of it, and
/// of one made again at its path, whose new inode the old watch does not
/// see. Returns the watched set and the wanted directories that are missing.
fn resolve_dirs(root: &Path, wanted: &HashSet<PathBuf>) -> (HashSet<PathBuf>, Vec<PathBuf>) {
    let mut dirs = HashSet::new();
    let mut missing = Vec::new();
    for want in wanted {
        if !want.starts_with(root) {
            continue;
        }
        let mut dir = Some(want.as_path());
        while let Some(d) = dir {
            if d.is_dir() {
                dirs.insert(d.to_path_buf());
                if d != root
                    && let Some(parent) = d.parent()
                {
                    dirs.insert(parent.to_path_buf());
                }
                break;
            }
            if d == want {
                missing.push(want.clone());
            }
            if d == root {
                break;
            }
            dir = d.parent();
        }
    }
    (dirs, missing)
}

pub(super) struct Watcher {
    pub(super) fd: AsyncFd<Inotify>,
    pub(super) file_wd: Option<WatchDescriptor>,
    pub(super) file_name: Option<std::ffi::OsString>,
    /// The policy file (absolute) and what it looked like when a change of
    /// it was last signalled: an inotify queue overflow asks for a reload
    /// only if it looks different now.
    file: Option<(PathBuf, Option<FileLook>)>,
    pub(super) dirs: HashMap<PathBuf, WatchDescriptor>,
    /// The directory each watch is on (events name the watch).
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    /// The cgroup2 mount and [`Agent::cgroup_watch_dirs`] when last
    /// computed: resolved again on the loop when a watched directory
    /// loses or gains a child that matters, without asking the agent.
    root: PathBuf,
    wanted: HashSet<PathBuf>,
    /// Wanted directories missing at the last resolution.
    missing: Vec<PathBuf>,
    /// `Agent::watch_inputs` when the wanted set was last computed
    /// ([`Watcher::refresh`]).
    computed_for: Option<u64>,
    parents: ParentsCache,
}

/// What identifies a version of the policy file (through symlinks, as a
/// Kubernetes volume's `..data` swap changes it): inode, size, mtime.
type FileLook = (u64, u64, u64, i64, i64);

fn file_look(path: &Path) -> Option<FileLook> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
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
        let mut file = None;
        if watch_file {
            let abs = std::path::absolute(policy).unwrap_or_else(|_| policy.to_owned());
            file = Some((abs.clone(), file_look(&abs)));
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
            file,
            dirs: HashMap::new(),
            by_wd: HashMap::new(),
            root: PathBuf::new(),
            wanted: HashSet::new(),
            missing: Vec::new(),
            computed_for: None,
            parents: ParentsCache::default(),
        })
    }

    /// Watch what [`Agent::cgroup_watch_dirs`] names, computed again only
    /// when what it depends on may have changed since: an apply or the tree
    /// index. With thousands of policies the computation takes
    /// milliseconds, and the loop wakes for every timer. Directories that
    /// appear or go are followed by [`Watcher::drain`].
    pub(super) fn refresh(&mut self, agent: &Agent) {
        if self.computed_for != Some(agent.watch_inputs) {
            self.rebuild(agent);
        }
    }

    /// Compute the wanted set afresh and watch it.
    pub(super) fn rebuild(&mut self, agent: &Agent) {
        self.root = agent.hierarchy.root().to_path_buf();
        self.wanted = agent.cgroup_watch_dirs(&mut self.parents);
        self.computed_for = Some(agent.watch_inputs);
        self.resolve();
    }

    /// Watch the wanted set as the filesystem is now.
    fn resolve(&mut self) {
        let (want, missing) = resolve_dirs(&self.root, &self.wanted);
        self.missing = missing;
        let mut watches = self.fd.get_ref().watches();
        let by_wd = &mut self.by_wd;
        self.dirs.retain(|d, wd| {
            if want.contains(d) {
                return true;
            }
            by_wd.remove(wd);
            let _ = watches.remove(wd.clone());
            false
        });
        // Every directory is added again, the watched ones too: the kernel
        // answers with the same watch for the same inode, and with another
        // for a directory removed and made again at that path (its parent
        // too may have been, before this saw any event), whose old watch
        // is on a dead inode and says nothing more.
        for d in want {
            match watches.add(
                &d,
                WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::MOVED_TO
                    | WatchMask::ONLYDIR,
            ) {
                Ok(wd) => {
                    if let Some(old) = self.dirs.get(&d) {
                        if *old == wd {
                            continue;
                        }
                        debug!("daemon: {} was made again: watching it anew", d.display());
                        self.by_wd.remove(old);
                        let _ = watches.remove(old.clone());
                    } else {
                        debug!("daemon: watching {}", d.display());
                    }
                    self.by_wd.insert(wd.clone(), d.clone());
                    self.dirs.insert(d, wd);
                }
                Err(e) => debug!("daemon: cannot watch {}: {e}", d.display()),
            }
        }
    }

    /// Forget the watch on `dir` (removed: the watch, if the kernel still
    /// holds it, is on a dead inode).
    fn forget(&mut self, dir: &Path) {
        if let Some(wd) = self.dirs.remove(dir) {
            self.by_wd.remove(&wd);
            let _ = self.fd.get_ref().watches().remove(wd);
        }
    }

    /// Drain pending inotify events into the kinds of change they signal.
    pub(super) fn drain(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let mut stale = false;
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
                        if let Some((path, look)) = &mut self.file {
                            *look = file_look(path);
                        }
                        out.push(Change::PolicyFile);
                    }
                } else if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    // Events were lost: a watched directory may have gone
                    // and come back unseen. Watch everything anew (a watch
                    // added again to a live directory is the same one); the
                    // rescan this asks for finds what was made meanwhile.
                    warn!("daemon: inotify queue overflowed: watching the cgroup directories anew");
                    for dir in self.dirs.keys().cloned().collect::<Vec<_>>() {
                        self.forget(&dir);
                    }
                    stale = true;
                    out.push(Change::Cgroups);
                    // The policy file's change may be among those lost: a
                    // reload if it looks other than when one was last
                    // asked for (not for every overflow: a reload of an
                    // unchanged file still resolves and applies, on the
                    // loop that answers hooks).
                    if let Some((path, look)) = &mut self.file {
                        let now = file_look(path);
                        if now != *look {
                            *look = now;
                            out.push(Change::PolicyFile);
                        }
                    }
                } else {
                    // A child of a watched directory removed, renamed or
                    // made: if it is itself watched, or on the way to a
                    // missing wanted directory, watch anew now (before the
                    // rescan this event asks for walks the tree, so that
                    // nothing made in it meanwhile goes unseen).
                    if let (Some(name), Some(dir)) = (ev.name, self.by_wd.get(&ev.wd))
                        && ev.mask.contains(EventMask::ISDIR)
                    {
                        let child = dir.join(name);
                        if ev
                            .mask
                            .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                        {
                            if self.dirs.contains_key(&child) {
                                self.forget(&child);
                                stale = true;
                            }
                        } else if self.dirs.contains_key(&child)
                            || self.missing.iter().any(|m| m.starts_with(&child))
                        {
                            // Made (again) where a watch is wanted.
                            stale = true;
                        }
                    }
                    // The watched directory is gone (its watch dropped):
                    // forget it, so that one made again is watched anew.
                    if ev.mask.contains(EventMask::IGNORED)
                        && let Some(dir) = self.by_wd.get(&ev.wd).cloned()
                    {
                        self.forget(&dir);
                        stale = true;
                    }
                    out.push(Change::Cgroups);
                }
            }
            if !any {
                break;
            }
        }
        if stale {
            self.resolve();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wanted_directory_is_watched_with_its_parent_or_its_nearest_ancestor_while_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["s/u", "k"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let wanted: HashSet<PathBuf> = [
            root.join("s/u"),
            root.join("k/pod/c"),
            root.to_path_buf(),
            PathBuf::from("/elsewhere"),
        ]
        .into();
        let (dirs, missing) = resolve_dirs(root, &wanted);
        // `s/u` and its parent (which alone hears of its removal); `k`, the
        // nearest existing ancestor of the missing `k/pod/c`, and its parent
        // the root; the root itself has no parent to watch; nothing outside.
        let expect: HashSet<PathBuf> = [
            root.join("s/u"),
            root.join("s"),
            root.join("k"),
            root.to_path_buf(),
        ]
        .into();
        assert_eq!(dirs, expect);
        assert_eq!(missing, vec![root.join("k/pod/c")]);
    }
}
