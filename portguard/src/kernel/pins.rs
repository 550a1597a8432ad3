//! The bpffs directory holding portguard's pinned programs, links and maps,
//! so enforcement outlives the agent (crash, SIGKILL, restart, upgrade):
//!
//! ```text
//! /sys/fs/bpf/portguard/        0700, flock()ed by the running agent
//!   links/portguard_setsockopt  the host-wide links (fence keeper, listen
//!                               reporter), on --attach-cgroup (the root)
//!   links/cg4242-portguard_bind4 ...  the decision programs' links on each
//!                               attach point (cgroup id 4242), one per hook
//!   progs/portguard_bind4 ...   the programs the links run
//!   maps/PORTGUARD_STATE ...    every map, including the version stamp
//! ```
//!
//! Only names portguard creates are ever touched; `uninstall` leaves anything
//! else in the directory alone and says so.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{DirBuilderExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use log::{info, warn};
use portguard_common::{
    FENCE_PROGRAM, GUARD_PROGRAM, LSM_PROGRAMS, MAPS, PROGRAMS, SOCK_OPS_PROGRAM,
};

use crate::kernel::bpfsys;

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portguard";
/// Where bpffs is conventionally mounted (and is mounted if it is not).
const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of a map pin moved aside while its replacement takes over (bpffs
/// refuses names with a dot).
pub const OLD_PREFIX: &str = "old-";
/// Suffix of a link pin being put in place of a wrong one.
const NEW_SUFFIX: &str = "-new";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{path} is not on a BPF filesystem (bpffs), so nothing can be pinned there; mount one \
         (`mount -t bpf bpf /sys/fs/bpf`) or pass --pin-dir none to run without pinning \
         (enforcement then stops with the agent)"
    )]
    NotBpffs { path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another portguard agent is running on the pinned state in {path}; stop it first (two \
         agents must not manage one set of programs)"
    )]
    Busy { path: PathBuf },
    #[error(
        "{path} is not a directory of this user (it is owned by uid {owner}, or is not a \
         directory): refusing to pin there, since its owner could replace or remove the pins; \
         remove it or choose another --pin-dir"
    )]
    NotOurs { path: PathBuf, owner: u32 },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
    let path = path.to_owned();
    move |source| PinError::Io { what, path, source }
}

/// Every program name portguard may pin or link.
pub fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS
        .iter()
        .map(|(n, _)| *n)
        .chain(LSM_PROGRAMS.iter().map(|(n, _, _)| *n))
        .chain([SOCK_OPS_PROGRAM, FENCE_PROGRAM, GUARD_PROGRAM])
}

/// The pin of the link of `program` on the attach point with cgroup id
/// `cgroup_id` (see [`parse_point_link`]).
pub fn point_link(root: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    root.join("links").join(format!("cg{cgroup_id}-{program}"))
}

/// Where the replacement of a wrong point link waits to be moved in place.
pub fn new_point_link(root: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    root.join("links")
        .join(format!("cg{cgroup_id}-{program}{NEW_SUFFIX}"))
}

/// (cgroup id, program) of an attach point's link pin name
/// (`cg<cgroup id>-<program>`, optionally staged with the `-new` suffix);
/// `None` for any other name.
pub fn parse_point_link(name: &str) -> Option<(u64, &'static str)> {
    let rest = name.strip_prefix("cg")?;
    let (id, program) = rest.split_once('-')?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let program = program.strip_suffix(NEW_SUFFIX).unwrap_or(program);
    let (name, _) = PROGRAMS.iter().find(|(n, _)| *n == program)?;
    Some((id.parse().ok()?, name))
}

