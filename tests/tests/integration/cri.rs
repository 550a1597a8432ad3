//! End to end with real parts: a private containerd (CRI plugin, runc, CNI
//! bridge) running pods like the kubelet does, and the agent selecting pods
//! by label through that runtime's CRI socket; then the agent itself running
//! as the DaemonSet's pod (its image, arguments, volumes, capabilities and
//! seccomp profile, translated the way the kubelet does) on the shipped
//! ConfigMap policy.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use portguard::workload::cri::api::{
    Capability, ContainerConfig, ContainerMetadata, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, Mount,
    NamespaceMode, NamespaceOption, SecurityProfile, security_profile::ProfileType,
};
use portguard_tests::{
    Agent, ConfigMapVolume, TestBpffs, agent_bin, cgroup2_root,
    containerd::{Containerd, unavailable},
    probe_bin, require_root,
};
use serde_json::{Value, json};

use crate::manifests::{deploy_dir, yaml_docs};

#[test]
fn pods_selected_by_label_through_a_real_cri_runtime() {
    require_root!();
    if let Some(why) = unavailable() {
        panic!("the CRI end-to-end test needs containerd here: {why}");
    }
    let mut ctrd = Containerd::start(&probe_bin());
    // Two pods before the agent starts: one selected by label, one not.
    let (web_sb, web_uid, web_cg) = ctrd.run_pod("payments", "web-0", &[("app", "web")]);
    let web_ctr = ctrd.run_container(&web_sb, "server");
    let (db_sb, _, _) = ctrd.run_pod("payments", "db-0", &[("app", "db")]);
    let db_ctr = ctrd.run_container(&db_sb, "server");

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
    let late = ctrd.run_container(&web_sb, "late");
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
    let new_ctr = ctrd.run_container(&new_sb, "server");
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
    // Judged by the pod's own policy, not by the hold: the pod was
    // identified before its first container started.
    let e = agent.wait_event(&[("port", json!(8081)), ("k8s_pod", json!("web-1"))]);
    assert_eq!(e["policy"], "web", "{e}");
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
    let root = portguard::workload::cgroupfs::cgroup2_mount().unwrap();
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

/// The node name the DaemonSet test's "kubelet" runs on.
const NODE: &str = "node1";

/// "256Mi" -> bytes (the quantities the DaemonSet uses).
fn quantity_bytes(q: &str) -> i64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: i64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unit {other} in {q}"),
    }
}

fn profile(v: &Value) -> Option<SecurityProfile> {
    let t = v["type"].as_str()?;
    Some(SecurityProfile {
        profile_type: match t {
            "RuntimeDefault" => ProfileType::RuntimeDefault,
            "Unconfined" => ProfileType::Unconfined,
            other => panic!("profile type {other}"),
        }
        .into(),
        localhost_ref: String::new(),
    })
}

/// A container `c` of the DaemonSet's pod `pod` as the kubelet hands it to
/// the runtime: its image, arguments, environment, volumes (with `host`
/// mapping a hostPath to where this host has it), resources and security
/// context.
fn kubelet_container_config(
    pod: &Value,
    c: &Value,
    host: &dyn Fn(&Value) -> String,
) -> ContainerConfig {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
            Mount {
                container_path: m["mountPath"].as_str().unwrap().to_owned(),
                host_path: host(v),
                readonly: m["readOnly"].as_bool().unwrap_or(false),
                ..Default::default()
            }
        })
        .collect();
    let sc = &c["securityContext"];
    let host_pid = pod["hostPID"] == true;
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: c["name"].as_str().unwrap().to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: c["image"].as_str().unwrap().to_owned(),
            ..Default::default()
        }),
        args: strings(&c["args"]),
        envs: c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| KeyValue {
                key: e["name"].as_str().unwrap().to_owned(),
                value: match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    // The kubelet fills in the pod's node.
                    Some("spec.nodeName") => NODE.to_owned(),
                    Some(other) => panic!("env fieldRef {other}"),
                    None => e["value"].as_str().unwrap().to_owned(),
                },
            })
            .collect(),
        mounts,
        log_path: format!("{}.log", c["name"].as_str().unwrap()),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: c["resources"]["limits"]["memory"]
                    .as_str()
                    .map_or(0, quantity_bytes),
                ..Default::default()
            }),
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: strings(&sc["capabilities"]["add"]),
                    drop_capabilities: strings(&sc["capabilities"]["drop"]),
                    ..Default::default()
                }),
                privileged: sc["privileged"] == true,
                namespace_options: Some(NamespaceOption {
                    pid: if host_pid {
                        NamespaceMode::Node
                    } else {
                        NamespaceMode::Container
                    }
                    .into(),
                    ..Default::default()
                }),
                run_as_user: sc["runAsUser"].as_i64().map(|value| Int64Value { value }),
                readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
                seccomp: profile(&sc["seccompProfile"]),
                apparmor: profile(&sc["appArmorProfile"]),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// GET http://127.0.0.1:PORT/PATH inside the network namespace of `pid`
