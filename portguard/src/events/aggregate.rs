//! Flood control: identical decisions within a window become one line.
//!
//! The first decision of a kind (same policy, cgroup, hook, verdict,
//! protocol, family, address and port) is written at once, with `count: 1`.
//! Identical ones that follow within the window are counted, not written;
//! when the window ends, one aggregate line carries their `count`,
//! `first_seen` and `last_seen`, the process of the first of them (`pid`,
//! `tid`, `uid`, `comm`) and the distinct processes among them (`pids`, the
//! first [`AGGREGATE_PIDS`], and `pid_count`), and
//! the next window starts. A window that saw nothing more closes quietly,
//! so the next occurrence is again written at once. Any decision that
//! differs in one of those fields is a different kind, written at once: the
//! aggregation never hides a distinct denial. Counts add up exactly to the
//! decisions the kernel reported.
//!
//! Pure: the caller passes the time.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use std::collections::HashSet;

use crate::events::{AGGREGATE_PID_COUNT_MAX, AGGREGATE_PIDS, EventRecord};

/// What makes two decisions "identical".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    policy: Option<String>,
    cgroup_id: u64,
    hook: super::EventHook,
    verdict: super::Verdict,
    protocol: String,
    family: &'static str,
    address: String,
    port: u16,
    socket: Option<&'static str>,
}

impl Key {
    fn of(r: &EventRecord) -> Self {
        Self {
            policy: r.policy.clone(),
            cgroup_id: r.cgroup_id,
            hook: r.hook,
            verdict: r.verdict,
            protocol: r.protocol.clone(),
            family: r.family,
            address: r.address.clone(),
            port: r.port,
            socket: r.socket,
        }
    }
}

struct Window {
    ends: Instant,
    /// The first decision counted in this window, with the running count.
    pending: Option<EventRecord>,
    /// Distinct pids among the pending decisions (at most
    /// `AGGREGATE_PID_COUNT_MAX`).
    pids: HashSet<u32>,
}

impl Window {
    /// Count `pid` among the pending decisions' processes.
    fn saw(&mut self, pid: u32) {
        let Some(p) = &mut self.pending else {
            return;
        };
        if self.pids.len() < AGGREGATE_PID_COUNT_MAX as usize && self.pids.insert(pid) {
            if p.pids.len() < AGGREGATE_PIDS {
                p.pids.push(pid);
            }
            p.pid_count = Some(self.pids.len() as u32);
        }
    }

    /// The pending aggregate, if any; the window starts over.
    fn take(&mut self) -> Option<EventRecord> {
        self.pids.clear();
        self.pending.take()
    }
}

/// Open windows, one per kind of decision seen recently.
pub struct Aggregator {
    window: Duration,
    open: HashMap<Key, Window>,
    /// Most kinds tracked at once; beyond it, every open window is closed
    /// early (its aggregate written) to make room.
    max_kinds: usize,
    /// Decisions absorbed into aggregates so far (for metrics).
    pub aggregated: u64,
}

impl Aggregator {
    /// `window` zero disables aggregation: every decision is its own line.
    pub fn new(window: Duration, max_kinds: usize) -> Self {
        Self {
            window,
            open: HashMap::new(),
            max_kinds,
            aggregated: 0,
        }
    }

    /// A decision arrived at `now`. Appends to `out` the lines to write
    /// now: any aggregates closed early to make room, then the decision
    /// itself when it opens a window; nothing when it joins one.
    pub fn push(&mut self, rec: EventRecord, now: Instant, out: &mut Vec<EventRecord>) {
        if self.window.is_zero() {
            out.push(rec);
            return;
        }
        let key = Key::of(&rec);
        if let Some(w) = self.open.get_mut(&key)
            && now < w.ends
        {
            self.aggregated += 1;
            let pid = rec.pid;
            match &mut w.pending {
                Some(p) => {
                    p.count += 1;
                    p.last_seen = Some(rec.time);
                }
                None => {
                    let mut p = rec;
                    p.first_seen = Some(p.time.clone());
                    p.last_seen = Some(p.time.clone());
                    w.pending = Some(p);
                }
            }
            w.saw(pid);
            return;
        }
        // A new kind, or its window is over (not yet expired by the timer).
        if let Some(mut w) = self.open.remove(&key) {
            out.extend(w.take());
        } else if self.open.len() >= self.max_kinds {
            out.extend(self.drain());
        }
        self.open.insert(
            key,
            Window {
                ends: now + self.window,
                pending: None,
                pids: HashSet::new(),
            },
        );
        out.push(rec);
    }

