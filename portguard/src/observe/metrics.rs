//! Prometheus metrics (`--metrics-addr`, default 127.0.0.1:9620), with the
//! `prometheus-client` crate.
//!
//! Decision counters come from the kernel's per-CPU maps, read at scrape
//! time (never re-counted here); the agent only adds what it alone knows:
//! aggregation, reloads, governed cgroups and map occupancy.
//!
//! | metric | labels |
//! |---|---|
//! | `portguard_decisions_total` | `policy`, `verdict` (allow, deny, audit, reported) |
//! | `portguard_hook_decisions_total` | `hook`, `verdict` |
//! | `portguard_events_lost_total` | |
//! | `portguard_events_suppressed_total` | `policy` |
//! | `portguard_policy_events_lost_total` | `policy` |
//! | `portguard_guard_dropped_packets_total` | |
//! | `portguard_fence_failures_total` | |
//! | `portguard_mark_failures_total` | |
//! | `portguard_events_aggregated_total` | |
//! | `portguard_events_written_total` | |
//! | `portguard_policy_reloads_total` | `result` (ok, failed) |
//! | `portguard_policies` | |
//! | `portguard_governed_cgroups` | |
//! | `portguard_delegated_cgroups_left_out` | `reason` (skipped, unfit) |
//! | `portguard_map_entries`, `portguard_map_capacity` | `map` |
//! | `portguard_inventory_passes_total`, `portguard_inventory_sockets_ended_total` | |
//! | `portguard_inventory_sockets_checked`, `portguard_inventory_violations`, `portguard_inventory_last_pass_seconds` | |
//! | `portguard_program_runs_total`, `portguard_program_run_seconds_total` | `program` (`--program-stats` only; see [`super::cost`]) |
//!
//! Everything is read when /metrics is asked for: the counters from their
//! maps, the program statistics with one `BPF_OBJ_GET_INFO_BY_FD` per
//! program (a dozen syscalls, microseconds), so a scrape always sees the
//! kernel's current numbers and no timer runs between scrapes.

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::snapshot::{Facts, KernelReading, Snapshot, VERDICTS};

