//! The CRI runtime under stress, with a real private containerd: answers
//! larger than gRPC's usual 4 MiB (pods with large annotations), and the
//! runtime not answering at all (killed, then restarted).

use std::time::{Duration, Instant};

use portguard_tests::{
    Agent, Cgroup, Probe, cgroup2_root,
    containerd::{Containerd, unavailable},
    portguard, probe_bin, require_root,
};
use serde_json::{Value, json};

/// Ports no other test uses.
const BIG_PORT: &str = "8138";
const HELD_PORT: &str = "8139";

fn containerd() -> Containerd {
    if let Some(why) = unavailable() {
        panic!("the CRI end-to-end tests need containerd here: {why}");
    }
    Containerd::start(&probe_bin())
}

#[test]
fn pods_are_governed_when_the_runtime_answers_more_than_4_mib() {
    require_root!();
    let mut ctrd = containerd();
    // Five pods with 1 MiB of annotations each: ListPodSandbox answers
    // more than 5 MiB, over tonic's default 4 MiB decode limit.
    let blob = "x".repeat(1 << 20);
    for i in 0..5 {
        ctrd.run_pod_annotated(
            "bulk",
            &format!("annotated-{i}"),
            &[("app", "bulk")],
            &[("example.com/blob", &blob)],
            false,
        );
    }
    let (web_sb, _, web_cg) = ctrd.run_pod("payments", "big-web-0", &[("app", "big-web")]);
    let web_ctr = ctrd.run_container(&web_sb, "server");
    let agent = Agent::start_with(
        "policies:\n  - name: big-web\n    pods: {namespace: payments, labels: {app: big-web}}\n    bind: [{ports: [8080]}]\n",
        &["--cri-socket", &ctrd.socket.display().to_string()],
    );
    assert!(
        agent.stderr().contains(&format!("governs cgroup {web_cg}")),
        "the labelled pod is governed although the runtime's answer is over 4 MiB:\n{}",
        agent.stderr()
    );
    let r = ctrd.probe(&web_ctr, &["bind", "tcp", "127.0.0.1", BIG_PORT]);
    assert_eq!(r["error"], "EPERM", "{r}");
    let e = agent.wait_event(&[("port", json!(8138)), ("k8s_pod", json!("big-web-0"))]);
    assert_eq!(e["policy"], "big-web");
    assert_eq!(e["container_name"], "server");
    assert_eq!(e["identity_source"], "cri");
}

