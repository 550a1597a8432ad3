//! What a hook and the agent leave each other in the status socket's
//! directory (root's only): the hook's failures, written while the agent
//! does not answer and turned into events when it runs again; and the
//! agent's list of the pods its `pods:` policies select, which tells a
//! hook that cannot reach the agent whether to fail closed.

use std::{
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The spool of hook failures, next to the status socket.
pub const SPOOL_FILE: &str = "hook-events.jsonl";
/// The pods the agent's policies select, next to the status socket.
pub const SELECTION_FILE: &str = "hook-selection.json";
/// The spool stops growing here (a hook failing in a loop for days).
pub const SPOOL_MAX_BYTES: u64 = 4 << 20;

/// `dir` of the status socket `socket`.
pub fn dir_of(socket: &Path) -> PathBuf {
    socket
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A hook could not make sure a cgroup was governed before it started:
/// one event line (`"verdict": "hook_failed"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookFailed {
    #[serde(default)]
    pub schema_version: u32,
    pub time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Always `hook_failed`.
    pub verdict: String,
    /// `oci` or `unit`.
    pub hook: String,
    /// `allowed_start` (fail open: it started, maybe ungoverned) or
    /// `refused_start` (fail closed: it did not start).
    pub action: String,
    /// Why the hook could not confirm the cgroup was governed.
    pub reason: String,
    /// `closed` or `open`: what the hook was configured (or chose, for
    /// `auto`) to do on failure.
    pub on_failure: String,
    pub cgroup: String,
    #[serde(default)]
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl HookFailed {
    /// Who the hook was starting, in a few words (for `message`).
    fn workload(&self) -> String {
        match (&self.namespace, &self.pod, &self.container, &self.unit) {
            (Some(ns), Some(pod), Some(c), _) => format!("{ns}/{pod}/{c}"),
            (Some(ns), Some(pod), None, _) => format!("{ns}/{pod}"),
            (_, _, _, Some(unit)) => unit.clone(),
            _ => self
                .container_id
                .clone()
                .unwrap_or_else(|| self.cgroup.clone()),
        }
    }
}

/// A hook failure as an OCSF Application Lifecycle event or an ECS
/// document (`crate::events::ocsf::hook_failed`), the line itself under
/// `unmapped` / `portguard`.
impl crate::events::EventLine for HookFailed {
    fn ocsf(&self) -> impl Serialize + '_ {
        crate::events::ocsf::hook_failed(
            &self.time,
            &self.host,
            &self.hook,
            self.action == "refused_start",
            &self.reason,
            &self.workload(),
            self,
        )
    }
    fn ecs(&self) -> serde_json::Value {
        crate::events::ecs::hook_failed(
            &self.time,
            &self.host,
            self.action == "refused_start",
            &self.reason,
            self.container_id.as_deref(),
            self,
        )
    }
    fn journal_warning(&self) -> bool {
        false
    }
}

fn lock(f: &std::fs::File, deadline: Instant) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Append `rec` to the spool in `dir`, waiting at most until `deadline`
/// for the agent to finish reading it.
pub fn append(dir: &Path, rec: &HookFailed, deadline: Instant) -> std::io::Result<()> {
    // No agent has run since boot (/run is empty): keep the record for the
    // first one, in a directory as private as the agent makes it.
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let path = dir.join(SPOOL_FILE);
    let f = open(&path)?;
    lock(&f, deadline)?;
    if f.metadata()?.len() >= SPOOL_MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "{} is full ({SPOOL_MAX_BYTES} bytes): is the agent reading it?",
            path.display()
        )));
    }
    let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
    line.push(b'\n');
    (&f).write_all(&line)
    // Closing the file releases the lock.
}