    /// Close the windows that ended by `now`: their aggregates, oldest
    /// first. A window with something pending starts a new one.
    pub fn expire(&mut self, now: Instant) -> Vec<EventRecord> {
        let mut out = Vec::new();
        let window = self.window;
        self.open.retain(|_, w| {
            if w.ends > now {
                return true;
            }
            match w.take() {
                Some(p) => {
                    out.push(p);
                    w.ends = now + window;
                    true
                }
                None => false,
            }
        });
        out.sort_by(|a, b| a.first_seen.cmp(&b.first_seen));
        out
    }

    /// Every pending aggregate (at shutdown, or to make room).
    pub fn drain(&mut self) -> Vec<EventRecord> {
        let mut out: Vec<EventRecord> = self
            .open
            .drain()
            .filter_map(|(_, mut w)| w.take())
            .collect();
        out.sort_by(|a, b| a.first_seen.cmp(&b.first_seen));
        out
    }

    /// When the next window ends, if any is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.values().map(|w| w.ends).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventHook, Verdict};

    /// The lines `push` gives.
    fn push(a: &mut Aggregator, rec: EventRecord, now: Instant) -> Vec<EventRecord> {
        let mut out = Vec::new();
        a.push(rec, now, &mut out);
        out
    }

    fn rec(port: u16, time: &str, pid: u32) -> EventRecord {
        EventRecord {
            policy: Some("p".into()),
            cgroup: Some("/c".into()),
            cgroup_id: 7,
            pid,
            tid: pid,
            comm: "x".into(),
            protocol: "tcp".into(),
            address: "127.0.0.1".into(),
            port,
            policy_cgroup: Some("/c".into()),
            policy_cgroup_id: 7,
            ..EventRecord::new(
                Verdict::Deny,
                EventHook::Kernel(portguard_common::Hook::Bind4),
                time.into(),
                "h",
            )
        }
    }

