//! The status socket's server: one request and one answer per connection
//! (`hook::protocol`). The status document is answered here from the
//! agent's snapshot; a hook's govern request is handed to the agent's loop
//! and answered when it has acted; `portguard why`'s explain request is
//! handed to the loop too (it reads the kernel maps).

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::json;

use crate::{
    hook::protocol::{
        ExplainPending, Explanation, Govern, MAX_REQUEST_BYTES, Pending, REQUEST_WAIT, Reply,
        Request,
    },
    observe::{snapshot::Snapshot, status::document_text},
};

/// Bind the status socket: mode 0600 in a directory created 0700. A socket
/// file left by a dead agent is replaced; one a live agent answers on is an
/// error.
pub fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("--status-socket: creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "--status-socket {}: another portguard agent is answering there; give this one \
                 another path, or `off`",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("--status-socket: removing stale {}", path.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("--status-socket {}: cannot listen", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("--status-socket: chmod 0600 {}", path.display()))?;
    l.set_nonblocking(true)
        .context("--status-socket: set_nonblocking")?;
    Ok(l)
}

/// Answer each connection with the status document.
pub async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Snapshot>,
    govern: tokio::sync::mpsc::Sender<Pending>,
    explain: tokio::sync::mpsc::Sender<ExplainPending>,
) {
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Connections beyond the bound wait in the listen queue.
        let Ok(permit) = room.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // One task per connection: a client that sends slowly, or a govern
        // request waiting for the agent's loop, holds up no other.
        let (shared, govern, explain) = (shared.clone(), govern.clone(), explain.clone());
        tokio::spawn(async move {
            answer(stream, shared, govern, explain).await;
            drop(permit);
        });
    }
}

/// Most connections answered at once.
const MAX_CONNECTIONS: usize = 64;

/// Read the request on one connection (none: the status document) and
/// answer it.
async fn answer(
    mut stream: tokio::net::UnixStream,
    shared: Arc<Snapshot>,
    govern: tokio::sync::mpsc::Sender<Pending>,
    explain: tokio::sync::mpsc::Sender<ExplainPending>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    // A client that sends nothing within REQUEST_WAIT gets the status.
    let _ = tokio::time::timeout(REQUEST_WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => line.extend_from_slice(&buf[..n]),
            }
            if line.contains(&b'\n') || line.len() > MAX_REQUEST_BYTES {
                break;
            }
        }
    })
    .await;
    let mut text = if line.iter().all(u8::is_ascii_whitespace) {
        document_text(&shared).await
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Status) => document_text(&shared).await,
            Ok(Request::Govern(g)) => {
                let reply = govern_reply(&stream, g, &govern).await;
                serde_json::to_string(&reply).unwrap_or_default()
            }
            Ok(Request::Explain(x)) => {
                let reply = explain_reply(&stream, x.cgroup_id, &explain).await;
                serde_json::to_string(&reply).unwrap_or_default()
            }
            Err(e) => json!({"ok": false, "error": format!("not a request: {e}")}).to_string(),
        }
    };
    text.push('\n');
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(text.as_bytes())).await;
}

/// Hand a govern request to the agent's loop and wait for its answer. Only
/// root may ask, whatever the socket's mode says.
async fn govern_reply(
    stream: &tokio::net::UnixStream,
    g: Govern,
    govern: &tokio::sync::mpsc::Sender<Pending>,
) -> Reply {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(0) {
        return Reply::error(
            g.cgroup_id,
            format!("only root may ask the agent to govern a cgroup (peer uid {uid:?})"),
        );
    }
    let id = g.cgroup_id;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if govern
        .send(Pending {
            request: g,
            reply: tx,
        })
        .await
        .is_err()
    {
        return Reply::error(id, "the agent is shutting down");
    }
    match tokio::time::timeout(GOVERN_WAIT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Reply::error(id, "the agent dropped the request"),
        Err(_) => Reply::error(id, "the agent did not get to the request in time"),
    }
}

/// Hand an explain request to the agent's loop and wait for its answer.
/// Root only, like govern: the answer carries the policy file and other
/// workloads' events.
async fn explain_reply(
    stream: &tokio::net::UnixStream,
    cgroup_id: u64,
    explain: &tokio::sync::mpsc::Sender<ExplainPending>,
) -> Explanation {
    let error = |msg: String| Explanation {
        ok: false,
        error: Some(msg),
        cgroup_id,
        ..Explanation::default()
    };
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(0) {
        return error(format!(
            "only root may ask the agent to explain a cgroup (peer uid {uid:?})"
        ));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let request = crate::hook::protocol::Explain { cgroup_id };
    if explain
        .send(ExplainPending { request, reply: tx })
        .await
        .is_err()
    {
        return error("the agent is shutting down".to_owned());
    }
    match tokio::time::timeout(GOVERN_WAIT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => error("the agent dropped the request".to_owned()),
        Err(_) => error("the agent did not get to the request in time".to_owned()),
    }
}

/// The longest the socket waits for the agent's loop to answer a govern
/// request (the hook's own --timeout is usually shorter).
const GOVERN_WAIT: Duration = Duration::from_secs(30);