/// Take every record from the spool in `dir` (the agent). Lines that are
/// not records are skipped and counted.
pub fn drain(dir: &Path) -> std::io::Result<(Vec<HookFailed>, usize)> {
    let path = dir.join(SPOOL_FILE);
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() == 0 {
        return Ok((Vec::new(), 0));
    }
    lock(&f, Instant::now() + Duration::from_millis(100))?;
    let mut text = String::new();
    (&f).take(SPOOL_MAX_BYTES + 4096)
        .read_to_string(&mut text)?;
    f.set_len(0)?;
    f.rewind()?;
    let mut bad = 0;
    let recs = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let r = serde_json::from_str::<HookFailed>(l).ok();
            bad += usize::from(r.is_none());
            r
        })
        .collect();
    Ok((recs, bad))
}

/// What the agent's policies select, for a hook that cannot reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// When the agent wrote it.
    pub time: String,
    /// The uids of pods a `pods:` policy governs now.
    pub pods: Vec<String>,
    /// The namespace patterns of the `pods:` selectors (`*` for a selector
    /// without one): a new pod in a matching namespace may be selected.
    pub namespaces: Vec<String>,
}

impl Selection {
    /// Whether a pod with this uid and namespace may be selected by a
    /// `pods:` policy (its labels are not known without the runtime, so a
    /// namespace match is enough).
    pub fn may_select(&self, uid: Option<&str>, namespace: Option<&str>) -> bool {
        uid.is_some_and(|u| self.pods.iter().any(|p| p == u))
            || namespace.is_some_and(|ns| {
                self.namespaces
                    .iter()
                    .any(|pat| glob::Pattern::new(pat).is_ok_and(|g| g.matches(ns)))
            })
    }
}

/// Write the selection in `dir` atomically (the agent, after each apply).
pub fn write_selection(dir: &Path, sel: &Selection) -> std::io::Result<()> {
    let text = serde_json::to_vec(sel).map_err(std::io::Error::other)?;
    super::replace_file(&dir.join(SELECTION_FILE), &text, 0o600)
}

/// Read the selection in `dir` (a hook), `None` if no agent wrote one.
pub fn read_selection(dir: &Path) -> Option<Selection> {
    let text = std::fs::read_to_string(dir.join(SELECTION_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(reason: &str) -> HookFailed {
        HookFailed {
            verdict: "hook_failed".into(),
            hook: "oci".into(),
            action: "allowed_start".into(),
            reason: reason.into(),
            on_failure: "open".into(),
            cgroup: "/kubepods/besteffort/pod1/c".into(),
            ..HookFailed::default()
        }
    }

    #[test]
    fn the_spool_hands_each_record_over_once() {
        let d = tempfile::tempdir().unwrap();
        let later = Instant::now() + Duration::from_secs(1);
        append(d.path(), &rec("a"), later).unwrap();
        append(d.path(), &rec("b"), later).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(SPOOL_FILE))
            .unwrap()
            .write_all(b"{not a record}\n")
            .unwrap();
        let (got, bad) = drain(d.path()).unwrap();
        assert_eq!(
            got.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(bad, 1);
        assert_eq!(drain(d.path()).unwrap(), (Vec::new(), 0));
        append(d.path(), &rec("c"), later).unwrap();
        assert_eq!(drain(d.path()).unwrap().0.len(), 1);
    }

    #[test]
    fn a_spool_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join(SPOOL_FILE)).unwrap();
        assert!(append(d.path(), &rec("x"), Instant::now()).is_err());
        assert!(drain(d.path()).is_err());
    }

    #[test]
    fn a_new_pod_may_be_selected_by_its_namespace() {
        let s = Selection {
            pods: vec!["u1".into()],
            namespaces: vec!["team-*".into()],
            ..Selection::default()
        };
        assert!(s.may_select(Some("u1"), Some("other")));
        assert!(s.may_select(Some("u2"), Some("team-a")));
        assert!(!s.may_select(Some("u2"), Some("ops")));
        assert!(!s.may_select(None, None));
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_selection(d.path()), None);
        write_selection(d.path(), &s).unwrap();
        assert_eq!(read_selection(d.path()), Some(s));
    }
}
