//! `run --policy-reports`: the agent's side of `crate::report`. The event
//! glue counts each record it writes into a [`Tally`] (a map lookup; no
//! I/O); once per window the serve loop renders the window's reports and
//! applies them on a task of its own, so the API server's latency never
//! holds the loop. A namespace that had results in the previous window and
//! none in this one gets an empty report, so stale failures do not linger.
//! A window whose reports could not be written is not retried (its
//! decisions are in the event log); while the previous window's apply is
//! still running, the window is extended instead of starting another.

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime},
};

use log::{debug, info, warn};

use crate::report::{Decision, Tally, client::Publisher, empty_report, rfc3339};

/// The agent's PolicyReport state.
pub(super) struct Reports {
    pub(super) every: Duration,
    tally: Tally,
    window_start: SystemTime,
    /// (namespace, node) reported in the previous window.
    reported: BTreeSet<(String, String)>,
    host: String,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The last apply failed (later failures are logged at debug).
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Reports {
    pub(super) fn new(every: Duration, host: &str) -> Self {
        Self {
            every,
            tally: Tally::default(),
            window_start: SystemTime::now(),
            reported: BTreeSet::new(),
            host: host.to_owned(),
            task: None,
            failing: std::sync::Arc::default(),
        }
    }

    /// Count a record the agent has written.
    pub(super) fn count(&mut self, r: &crate::events::EventRecord) {
        if let Some(d) = Decision::of_record(r) {
            self.tally.add(d);
        }
    }

    /// The window is over: render its reports and apply them in the
    /// background (on the current tokio runtime).
    pub(super) fn end_window(&mut self) {
        if self.task.as_ref().is_some_and(|t| !t.is_finished()) {
            debug!(
                "policy-reports: the previous window is still being written; extending this one"
            );
            return;
        }
        let now = SystemTime::now();
        let window = (rfc3339(self.window_start), rfc3339(now));
        let tally = std::mem::take(&mut self.tally);
        let keys = tally.report_keys();
        let mut reports = tally.reports((&window.0, &window.1));
        for (ns, host) in self.reported.difference(&keys) {
            reports.push(empty_report(ns, host, (&window.0, &window.1)));
        }
        if tally.unplaced > 0 || tally.overflow > 0 {
            debug!(
                "policy-reports: {} decisions without a namespace, {} over the result bound, in no report",
                tally.unplaced, tally.overflow
            );
        }
        self.reported = keys;
        self.window_start = now;
        if reports.is_empty() {
            return;
        }
        let failing = self.failing.clone();
        let host = self.host.clone();
        self.task = Some(tokio::spawn(async move {
            let publisher = match Publisher::infer().await {
                Ok(p) => p,
                Err(e) => {
                    if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        warn!("policy-reports: {e}");
                    }
                    return;
                }
            };
            let errors = publisher.apply_all(&reports).await;
            let written = reports.len() - errors.len();
            for e in &errors {
                if failing.load(std::sync::atomic::Ordering::Relaxed) {
                    debug!("policy-reports: {e}");
                } else {
                    warn!("policy-reports: {e}");
                }
            }
            let was_failing =
                failing.swap(!errors.is_empty(), std::sync::atomic::Ordering::Relaxed);
            if errors.is_empty() && was_failing {
                info!("policy-reports: writing reports again");
            }
            debug!(
                "policy-reports: node {host}: {written} reports written, {} failed",
                errors.len()
            );
        }));
    }
}
