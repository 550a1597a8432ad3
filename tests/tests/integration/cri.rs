//! End to end with real parts: a private containerd (CRI plugin, runc, CNI
//! bridge) running pods like the kubelet does, and the agent selecting pods
//! by label through that runtime's CRI socket.

use std::time::{Duration, Instant};

use portguard_tests::{
    Agent,
    containerd::{Containerd, unavailable},
    probe_bin, require_root,
};
use serde_json::json;

#[test]
fn pods_selected_by_label_through_a_real_cri_runtime() {
    require_root!();
    if let Some(why) = unavailable() {
        panic!("the CRI end-to-end test needs containerd here: {why}");
    }
    let mut ctrd = Containerd::start(&probe_bin());
    // Two pods before the agent starts: one selected by label, one not.
    let (web_sb, web_uid, web_cg) = ctrd.run_pod("payments", "web-0", &[("app", "web")]);
    let web_ctr = ctrd.run_container(&web_sb, &web_uid, "payments", "web-0", "server");
    let (db_sb, db_uid, _) = ctrd.run_pod("payments", "db-0", &[("app", "db")]);
    let db_ctr = ctrd.run_container(&db_sb, &db_uid, "payments", "db-0", "server");

    let agent = Agent::start_with(
        "policies:\n  - name: web\n    pods: {namespace: payments, labels: {app: web}}\n    bind: [{ports: [8080]}]\n",
        &["--cri-socket", &ctrd.socket.display().to_string()],
    );
    assert!(
        agent.stderr().contains(&format!("governs cgroup {web_cg}")),
        "the selected pod's cgroup is governed:\n{}",
        agent.stderr()
    );

    // Inside the selected pod: a forbidden bind is denied, and the event
    // names its namespace, pod and container.
    let r = ctrd.probe(&web_ctr, &["bind", "tcp", "127.0.0.1", "8081"]);
    assert_eq!(r["error"], "EPERM", "{r}");
    let e = agent.wait_event(&[("port", json!(8081)), ("k8s_pod", json!("web-0"))]);
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["policy"], "web");
    assert_eq!(e["k8s_namespace"], "payments");
    assert_eq!(e["k8s_pod_uid"], web_uid);
    assert_eq!(e["container_name"], "server");
    assert_eq!(e["container_id"], web_ctr);
    assert_eq!(e["identity_source"], "cri");
    assert_eq!(e["policy_cgroup"], web_cg);
    // The allowed port works.
    let r = ctrd.probe(&web_ctr, &["bind", "tcp", "127.0.0.1", "8080"]);
    assert_eq!(r["ok"], true, "{r}");

    // The same bind in the other pod succeeds.
    let r = ctrd.probe(&db_ctr, &["bind", "tcp", "127.0.0.1", "8081"]);
    assert_eq!(r["ok"], true, "{r}");

    // A container added to the selected pod after the agent started is
    // governed from its first bind (it inherits the pod-level cgroup).
    let late = ctrd.run_container(&web_sb, &web_uid, "payments", "web-0", "late");
    let r = ctrd.probe(&late, &["bind", "udp", "0.0.0.0", "9999"]);
    assert_eq!(r["error"], "EPERM", "{r}");
    let e = agent.wait_event(&[("port", json!(9999)), ("container_name", json!("late"))]);
    assert_eq!(e["k8s_pod"], "web-0");

    // A new matching pod: governed as soon as its cgroup appears, so its
    // first container's first bind is already judged.
    let t0 = Instant::now();
    let (new_sb, new_uid, new_cg) = ctrd.run_pod("payments", "web-1", &[("app", "web")]);
    let sandbox_ms = t0.elapsed();
    eprintln!("RunPodSandbox returned after {sandbox_ms:?}");
    let new_ctr = ctrd.run_container(&new_sb, &new_uid, "payments", "web-1", "server");
    eprintln!("container started after {:?}", t0.elapsed());
    let r = ctrd.probe(&new_ctr, &["bind", "tcp", "127.0.0.1", "8081"]);
    if r["error"] != "EPERM" {
        let log = agent.stderr();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("aya_obj")).collect();
        for l in &lines[lines.len().saturating_sub(25)..] {
            eprintln!("agent: {l}");
        }
    }
    assert_eq!(
        r["error"], "EPERM",
        "the new pod's first bind is judged: {r}"
    );
    agent.wait_event(&[("port", json!(8081)), ("k8s_pod", json!("web-1"))]);
    // How long after the pod cgroup appeared did the agent govern it?
    let log = agent.stderr();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("governs cgroup {new_cg}")))
        .unwrap_or_else(|| panic!("no governs line for {new_cg}:\n{log}"));
    eprintln!("new pod: RunPodSandbox took {sandbox_ms:?}; agent: {line}");
    for l in log
        .lines()
        .filter(|l| l.contains(&new_uid) && (l.contains("held by") || l.contains("identified")))
    {
        eprintln!("agent: {l}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains(&new_uid) && l.contains("held by `portguard:identifying`")),
        "the new pod was held until identified:\n{log}"
    );

    // A pod cgroup the runtime does not know (its sandbox is still being
    // created, or it never will be) is held by `portguard:identifying`:
    // nothing in it may bind or connect until the runtime names the pod.
    let ghost_uid = "0000dead-0000-4000-8000-00000000beef";
    let root = portguard::cgroupfs::cgroup2_mount().unwrap();
    let ghost = portguard_tests::Cgroup::existing(
        root.join(format!("kubepods/besteffort/pod{ghost_uid}")),
        &format!("/kubepods/besteffort/pod{ghost_uid}"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r =
            portguard_tests::Probe::in_cgroup(&ghost).run(&["bind", "tcp", "127.0.0.1", "8080"]);
        if !r.ok || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["policy"], "portguard:identifying");
    assert_eq!(e["k8s_pod_uid"], ghost_uid);
    assert_eq!(e["identity_source"], "cgroup-path");
    drop(ghost);
}
