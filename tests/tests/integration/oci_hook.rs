//! `portguard hook oci`: the OCI `createRuntime` hook that closes the start
//! window of a `container:` policy (issue 17). A container's cgroup appears
//! when runc creates it, and its entrypoint runs a moment later; without the
//! hook the agent governs that cgroup only once it has noticed it and asked
//! the runtime, so the entrypoint's first bind is judged by the pod's policy
//! instead (a slip). With the hook, runc waits, before the entrypoint runs,
//! until the agent has governed the cgroup.
//!
//! - `containerd_facts`: what the harness relies on, and what containerd
//!   1.6 does with a `createRuntime` hook (docs/oci-hook.md).
//! - `the_hook_governs_each_container_before_its_first_instruction`: first
//!   the control, without the hook: how often a fresh container's first
//!   bind slips past its `container:` policy (printed, not asserted); then
//!   the same starts with the hook: no slips, one deny event per start.
//! - `a_starved_agent_fails_the_hook_closed_or_open_as_configured`: the
//!   agent stopped (SIGSTOP) while a container starts: refused by default,
//!   started with `--on-failure open` and reported once the agent runs.

mod containerd_facts;

use std::time::{Duration, Instant};

use portguard::workload::cri::api::ContainerState;
use portguard_tests::{
    Agent, agent_bin,
    containerd::{Containerd, Hook, container_config, unavailable},
    probe_bin, require_root,
};
use serde_json::{Value, json};

/// A pod-level policy allowing 8080 and a `container: web` policy that does
/// not: the container's first bind of 8080 is denied only if its own
/// cgroup is governed before it runs.
fn policy(namespace: &str) -> String {
    format!(
        "policies:\n  - name: oci-pod\n    pods: {{namespace: {namespace}}}\n    bind: [{{ports: [8080]}}]\n  \
         - name: oci-web\n    pods: {{namespace: {namespace}, container: web}}\n    bind: [{{ports: [9000]}}]\n"
    )
}

/// The entrypoint of every `web` container: bind TCP 0.0.0.0:8080 first
/// thing, print the result, exit.
const BIND_8080: [&str; 5] = ["/pgprobe", "bind", "tcp", "0.0.0.0", "8080"];

