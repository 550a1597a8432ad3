//! The node's CRI runtime (containerd, CRI-O) over its unix socket: which
//! pods and containers exist, with their namespaces, names, uids and labels.
//! portguard only reads (List* calls); tests also use [`connect`] to drive a
//! runtime.
//!
//! The List calls ask for every sandbox and container, unfiltered: CRI v1
//! has no paging, and its filters (one id, one state, a label selector)
//! would hide what the agent must see: a container in state CREATED
//! already has its cgroup (runc creates it before the process starts), and
//! a NOTREADY sandbox keeps its pod cgroup until the kubelet removes it, so
//! either, filtered out, would look unknown and be held by
//! `portguard:identifying`. Instead the client accepts answers up to
//! `--cri-max-message-bytes` ([`DEFAULT_MAX_MESSAGE_BYTES`]; tonic's own
//! limit, 4 MiB, is reached by a node whose pods carry large annotations).

use std::{collections::BTreeMap, path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ListContainersRequest, ListPodSandboxRequest, runtime_service_client::RuntimeServiceClient,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// containerd's CRI socket, the default `--cri-socket`.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// The largest CRI answer accepted by default (`--cri-max-message-bytes`).
/// ListPodSandbox and ListContainers return every pod's labels and
/// annotations in one message; 64 MiB is four times what containerd
/// itself sends at most by default (`grpc.max_send_message_size`, 16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI runtime at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI call {call} to {path} failed: {source}")]
    Call {
        call: &'static str,
        path: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("CRI call {call} to {path} timed out")]
    Timeout { call: &'static str, path: String },
}

/// A pod sandbox as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub sandbox_id: String,
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
}

/// A container as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
}

/// Pods and containers at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub pods: Vec<Pod>,
    pub containers: Vec<Container>,
}

impl Snapshot {
    pub fn pod_by_uid(&self, uid: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.uid == uid)
    }

    pub fn container(&self, id: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.id == id)
    }
}

/// A CRI client on a unix socket, accepting answers up to
/// [`DEFAULT_MAX_MESSAGE_BYTES`].
pub async fn connect(path: &Path) -> Result<RuntimeServiceClient<Channel>, CriError> {
    connect_with_limit(path, DEFAULT_MAX_MESSAGE_BYTES).await
}

/// A CRI client on a unix socket, accepting answers up to `max_message_bytes`.
pub async fn connect_with_limit(
    path: &Path,
    max_message_bytes: usize,
) -> Result<RuntimeServiceClient<Channel>, CriError> {
    let socket = path.to_owned();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| CriError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    Ok(RuntimeServiceClient::new(channel).max_decoding_message_size(max_message_bytes))
}

impl CriError {
    /// The answer was larger than the client accepts (raise
    /// `--cri-max-message-bytes`).
    pub fn too_large(&self) -> bool {
        matches!(self, CriError::Call { source, .. }
            if source.code() == tonic::Code::OutOfRange && source.message().contains("too large"))
    }
}

/// List pods and containers.
pub async fn snapshot(
    client: &mut RuntimeServiceClient<Channel>,
    path: &Path,
) -> Result<Snapshot, CriError> {
    let p = || path.display().to_string();
    let call = |call: &'static str| {
        move |source: tonic::Status| CriError::Call {
            call,
            path: path.display().to_string(),
            source: Box::new(source),
        }
    };
    let pods = tokio::time::timeout(
        Duration::from_secs(5),
        client.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
    )
    .await
    .map_err(|_| CriError::Timeout {
        call: "ListPodSandbox",
        path: p(),
    })?
    .map_err(call("ListPodSandbox"))?
    .into_inner()
    .items;
    let containers = tokio::time::timeout(
        Duration::from_secs(5),
        client.list_containers(ListContainersRequest { filter: None }),
    )
    .await
    .map_err(|_| CriError::Timeout {
        call: "ListContainers",
        path: p(),
    })?
    .map_err(call("ListContainers"))?
    .into_inner()
    .containers;
    Ok(Snapshot {
        pods: pods
            .into_iter()
            .filter_map(|s| {
                let m = s.metadata?;
                Some(Pod {
                    sandbox_id: s.id,
                    uid: m.uid,
                    name: m.name,
                    namespace: m.namespace,
                    labels: s.labels.into_iter().collect(),
                    // PodSandboxState::SandboxReady = 0
                    ready: s.state == 0,
                })
            })
            .collect(),
        containers: containers
            .into_iter()
            .map(|c| Container {
                name: c.metadata.map(|m| m.name).unwrap_or_default(),
                id: c.id,
                sandbox_id: c.pod_sandbox_id,
            })
            .collect(),
    })
}

pub use k8s_cri::v1 as api;
