//! Real cgroups: the cgroup2 mount, [`Cgroup`] (created for a test, removed
//! with everything running in it on drop), the tree removal behind it, and
//! [`join_before_exec`] (a command started inside a cgroup).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Make `cmd` join the cgroup at `cgroup` (its directory) between fork and
/// exec, as systemd's and runc's children do, then, with `uid`, switch to
/// that user (it could not have joined a root-owned cgroup itself).
pub fn join_before_exec(cmd: &mut std::process::Command, cgroup: &Path, uid: Option<u32>) {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").display().to_string())
        .expect("a cgroup path without NUL");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            if let Some(u) = uid
                && (libc::setgid(u) != 0 || libc::setuid(u) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The cgroup2 mount point of this host.
pub fn cgroup2_root() -> PathBuf {
    portguard::workload::cgroupfs::cgroup2_mount().expect("these tests need a cgroup2 mount")
}

/// True when running as root (the tests need CAP_BPF, CAP_SYS_ADMIN, ...).
pub fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// A real cgroup, removed (with everything running in it) on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Filesystem path.
    pub fs: PathBuf,
    /// Path as a policy names it (`/a/b`).
    pub rel: String,
    created: bool,
}

impl Cgroup {
    /// A fresh top-level cgroup `/pgtest-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        let mut cg = Self::planned(tag);
        cg.create();
        cg.created = true;
        cg
    }

    /// The path of a fresh top-level cgroup, not created yet (for "appears
    /// later" tests). Removed on drop if it was created by then.
    pub fn planned(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let rel = format!("/pgtest-{tag}-{}-{n}", std::process::id());
        Self {
            fs: cgroup2_root().join(&rel[1..]),
            rel,
            created: false,
        }
    }

    /// A cgroup at an arbitrary path (created now, removed on drop).
    pub fn existing(fs: PathBuf, rel: &str) -> Self {
        let c = Self {
            fs,
            rel: rel.to_owned(),
            created: true,
        };
        c.create();
        c
    }

    /// A child cgroup (created now). Dropping the parent also removes it.
    pub fn child(&self, name: &str) -> Self {
        let c = Self {
            fs: self.fs.join(name),
            rel: format!("{}/{name}", self.rel),
            created: true,
        };
        c.create();
        c
    }

    /// A child path, not created yet.
    pub fn planned_child(&self, name: &str) -> Self {
        Self {
            fs: self.fs.join(name),
            rel: format!("{}/{name}", self.rel),
            created: false,
        }
    }

    pub fn create(&self) {
        std::fs::create_dir_all(&self.fs)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", self.fs.display()));
    }

    /// The cgroup id (inode number).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.fs).unwrap().ino()
    }
}

/// Kill everything in `dir`'s subtree and remove it, deepest first.
pub(crate) fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let populated = std::fs::read_to_string(dir.join("cgroup.events"))
            .map(|s| s.contains("populated 1"))
            .unwrap_or(false);
        if !populated || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..200 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children created with `child()` are removed with their parent; a
        // planned cgroup is removed if something created it meanwhile.
        if self.created || self.fs.exists() {
            remove_cgroup_tree(&self.fs);
        }
    }
}
