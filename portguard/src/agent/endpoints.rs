//! The agent's own listening sockets (`/healthz`, `/metrics`, the status
//! socket): bound before anything is attached, served once the agent runs.
//! One that cannot be bound (a local user holds the port first) is an
//! error in the log and in `status`, never a reason not to enforce.

use anyhow::Context as _;
use log::{error, info};

use super::*;

/// The agent's own listening sockets, bound before anything is attached:
/// a bad address fails here, and the agent's own policy (if it governs the
/// agent) never blocks them.
pub(super) struct Endpoints {
    health: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
    status: Option<std::os::unix::net::UnixListener>,
}

impl Endpoints {
    /// Bind what the options ask for. What cannot be bound (a bad address,
    /// a port a local user holds first) is left out, logged as an error and
    /// named in the returned list: enforcement comes first.
    pub(super) fn bind(opts: &RunOptions) -> (Self, Vec<String>) {
        let mut failed = Vec::new();
        let mut keep = |what: &str, r: anyhow::Result<Option<std::net::TcpListener>>| match r {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("{e:#}");
                error!(
                    "daemon: {msg}; enforcing WITHOUT {what} (whoever holds that address may \
                     answer in the agent's name)"
                );
                failed.push(msg);
                None
            }
        };
        let health = keep(
            "/healthz and /readyz",
            tcp(
                opts.health_listen,
                "--health-listen",
                "/healthz and /readyz",
            ),
        );
        let metrics = keep(
            "/metrics",
            tcp(opts.metrics_addr, "--metrics-addr", "/metrics"),
        );
        let status = match &opts.status_socket {
            Some(p) => match crate::observe::status::bind(p) {
                Ok(l) => {
                    info!("daemon: answering `portguard status` on {}", p.display());
                    Some(l)
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    error!("daemon: {msg}; enforcing WITHOUT the status socket");
                    failed.push(msg);
                    None
                }
            },
            None => None,
        };
        (
            Self {
                health,
                metrics,
                status,
            },
            failed,
        )
    }

    /// Serve them on the runtime, from the agent's shared snapshot.
    pub(super) fn spawn(
        self,
        rt: &tokio::runtime::Runtime,
        agent: &Agent,
        govern: tokio::sync::mpsc::Sender<crate::hook::protocol::Pending>,
        explain: tokio::sync::mpsc::Sender<crate::hook::protocol::ExplainPending>,
    ) -> anyhow::Result<()> {
        let _guard = rt.enter();
        if let Some(l) = self.status {
            let listener = tokio::net::UnixListener::from_std(l).context("--status-socket")?;
            rt.spawn(crate::observe::status::serve(
                listener,
                agent.shared.clone(),
                govern,
                explain,
            ));
        }
        if let Some(l) = self.metrics {
            let shared = agent.shared.clone();
            let listener = tokio::net::TcpListener::from_std(l).context("--metrics-addr")?;
            rt.spawn(async move {
                if let Err(e) = crate::observe::metrics::serve(listener, shared).await {
                    error!("daemon: metrics endpoint stopped: {e}");
                }
            });
        }
        if let Some(l) = self.health {
            let h = agent.health.clone();
            let listener = tokio::net::TcpListener::from_std(l).context("--health-listen")?;
            rt.spawn(async move {
                if let Err(e) = crate::observe::health::serve(listener, h).await {
                    error!("daemon: health endpoint stopped: {e}");
                }
            });
        }
        Ok(())
    }
}

/// Listen on `addr` (non-blocking), if given.
fn tcp(
    addr: Option<std::net::SocketAddr>,
    flag: &str,
    what: &str,
) -> anyhow::Result<Option<std::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("{flag} {addr}: cannot listen"))?;
    l.set_nonblocking(true)
        .with_context(|| format!("{flag}: set_nonblocking"))?;
    info!("daemon: serving {what} on http://{}", l.local_addr()?);
    Ok(Some(l))
}
