//! A storm's ledger, per policy: the decisions the kernel counted (deny +
//! audit, from `portguard status --json`) against what became of each: an
//! event the agent wrote (a line stands for its `count`: 1, or an
//! aggregate's size), suppressed by the policy's kernel event budget, or
//! lost (the ring buffer had no room). Exact when written + suppressed +
//! lost = decisions. The event log is read as it grows ([`LogTally`]): a
//! storm writes millions of lines.

use std::{
    collections::{HashMap, HashSet},
    io::{Read as _, Seek as _, SeekFrom},
    path::PathBuf,
    time::{Duration, Instant},
};

use portguard_tests::Agent;
use serde_json::Value;

use crate::stats::grouped;

/// One policy's decisions and what became of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    pub(crate) policy: String,
    /// Deny + audit decisions, counted by the kernel.
    pub(crate) decisions: u64,
    /// Decisions the event log stands for (sum of `count`).
    pub(crate) written: u64,
    /// Held back by the policy's event budget (kernel counter).
    pub(crate) suppressed: u64,
    /// No room in the ring buffer (kernel counter).
    pub(crate) lost: u64,
}

impl Ledger {
    pub(crate) fn exact(&self) -> bool {
        self.written + self.suppressed + self.lost == self.decisions
    }

    /// `noisy: 2,400 written + 21,984,600 suppressed + 0 lost = 21,987,000 decisions`.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{}: {} written + {} suppressed + {} lost {} {} decisions",
            self.policy,
            grouped(self.written as f64),
            grouped(self.suppressed as f64),
            grouped(self.lost as f64),
            if self.exact() { "=" } else { "!=" },
            grouped(self.decisions as f64)
        )
    }
}

/// The fields of an event line the ledger reads.
#[derive(serde::Deserialize)]
struct Line {
    policy: Option<String>,
    verdict: Option<String>,
    count: Option<u64>,
    port: Option<u16>,
    lost_total: Option<u64>,
}

/// The agent's event log, read as it grows: per policy, the decisions its
/// event lines stand for, and which (policy, port) pairs have a line.
pub(crate) struct LogTally {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Sum of `count` of event lines, per policy.
    pub(crate) written: HashMap<String, u64>,
    /// (policy, port) of every event line.
    pub(crate) ports: HashSet<(String, u16)>,
    /// Lines read (any kind).
    pub(crate) lines: u64,
    /// The largest `lost_total` of a lost-event line.
    pub(crate) lost_total: u64,
}

impl LogTally {
    pub(crate) fn new(agent: &Agent) -> Self {
        Self {
            path: agent.log.clone(),
            offset: 0,
            partial: Vec::new(),
            written: HashMap::new(),
            ports: HashSet::new(),
            lines: 0,
            lost_total: 0,
        }
    }

    /// Read what was appended since the last call.
    pub(crate) fn update(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = std::mem::take(&mut self.partial);
        let Ok(n) = f.read_to_end(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in buf[..complete].split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            self.lines += 1;
            let Ok(l) = serde_json::from_slice::<Line>(line) else {
                continue;
            };
            if let Some(t) = l.lost_total {
                self.lost_total = self.lost_total.max(t);
            }
            if l.verdict.is_none() {
                continue;
            }
            let policy = l.policy.unwrap_or_default();
            if let Some(port) = l.port {
                self.ports.insert((policy.clone(), port));
            }
            *self.written.entry(policy).or_default() += l.count.unwrap_or(1);
        }
        self.partial = buf[complete..].to_vec();
    }
}

/// `policy`'s kernel counters: (deny + audit decisions, suppressed, lost),
/// from `portguard status --json`.
fn counters(agent: &Agent, policy: &str) -> (u64, u64, u64) {
    let sock = agent.status_socket();
    let (code, out, err) =
        portguard_tests::portguard(&["status", "--json", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "portguard status: {err}");
    let doc: Value = serde_json::from_str(&out).expect("status JSON");
    let p = doc["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == policy))
        .unwrap_or_else(|| panic!("no policy {policy} in {doc}"));
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    (
        n(&p["decisions"]["deny"]) + n(&p["decisions"]["audit"]),
        n(&p["events"]["suppressed"]),
        n(&p["events"]["lost"]),
    )
}

/// The ledgers of `policies` once the agent has drained the storm: the log
/// and the kernel's counters read until neither changed for `quiet`
/// (longer than the agent's loss-report interval). Nothing waits for the
/// sums to agree: what is compared is what had settled.
pub(crate) fn settle(
    agent: &Agent,
    log: &mut LogTally,
    policies: &[&str],
    quiet: Duration,
) -> Vec<Ledger> {
    let read = |log: &mut LogTally| -> Vec<Ledger> {
        log.update();
        policies
            .iter()
            .map(|p| {
                let (decisions, suppressed, lost) = counters(agent, p);
                Ledger {
                    policy: (*p).to_owned(),
                    decisions,
                    written: log.written.get(*p).copied().unwrap_or(0),
                    suppressed,
                    lost,
                }
            })
            .collect()
    };
    let mut last = read(log);
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = read(log);
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= quiet || Instant::now() > deadline {
            return last;
        }
    }
}
