//! The agent's own listening sockets (`/healthz`, `/metrics`, the status
//! socket): bound before anything is attached, served once the agent runs.

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
    pub(super) fn bind(opts: &RunOptions) -> anyhow::Result<Self> {
        let tcp =
            |addr: std::net::SocketAddr, flag: &str| -> anyhow::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("{flag} {addr}: cannot listen"))?;
                l.set_nonblocking(true)
                    .with_context(|| format!("{flag}: set_nonblocking"))?;
                Ok(l)
            };
        let health = match opts.health_listen {
            Some(addr) => {
                let l = tcp(addr, "--health-listen")?;
                info!(
                    "daemon: serving /healthz and /readyz on http://{}",
                    l.local_addr()?
                );
                Some(l)
            }
            None => None,
        };
        let metrics = match opts.metrics_addr {
            Some(addr) => {
                let l = tcp(addr, "--metrics-addr")?;
                info!("daemon: serving /metrics on http://{}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let status = match &opts.status_socket {
            Some(p) => {
                let l = crate::observe::status::bind(p)?;
                info!("daemon: answering `portguard status` on {}", p.display());
                Some(l)
            }
            None => None,
        };
        Ok(Self {
            health,
            metrics,
            status,
        })
    }

    /// Serve them on the runtime, from the agent's shared snapshot.
    pub(super) fn spawn(self, rt: &tokio::runtime::Runtime, agent: &Agent) -> anyhow::Result<()> {
        let _guard = rt.enter();
        if let Some(l) = self.status {
            let listener = tokio::net::UnixListener::from_std(l).context("--status-socket")?;
            rt.spawn(crate::observe::status::serve(
                listener,
                agent.shared.clone(),
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