/// The attach points pinned in `root`'s `links/` (their cgroup ids).
pub fn pinned_points(root: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(root.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| parse_point_link(e.file_name().to_str()?).map(|(id, _)| id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// An open, locked pin directory.
pub struct PinDir {
    root: PathBuf,
    /// Holds the flock for as long as the agent runs.
    _lock: File,
}

impl PinDir {
    /// Open (creating it 0700 if needed) and lock `root`. Mounts bpffs at
    /// /sys/fs/bpf when `root` is below it and nothing is mounted there yet.
    pub fn open(root: &Path) -> Result<Self, PinError> {
        ensure_bpffs(root)?;
        // bpffs at /sys/fs/bpf is usually world-writable (sticky): another
        // user could have made a directory first, to own the pins. Each one
        // is checked before anything is made inside it.
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        for dir in [
            root.to_owned(),
            root.join("links"),
            root.join("progs"),
            root.join("maps"),
        ] {
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("creating", &dir)(e)),
            }
            let md = std::fs::symlink_metadata(&dir).map_err(io_err("inspecting", &dir))?;
            let owner = std::os::unix::fs::MetadataExt::uid(&md);
            if !md.is_dir() || owner != uid {
                return Err(PinError::NotOurs { path: dir, owner });
            }
        }
        // Whatever created it, the directory is root's alone.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting the mode of", root))?;
        let lock = lock(root, true)?.ok_or_else(|| PinError::Busy {
            path: root.to_owned(),
        })?;
        Ok(Self {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    /// [`PinDir::open`], except that a directory another user made first
    /// (bpffs is usually world-writable) never keeps the agent from
    /// enforcing. It is never used: when it is empty it is removed (one
    /// `rmdir`, which follows no symlink) and a fresh one is made; when it
    /// holds anything, it is left for inspection and the agent enforces
    /// without pinning (`None`). bpffs cannot rename a directory, and a
    /// recursive removal would walk paths its owner can swap. The message
    /// says what was done.
    pub fn open_or_replace(root: &Path) -> Result<(Option<Self>, Option<String>), PinError> {
        let (path, owner) = match Self::open(root) {
            Ok(p) => return Ok((Some(p), None)),
            Err(PinError::NotOurs { path, owner }) => (path, owner),
            Err(e) => return Err(e),
        };
        let why = match std::fs::remove_dir(&path).map(|()| Self::open(root)) {
            Ok(Ok(p)) => {
                let msg = format!(
                    "pin directory {} was made by uid {owner}, not by this agent: removed (it \
                     was empty); pinning in a fresh one",
                    path.display(),
                );
                return Ok((Some(p), Some(msg)));
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("removing it: {e}; it is left for inspection"),
        };
        let msg = format!(
            "pin directory {} was made by uid {owner}, not by this agent, and cannot be replaced \
             ({why}): enforcing WITHOUT pinning; enforcement ends with the agent",
            path.display()
        );
        Ok((None, Some(msg)))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Where a map pin waits while its replacement takes over.
    pub fn old_map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(format!("{OLD_PREFIX}{name}"))
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }

    pub fn new_link(&self, program: &str) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{program}{NEW_SUFFIX}"))
    }

    pub fn prog(&self, program: &str) -> PathBuf {
        self.root.join("progs").join(program)
    }

    /// Whether a previous agent left state here.
    pub fn has_state(&self) -> bool {
        program_names().any(|p| self.link(p).exists())
            || MAPS.iter().any(|m| self.map(m).exists())
            || !pinned_points(&self.root).is_empty()
    }
}

/// Move a pin (bpffs has no rename): pin the object again at `to`, then
/// remove `from`. The object stays referenced throughout.
pub fn move_pin(from: &Path, to: &Path) -> io::Result<()> {
    let fd = bpfsys::obj_get(from)?;
    match std::fs::remove_file(to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    bpfsys::obj_pin(fd.as_fd(), to)?;
    std::fs::remove_file(from)
}

/// Take the directory's flock (`exclusive`: the agent; shared: uninstall
/// checking nobody runs). `None` when another process holds it.
fn lock(root: &Path, exclusive: bool) -> Result<Option<File>, PinError> {
    let f = File::open(root).map_err(io_err("opening", root))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_fd().as_raw_fd(), op) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(io_err("locking", root)(e));
    }
    Ok(Some(f))
}

/// Make sure `root`'s parent is bpffs, mounting it at /sys/fs/bpf if that
/// is where it belongs and nothing is mounted.
fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let parent = root.parent().unwrap_or(Path::new("/"));
    let on_bpffs = |p: &Path| bpfsys::is_bpffs(p).unwrap_or(false);
    if on_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new(BPFFS) {
        // SAFETY: mount(2) with static, NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc == 0 {
            info!("pins: mounted bpffs at {BPFFS}");
        } else {
            warn!(
                "pins: mounting bpffs at {BPFFS}: {}",
                io::Error::last_os_error()
            );
        }
        if on_bpffs(parent) {
            return Ok(());
        }
    }
    Err(PinError::NotBpffs {
        path: parent.to_owned(),
    })
}

/// One pinned object `uninstall` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub kind: &'static str,
    pub name: String,
    pub path: PathBuf,
    /// Kernel id of the object (link, program or map id), when readable.
    pub id: Option<u32>,
    pub detail: String,
}