    #[test]
    fn a_storm_becomes_one_line_per_window_and_counts_add_up() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut a = Aggregator::new(w, 1000);
        let mut lines = Vec::new();
        for i in 0..25_000u32 {
            // 25,000 identical denials over 25 s, one distinct in the middle.
            let now = t0 + Duration::from_millis(u64::from(i));
            lines.extend(a.expire(now));
            lines.extend(push(&mut a, rec(8081, &format!("t{i:05}"), i), now));
            if i == 12_345 {
                let d = push(&mut a, rec(9999, "distinct", 1), now);
                assert_eq!(d.len(), 1, "a distinct denial is written at once");
                lines.extend(d);
            }
        }
        lines.extend(a.drain());
        let storm: Vec<&EventRecord> = lines.iter().filter(|r| r.port == 8081).collect();
        assert_eq!(storm.iter().map(|r| r.count).sum::<u64>(), 25_000);
        // The first at once, then one aggregate per 10 s window.
        assert_eq!(storm.len(), 4, "{storm:#?}");
        assert_eq!(storm[0].count, 1);
        assert_eq!(storm[0].first_seen, None);
        assert_eq!(storm[1].first_seen.as_deref(), Some("t00001"));
        assert_eq!(storm[1].last_seen.as_deref(), Some("t09999"));
        assert_eq!(storm[1].pid, 1, "the aggregate shows its first process");
        // Every decision had a pid of its own: the first 16 are listed,
        // and the count stops at its cap.
        assert_eq!(storm[1].pids, (1..=16).collect::<Vec<u32>>());
        assert_eq!(storm[1].pid_count, Some(64), "counted up to the cap");
        assert_eq!(storm[0].pids, Vec::<u32>::new(), "not on single lines");
        assert_eq!(lines.iter().filter(|r| r.port == 9999).count(), 1);
        assert_eq!(a.aggregated, 24_999);
    }

    #[test]
    fn an_aggregate_lists_its_distinct_processes() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(Duration::from_secs(10), 1000);
        let mut out = push(&mut a, rec(80, "a", 1), t0);
        // Two processes alternating, then a third.
        for (i, pid) in [1, 2, 1, 2, 2, 3].into_iter().enumerate() {
            out.extend(push(&mut a, rec(80, &format!("t{i}"), pid), t0));
        }
        out.extend(a.drain());
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].count, 6);
        assert_eq!(out[1].pid, 1);
        assert_eq!(out[1].pids, vec![1, 2, 3]);
        assert_eq!(out[1].pid_count, Some(3));
        let json = serde_json::to_value(&out[1]).unwrap();
        assert_eq!(json["pids"], serde_json::json!([1, 2, 3]));
        assert_eq!(json["pid_count"], 3);
        let single = serde_json::to_value(&out[0]).unwrap();
        assert!(single.get("pids").is_none() && single.get("pid_count").is_none());
    }

    #[test]
    fn a_quiet_window_closes_and_the_next_occurrence_is_written_at_once() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(Duration::from_secs(1), 1000);
        assert_eq!(push(&mut a, rec(1, "a", 1), t0).len(), 1);
        assert!(a.expire(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(a.next_deadline(), None);
        assert_eq!(
            push(&mut a, rec(1, "b", 1), t0 + Duration::from_secs(3)).len(),
            1
        );
    }

    #[test]
    fn every_field_of_the_key_makes_a_distinct_kind() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(Duration::from_secs(10), 1000);
        let base = rec(80, "a", 1);
        assert_eq!(push(&mut a, base.clone(), t0).len(), 1);
        let variants = [
            EventRecord {
                cgroup_id: 8,
                ..base.clone()
            },
            EventRecord {
                hook: EventHook::Kernel(portguard_common::Hook::Bind6),
                ..base.clone()
            },
            EventRecord {
                verdict: Verdict::Audit,
                ..base.clone()
            },
            EventRecord {
                protocol: "udp".into(),
                ..base.clone()
            },
            EventRecord {
                address: "0.0.0.0".into(),
                ..base.clone()
            },
            EventRecord {
                port: 81,
                ..base.clone()
            },
            EventRecord {
                policy: Some("q".into()),
                ..base.clone()
            },
        ];
        for v in variants {
            assert_eq!(push(&mut a, v, t0).len(), 1);
        }
        // A different process with the same kind joins the window.
        assert!(push(&mut a, EventRecord { pid: 2, ..base }, t0).is_empty());
    }

    #[test]
    fn too_many_kinds_close_windows_early_without_losing_counts() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(Duration::from_secs(10), 2);
        let mut out = Vec::new();
        for port in [1, 1, 2, 2, 3] {
            out.extend(push(&mut a, rec(port, "t", 1), t0));
        }
        out.extend(a.drain());
        assert_eq!(out.iter().map(|r| r.count).sum::<u64>(), 5);
    }

    #[test]
    fn a_zero_window_writes_everything() {
        let mut a = Aggregator::new(Duration::ZERO, 10);
        let t0 = Instant::now();
        assert_eq!(push(&mut a, rec(1, "a", 1), t0).len(), 1);
        assert_eq!(push(&mut a, rec(1, "b", 1), t0).len(), 1);
        assert_eq!(a.next_deadline(), None);
    }
}
