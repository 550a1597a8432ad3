//! The node's CRI runtime (containerd, CRI-O) over its unix socket: which
//! pods and containers exist, with their namespaces, names, uids and labels.
//! portguard only reads (List* calls); tests also use [`connect`] to drive a
//! runtime.

use std::{collections::BTreeMap, path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ListContainersRequest, ListPodSandboxRequest, runtime_service_client::RuntimeServiceClient,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// containerd's CRI socket, the default `--cri-socket`.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

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

/// A CRI client on a unix socket.
pub async fn connect(path: &Path) -> Result<RuntimeServiceClient<Channel>, CriError> {
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
    Ok(RuntimeServiceClient::new(channel))
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