/// What is pinned in `root`, links first (removing them detaches), then
/// programs, then maps; and entries that are not portguard's.
pub fn inventory(root: &Path) -> (Vec<Pinned>, Vec<PathBuf>) {
    let mut ours = Vec::new();
    let mut foreign = Vec::new();
    let known_links: Vec<String> = program_names()
        .flat_map(|p| [p.to_owned(), format!("{p}{NEW_SUFFIX}")])
        .collect();
    let known_progs: Vec<String> = program_names().map(str::to_owned).collect();
    let known_maps: Vec<String> = MAPS
        .iter()
        .flat_map(|m| [(*m).to_owned(), format!("{OLD_PREFIX}{m}")])
        .collect();
    for (sub, kind, known) in [
        ("links", "link", &known_links),
        ("progs", "program", &known_progs),
        ("maps", "map", &known_maps),
    ] {
        let dir = root.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let name = name.to_string_lossy().into_owned();
            let point = kind == "link" && parse_point_link(&name).is_some();
            if !(known.contains(&name) || point) {
                foreign.push(path);
                continue;
            }
            let (id, detail) = describe(kind, &path);
            ours.push(Pinned {
                kind,
                name,
                path,
                id,
                detail,
            });
        }
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let n = e.file_name();
            if !matches!(n.to_str(), Some("links" | "progs" | "maps")) {
                foreign.push(e.path());
            }
        }
    }
    (ours, foreign)
}

fn describe(kind: &str, path: &Path) -> (Option<u32>, String) {
    match kind {
        "link" => match bpfsys::obj_get(path).and_then(|fd| bpfsys::link_info(fd.as_fd())) {
            Ok(i) if i.cgroup_id == 0 => (
                Some(i.id),
                format!("program id {}, defunct (its cgroup is gone)", i.prog_id),
            ),
            Ok(i) => (
                Some(i.id),
                format!("program id {}, cgroup id {}", i.prog_id, i.cgroup_id),
            ),
            Err(e) => (None, format!("unreadable: {e}")),
        },
        "program" => match aya::programs::ProgramInfo::from_pin(path) {
            Ok(i) => (Some(i.id()), String::new()),
            Err(e) => (None, format!("unreadable: {e}")),
        },
        _ => match aya::maps::MapInfo::from_pin(path) {
            Ok(i) => (Some(i.id()), String::new()),
            Err(e) => (None, format!("unreadable: {e}")),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("{0} does not exist: nothing to uninstall")]
    Missing(PathBuf),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Remove every portguard pin in `root` (links first, so enforcement ends
/// before the programs and maps go), then the directories if empty. Refuses
/// while an agent holds the directory. Returns what was (or, with
/// `dry_run`, would be) removed and what was left alone.
pub fn uninstall(
    root: &Path,
    dry_run: bool,
) -> Result<(Vec<Pinned>, Vec<PathBuf>), UninstallError> {
    if !root.exists() {
        return Err(UninstallError::Missing(root.to_owned()));
    }
    let _lock = lock(root, true)?.ok_or_else(|| PinError::Busy {
        path: root.to_owned(),
    })?;
    let (ours, foreign) = inventory(root);
    if dry_run {
        return Ok((ours, foreign));
    }
    for p in &ours {
        std::fs::remove_file(&p.path).map_err(|source| UninstallError::Remove {
            path: p.path.clone(),
            source,
        })?;
    }
    for sub in ["links", "progs", "maps"] {
        let _ = std::fs::remove_dir(root.join(sub));
    }
    if foreign.is_empty() {
        let _ = std::fs::remove_dir(root);
    }
    Ok((ours, foreign))
}
