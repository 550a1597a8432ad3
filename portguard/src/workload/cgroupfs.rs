//! The cgroup v2 filesystem: where it is mounted, and how cgroup paths map to
//! the ids the kernel programs see (a cgroup's id is the inode number of its
//! directory), with a cache of that mapping ([`ResolveCache`]).

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/mounts: {0}")]
    Mounts(#[source] io::Error),
    #[error(
        "no cgroup2 filesystem is mounted (checked /proc/mounts); portguard needs cgroup v2 \
         (mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified` on a hybrid host)"
    )]
    NoCgroup2,
    #[error("cannot stat cgroup {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cgroup directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a cgroup2 mount (cannot stat it, or it holds another filesystem)")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "the cgroup2 mount at {path} shows a subtree, not the whole hierarchy (a cgroup \
         namespace, as inside a container, or a bind mount of a child cgroup); portguard must see \
         every cgroup: in a container, mount the host's cgroup2 (a hostPath volume of \
         /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host) and pass that path with \
         --cgroup-root"
    )]
    NotHierarchyRoot { path: PathBuf },
}

/// Decode the octal escapes (`\040` for space, ...) of a /proc/mounts field.
fn unescape_mount_field(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// A cgroup path (`/a/b`) and its ancestors, deepest first, ending at `/`
/// (the order the kernel programs walk them in).
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let here = next?;
        next = match here.rfind('/') {
            _ if here == "/" || here.is_empty() => None,
            Some(0) => Some("/"),
            Some(i) => Some(&here[..i]),
            None => None,
        };
        Some(here)
    })
}

/// Where the decision programs run so that every governed cgroup, its
/// descendants and its future siblings are covered: the parent of each
/// governed cgroup (a unit's slice, a pod's QoS class, a container's pod),
/// or the cgroup itself where its parent is the root or lies outside
/// `scope`; a governed cgroup outside `scope` gets none (nothing is
/// enforced outside it), and an attach point below another one is dropped
/// (the programs would run twice there). Sorted. Everything outside the
/// result runs no decision program at all.
pub fn attach_points<'a>(governed: impl IntoIterator<Item = &'a str>, scope: &str) -> Vec<String> {
    let mut points: Vec<&str> = governed
        .into_iter()
        .filter(|g| crate::policy::builtin::within(g, scope))
        .map(|g| {
            let parent = ancestors(g).nth(1).unwrap_or("/");
            if parent != "/" && crate::policy::builtin::within(parent, scope) {
                parent
            } else {
                g
            }
        })
        .collect();
    points.sort_unstable();
    points.dedup();
    let set: std::collections::HashSet<&str> = points.iter().copied().collect();
    let mut out: Vec<String> = Vec::with_capacity(points.len());
    for p in points {
        if !ancestors(p).skip(1).any(|a| set.contains(a)) {
            out.push(p.to_owned());
        }
    }
    out
}

/// Every cgroup2 mount point listed in `mounts` (the text of /proc/mounts),
/// in order.
pub fn cgroup2_mounts_in(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| unescape_mount_field(mnt))
        })
        .collect()
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Check that `path` is a cgroup2 filesystem seen from the hierarchy's root
/// (not from inside a cgroup namespace or through a bind mount of a child):
/// only the root cgroup lacks `cgroup.type`.
pub fn check_hierarchy_root(path: &Path) -> Result<(), CgroupError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CgroupError::NotCgroup2 { path: path.into() })?;
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // f_type is an i64 on x86_64 and a narrower integer elsewhere.
    #[allow(clippy::useless_conversion)]
    let fs_type = i64::from(st.f_type);
    if rc != 0 || fs_type != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 { path: path.into() });
    }
    if path.join("cgroup.type").exists() {
        return Err(CgroupError::NotHierarchyRoot { path: path.into() });
    }
    Ok(())
}

/// The cgroup2 mount point of this host, from /proc/mounts: the first one
/// that shows the whole hierarchy. Never assumes /sys/fs/cgroup: hybrid
/// hosts mount it at /sys/fs/cgroup/unified, and a container sees its own
/// cgroup namespace there and the host's tree wherever it was mounted.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    let all = cgroup2_mounts_in(&mounts);
    let mut first_err = None;
    for m in all {
        match check_hierarchy_root(&m) {
            Ok(()) => return Ok(m),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or(CgroupError::NoCgroup2))
}

/// A cgroup2 hierarchy rooted at a mount point.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    root: PathBuf,
    /// id -> path cache for event reporting. cgroup ids are never reused
    /// while the system runs, so entries never go stale.
    names: HashMap<u64, String>,
}