type Labels = Vec<(&'static str, String)>;

/// The exposition text for `facts` and `kernel`.
pub fn render(facts: &Facts, kernel: &KernelReading) -> String {
    let mut reg = Registry::default();
    let decisions = Family::<Labels, Counter>::default();
    for (p, d) in facts.policies.iter().zip(&kernel.by_policy) {
        for (v, n) in VERDICTS.iter().zip(d) {
            decisions
                .get_or_create(&vec![
                    ("policy", p.name.clone()),
                    ("verdict", (*v).to_owned()),
                ])
                .inc_by(*n);
        }
    }
    reg.register(
        "portguard_decisions",
        "Governed operations decided, by policy and verdict (kernel counters)",
        decisions,
    );
    let suppressed = Family::<Labels, Counter>::default();
    let policy_lost = Family::<Labels, Counter>::default();
    for (p, d) in facts.policies.iter().zip(&kernel.by_policy) {
        let labels = vec![("policy", p.name.clone())];
        suppressed
            .get_or_create(&labels)
            .inc_by(d[portguard_common::POLICY_EVENTS_SUPPRESSED as usize]);
        policy_lost
            .get_or_create(&labels)
            .inc_by(d[portguard_common::POLICY_EVENTS_LOST as usize]);
    }
    reg.register(
        "portguard_events_suppressed",
        "Decisions enforced and counted but written as no event: over their policy's event \
         budget (--event-rate, --event-burst; kernel counters)",
        suppressed,
    );
    reg.register(
        "portguard_policy_events_lost",
        "Events the kernel could not queue, by the policy that made the decision (kernel \
         counters; portguard_events_lost_total is their sum)",
        policy_lost,
    );
    let hooks = Family::<Labels, Counter>::default();
    for (h, d) in &kernel.by_hook {
        for (v, n) in VERDICTS.iter().zip(d) {
            hooks
                .get_or_create(&vec![
                    ("hook", (*h).to_owned()),
                    ("verdict", (*v).to_owned()),
                ])
                .inc_by(*n);
        }
    }
    reg.register(
        "portguard_hook_decisions",
        "Governed operations decided, by hook and verdict (kernel counters)",
        hooks,
    );
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    counter(
        &mut reg,
        "portguard_events_lost",
        "Events the kernel could not queue (ring buffer full)",
        kernel.events_lost,
    );
    counter(
        &mut reg,
        "portguard_guard_dropped_packets",
        "Packets the packet guard dropped: addressed to a cut-off socket that neither the fence \
         nor SOCK_DESTROY could end (kernel counter; the guard is attached only while one exists)",
        kernel.guard_drops,
    );
    counter(
        &mut reg,
        "portguard_fence_failures",
        "Cut-off sockets the kernel would not fence: a process without CAP_NET_RAW had bound \
         them to a device (kernel counter; the agent destroys them)",
        kernel.fence_failures,
    );
    counter(
        &mut reg,
        "portguard_mark_failures",
        "Cut-off sockets the kernel could not mark for the packet guard: no memory for socket \
         storage, which a tenant can cause (kernel counter; the socket inventory looks for them)",
        kernel.mark_failures,
    );
    counter(
        &mut reg,
        "portguard_events_aggregated",
        "Decisions folded into an aggregate line instead of a line of their own",
        facts.events_aggregated,
    );
    counter(
        &mut reg,
        "portguard_events_written",
        "Event lines written (decisions, aggregates, pre-existing sockets)",
        facts.events_written,
    );
    let reloads = Family::<Labels, Counter>::default();
    reloads
        .get_or_create(&vec![("result", "ok".to_owned())])
        .inc_by(facts.reloads_ok);
    reloads
        .get_or_create(&vec![("result", "failed".to_owned())])
        .inc_by(facts.reloads_failed);
    reg.register(
        "portguard_policy_reloads",
        "Policy reloads (SIGHUP or file change), applied or rejected",
        reloads,
    );
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        reg.register(name, help, g);
    };
    gauge(
        &mut reg,
        "portguard_policies",
        "Policies in force",
        facts.policies.len() as i64,
    );
    gauge(
        &mut reg,
        "portguard_governed_cgroups",
        "cgroups with a policy of their own (descendants inherit it)",
        facts.governed_cgroups as i64,
    );
    let left_out = Family::<Labels, Gauge>::default();
    for (reason, v) in [
        ("skipped", facts.left_out.skipped),
        ("unfit", facts.left_out.unfit),
    ] {
        left_out
            .get_or_create(&vec![("reason", reason.to_owned())])
            .set(v as i64);
    }
    reg.register(
        "portguard_delegated_cgroups_left_out",
        "cgroups a unit:/pods: policy selects by name but does not govern: in a delegated \
         subtree without `delegated: govern` (skipped), or over --max-delegated-cgroups or the \
         map's room (unfit)",
        left_out,
    );
    if let Some(cri) = &facts.cri {
        gauge(
            &mut reg,
            "portguard_cri_up",
            "1 when the CRI runtime answered the agent's last call, 0 while it does not (pods keep \
             the policies of its last answer; new pod cgroups are held by portguard:identifying)",
            i64::from(cri.up),
        );
        counter(
            &mut reg,
            "portguard_cri_errors",
            "CRI refreshes that failed (runtime unreachable, timed out, or an answer over \
             --cri-max-message-bytes)",
            cri.errors,
        );
    }
    let h = &facts.runtime_hooks;
    counter(
        &mut reg,
        "portguard_runtime_hook_requests",
        "Govern requests from `portguard hook oci` / `hook unit` the agent answered",
        h.requests,
    );
    counter(
        &mut reg,
        "portguard_runtime_hook_refused",
        "Govern requests answered with ok: false (no such cgroup, not root, the kernel maps \
         disagreeing with the policy)",
        h.refused,
    );
    let seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    seconds.inc_by(h.seconds);
    reg.register(
        "portguard_runtime_hook_request_seconds",
        "Seconds spent answering govern requests (divide by portguard_runtime_hook_requests \
         for the mean)",
        seconds,
    );
    let slowest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    slowest.set(h.slowest);
    reg.register(
        "portguard_runtime_hook_request_slowest_seconds",
        "The slowest govern request answered in this run",
        slowest,
    );
    let failures = Family::<Labels, Counter>::default();
    // Every series from the start, at 0: a dashboard or an alert on
    // failures finds the metric before the first failure.
    for hook in ["oci", "unit"] {
        for action in ["refused_start", "allowed_start"] {
            let _ = failures.get_or_create(&vec![
                ("hook", hook.to_owned()),
                ("action", action.to_owned()),
            ]);
        }
    }
    for ((hook, action), n) in &h.failures {
        failures
            .get_or_create(&vec![("hook", hook.clone()), ("action", action.clone())])
            .inc_by(*n);
    }
    reg.register(
        "portguard_runtime_hook_failures",
        "Hooks that could not confirm their workload was governed (the agent did not answer in \
         time), by hook (oci, unit) and action (refused_start: failed closed; allowed_start: \
         failed open); reported when the agent reads the hooks' spool",
        failures,
    );
    let inv = &facts.inventory;
    counter(
        &mut reg,
        "portguard_inventory_passes",
        "Inventory passes over the host's listening and bound sockets completed (at start, \
         after each change of what is governed, every --inventory-interval)",
        inv.passes,
    );
    gauge(
        &mut reg,
        "portguard_inventory_sockets_checked",
        "Listening/bound sockets of governed cgroups the last inventory pass checked",
        inv.checked as i64,
    );
    gauge(
        &mut reg,
        "portguard_inventory_violations",
        "Sockets the last inventory pass found breaking their policy (no hook judged them: \
         bound before their cgroup was governed, or handed in; reported as `preexisting`)",
        inv.violations as i64,
    );
    counter(
        &mut reg,
        "portguard_inventory_sockets_ended",
        "Sockets the inventory ended (destroyed, fenced or closed) under an enforcing policy",
        inv.ended,
    );
    let took = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    took.set(inv.last_seconds);
    reg.register(
        "portguard_inventory_last_pass_seconds",
        "How long the last inventory pass took",
        took,
    );
    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for m in &facts.maps {
        entries
            .get_or_create(&vec![("map", m.name.to_owned())])
            .set(m.entries as i64);
        capacity
            .get_or_create(&vec![("map", m.name.to_owned())])
            .set(m.capacity as i64);
    }
    reg.register(
        "portguard_map_entries",
        "Entries in use per kernel map",
        entries,
    );
    reg.register(
        "portguard_map_capacity",
        "Capacity of each kernel map (--max-* flags)",
        capacity,
    );
    if let Some(programs) = &kernel.programs {
        super::cost::register(&mut reg, programs);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

async fn metrics(State(shared): State<Arc<Snapshot>>) -> impl IntoResponse {
    // Rendered off the agent's loop (thousands of policies take a while).
    let page = shared
        .off_loop(|facts, kernel| kernel.map(|k| render(facts, &k)))
        .await
        .and_then(|page| page.map_err(|e| format!("reading the kernel counters: {e}")));
    match page {
        Ok(text) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            format!("{e}\n"),
        ),
    }
}

/// Serve GET /metrics on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Snapshot>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::snapshot::{MapUse, PolicyFacts, since};

    #[test]
    fn renders_kernel_and_agent_numbers_with_labels() {
        let facts = Facts {
            policies: Arc::new(vec![Arc::new(PolicyFacts {
                name: "web".into(),
                slot: 3,
                baseline: [0; 6],
                mode: "enforce",
                ..PolicyFacts::default()
            })]),
            governed_cgroups: 2,
            reloads_ok: 1,
            reloads_failed: 2,
            events_aggregated: 99,
            events_written: 5,
            inventory: crate::observe::snapshot::InventoryFacts {
                passes: 3,
                checked: 8,
                violations: 2,
                ended: 4,
                last_seconds: 0.5,
            },
            maps: vec![MapUse {
                name: "cgroups",
                entries: 4,
                capacity: 32768,
            }],
            ..Facts::default()
        };
        let kernel = KernelReading {
            by_hook: vec![("bind4", [10, 3, 0, 0, 0, 0])],
            by_policy: vec![[10, 3, 0, 0, 40, 2]],
            events_lost: 7,
            guard_drops: 5,
            fence_failures: 6,
            mark_failures: 8,
            programs: None,
        };
        let text = render(&facts, &kernel);
        for line in [
            r#"portguard_decisions_total{policy="web",verdict="deny"} 3"#,
            r#"portguard_decisions_total{policy="web",verdict="allow"} 10"#,
            r#"portguard_hook_decisions_total{hook="bind4",verdict="deny"} 3"#,
            "portguard_events_lost_total 7",
            r#"portguard_events_suppressed_total{policy="web"} 40"#,
            r#"portguard_policy_events_lost_total{policy="web"} 2"#,
            "portguard_guard_dropped_packets_total 5",
            "portguard_fence_failures_total 6",
            "portguard_mark_failures_total 8",
            "portguard_events_aggregated_total 99",
            r#"portguard_policy_reloads_total{result="failed"} 2"#,
            "portguard_policies 1",
            "portguard_governed_cgroups 2",
            r#"portguard_map_entries{map="cgroups"} 4"#,
            r#"portguard_map_capacity{map="cgroups"} 32768"#,
            "portguard_inventory_passes_total 3",
            "portguard_inventory_sockets_checked 8",
            "portguard_inventory_violations 2",
            "portguard_inventory_sockets_ended_total 4",
            "portguard_inventory_last_pass_seconds 0.5",
            r#"portguard_runtime_hook_failures_total{hook="oci",action="allowed_start"} 0"#,
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn a_reused_slot_starts_from_its_baseline() {
        assert_eq!(
            since([10, 5, 0, 1, 9, 2], [4, 5, 0, 0, 3, 2]),
            [6, 0, 0, 1, 6, 0]
        );
        assert_eq!(since([1, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]), [0; 6]);
    }
}
