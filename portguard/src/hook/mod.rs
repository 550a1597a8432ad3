//! Runtime hooks that close the start window. `portguard hook oci` (an OCI
//! runtime's `createRuntime` hook) and `portguard hook unit` (a systemd
//! unit's `ExecStartPre=`) run after the workload's cgroup exists and
//! before its first instruction; each asks the running agent to govern that
//! cgroup now, and lets the start go on only once the kernel maps say so
//! (or, when the agent does not answer in time, as `--on-failure` says).
//!
//! - [`protocol`]: the request and answer on the status socket;
//! - [`client`]: asking, within a deadline;
//! - [`oci`]: the OCI state a runtime hands a hook;
//! - [`install`]: containerd's base spec and CRI-O's hooks.d;
//! - [`spool`]: failures left for the agent to report, and the pods its
//!   policies select (for `--on-failure auto`);
//! - [`systemd`]: the drop-ins that run `portguard hook unit` in a
//!   service's `ExecStartPre=`.

pub mod client;
pub mod install;
pub mod oci;
pub mod protocol;
pub mod spool;
pub mod systemd;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use self::{
    protocol::{Govern, HookKind, Reply},
    spool::HookFailed,
};

/// What a hook does when it cannot confirm the cgroup is governed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFailure {
    /// Closed for a container of a pod a `pods:` policy may select (by the
    /// agent's last published selection), open for anything else.
    Auto,
    /// The start fails.
    Closed,
    /// The start goes on, and the agent reports it (`hook_failed`).
    Open,
}

/// Options every hook takes.
#[derive(Clone, Debug)]
pub struct HookOptions {
    pub socket: PathBuf,
    pub timeout: Duration,
    pub on_failure: OnFailure,
    /// Pods in these namespaces fail open whatever `on_failure` says: the
    /// agent's own, or a stopped agent could never be started again.
    pub fail_open_namespaces: Vec<String>,
    /// Whose annotations the OCI state carries.
    pub runtime: oci::Runtime,
}

/// What a hook ended with.
#[derive(Debug)]
pub struct Outcome {
    /// The start may go on.
    pub proceed: bool,
    /// The agent's answer, when it gave one.
    pub reply: Option<Reply>,
    /// The failure record, when the hook failed (also spooled and printed).
    pub failed: Option<HookFailed>,
}

/// The cgroup id of `cgroup` (a path relative to this process's cgroup2
/// mount): the inode number of its directory.
pub fn cgroup_id(cgroup: &str) -> anyhow::Result<u64> {
    let hierarchy = crate::workload::cgroupfs::Hierarchy::discover()?;
    match hierarchy.resolve(cgroup)? {
        Some((id, _)) => Ok(id),
        None => anyhow::bail!(
            "cgroup {cgroup} ({}) does not exist",
            hierarchy.fs_path(cgroup).display()
        ),
    }
}