/// Maximum entries kept in the id -> path cache.
const NAME_CACHE: usize = 16384;

impl Hierarchy {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            names: HashMap::new(),
        }
    }

    pub fn discover() -> Result<Self, CgroupError> {
        Ok(Self::new(cgroup2_mount()?))
    }

    /// The hierarchy mounted at `root` (`--cgroup-root`), checked to be a
    /// cgroup2 mount of the whole tree.
    pub fn at(root: PathBuf) -> Result<Self, CgroupError> {
        check_hierarchy_root(&root)?;
        Ok(Self::new(root))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Filesystem path of a policy cgroup path (`/a/b`).
    pub fn fs_path(&self, cgroup: &str) -> PathBuf {
        let rel = cgroup.trim_start_matches('/');
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// The id and level of a cgroup, or `Ok(None)` if it does not exist.
    pub fn resolve(&self, cgroup: &str) -> Result<Option<(u64, u32)>, CgroupError> {
        let path = self.fs_path(cgroup);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                let level = cgroup.split('/').filter(|s| !s.is_empty()).count() as u32;
                Ok(Some((m.ino(), level)))
            }
            Ok(_) => Err(CgroupError::NotADirectory { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CgroupError::Stat { path, source }),
        }
    }

    /// The topmost ancestor of `cgroup` (itself excluded) whose directory a
    /// user other than root may write: owned by another uid (systemd's
    /// `Delegate=`, `user@UID.service`) or writable by its group or others.
    /// Anyone who can write there can create a cgroup with any name below
    /// it. The cgroup itself does not count: whoever owns a directory can
    /// create cgroups below it, not rename it (a `Delegate=yes` service run
    /// as its own user keeps its unit's policy). `writable` caches answers
    /// per path (the caller clears it when it rescans or a watched cgroup
    /// directory changes).
    pub fn delegated_subtree(
        &self,
        cgroup: &str,
        writable: &mut HashMap<String, bool>,
    ) -> Option<String> {
        let mut prefix = String::with_capacity(cgroup.len());
        let parts: Vec<&str> = cgroup.split('/').filter(|c| !c.is_empty()).collect();
        let ancestors = parts.len().saturating_sub(1);
        for c in &parts[..ancestors] {
            prefix.push('/');
            prefix.push_str(c);
            let open = *writable
                .entry(prefix.clone())
                .or_insert_with(|| self.open_to_others(&prefix));
            if open {
                return Some(prefix);
            }
        }
        None
    }

    /// Whether others than root may write the cgroup directory `cgroup`
    /// (what [`Hierarchy::delegated_subtree`] asks of each ancestor). A
    /// directory that cannot be read is treated as root's: it vanished, and
    /// the caller's stat will say so.
    pub fn open_to_others(&self, cgroup: &str) -> bool {
        std::fs::metadata(self.fs_path(cgroup)).is_ok_and(|m| m.uid() != 0 || m.mode() & 0o022 != 0)
    }

    /// The path (relative to the mount, starting with `/`) of the cgroup with
    /// id `id`, or `None` if it no longer exists.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.names.get(&id) {
            return Some(p.clone());
        }
        let p = self.lookup_by_handle(id)?;
        if self.names.len() >= NAME_CACHE {
            self.names.clear();
        }
        self.names.insert(id, p.clone());
        Some(p)
    }

    /// Remember a known (id, path) pair, e.g. from resolving a policy.
    pub fn remember(&mut self, id: u64, path: &str) {
        if self.names.get(&id).is_some_and(|known| known == path) {
            return;
        }
        if self.names.len() < NAME_CACHE {
            self.names.insert(id, path.to_owned());
        }
    }

    /// cgroupfs (kernfs) exports its inodes as file handles whose payload is
    /// the 64-bit cgroup id, so `open_by_handle_at` turns an id into an open
    /// directory and /proc/self/fd/N into its path. Needs CAP_DAC_READ_SEARCH.
    fn lookup_by_handle(&self, id: u64) -> Option<String> {
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            id: u64,
        }
        // FILEID_KERNFS from include/linux/exportfs.h.
        const FILEID_KERNFS: i32 = 0xfe;
        let root = CString::new(self.root.as_os_str().as_bytes()).ok()?;
        // SAFETY: plain syscalls on valid, NUL-terminated inputs; every fd
        // opened here is closed before returning.
        unsafe {
            let mount_fd = libc::open(root.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            if mount_fd < 0 {
                return None;
            }
            let mut h = Handle {
                bytes: 8,
                kind: FILEID_KERNFS,
                id,
            };
            let fd = libc::open_by_handle_at(
                mount_fd,
                std::ptr::from_mut(&mut h).cast::<libc::file_handle>(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            );
            libc::close(mount_fd);
            if fd < 0 {
                return None;
            }
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            libc::close(fd);
            let full = link.ok()?;
            let rel = full.strip_prefix(&self.root).ok()?;
            Some(format!("/{}", rel.to_string_lossy()))
        }
    }
}

