//! Liveness and readiness over HTTP, for Kubernetes probes and load
//! balancers (`portguard run --health-listen ADDR`).
//!
//! - `GET /readyz`: 200 once the programs are attached and the first policy
//!   is in the kernel maps (the body is the agent's status line), 503 before.
//! - `GET /healthz`: 200 while the agent's main loop (events, reloads, cgroup
//!   watch) keeps turning; 503 when it has not turned for `stale_after`,
//!   which a hung CRI call or a wedged reload would cause. The loop wakes at
//!   least every `--lost-report-interval`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

/// Shared between the main loop (writer) and the HTTP handlers (readers).
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    /// Milliseconds since `epoch` when the main loop last turned.
    heartbeat_ms: AtomicU64,
    ready: AtomicBool,
    status: Mutex<String>,
    stale_after: Duration,
}

impl Health {
    pub fn new(stale_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            status: Mutex::new("starting".into()),
            stale_after,
        })
    }

    /// The main loop turned.
    pub fn beat(&self) {
        self.heartbeat_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Enforcing; `status` says what (e.g. "enforcing 3 policies").
    pub fn set_ready(&self, status: &str) {
        status.clone_into(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
        self.ready.store(true, Ordering::Relaxed);
        self.beat();
    }

    fn since_beat(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }
}

/// The liveness answer for a loop that last turned `age` ago.
pub fn liveness(age: Duration, stale_after: Duration) -> (StatusCode, String) {
    if age <= stale_after {
        (
            StatusCode::OK,
            format!("ok: main loop turned {} ms ago\n", age.as_millis()),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: main loop has not turned for {:.1} s (limit {:.1} s)\n",
                age.as_secs_f64(),
                stale_after.as_secs_f64()
            ),
        )
    }
}

/// The readiness answer.
pub fn readiness(ready: bool, status: &str) -> (StatusCode, String) {
    if ready {
        (StatusCode::OK, format!("ready: {status}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {status}\n"),
        )
    }
}

async fn healthz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    liveness(h.since_beat(), h.stale_after)
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    let status = h.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    readiness(h.ready.load(Ordering::Relaxed), &status)
}

/// Serve the probes on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_only_when_the_loop_is_stale() {
        let limit = Duration::from_secs(30);
        assert_eq!(liveness(Duration::from_secs(1), limit).0, StatusCode::OK);
        assert_eq!(liveness(limit, limit).0, StatusCode::OK);
        let (code, body) = liveness(Duration::from_secs(31), limit);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("31.0 s"), "{body}");
    }

    #[test]
    fn readiness_follows_the_flag_and_says_why() {
        let h = Health::new(Duration::from_secs(30));
        let status = h.status.lock().unwrap().clone();
        assert_eq!(
            readiness(h.ready.load(Ordering::Relaxed), &status).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_ready("enforcing 2 policies");
        let status = h.status.lock().unwrap().clone();
        let (code, body) = readiness(h.ready.load(Ordering::Relaxed), &status);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, "ready: enforcing 2 policies\n");
        assert!(h.since_beat() < Duration::from_secs(1));
    }
}
