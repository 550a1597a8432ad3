//! Debug builds only: points where the integration tests park the agent's
//! background work, so they can act while it is in flight, deterministically.
//! `<VAR>=<dir>` in the agent's environment arms gate `<VAR>`: its N-th
//! pass writes `<dir>/parked-N` and waits until `<dir>/release-N` exists (at
//! most 2 minutes). Release builds compile every gate to nothing.
//!
//! | variable | parks |
//! |---|---|
//! | `PORTGUARD_TEST_SURVEY_GATE` | survey N after its walk of the cgroup tree (`agent::survey`) |
//! | `PORTGUARD_TEST_SETTLE_GATE` | the agent's loop (all of it) after it answered the N-th batch of hooks' requests that applied, before the apply's bookkeeping (`agent::govern`) |
//! | `PORTGUARD_TEST_GOVERN_NOW_GATE` | the agent's loop after it answered the N-th batch of hooks' requests all at once (`agent::govern_now`), before it asks for the survey that resolves and applies in full |
//! | `PORTGUARD_TEST_STATUS_GATE` | the N-th status document or `/metrics` page, after its copy of the facts (`observe`) |

/// Park pass `seq` of gate `var`, if armed.
#[cfg(debug_assertions)]
pub fn park(var: &str, seq: u64) {
    use std::time::{Duration, Instant};
    let Some(dir) = std::env::var_os(var) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::write(dir.join(format!("parked-{seq}")), b"");
    let release = dir.join(format!("release-{seq}"));
    let until = Instant::now() + Duration::from_secs(120);
    while !release.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Park pass `seq` of gate `var`, if armed (release builds: never).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn park(_var: &str, _seq: u64) {}

/// Park the next pass of gate `var` (numbered from 1 per gate), if armed:
/// for gates whose passes have no number of their own.
#[cfg(debug_assertions)]
pub fn park_next(var: &'static str) {
    static PASSES: std::sync::Mutex<Vec<(&str, u64)>> = std::sync::Mutex::new(Vec::new());
    if std::env::var_os(var).is_none() {
        return;
    }
    let seq = {
        let mut passes = PASSES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = passes.iter_mut().find(|(v, _)| *v == var) {
            *n += 1;
            *n
        } else {
            passes.push((var, 1));
            1
        }
    };
    park(var, seq);
}

/// Park the next pass of gate `var`, if armed (release builds: never).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn park_next(_var: &'static str) {}