/// Cgroup paths resolved to their id and level ([`Hierarchy::resolve`]; `None`:
/// absent) as last seen, with a count of changes: while the count stays the
/// same, every lookup answers as it did.
#[derive(Debug, Default)]
pub struct ResolveCache {
    entries: rustc_hash::FxHashMap<String, Option<(u64, u32)>>,
    changes: u64,
}

impl ResolveCache {
    /// The answer for `path`: as last seen, or from `resolve`, then kept.
    pub fn get_or(
        &mut self,
        path: &str,
        resolve: impl FnOnce() -> Option<(u64, u32)>,
    ) -> Option<(u64, u32)> {
        if let Some(known) = self.entries.get(path) {
            return *known;
        }
        let r = resolve();
        self.entries.insert(path.to_owned(), r);
        self.changes += 1;
        r
    }

    /// The answer kept for `path`, if it was asked for (`Some(None)`: it
    /// was absent).
    pub fn peek(&self, path: &str) -> Option<Option<(u64, u32)>> {
        self.entries.get(path).copied()
    }

    /// Forget `path` (it is resolved again when next asked).
    pub fn remove(&mut self, path: &str) {
        if self.entries.remove(path).is_some() {
            self.changes += 1;
        }
    }

    /// Take the answers of `fresh` (looked up elsewhere: a survey on
    /// another thread) instead of these; a change, whatever they say.
    /// Returns the answers replaced (thousands of paths: the caller may
    /// free them off its thread).
    pub fn adopt(&mut self, fresh: Self) -> Self {
        let old = std::mem::replace(&mut self.entries, fresh.entries);
        self.changes += 1;
        Self {
            entries: old,
            changes: 0,
        }
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.changes += 1;
    }

