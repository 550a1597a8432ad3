//! Numbers: medians, percentiles and minimums of measurements, large ones
//! printed grouped (`1,234,567`), and what /proc says about the agent
//! (fdinfo sums, RSS, CPU time over a window, threads) or its log (timings).

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The `q` quantile (0.5: median, 0.99: p99, 1.0: max) by nearest rank.
pub(crate) fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Sum of `key:` values over the agent's fdinfo entries that have `kind:`.
pub(crate) fn fdinfo_sum(pid: i32, kind: &str, key: &str) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if !text.lines().any(|l| l.starts_with(kind)) {
            continue;
        }
        for l in text.lines() {
            if let Some(v) = l.strip_prefix(key) {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

pub(crate) fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The CPU time (user + system, every thread) a process used, in clock
/// ticks.
pub(crate) fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of comm: state is field 3; utime 14, stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub(crate) fn clk_tck() -> f64 {
    // SAFETY: plain sysconf.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// How many threads a process runs now.
pub(crate) fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

/// A process's CPU time over a stretch of wall time.
pub(crate) struct CpuWindow {
    pid: i32,
    ticks: u64,
    started: std::time::Instant,
}

impl CpuWindow {
    pub(crate) fn start(pid: i32) -> Self {
        Self {
            pid,
            ticks: cpu_ticks(pid),
            started: std::time::Instant::now(),
        }
    }

    /// CPU seconds since [`CpuWindow::start`].
    pub(crate) fn seconds(&self) -> f64 {
        (cpu_ticks(self.pid) - self.ticks) as f64 / clk_tck()
    }

    /// CPU time since [`CpuWindow::start`] over the wall time since, in %
    /// of one core.
    pub(crate) fn percent(&self) -> f64 {
        self.seconds() / self.started.elapsed().as_secs_f64() * 100.0
    }
}

/// `12345678.4` -> `12,345,678` (a fraction below 10 keeps two decimals).
pub(crate) fn grouped(v: f64) -> String {
    if v.abs() < 10.0 && v.fract() != 0.0 {
        return format!("{v:.2}");
    }
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// A number following `marker` in the agent's log, e.g. "in 12.3 ms".
pub(crate) fn logged_ms(log: &str, line_marker: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(line_marker))?;
    let (_, tail) = line.rsplit_once(" in ")?;
    tail.trim().strip_suffix(" ms")?.parse().ok()
}

pub(crate) fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}
