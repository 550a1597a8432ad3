//! Load: [`Loop`], a `pgprobe` repeating one operation until stopped, and the
//! [`Tally`] of its outcomes.

use std::{
    io::{BufRead as _, BufReader},
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{Probe, ProbeResult};

/// Collects a looping probe's results as they arrive.
pub struct Loop {
    child: Child,
    /// Raw result lines, parsed when asked (parsing as they arrive would
    /// compete for the CPU with the loop and the agent). Empty in counting
    /// mode.
    lines: Arc<Mutex<Vec<String>>>,
    tally: Arc<Mutex<Tally>>,
}

/// A loop's outcomes, counted (for loops of millions of attempts).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub ok: u64,
    /// Failed with EPERM: the policy denied it.
    pub eperm: u64,
    /// Failed otherwise (EADDRINUSE and the like: not a policy decision).
    pub other: u64,
    /// A few of the `other` lines.
    pub other_samples: Vec<String>,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.ok + self.eperm + self.other
    }
}

fn parse_result(line: &str) -> ProbeResult {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad pgprobe line {line:?}: {e}"))
}

impl Loop {
    /// Run `op` until dropped, `interval_ms` apart (0: back to back),
    /// keeping every result.
    pub fn start(p: &Probe, op: &[&str], interval_ms: u64) -> Self {
        Self::spawn(p, op, interval_ms, true)
    }

    /// Like [`Loop::start`], only counting outcomes ([`Loop::tally`]).
    pub fn counting(p: &Probe, op: &[&str], interval_ms: u64) -> Self {
        Self::spawn(p, op, interval_ms, false)
    }

    fn spawn(p: &Probe, op: &[&str], interval_ms: u64, keep: bool) -> Self {
        let mut child = p.spawn_loop(op, 1 << 40, interval_ms);
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (l2, t2) = (Arc::clone(&lines), Arc::clone(&tally));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !line.starts_with('{') {
                    continue;
                }
                {
                    let mut t = t2.lock().unwrap();
                    if line.contains("\"ok\":true") {
                        t.ok += 1;
                    } else if line.contains("\"errno\":1,") {
                        t.eperm += 1;
                    } else {
                        t.other += 1;
                        if t.other_samples.len() < 20 {
                            t.other_samples.push(line.clone());
                        }
                    }
                }
                if keep {
                    l2.lock().unwrap().push(line);
                }
            }
        });
        Self {
            child,
            lines,
            tally,
        }
    }

    /// Results so far.
    pub fn count(&self) -> usize {
        self.tally.lock().unwrap().total() as usize
    }

    /// Outcomes so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Stop the loop and return the final tally.
    pub fn finish_tally(mut self) -> Tally {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        self.tally()
    }

    /// Wait until `n` more results have arrived.
    pub fn wait_more(&self, n: usize) {
        let target = self.count() + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() < target {
            assert!(Instant::now() < deadline, "loop probe stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn outcomes_since(&self, from: usize) -> Vec<bool> {
        self.lines.lock().unwrap()[from..]
            .iter()
            .map(|l| {
                let r = parse_result(l);
                assert!(r.ok || r.errno == libc::EPERM, "unexpected result {r:?}");
                r.ok
            })
            .collect()
    }

    /// Stop the loop and return every result.
    pub fn finish(mut self) -> Vec<ProbeResult> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        lines.iter().map(|l| parse_result(l)).collect()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