    /// How many times an answer was added or forgotten so far.
    pub const fn changes(&self) -> u64 {
        self.changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_attach_at_each_governed_cgroups_parent_and_never_twice() {
        let pts = attach_points(
            [
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda.slice",
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podb.slice",
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda.slice/cri-x.scope",
                "/system.slice/nginx.service",
                "/top",
                "/a/b/c",
                "/a/b",
                "/ab/c",
            ],
            "/",
        );
        assert_eq!(
            pts,
            [
                "/a",
                "/ab",
                "/kubepods.slice/kubepods-besteffort.slice",
                "/system.slice",
                "/top"
            ]
        );
        // A parent outside --attach-cgroup: the cgroup itself; a governed
        // cgroup outside it (a hold the resolver made): none.
        assert_eq!(attach_points(["/s/x", "/s/y/z"], "/s/y"), ["/s/y"]);
        assert_eq!(attach_points(["/s/y"], "/s/y"), ["/s/y"]);
        assert_eq!(attach_points(["/s/y/z"], "/s/y/z"), ["/s/y/z"]);
        assert!(attach_points([], "/").is_empty());
        // "/a" then "/a-b": not nested, both kept; "/a/x" is below "/a".
        assert_eq!(
            attach_points(["/a/x", "/a-b/x", "/a/x/y/z"], "/"),
            ["/a", "/a-b"]
        );
    }

    #[test]
    fn finds_the_cgroup2_mounts_in_hybrid_mode_and_in_containers() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mounts_in(mounts),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert!(cgroup2_mounts_in("proc /proc proc rw 0 0\n").is_empty());
        // A DaemonSet pod: its own cgroup namespace, then the host's tree.
        let pod = "cgroup /sys/fs/cgroup cgroup2 ro,nosuid 0 0\n\
                   cgroup2 /host/sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            cgroup2_mounts_in(pod),
            vec![
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/host/sys/fs/cgroup")
            ]
        );
    }

    #[test]
    fn the_resolve_cache_counts_its_changes() {
        let mut cache = ResolveCache::default();
        assert_eq!(cache.get_or("/a", || Some((7, 1))), Some((7, 1)));
        assert_eq!(cache.get_or("/b", || None), None);
        let seen = cache.changes();
        // Answers as it did, without asking.
        assert_eq!(cache.get_or("/a", || unreachable!()), Some((7, 1)));
        assert_eq!(cache.get_or("/b", || unreachable!()), None);
        assert_eq!(cache.changes(), seen);
        cache.remove("/nowhere");
        assert_eq!(cache.changes(), seen);
        cache.remove("/a");
        assert_eq!(cache.changes(), seen + 1);
        assert_eq!(cache.get_or("/a", || Some((8, 1))), Some((8, 1)));
        cache.clear();
        assert!(cache.changes() > seen + 2);
    }

    #[test]
    fn unescapes_mount_points() {
        let mounts = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mounts_in(mounts),
            vec![PathBuf::from("/mnt/my cgroups")]
        );
    }

    #[test]
    fn only_a_cgroup2_hierarchy_root_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_hierarchy_root(dir.path()),
            Err(CgroupError::NotCgroup2 { .. })
        ));
        // On a host with cgroup2: the mount passes, a child cgroup does not.
        if let Ok(root) = cgroup2_mount() {
            check_hierarchy_root(&root).unwrap();
            let child = std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .find(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path());
            if let Some(child) = child {
                let err = check_hierarchy_root(&child).unwrap_err();
                assert!(matches!(err, CgroupError::NotHierarchyRoot { .. }), "{err}");
                assert!(err.to_string().contains("--cgroup-root"), "{err}");
            }
        }
    }

    #[test]
    fn fs_paths() {
        let h = Hierarchy::new(PathBuf::from("/cg"));
        assert_eq!(h.fs_path("/"), PathBuf::from("/cg"));
        assert_eq!(h.fs_path("/a/b"), PathBuf::from("/cg/a/b"));
    }

    #[test]
    fn ancestors_run_from_the_cgroup_to_the_root() {
        assert_eq!(
            ancestors("/a/b/c").collect::<Vec<_>>(),
            ["/a/b/c", "/a/b", "/a", "/"]
        );
        assert_eq!(ancestors("/").collect::<Vec<_>>(), ["/"]);
    }

    #[test]
    fn resolve_uses_inode_and_depth() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let h = Hierarchy::new(dir.path().to_owned());
        let (id, level) = h.resolve("/a/b").unwrap().unwrap();
        assert_eq!(id, std::fs::metadata(dir.path().join("a/b")).unwrap().ino());
        assert_eq!(level, 2);
        assert_eq!(h.resolve("/").unwrap().unwrap().1, 0);
        assert_eq!(h.resolve("/missing").unwrap(), None);
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(h.resolve("/file").is_err());
    }

    /// Ownership needs root (as CI runs): a directory root made and chowned
    /// or opened to others is a delegated subtree for what is below it,
    /// not for itself.
    #[test]
    fn delegated_subtrees_are_ancestors_others_may_write() {
        use std::os::unix::fs::PermissionsExt as _;
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to make root-owned directories");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["sys/svc", "home/app/x.service", "open/x.service"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::os::unix::fs::chown(dir.path().join("home"), Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(dir.path().join("sys/svc"), Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(
            dir.path().join("open"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let h = Hierarchy::new(dir.path().to_owned());
        let mut cache = HashMap::new();
        let mut d = |p: &str| h.delegated_subtree(p, &mut cache);
        assert_eq!(d("/home/app/x.service").as_deref(), Some("/home"));
        assert_eq!(d("/open/x.service").as_deref(), Some("/open"));
        // Its own directory is the service's (Delegate=yes, User=), its
        // name root's choice.
        assert_eq!(d("/sys/svc"), None);
        assert_eq!(d("/home"), None);
    }

    #[test]
    fn an_adopted_survey_answers_in_place_of_the_old_answers_and_counts_a_change() {
        let mut cache = ResolveCache::default();
        cache.get_or("/a", || Some((1, 1)));
        cache.get_or("/gone", || Some((7, 1)));
        let mut survey = ResolveCache::default();
        survey.get_or("/a", || Some((2, 1)));
        survey.get_or("/b", || None);
        let before = cache.changes();
        let _ = cache.adopt(survey);
        assert!(cache.changes() > before);
        assert_eq!(cache.get_or("/a", || panic!("cached")), Some((2, 1)));
        assert_eq!(cache.get_or("/b", || panic!("cached")), None);
        // Not in the survey: looked up again.
        assert_eq!(cache.get_or("/gone", || None), None);
    }
}
