//! The requests on the agent's status socket, and the answers: a hook's
//! `govern`, `portguard why`'s `explain`, `portguard status`'s `status`.
//!
//! One connection carries one request. A client writes one JSON line
//! (`{"request":"govern",...}`, `{"request":"explain","cgroup_id":N}` or
//! `{"request":"status"}`) and reads one
//! JSON document back. A client that writes nothing (`nc -U`, agents and
//! clients from before hooks existed) gets the status document once it
//! closes its side or after [`REQUEST_WAIT`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long the agent waits for a request line before answering with its
/// status (a client that sends nothing).
pub const REQUEST_WAIT: Duration = Duration::from_millis(200);

/// The longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request on the status socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The status document (what `portguard status --json` prints).
    Status,
    /// Govern this cgroup now with the policy that selects it, and answer
    /// once the kernel maps say so.
    Govern(Govern),
    /// Which policy governs this cgroup, as the kernel maps say, and what
    /// `portguard why` needs to judge an operation there ([`Explanation`]).
    /// Read-only: nothing is rescanned or applied.
    Explain(Explain),
}

/// "Which policy governs this cgroup, and why": `portguard why`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explain {
    /// The cgroup's id (the inode number of its cgroup2 directory).
    pub cgroup_id: u64,
}

/// A policy that selects the cgroup or one of its ancestors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selecting {
    pub policy: String,
    /// The cgroup it selects (the cgroup itself or an ancestor).
    pub cgroup: String,
}

/// The agent's answer to [`Explain`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// Answered; `false` with `error` when the cgroup is unknown here.
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cgroup's path as the agent sees it.
    #[serde(default)]
    pub cgroup: String,
    #[serde(default)]
    pub cgroup_id: u64,
    /// The policy the kernel maps give the cgroup (its own or its nearest
    /// governed ancestor's); `None`: not governed.
    #[serde(default)]
    pub policy: Option<String>,
    /// The cgroup that policy is attached to.
    #[serde(default)]
    pub policy_cgroup: Option<String>,
    /// The kernel maps and the agent's own view disagree (an apply failed):
    /// what each says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The policy file the agent runs, and its text as last applied (the
    /// file on disk may have changed since).
    #[serde(default)]
    pub policy_file: String,
    #[serde(default)]
    pub policy_text: Option<String>,
    /// Every policy that selects the cgroup or an ancestor, with the
    /// cgroup it selects.
    #[serde(default)]
    pub candidates: Vec<Selecting>,
    /// Who the cgroup is (pod, container, unit), as event lines name it.
    #[serde(default)]
    pub identity: serde_json::Value,
    /// The agent's most recent event lines about the cgroup and the
    /// cgroups below it (oldest first; the agent keeps its last
    /// `RECENT_EVENTS` lines in all).
    #[serde(default)]
    pub events: Vec<serde_json::Value>,
}

/// An explain request on its way from the socket to the agent's loop.
#[derive(Debug)]
pub struct ExplainPending {
    pub request: Explain,
    pub reply: tokio::sync::oneshot::Sender<Explanation>,
}

/// Which hook asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    /// `portguard hook oci` (an OCI runtime's createRuntime hook).
    Oci,
    /// `portguard hook unit` (a systemd unit's ExecStartPre=).
    Unit,
}

impl HookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oci => "oci",
            Self::Unit => "unit",
        }
    }
}

/// "Govern this cgroup now". The agent decides which policy applies, from
/// its own view of the cgroup tree and the CRI runtime: nothing in the
/// request chooses a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Govern {
    /// The cgroup's id (the inode number of its cgroup2 directory): the
    /// same in every cgroup namespace, so an agent in a pod of its own
    /// finds it.
    pub cgroup_id: u64,
    /// The cgroup's path as the hook sees it (for messages).
    pub cgroup: String,
    pub hook: HookKind,
    /// The OCI container id (`oci` hooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The runtime says this is a pod's sandbox (pause) container: its pod
    /// cannot be listed yet, and is held until it can.
    #[serde(default)]
    pub sandbox: bool,
    /// The container's name and its sandbox's id, as the runtime's
    /// annotations give them: for a runtime that lists a container only
    /// once its hooks ran (CRI-O). Used only when the runtime lists the pod
    /// (by the uid in the cgroup path) with that sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// The unit (`unit` hooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// The agent's answer to [`Govern`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The cgroup is governed as `policy` says, in the kernel maps.
    pub ok: bool,
    /// Why not, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cgroup's path as the agent sees it.
    #[serde(default)]
    pub cgroup: String,
    #[serde(default)]
    pub cgroup_id: u64,
    /// The policy the kernel applies to the cgroup (its own or its nearest
    /// governed ancestor's; `None`: no policy governs it).
    #[serde(default)]
    pub policy: Option<String>,
    /// The cgroup that policy is attached to.
    #[serde(default)]
    pub policy_cgroup: Option<String>,
    /// The agent knows who the cgroup is: the runtime lists the container
    /// (and its pod), or no `pods:` policy needs the runtime. `false` for a
    /// sandbox whose pod the runtime does not list yet (held by
    /// `portguard:identifying`).
    #[serde(default)]
    pub identified: bool,
    /// Microseconds the agent took, from reading the request to answering.
    #[serde(default)]
    pub micros: u64,
}

impl Reply {
    pub fn error(cgroup_id: u64, msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            cgroup_id,
            ..Self::default()
        }
    }
}

/// A govern request on its way from the socket to the agent's loop.
#[derive(Debug)]
pub struct Pending {
    pub request: Govern,
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_in_their_wire_form() {
        let g = Request::Govern(Govern {
            cgroup_id: 42,
            cgroup: "/kubepods/besteffort/podx/abc".into(),
            hook: HookKind::Oci,
            container_id: Some("abc".into()),
            sandbox: false,
            container_name: None,
            sandbox_id: None,
            unit: None,
        });
        let text = serde_json::to_string(&g).unwrap();
        assert!(
            text.starts_with(r#"{"request":"govern","cgroup_id":42,"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), g);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"status"}"#).unwrap(),
            Request::Status
        );
        // A request without the fields it needs is an error, not a default.
        assert!(serde_json::from_str::<Request>(r#"{"request":"govern"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"explain","cgroup_id":7}"#).unwrap(),
            Request::Explain(Explain { cgroup_id: 7 })
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"explain"}"#).is_err());
    }
}