/// Replace `path` with `bytes` atomically: written to a temporary name
/// beside it (a stale one removed first, never written through a symlink),
/// synced, renamed over it; its directory made if missing. The installed
/// hook files, the hook binary and the agent's selection all go this way.
pub(crate) fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "portguard".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.portguard-{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Who a hook is about, for the request and for a failure record.
#[derive(Clone, Debug, Default)]
struct Subject {
    hook: Option<HookKind>,
    cgroup: String,
    cgroup_id: u64,
    container_id: Option<String>,
    workload: oci::Workload,
    unit: Option<String>,
    /// The OCI state could not be read: who this is is unknown.
    unknown: bool,
}

impl Subject {
    fn request(&self) -> Govern {
        Govern {
            cgroup_id: self.cgroup_id,
            cgroup: self.cgroup.clone(),
            hook: self.hook.unwrap_or(HookKind::Oci),
            container_id: self.container_id.clone(),
            sandbox: self.workload.sandbox,
            container_name: self.workload.container_name.clone(),
            sandbox_id: self.workload.sandbox_id.clone(),
            unit: self.unit.clone(),
        }
    }

    fn pod_uid(&self) -> Option<String> {
        self.workload
            .pod_uid
            .clone()
            .or_else(|| crate::workload::identity::parse(&self.cgroup).pod_uid)
    }
}

/// `portguard hook oci`: `state` is what the runtime wrote on standard
/// input.
pub fn oci(opts: &HookOptions, state: &str) -> Outcome {
    let deadline = Instant::now() + opts.timeout;
    let mut subject = Subject {
        hook: Some(HookKind::Oci),
        unknown: true,
        ..Subject::default()
    };
    let found = oci::State::parse(state).and_then(|s| {
        subject.unknown = false;
        subject.container_id = Some(s.id.clone());
        subject.workload = s.workload(opts.runtime);
        subject.cgroup = oci::cgroup_of_pid(s.pid)?;
        subject.cgroup_id = cgroup_id(&subject.cgroup)?;
        Ok(())
    });
    finish(opts, subject, found, deadline)
}

/// `portguard hook unit`: govern this process's own cgroup (an
/// `ExecStartPre=` runs in its unit's cgroup).
pub fn unit(opts: &HookOptions, unit: &str) -> Outcome {
    let deadline = Instant::now() + opts.timeout;
    let mut subject = Subject {
        hook: Some(HookKind::Unit),
        unit: Some(unit.to_owned()),
        ..Subject::default()
    };
    let found = (|| {
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        subject.cgroup = oci::cgroup2_line(&text)
            .ok_or_else(|| anyhow::anyhow!("/proc/self/cgroup has no cgroup v2 (`0::`) line"))?
            .to_owned();
        if subject.cgroup == "/" {
            anyhow::bail!(
                "this process is in the root cgroup, not in unit {unit}'s: run `portguard hook \
                 unit` from the unit's ExecStartPre="
            );
        }
        subject.cgroup_id = cgroup_id(&subject.cgroup)?;
        Ok(())
    })();
    finish(opts, subject, found, deadline)
}

fn finish(
    opts: &HookOptions,
    subject: Subject,
    found: anyhow::Result<()>,
    deadline: Instant,
) -> Outcome {
    let answer = found.and_then(|()| {
        let req = subject.request();
        let reply = client::govern(&opts.socket, &req, deadline)?;
        if !reply.ok {
            anyhow::bail!(
                "the agent could not govern {}: {}",
                subject.cgroup,
                reply.error.as_deref().unwrap_or("no reason given")
            );
        }
        // A unit hook exists only for a unit a policy names: no policy
        // (outside --attach-cgroup, an alias, a delegated subtree) is not
        // what the drop-in was written for.
        if req.hook == HookKind::Unit && reply.policy.is_none() {
            anyhow::bail!(
                "no policy governs {} (is {} outside --attach-cgroup, in a delegated subtree, or \
                 named by an alias?)",
                reply.cgroup,
                req.unit.as_deref().unwrap_or("the unit")
            );
        }
        // A container the runtime does not list cannot be given its
        // `container:` policy (a sandbox's pod is held until it is listed).
        if !reply.identified && !req.sandbox && req.hook == HookKind::Oci {
            anyhow::bail!(
                "the agent governs {} as `{}`, but the CRI runtime does not list container {} \
                 yet, so its own policy may not apply",
                reply.cgroup,
                reply.policy.as_deref().unwrap_or("no policy"),
                req.container_id.as_deref().unwrap_or("?")
            );
        }
        Ok(reply)
    });
    match answer {
        Ok(reply) => Outcome {
            proceed: true,
            reply: Some(reply),
            failed: None,
        },
        Err(e) => fail(opts, &subject, &format!("{e:#}"), deadline),
    }
}

/// Whether to fail closed: as configured, or for `auto`, when the
/// container is in a pod the agent's last selection may select.
fn closed(opts: &HookOptions, subject: &Subject) -> bool {
    if subject
        .workload
        .pod_namespace
        .as_ref()
        .is_some_and(|ns| opts.fail_open_namespaces.contains(ns))
    {
        return false;
    }
    match opts.on_failure {
        OnFailure::Closed => true,
        OnFailure::Open => false,
        // A unit hook exists only for units a policy names.
        OnFailure::Auto if subject.hook == Some(HookKind::Unit) => true,
        // A state that cannot be read (too large, not JSON) is not "no
        // pod": closed wherever a `pods:` policy selects anything.
        OnFailure::Auto if subject.unknown => spool::read_selection(&spool::dir_of(&opts.socket))
            .is_some_and(|s| !s.namespaces.is_empty() || !s.pods.is_empty()),
        OnFailure::Auto => {
            let uid = subject.pod_uid();
            (subject.workload.in_pod() || uid.is_some())
                && spool::read_selection(&spool::dir_of(&opts.socket)).is_some_and(|s| {
                    s.may_select(uid.as_deref(), subject.workload.pod_namespace.as_deref())
                })
        }
    }
}

fn fail(opts: &HookOptions, subject: &Subject, reason: &str, deadline: Instant) -> Outcome {
    let closed = closed(opts, subject);
    let w = &subject.workload;
    let rec = HookFailed {
        schema_version: crate::events::SCHEMA_VERSION,
        time: crate::events::format_time(std::time::SystemTime::now()),
        host: String::new(),
        verdict: "hook_failed".into(),
        hook: subject.hook.unwrap_or(HookKind::Oci).as_str().into(),
        action: if closed {
            "refused_start"
        } else {
            "allowed_start"
        }
        .into(),
        reason: reason.to_owned(),
        on_failure: if closed { "closed" } else { "open" }.into(),
        cgroup: subject.cgroup.clone(),
        cgroup_id: subject.cgroup_id,
        container_id: subject.container_id.clone(),
        namespace: w.pod_namespace.clone(),
        pod: w.pod_name.clone(),
        pod_uid: subject.pod_uid(),
        container: w.container_name.clone(),
        unit: subject.unit.clone(),
    };
    let line = serde_json::to_string(&rec).unwrap_or_default();
    // The runtime (containerd's log, the journal) keeps this line; the
    // agent reports the spooled copy as an event when it runs again.
    eprintln!("portguard hook: {line}");
    let dir = spool::dir_of(&opts.socket);
    // A moment past the deadline for the spool: the record matters more
    // than a few milliseconds of an already failed start.
    if let Err(e) = spool::append(
        &dir,
        &rec,
        deadline.max(Instant::now()) + Duration::from_millis(50),
    ) {
        eprintln!(
            "portguard hook: cannot leave the failure for the agent in {}: {e}",
            dir.display()
        );
    }
    Outcome {
        proceed: !closed,
        reply: None,
        failed: Some(rec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(ns: Option<&str>, uid: Option<&str>, hook: HookKind) -> Subject {
        Subject {
            hook: Some(hook),
            cgroup: "/kubepods/besteffort/pod0f6c0000-0000-4000-8000-000000000009/c0ffee00c0ffee00"
                .into(),
            workload: oci::Workload {
                pod_namespace: ns.map(str::to_owned),
                pod_uid: uid.map(str::to_owned),
                ..oci::Workload::default()
            },
            ..Subject::default()
        }
    }

    #[test]
    fn auto_fails_closed_only_where_a_pods_policy_may_select() {
        let d = tempfile::tempdir().unwrap();
        let mut opts = HookOptions {
            socket: d.path().join("status.sock"),
            timeout: Duration::from_millis(10),
            on_failure: OnFailure::Auto,
            fail_open_namespaces: vec!["portguard-system".into()],
            runtime: oci::Runtime::Auto,
        };
        let pod = |ns| subject(Some(ns), Some("u-1"), HookKind::Oci);
        // No agent ever published a selection: nothing is known selected.
        assert!(!closed(&opts, &pod("payments")));
        spool::write_selection(
            d.path(),
            &spool::Selection {
                pods: vec!["u-9".into()],
                namespaces: vec!["pay*".into()],
                ..spool::Selection::default()
            },
        )
        .unwrap();
        assert!(closed(&opts, &pod("payments")));
        assert!(!closed(&opts, &pod("ops")));
        // A selected pod by uid (the cgroup path names it), any namespace.
        assert!(closed(
            &opts,
            &subject(Some("ops"), Some("u-9"), HookKind::Oci)
        ));
        let by_path = subject(None, None, HookKind::Oci);
        assert_eq!(
            by_path.pod_uid().as_deref(),
            Some("0f6c0000-0000-4000-8000-000000000009")
        );
        // Not a pod at all: open. A unit hook: closed.
        let mut plain = subject(None, None, HookKind::Oci);
        plain.cgroup = "/system.slice/runc-x.scope".into();
        assert!(!closed(&opts, &plain));
        assert!(closed(&opts, &subject(None, None, HookKind::Unit)));
        // The agent's own namespace always fails open.
        spool::write_selection(
            d.path(),
            &spool::Selection {
                namespaces: vec!["*".into()],
                ..spool::Selection::default()
            },
        )
        .unwrap();
        assert!(closed(&opts, &pod("payments")));
        assert!(!closed(&opts, &pod("portguard-system")));
        opts.on_failure = OnFailure::Closed;
        assert!(!closed(&opts, &pod("portguard-system")));
        assert!(closed(&opts, &pod("ops")));
        // A state the hook could not read is closed where pods are selected.
        let unknown = Subject {
            unknown: true,
            ..subject(None, None, HookKind::Oci)
        };
        opts.on_failure = OnFailure::Auto;
        assert!(closed(&opts, &unknown));
        opts.on_failure = OnFailure::Open;
        assert!(!closed(&opts, &pod("payments")));
    }

    #[test]
    fn an_unreachable_agent_is_a_failure_spooled_for_it() {
        let d = tempfile::tempdir().unwrap();
        let opts = HookOptions {
            socket: d.path().join("run/status.sock"),
            timeout: Duration::from_millis(50),
            on_failure: OnFailure::Closed,
            fail_open_namespaces: Vec::new(),
            runtime: oci::Runtime::Auto,
        };
        let o = unit(&opts, "x.service");
        assert!(!o.proceed);
        let rec = o.failed.unwrap();
        assert_eq!(
            (rec.action.as_str(), rec.hook.as_str()),
            ("refused_start", "unit")
        );
        // The spool's directory is made for it (no agent ran since boot).
        let (spooled, _) = spool::drain(&d.path().join("run")).unwrap();
        assert_eq!(spooled, vec![rec]);
    }
}
