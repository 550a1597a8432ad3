//! What portguard's kernel programs cost, from the kernel's own run
//! statistics (`portguard run --program-stats`, see
//! [`crate::kernel::ProgramStats`]): as Prometheus counters, in the status
//! document and in its human view. Without the flag none of this appears
//! (no metric, `program_stats: null`): the kernel counts nothing for us
//! then, and a zero would read as "free".
//!
//! | metric | labels |
//! |---|---|
//! | `portguard_program_runs_total` | `program` (bind4, post_bind4, connect6, listen, sock_ops, ...) |
//! | `portguard_program_run_seconds_total` | `program` |
//!
//! A run is one call of a hook: one `bind()`, `connect()`, `sendmsg()`,
//! `socket()`, `setsockopt()`... under an attach point, governed or not,
//! allowed or denied. Its mean cost is run time over runs.

use std::io::Write as _;

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::{Value, json};

use crate::{kernel::ProgramCost, observe::text::escape};

type Labels = Vec<(&'static str, String)>;

/// Register the program counters in `reg`.
pub fn register(reg: &mut Registry, programs: &[ProgramCost]) {
    let runs = Family::<Labels, Counter>::default();
    let seconds = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    for p in programs {
        let labels = vec![("program", p.program.clone())];
        runs.get_or_create(&labels).inc_by(p.runs);
        seconds.get_or_create(&labels).inc_by(p.run_ns as f64 / 1e9);
    }
    reg.register(
        "portguard_program_runs",
        "Runs of each of portguard's kernel programs, counted by the kernel while \
         --program-stats holds BPF run-time statistics on (a program's runs on every attach \
         point together)",
        runs,
    );
    reg.register(
        "portguard_program_run_seconds",
        "Seconds spent in each of portguard's kernel programs (kernel run_time_ns; divide by \
         portguard_program_runs_total for the mean cost of a run)",
        seconds,
    );
}

/// Mean nanoseconds per run (None: no run counted).
fn per_run(runs: u64, ns: u64) -> Option<f64> {
    (runs > 0).then(|| ns as f64 / runs as f64)
}

/// The status document's `program_stats`: null when off.
pub fn json(programs: Option<&[ProgramCost]>) -> Value {
    let Some(programs) = programs else {
        return Value::Null;
    };
    let runs: u64 = programs.iter().map(|p| p.runs).sum();
    let ns: u64 = programs.iter().map(|p| p.run_ns).sum();
    json!({
        "runs": runs,
        "run_ns": ns,
        "ns_per_run": per_run(runs, ns),
        "programs": programs.iter().map(|p| json!({
            "program": p.program,
            "id": p.id,
            "runs": p.runs,
            "run_ns": p.run_ns,
            "ns_per_run": per_run(p.runs, p.run_ns),
        })).collect::<Vec<_>>(),
    })
}

/// Nanoseconds, for people.
fn duration(ns: f64) -> String {
    match ns {
        n if n >= 1e9 => format!("{:.3} s", n / 1e9),
        n if n >= 1e6 => format!("{:.3} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.3} us", n / 1e3),
        n => format!("{n:.0} ns"),
    }
}

/// The human view of a status document's `program_stats` (nothing when
/// it is null).
pub fn render(stats: &Value) -> String {
    let Some(programs) = stats["programs"].as_array() else {
        return String::new();
    };
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mean = |v: &Value| v["ns_per_run"].as_f64().map_or("-".to_owned(), duration);
    let mut out = format!(
        "program cost (--program-stats): {} runs, {} in all, {} per run\n",
        n(&stats["runs"]),
        duration(n(&stats["run_ns"]) as f64),
        mean(stats),
    );
    let mut w = tabwriter::TabWriter::new(Vec::new()).padding(2);
    let _ = writeln!(w, "\nPROGRAM\tID\tRUNS\tTIME\tPER RUN");
    for p in programs {
        let _ = writeln!(
            w,
            "{}\t{}\t{}\t{}\t{}",
            escape(p["program"].as_str().unwrap_or("-")),
            n(&p["id"]),
            n(&p["runs"]),
            duration(n(&p["run_ns"]) as f64),
            mean(p),
        );
    }
    out += &String::from_utf8_lossy(&w.into_inner().unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Vec<ProgramCost> {
        vec![
            ProgramCost {
                program: "bind4".into(),
                id: 41,
                runs: 4,
                run_ns: 340,
            },
            ProgramCost {
                program: "ingress".into(),
                id: 42,
                runs: 0,
                run_ns: 0,
            },
        ]
    }

    #[test]
    fn counters_per_program() {
        let mut reg = Registry::default();
        register(&mut reg, &costs());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            r#"portguard_program_runs_total{program="bind4"} 4"#,
            r#"portguard_program_run_seconds_total{program="bind4"} 3.4e-7"#,
            r#"portguard_program_runs_total{program="ingress"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn status_shows_the_mean_cost_of_a_run() {
        let doc = json(Some(&costs()));
        assert_eq!(doc["runs"], 4);
        assert_eq!(doc["run_ns"], 340);
        assert_eq!(doc["ns_per_run"], 85.0);
        assert_eq!(doc["programs"][0]["ns_per_run"], 85.0);
        assert!(doc["programs"][1]["ns_per_run"].is_null());
        let text = render(&doc);
        assert!(
            text.starts_with(
                "program cost (--program-stats): 4 runs, 340 ns in all, 85 ns per run"
            ),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("bind4")).unwrap();
        assert!(row.contains(" 41 ") && row.ends_with("85 ns"), "{row}");
        let row = text.lines().find(|l| l.starts_with("ingress")).unwrap();
        assert!(row.ends_with('-'), "{row}");
    }

    #[test]
    fn off_is_null_and_silent() {
        assert!(json(None).is_null());
        assert_eq!(render(&Value::Null), "");
    }
}