/// How many containers each half of the test starts (`PORTGUARD_OCI_STARTS`,
/// default 100).
fn starts() -> u32 {
    std::env::var("PORTGUARD_OCI_STARTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// containerd (with the hook `portguard hook oci --socket <agent's>
/// HOOK_ARGS...` if `hook_args` is Some), an agent on [`policy`] asking it,
/// and one pod in `namespace` the agent governs. Returns the pod's sandbox
/// id and cgroup.
fn setup(namespace: &str, hook_args: Option<&[&str]>) -> (Containerd, Agent, String, String) {
    if let Some(why) = unavailable() {
        panic!("the OCI hook tests need containerd here: {why}");
    }
    let mut ctrd = Containerd::start(&probe_bin());
    let agent = Agent::start_with(
        &policy(namespace),
        &["--cri-socket", &ctrd.socket.display().to_string()],
    );
    if let Some(extra) = hook_args {
        // The hook names the agent's socket, the agent the runtime's: the
        // runtime takes its hook at a restart.
        ctrd.set_hook(Some(Hook::portguard(
            &agent_bin(),
            &agent.status_socket(),
            extra,
        )));
    }
    let (sb, _, pod_cg) = ctrd.run_pod(namespace, "web-0", &[("app", "web")]);
    wait_governed(&agent, &pod_cg);
    (ctrd, agent, sb, pod_cg)
}

/// Wait until the agent governs `cgroup` with a policy of its file.
fn wait_governed(agent: &Agent, cgroup: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let needle = format!("governs cgroup {cgroup} (");
    while !agent
        .stderr()
        .lines()
        .any(|l| l.contains(&needle) && !l.contains("`portguard:"))
    {
        assert!(
            Instant::now() < deadline,
            "the agent never governed {cgroup}:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start attempt `attempt` of container `web` (entrypoint [`BIND_8080`])
/// in the pod, wait for it to exit, remove it. Returns its id and what its
/// bind got (pgprobe's JSON line), or why there is none.
fn bind_at_start(ctrd: &Containerd, sb: &str, attempt: u32) -> (String, Result<Value, String>) {
    let id = ctrd.create_container(sb, container_config("web", attempt, &BIND_8080));
    let result = ctrd
        .try_start(&id)
        .map_err(|e| format!("StartContainer: {}", e.message()))
        .and_then(|()| {
            ctrd.wait_exited(&id, Duration::from_secs(10))
                .ok_or_else(|| "still running after 10 s".to_owned())?;
            // The shim copies the output to the log as the process exits.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let log = ctrd.attempt_log(sb, "web", attempt);
                // CRI log lines: TIME STREAM TAG MESSAGE.
                if let Some(v) = log
                    .lines()
                    .filter_map(|l| l.splitn(4, ' ').nth(3))
                    .find_map(|m| serde_json::from_str::<Value>(m).ok())
                {
                    return Ok(v);
                }
                if Instant::now() > deadline {
                    return Err(format!("no result in the log: {log:?}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    ctrd.remove_container(&id);
    (id, result)
}

/// Deny events of the `container: web` policy for port 8080, once there
/// are `want` (or after waiting for them in vain).
fn web_denials(agent: &Agent, want: usize) -> Vec<Value> {
    let matching = || {
        agent
            .events()
            .into_iter()
            .filter(|e| {
                e["verdict"] == "deny" && e["policy"] == "oci-web" && e["port"] == json!(8080)
            })
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + portguard_tests::EVENT_TIMEOUT;
    while matching().len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Anything more would be logged by now.
    std::thread::sleep(Duration::from_millis(300));
    matching()
}

#[test]
fn the_hook_governs_each_container_before_its_first_instruction() {
    require_root!();
    let (mut ctrd, agent, sb, pod_cg) = setup("oci-hooked", None);
    let n = starts();
    // The control first: the same starts without the hook. Each start's
    // bind is either judged by `oci-web` (the agent won the race) or
    // slips under the pod's looser `oci-pod`; how many slip is measured,
    // not asserted (it depends on scheduling), every outcome is one of
    // the two, and every denial is an event.
    let (mut slipped, mut denied) = (Vec::new(), 0usize);
    let t0 = Instant::now();
    for attempt in 1..=n {
        match bind_at_start(&ctrd, &sb, attempt) {
            (_, Ok(r)) if r["ok"] == true => slipped.push(attempt),
            (_, Ok(r)) if r["error"] == "EPERM" => denied += 1,
            (id, r) => panic!("control start {attempt} ({id}): {r:?}\n{}", agent.stderr()),
        }
    }
    let events = web_denials(&agent, denied);
    eprintln!(
        "without the hook: {n} starts in {:?}: {} binds of 8080 slipped (judged by the pod's \
         policy: starts {slipped:?}), {denied} EPERM",
        t0.elapsed(),
        slipped.len(),
    );
    assert_eq!(
        events.len(),
        denied,
        "one deny event per denied control start"
    );
    // Then with the hook, installed the way a node has it.
    ctrd.set_hook(Some(Hook::portguard(
        &agent_bin(),
        &agent.status_socket(),
        &[],
    )));
    let mut took = Vec::new();
    for attempt in n + 1..=2 * n {
        let t0 = Instant::now();
        let (id, r) = bind_at_start(&ctrd, &sb, attempt);
        took.push(t0.elapsed());
        let r = r.unwrap_or_else(|e| panic!("start {attempt} ({id}): {e}\n{}", agent.stderr()));
        assert_eq!(
            r["error"], "EPERM",
            "start {attempt}: the entrypoint's first bind is judged by `oci-web`: {r}"
        );
    }
    took.sort();
    eprintln!(
        "with the hook: {n} starts, start-to-exit median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    let events: Vec<Value> = web_denials(&agent, denied + n as usize)
        .into_iter()
        .skip(denied)
        .collect();
    assert_eq!(
        events.len(),
        n as usize,
        "one deny event of `oci-web` per start: {events:#?}"
    );
    for e in &events {
        let cg = e["cgroup"].as_str().unwrap_or_default();
        assert!(
            cg.starts_with(&format!("{pod_cg}/")),
            "the denial is in a container of the pod: {e}"
        );
    }
    // Every start asked the agent (without the hook most starts are won
    // by the agent anyway: see the control), and none failed.
    let m = agent.metrics_text();
    let metric = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
    };
    assert_eq!(
        metric("portguard_runtime_hook_requests_total"),
        f64::from(n),
        "{m}"
    );
    assert_eq!(metric("portguard_runtime_hook_refused_total"), 0.0, "{m}");
    eprintln!(
        "with the hook: the agent answered {n} requests in {:.1} ms on average, the slowest in \
         {:.1} ms",
        metric("portguard_runtime_hook_request_seconds_total") * 1000.0 / f64::from(n),
        metric("portguard_runtime_hook_request_slowest_seconds") * 1000.0
    );
    let failed: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| e["verdict"] == "hook_failed")
        .collect();
    assert!(failed.is_empty(), "no hook failed: {failed:#?}");
}

#[test]
fn a_starved_agent_fails_the_hook_closed_or_open_as_configured() {
    require_root!();
    let (mut ctrd, agent, sb, pod_cg) = setup("oci-starved", Some(&[]));

    // Default (auto: closed for a pod some `pods:` policy may select).
    let refused = ctrd.create_container(&sb, container_config("web", 1, &BIND_8080));
    let stopped = agent.stop_until_dropped();
    let t0 = Instant::now();
    let r = ctrd.try_start(&refused);
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2).saturating_sub(took));
    drop(stopped);
    let err = r.expect_err("the hook fails closed while the agent does not answer");
    eprintln!(
        "starved, closed: StartContainer failed after {took:?}: {}",
        err.message()
    );
    let (state, _) = ctrd.container_state(&refused);
    assert_ne!(state, ContainerState::ContainerRunning);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ctrd.attempt_log(&sb, "web", 1),
        "",
        "the refused container's entrypoint never ran"
    );
    let e = agent.wait_event(&[
        ("verdict", json!("hook_failed")),
        ("container_id", json!(refused)),
    ]);
    assert_eq!(e["action"], "refused_start", "{e}");
    assert_eq!(e["hook"], "oci", "{e}");
    ctrd.remove_container(&refused);

    // --on-failure open: the container starts, and the agent reports it.
    ctrd.set_hook(Some(Hook::portguard(
        &agent_bin(),
        &agent.status_socket(),
        &["--on-failure", "open"],
    )));
    let allowed = ctrd.create_container(&sb, container_config("web", 2, &BIND_8080));
    let stopped = agent.stop_until_dropped();
    let t0 = Instant::now();
    let r = ctrd.try_start(&allowed);
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2).saturating_sub(took));
    drop(stopped);
    r.unwrap_or_else(|e| panic!("the hook fails open: StartContainer: {}", e.message()));
    eprintln!("starved, open: StartContainer returned after {took:?}");
    let e = agent.wait_event(&[
        ("verdict", json!("hook_failed")),
        ("container_id", json!(allowed)),
    ]);
    assert_eq!(e["action"], "allowed_start", "{e}");
    assert_eq!(e["hook"], "oci", "{e}");
    assert_eq!(e["cgroup"], format!("{pod_cg}/{allowed}"), "{e}");
}

/// CRI-O lists a container only once its createRuntime hooks ran: its
/// hook's request names the container, which the agent takes only when the
/// runtime lists the pod (by the uid in the cgroup path) with the sandbox
/// the annotations name. Stood in for here by a container cgroup in a real
/// pod that containerd does not list.
#[test]
fn a_container_the_runtime_does_not_list_yet_is_named_by_its_hook() {
    require_root!();
    let (ctrd, agent, sb, pod_cg) = setup("oci-unlisted", None);
    let cid = format!("{:016x}", u64::from(std::process::id())).repeat(4);
    let cg = portguard_tests::Cgroup::existing(
        portguard_tests::cgroup2_root()
            .join(pod_cg.trim_start_matches('/'))
            .join(&cid),
        &format!("{pod_cg}/{cid}"),
    );
    let ask = |sandbox_id: &str| {
        agent.ask(
            &json!({"request": "govern", "cgroup_id": cg.id(), "cgroup": cg.rel, "hook": "oci",
                    "container_id": cid, "container_name": "web", "sandbox_id": sandbox_id})
            .to_string(),
        )
    };
    // Another sandbox than the pod's: not taken; the hook would fail.
    let a = ask(&"0".repeat(64));
    assert_eq!(a["identified"], false, "{a}");
    assert_eq!(a["policy"], "oci-pod", "{a}");
    // The pod's own: the container's own policy, before the runtime lists it.
    let a = ask(&sb);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["identified"], true, "{a}");
    assert_eq!(a["policy"], "oci-web", "{a}");
    assert_eq!(a["policy_cgroup"], cg.rel.as_str(), "{a}");
    drop(cg);
    drop(ctrd);
}