/// (the way the kubelet's probe reaches the pod IP).
fn probe_in_netns(pid: u32, port: u16, path: &str) -> Option<(u16, String)> {
    let script = format!(
        "import urllib.request, urllib.error\n\
         try:\n    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=2)\n    print(r.status); print(r.read().decode())\n\
         except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
    );
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "python3", "-c", &script])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, body) = text.split_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

/// JSON lines a container wrote to standard output, from its CRI log.
fn stdout_json(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            let (_time, stream, _tag, line) = (f.next()?, f.next()?, f.next()?, f.next()?);
            (stream == "stdout").then(|| serde_json::from_str(line).ok())?
        })
        .collect()
}

#[test]
fn the_daemonset_runs_the_agent_through_the_cri() {
    require_root!();
    if let Some(why) = unavailable() {
        panic!("the CRI end-to-end test needs containerd here: {why}");
    }
    let dir = deploy_dir().join("kubernetes");
    let ds = yaml_docs(&dir.join("daemonset.yaml")).remove(0);
    let cm = yaml_docs(&dir.join("configmap.yaml")).remove(0);
    let pod_spec = &ds["spec"]["template"]["spec"];
    let policy = cm["data"]["policy.yaml"].as_str().unwrap().to_owned();

    // The node's bpffs (dropped after the pod: its pins are uninstalled).
    let node_bpffs = TestBpffs::new("cri-node");
    let mut ctrd = Containerd::start(&probe_bin());
    // The agent's image, made the way `cargo xtask image` makes it, from the
    // binary under test; the DaemonSet names it `portguard:0.1.0`.
    let archive = ctrd.dir.path().join("portguard-image.tar");
    xtask::oci::agent_image(&agent_bin(), "docker.io/library/portguard:0.1.0", &archive).unwrap();
    ctrd.import(&archive);

    // The ConfigMap, mounted the kubelet's way.
    let mut volume = ConfigMapVolume::new(&policy);
    let volume_dir = volume.dir.path().display().to_string();
    let cgroup2 = cgroup2_root().display().to_string();
    let socket = ctrd.socket.display().to_string();
    // The node's /run/portguard, /opt/portguard and /etc/containerd.
    let node_run = tempfile::tempdir().unwrap();
    let node_opt = tempfile::tempdir().unwrap();
    let node_etc = tempfile::tempdir().unwrap();
    let host = |v: &Value| -> String {
        if v.get("configMap").is_some() {
            return volume_dir.clone();
        }
        match v["hostPath"]["path"].as_str().unwrap() {
            "/run/portguard" => node_run.path().display().to_string(),
            "/opt/portguard" => node_opt.path().display().to_string(),
            "/etc/containerd" => node_etc.path().display().to_string(),
            // This host is hybrid: its cgroup2 tree is not /sys/fs/cgroup
            // (the manifest's comment says to change the path on such hosts).
            "/sys/fs/cgroup" => cgroup2.clone(),
            // The private containerd of this test.
            "/run/containerd/containerd.sock" => socket.clone(),
            // A bpffs directory of the test's own, so the agent's pins do not
            // land in the host's /sys/fs/bpf/portguard.
            "/sys/fs/bpf" => node_bpffs.path.display().to_string(),
            p => p.to_owned(),
        }
    };
    // A pod whose listener breaks the shipped policy, made before the agent
    // runs (so no hook judged it): the agent's inventory, from inside its
    // own pod's cgroup namespace, must find it by the kernel's cgroup id.
    let (legacy_sb, _, _) = ctrd.run_pod("payments", "legacy-0", &[("app", "legacy")]);
    let legacy = ctrd.run_container_cmd(
        &legacy_sb,
        "server",
        &["/pgprobe", "hold", "tcp", "0.0.0.0", "8082"],
    );
    let config = kubelet_container_config(pod_spec, &pod_spec["containers"][0], &host);
    let labels: Vec<(String, String)> = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (agent_sb, _, agent_cg) = ctrd.run_pod_with(
        ds["metadata"]["namespace"].as_str().unwrap(),
        "portguard-node1",
        &labels,
        pod_spec["hostPID"] == true,
    );
    // The init container first, as the kubelet runs it: it puts the OCI
    // hook on the node.
    let init = &pod_spec["initContainers"][0];
    ctrd.start_container(&agent_sb, kubelet_container_config(pod_spec, init, &host));
    let init_log = || ctrd.container_log(&agent_sb, init["name"].as_str().unwrap());
    let started = Instant::now();
    while !init_log().contains("base_runtime_spec") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the init container did not finish:\n{}\n{}",
            init_log(),
            ctrd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let node_bin = node_opt.path().join("bin/portguard");
    let version = Command::new(&node_bin).arg("--version").output().unwrap();
    assert!(version.status.success(), "the hook binary on the node runs");
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(node_etc.path().join("portguard-base-spec.json")).unwrap(),
    )
    .unwrap();
    let hook = &spec["hooks"]["createRuntime"][0];
    assert_eq!(hook["path"], "/opt/portguard/bin/portguard", "{spec}");
    assert_eq!(
        hook["args"],
        json!([
            "portguard",
            "hook",
            "oci",
            "--socket",
            "/run/portguard/status.sock",
            "--timeout",
            "1000ms",
            "--on-failure",
            "auto",
            "--fail-open-namespace",
            ds["metadata"]["namespace"],
            "--runtime",
            "containerd"
        ]),
        "the hook asks the agent where the DaemonSet puts its socket"
    );
    assert!(spec["process"].is_object() && spec["linux"]["namespaces"].is_array());
    let agent_ctr = ctrd.start_container(&agent_sb, config);
    let agent_log = |ctrd: &Containerd| ctrd.container_log(&agent_sb, "agent");

    // Readiness, probed like the kubelet: GET /readyz on the pod's address.
    let port: u16 = pod_spec["containers"][0]["ports"][0]["containerPort"]
        .as_u64()
        .unwrap() as u16;
    let procs = cgroup2_root()
        .join(agent_cg.trim_start_matches('/'))
        .join(&agent_ctr)
        .join("cgroup.procs");
    let started = Instant::now();
    let pid = loop {
        let pid = std::fs::read_to_string(&procs)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.parse::<u32>().ok()));
        if let Some(pid) = pid
            && probe_in_netns(pid, port, "/readyz").is_some_and(|(code, _)| code == 200)
        {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent pod never became ready:\n{}",
            agent_log(&ctrd)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "agent pod ready {:?} after its container started",
        started.elapsed()
    );
    let log = agent_log(&ctrd);
    assert!(log.contains("enforcing 4 policies"), "{log}");
    // As in a pod on a cgroup v2 node: a cgroup namespace of its own.
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).unwrap(),
        std::fs::read_link("/proc/self/ns/cgroup").unwrap(),
        "the agent's pod has its own cgroup namespace"
    );
    assert!(
        !log.contains("without CAP_"),
        "the pod's capabilities are the full documented set:\n{log}"
    );
    let (code, body) = probe_in_netns(pid, port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    // Pinned on the node's bpffs (through the hostPath), so enforcement
    // outlives the pod.
    let pins = node_bpffs.path.join("portguard");
    assert!(
        pins.join("links/portguard_setsockopt").exists()
            && pins.join("maps/PORTGUARD_STATE").exists(),
        "the pod pins its links and maps on the node's bpffs:\n{log}"
    );
    // `kubectl exec ... portguard status`, and the node's OCI hook: the
    // socket is in the node's /run/portguard.
    let status = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(node_run.path().join("status.sock"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let doc: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(doc["host"], NODE);
    // What a hook that cannot reach the agent reads to fail closed for a
    // pod the ConfigMap's `pods:` policies may select.
    let selection: Value = serde_json::from_str(
        &std::fs::read_to_string(node_run.path().join("hook-selection.json")).unwrap(),
    )
    .unwrap();
    assert!(
        selection["namespaces"]
            .as_array()
            .unwrap()
            .contains(&json!("payments")),
        "{selection}"
    );
    // The ConfigMap's four; a built-in hold (`portguard:identifying`) may be
    // listed too while one of this runtime's new pods waits to be listed.
    let named: Vec<&str> = doc["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| !n.starts_with("portguard:"))
        .collect();
    assert_eq!(named.len(), 4, "{doc}");

    // Workloads under the shipped policy.
    let (web_sb, _, _) = ctrd.run_pod("payments", "web-0", &[("app", "web")]);
    let web = ctrd.run_container(&web_sb, "server");
    let (db_sb, _, _) = ctrd.run_pod("payments", "db-0", &[("app", "db")]);
    let postgres = ctrd.run_container(&db_sb, "postgres");
    let sidecar = ctrd.run_container(&db_sb, "metrics");
    let (team_sb, _, _) = ctrd.run_pod("team-a", "api-0", &[("app", "api")]);
    let team = ctrd.run_container(&team_sb, "api");

    let bind = |ctr: &str, addr: &str, port: &str| ctrd.probe(ctr, &["bind", "tcp", addr, port]);
    let r = bind(&web, "0.0.0.0", "8080");
    assert_eq!(
        r["ok"],
        true,
        "web 0.0.0.0:8080: {r}\n--- agent ---\n{}",
        agent_log(&ctrd)
    );
    assert_eq!(bind(&web, "0.0.0.0", "8081")["error"], "EPERM");
    assert_eq!(
        bind(&web, "0.0.0.0", "9090")["error"],
        "EPERM",
        "metrics stay on loopback"
    );
    let r = bind(&web, "127.0.0.1", "9090");
    assert_eq!(
        r["ok"],
        true,
        "web 127.0.0.1:9090: {r}\n--- agent ---\n{}",
        agent_log(&ctrd)
    );
    let r = bind(&postgres, "0.0.0.0", "5432");
    assert_eq!(
        r["ok"],
        true,
        "postgres 0.0.0.0:5432: {r}\n--- agent ---\n{}",
        agent_log(&ctrd)
    );
    assert_eq!(bind(&postgres, "0.0.0.0", "5433")["error"], "EPERM");
    // The sidecar is not `postgres`: the namespace-wide policy governs it.
    assert_eq!(bind(&sidecar, "0.0.0.0", "5432")["error"], "EPERM");
    let r = bind(&sidecar, "127.0.0.1", "9000");
    assert_eq!(
        r["ok"],
        true,
        "sidecar 127.0.0.1:9000: {r}\n--- agent ---\n{}",
        agent_log(&ctrd)
    );
    // Audit mode: allowed, reported.
    let r = bind(&team, "0.0.0.0", "7000");
    assert_eq!(
        r["ok"],
        true,
        "team 0.0.0.0:7000: {r}\n--- agent ---\n{}",
        agent_log(&ctrd)
    );

    // The denials, as `kubectl logs` shows them, name pod and container.
    let find = |want: &[(&str, Value)]| -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = stdout_json(&agent_log(&ctrd))
                .into_iter()
                .find(|e| want.iter().all(|(k, v)| &e[*k] == v))
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no event {want:?} in the agent's log:\n{}",
                agent_log(&ctrd)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The inventory found the legacy pod's listener, from inside the
    // agent's cgroup namespace, and ended it.
    let e = find(&[("port", json!(8082)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["policy"], "payments-default", "{e}");
    assert_eq!(e["k8s_pod"], "legacy-0");
    assert_eq!(e["container_id"], legacy);
    assert_eq!(e["action"], "destroyed", "{e}");
    let e = find(&[("port", json!(8081)), ("k8s_pod", json!("web-0"))]);
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["policy"], "payments-web");
    assert_eq!(e["k8s_namespace"], "payments");
    assert_eq!(e["container_name"], "server");
    assert_eq!(e["container_id"], web);
    assert_eq!(e["host"], NODE, "events name the node (NODE_NAME)");
    assert_eq!(e["rule"], "bind");
    let e = find(&[("port", json!(9090)), ("k8s_pod", json!("web-0"))]);
    assert_eq!(
        e["rule"], "bind[1].address",
        "an internal port exposed: {e}"
    );
    // The pod's metrics, scraped on its address as Prometheus would.
    let (code, text) = probe_in_netns(pid, 9620, "/metrics").unwrap();
    assert_eq!(code, 200);
    let deny = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"portguard_decisions_total{policy="payments-web",verdict="deny"} "#)
        })
        .unwrap_or_else(|| panic!("no payments-web denials in /metrics:\n{text}"));
    assert_eq!(deny.trim(), "2", "8081 and 9090 on 0.0.0.0");
    let e = find(&[("port", json!(5432)), ("container_name", json!("metrics"))]);
    assert_eq!(e["policy"], "payments-default");
    assert_eq!(e["k8s_pod"], "db-0");
    let e = find(&[("port", json!(7000)), ("k8s_namespace", json!("team-a"))]);
    assert_eq!(e["verdict"], "audit");
    assert_eq!(e["policy"], "teams-audit");

    // Editing the ConfigMap reloads the policy in the running pod.
    volume.update(&policy.replace("- ports: [8080]", "- ports: [8080, 8081]"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while bind(&web, "0.0.0.0", "8081")["ok"] != true {
        assert!(
            Instant::now() < deadline,
            "the ConfigMap change was not applied:\n{}",
            agent_log(&ctrd)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent_log(&ctrd).contains("reloaded"));
    let events = stdout_json(&agent_log(&ctrd));
    let errors = portguard_tests::schema_errors(&events);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