/// Probe a bind from `cg` until it gives `want` (`true`: allowed) or
/// `within` passes; the last result.
fn bind_until(cg: &Cgroup, want_ok: bool, within: Duration) -> portguard_tests::ProbeResult {
    let deadline = Instant::now() + within;
    loop {
        let r = Probe::in_cgroup(cg).run(&["bind", "tcp", "127.0.0.1", HELD_PORT]);
        if r.ok == want_ok || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn while_the_runtime_is_down_pods_keep_their_policy_and_new_pods_stay_held() {
    require_root!();
    let mut ctrd = containerd();
    let (_, _, web_cg) = ctrd.run_pod("payments", "web-0", &[("app", "web")]);
    let mut agent = Agent::start_with(
        "policies:\n  - name: web\n    pods: {namespace: payments, labels: {app: web}}\n    bind: [{ports: [8080]}]\n",
        &[
            "--cri-socket",
            &ctrd.socket.display().to_string(),
            "--rescan-interval",
            "1s",
        ],
    );
    assert!(
        agent.stderr().contains(&format!("governs cgroup {web_cg}")),
        "{}",
        agent.stderr()
    );
    let root = cgroup2_root();
    // A process in the known pod (a cgroup below it inherits its policy).
    let in_web = Cgroup::existing(
        root.join(&web_cg[1..]).join("pgtest-probe"),
        &format!("{web_cg}/pgtest-probe"),
    );

    ctrd.kill_daemon();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.stderr().contains("NOT ANSWERING") {
        assert!(
            Instant::now() < deadline,
            "the agent does not say the runtime is down:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The known pod keeps its policy (the runtime's last answer).
    let r = Probe::in_cgroup(&in_web).run(&["bind", "tcp", "127.0.0.1", HELD_PORT]);
    r.assert_eperm();
    assert_eq!(agent.wait_event(&[("pid", json!(r.pid))])["policy"], "web");

    // A pod cgroup that appears while the runtime cannot be asked is held
    // by `portguard:identifying`, and stays held past the 10 s it gets
    // while the runtime answers.
    let uid = format!("0000c0de-0000-4000-8000-{:012x}", std::process::id());
    let new_pod = Cgroup::existing(
        root.join(format!("kubepods/besteffort/pod{uid}")),
        &format!("/kubepods/besteffort/pod{uid}"),
    );
    let t0 = Instant::now();
    let r = bind_until(&new_pod, false, Duration::from_secs(5));
    r.assert_eperm();
    std::thread::sleep(Duration::from_secs(13).saturating_sub(t0.elapsed()));
    let r = Probe::in_cgroup(&new_pod).run(&["bind", "tcp", "127.0.0.1", HELD_PORT]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["policy"], "portguard:identifying", "{e}");
    assert_eq!(e["k8s_pod_uid"], uid.as_str());
    // Status and metrics say so.
    let sock = agent.status_socket().display().to_string();
    let (code, out, err) = portguard(&["status", "--socket", &sock, "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["cri"]["up"], false, "{doc}");
    assert!(doc["cri"]["errors"].as_u64().unwrap() > 0, "{doc}");
    let (_, text, _) = portguard(&["status", "--socket", &sock]);
    assert!(text.contains("CRI runtime is NOT ANSWERING"), "{text}");
    let m = agent.metrics_text();
    assert!(m.contains("portguard_cri_up 0"), "{m}");

    // The runtime comes back: it does not know the pod, which gets the
    // usual 10 s from then and is released.
    ctrd.restart();
    let back = Instant::now();
    let r = bind_until(&new_pod, true, Duration::from_secs(25));
    assert!(
        r.ok,
        "the unknown pod is released once the runtime answers again: {r:?}\n{}",
        agent.stderr()
    );
    assert!(
        back.elapsed() >= Duration::from_secs(5),
        "released after the runtime answered, not before ({:?})",
        back.elapsed()
    );
    assert!(
        agent.stderr().contains("answers again"),
        "{}",
        agent.stderr()
    );
    assert!(agent.metrics_text().contains("portguard_cri_up 1"));
    assert!(agent.stop().success());
    drop((new_pod, in_web));
}

/// A pod cgroup the runtime does not list keeps the agent asking it every
/// 10 ms for up to 10 s (a sandbox being created); a policy file changed in
/// that time is still applied at once, not after those 10 s.
#[test]
fn a_pod_the_runtime_does_not_list_does_not_delay_a_reload() {
    require_root!();
    let ctrd = containerd();
    let cg = Cgroup::new("crireload");
    let policy = |port: u16| {
        format!(
            "policies:\n  - {{name: pods, pods: {{namespace: nowhere}}, bind: []}}\n  - {{name: svc, cgroup: {}, bind: [{{ports: [{port}]}}]}}\n",
            cg.rel
        )
    };
    let agent = Agent::start_with(
        &policy(8140),
        &[
            "--cri-socket",
            &ctrd.socket.display().to_string(),
            "--watch",
        ],
    );
    // A pod cgroup no runtime lists (another runtime's, or one being made).
    let uid = format!("0000c1a0-0000-4000-8000-{:012x}", std::process::id());
    let rel = format!("/kubepods/besteffort/pod{uid}");
    let ghost = Cgroup::existing(cgroup2_root().join(rel.trim_start_matches('/')), &rel);
    ghost.create();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.stderr().contains(&format!("pod{uid} held by")) {
        assert!(Instant::now() < deadline, "{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Replace the file the way editors do (rename).
    let tmp = agent.dir.path().join("new.yaml");
    std::fs::write(&tmp, policy(8141)).unwrap();
    let changed = Instant::now();
    std::fs::rename(&tmp, &agent.policy).unwrap();
    while !Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8141"])
        .ok
    {
        assert!(
            changed.elapsed() < Duration::from_secs(3),
            "the reload waited for the runtime:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("reloaded {:?} after the change", changed.elapsed());
    assert!(
        changed.elapsed() < Duration::from_secs(3),
        "the reload waited for the runtime"
    );
    drop(agent);
    drop(ghost);
}
