//! `--format ocsf`: a real agent's events, as a SIEM ingests them, validate
//! against the OCSF schema (scripts/ocsf_validate.py: PyPI's
//! ocsf-json-schema, offline) and say who did what where; `portguard events
//! --format ocsf` converts a real agent's JSON log the same way.

use std::time::{Duration, Instant};

use portguard_tests::{Agent, Cgroup, Probe, containerd::KubepodsLock, require_root};
use serde_json::{Value, json};

/// A container cgroup in the kubelet's layout
/// (`/kubepods/besteffort/pod<uid>/<container id>`): the agent reads the
/// pod uid and container id from the path (no runtime here names them).
fn pod_container(pid: u32) -> (Cgroup, Cgroup, String, String) {
    let uid = format!("{pid:08x}-0c5f-4a00-8000-000000000c5f");
    let cid = format!("{pid:064x}");
    let root = portguard::workload::cgroupfs::cgroup2_mount().unwrap();
    let pod = Cgroup::existing(
        root.join(format!("kubepods/besteffort/pod{uid}")),
        &format!("/kubepods/besteffort/pod{uid}"),
    );
    let container = pod.child(&cid);
    (pod, container, uid, cid)
}

/// Wait until the agent's log has an event for which `pred` holds.
fn wait_for(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + portguard_tests::EVENT_TIMEOUT;
    loop {
        if let Some(e) = agent.events().into_iter().find(|e| pred(e)) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no event {what}: {:#?}\n--- agent stderr ---\n{}",
            agent.events(),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every kind of decision a real agent makes, written with `--format
/// ocsf`: denials at every hook, an audit, a pre-existing socket, a
/// cut-off (or denied) listen, an aggregate, and a loss report. Each line
/// is a valid OCSF 1.3.0 event of its class, and the decisions carry the
/// process, user, container, pod, device and policy.
#[test]
fn a_real_agents_ocsf_events_validate_against_the_ocsf_schema() {
    require_root!();
    // A pod cgroup in the shared /kubepods tree: no other test's agent
    // with `pods:` policies may be running to hold it.
    let _kubepods = KubepodsLock::take();
    let pid = std::process::id();
    let (_pod, container, uid, cid) = pod_container(pid);
    let audited = Cgroup::new("ocsf-audit");
    // Bound before the agent starts: reported as pre-existing (and ended).
    // Not in the pod: another agent on this host with `pods:` policies
    // holds every new pod cgroup until its runtime names it.
    let holder = Cgroup::new("ocsf-held");
    let (held, _h) = Probe::in_cgroup(&holder).hold(&["hold", "tcp", "0.0.0.0", "9999"]);
    held.assert_ok();
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - name: ocsf-pod\n    cgroup: /kubepods/besteffort/pod{uid}\n    bind: [{{ports: [8080]}}]\n    connect: [{{ports: [53]}}]\n  - {{name: ocsf-audited, cgroup: {}, mode: audit, bind: []}}\n  - {{name: ocsf-held, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            audited.rel, holder.rel
        ),
        &[
            "--format",
            "ocsf",
            "--aggregate-window",
            "1s",
            "--ring-buffer-size",
            "4096",
        ],
    );
    wait_for(&agent, "for the pre-existing socket", |e| {
        e["unmapped"]["verdict"] == "preexisting"
    });
    let p = Probe::in_cgroup(&container);
    let bind = p.run(&["bind", "tcp", "127.0.0.1", "8081"]);
    bind.assert_eperm();
    let cut_off = portguard_tests::every_kind_of_event(
        &agent,
        &p,
        &audited,
        &[
            &["bind", "udp", "::", "8081"],
            &["bind", "udp", "127.0.0.1", "0"],
            &["connect", "tcp", "127.0.0.1", "80"],
            &["connect", "udp", "::1", "443"],
            &["sendto", "127.0.0.1", "5353"],
            &["socket", "raw4"],
        ],
    );
    wait_for(&agent, "reporting the loss", |e| e["class_uid"] == 1008);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.stop().success());

    let events = agent.events();
    let errors = portguard_tests::ocsf_errors(&events);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // Not one portguard JSON line among them.
    assert!(
        events.iter().all(|e| e.get("verdict").is_none()),
        "{events:#?}"
    );
    eprintln!(
        "an OCSF event from this run: {}",
        events
            .iter()
            .find(|e| e["unmapped"]["hook"] == "bind4" && e["dst_endpoint"]["port"] == 8081)
            .unwrap_or(&Value::Null)
    );

    // The bind denied above, in full.
    let e = events
        .iter()
        .find(|e| {
            e["actor"]["process"]["pid"] == bind.pid
                && e["unmapped"]["hook"] == "bind4"
                && e["dst_endpoint"]["port"] == 8081
        })
        .unwrap_or_else(|| panic!("no event for the bind: {events:#?}"));
    assert_eq!(
        (&e["class_uid"], &e["activity_id"]),
        (&json!(4001), &json!(7)),
        "{e}"
    );
    assert_eq!(e["type_uid"], 400_107);
    assert_eq!(
        (&e["action_id"], &e["disposition_id"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(
        (&e["action"], &e["disposition"]),
        (&json!("Denied"), &json!("Blocked"))
    );
    assert_eq!(e["status_code"], "EPERM");
    assert_eq!(e["metadata"]["version"], "1.3.0");
    assert_eq!(e["metadata"]["product"]["name"], "portguard");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(e["device"]["hostname"], host.trim());
    let process = &e["actor"]["process"];
    assert_eq!(process["tid"], bind.tid);
    assert_eq!(process["name"], "pgprobe");
    assert_eq!(process["user"]["uid"], "0");
    assert_eq!(process["group"]["uid"], "0");
    assert_eq!(e["actor"]["user"]["uid"], "0");
    assert_eq!(process["container"]["uid"], cid.as_str());
    assert_eq!(process["container"]["pod_uuid"], uid.as_str());
    assert_eq!(process["container"]["orchestrator"], "Kubernetes");
    assert_eq!(e["dst_endpoint"]["ip"], "127.0.0.1");
    assert_eq!(e["dst_endpoint"]["container"]["uid"], cid.as_str());
    assert_eq!(e["connection_info"]["protocol_name"], "tcp");
    assert_eq!(e["connection_info"]["boundary"], "Localhost");
    assert_eq!(
        e["firewall_rule"],
        json!({"name": "ocsf-pod", "type": "portguard policy", "condition": "bind"})
    );
    assert_eq!(e["unmapped"]["k8s_pod_uid"], uid.as_str());
    assert_eq!(e["unmapped"]["identity_source"], "cgroup-path");
    assert_eq!(e["unmapped"]["cgroup"], container.rel.as_str());
    assert_eq!(e["unmapped"]["cgroup_id"], container.id());
    assert_eq!(e["count"], 1);
    // Time: milliseconds, and the nanoseconds portguard wrote.
    let ms = e["time"].as_i64().unwrap();
    let dt = humantime::parse_rfc3339(e["time_dt"].as_str().unwrap()).unwrap();
    let dt_ms = dt
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(ms, dt_ms);

    // Every kind this test meant to produce is there.
    let has = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        assert!(events.iter().any(pred), "no {what}: {events:#?}");
    };
    let hook = |h: &'static str| move |e: &Value| e["unmapped"]["hook"] == h;
    has("bind6 (Listen)", &|e| {
        hook("bind6")(e) && e["activity_id"] == 7 && e["unmapped"]["dual_stack"] == true
    });
    has("post_bind4", &|e| {
        hook("post_bind4")(e) && e["activity_id"] == 7
    });
    has("connect4 (Open, outbound)", &|e| {
        hook("connect4")(e)
            && e["activity_id"] == 1
            && e["connection_info"]["direction_id"] == 2
            && e["dst_endpoint"]["port"] == 80
            && e["src_endpoint"]["container"]["uid"] == cid.as_str()
    });
    has("connect6", &|e| {
        hook("connect6")(e)
            && e["dst_endpoint"]["ip"] == "::1"
            && e["connection_info"]["protocol_ver_id"] == 6
    });
    has("sendmsg4 (Traffic)", &|e| {
        hook("sendmsg4")(e) && e["activity_id"] == 6
    });
    has("sock_create (Other)", &|e| {
        hook("sock_create")(e) && e["activity_id"] == 99 && e["unmapped"]["socket"] == "raw"
    });
    has("listen", &|e| {
        hook("listen")(e)
            && e["activity_id"] == 7
            && if cut_off {
                e["unmapped"]["verdict"] == "cut_off" && e["status_detail"] == "destroyed"
            } else {
                e["disposition_id"] == 2
            }
    });
    has("the audit (Allowed, Detected)", &|e| {
        e["unmapped"]["verdict"] == "audit"
            && e["action_id"] == 1
            && e["disposition_id"] == 15
            && e["firewall_rule"]["name"] == "ocsf-audited"
            && e["firewall_rule"]["condition"] == "bind[]"
    });
    has("the pre-existing socket", &|e| {
        hook("inventory")(e)
            && e["dst_endpoint"]["port"] == 9999
            && e["actor"]["process"]["pid"] == held.pid
            && e["unmapped"]["socket_inode"].is_u64()
            && e["firewall_rule"]["name"] == "ocsf-held"
            && e["disposition"] == "Blocked"
    });
    has("the aggregate", &|e| {
        e["dst_endpoint"]["port"] == 8085
            && e["count"] == 2
            && e["start_time"].is_i64()
            && e["end_time"].as_i64() >= e["start_time"].as_i64()
    });
    has("the loss report (Event Log Activity)", &|e| {
        e["class_uid"] == 1008
            && e["activity_name"] == "Events Lost"
            && e["count"].as_u64() >= Some(1)
            && e["unmapped"]["lost"] == e["count"]
    });
    // Decisions add up as they do in portguard's JSON: the denials of port
    // 8085 written (1 + an aggregate of 2) are 3.
    let n8085: u64 = events
        .iter()
        .filter(|e| e["class_uid"] == 4001 && e["dst_endpoint"]["port"] == 8085)
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(n8085, 3, "{events:#?}");
}

/// `portguard events --format ocsf` (and `ecs`) on a real agent's JSON log:
/// one valid OCSF event per decision line, the same events `--format ocsf`
/// would have written.
#[test]
fn portguard_events_converts_a_json_log_to_ocsf() {
    require_root!();
    let cg = Cgroup::new("ocsf-convert");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: convert, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &["--log", log.to_str().unwrap()],
    );
    let p = Probe::in_cgroup(&cg);
    let r4 = p.run(&["bind", "tcp", "0.0.0.0", "8081"]);
    r4.assert_eperm();
    p.run(&["bind", "tcp", "::", "8082"]).assert_eperm();
    // The harness reads its own log; this one is ours.
    let read = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + portguard_tests::EVENT_TIMEOUT;
    while !read().iter().any(|e| e["port"] == 8082) {
        assert!(
            Instant::now() < deadline,
            "no event for port 8082: {:#?}",
            read()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(agent.stop().success());
    let lines = read();
    let decisions = lines.iter().filter(|e| e.get("verdict").is_some()).count();
    assert!(decisions >= 2, "{lines:#?}");

    let (code, out, err) =
        portguard_tests::portguard(&["events", "--format", "ocsf", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let ocsf: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ocsf.len(), decisions, "{out}");
    let errors = portguard_tests::ocsf_errors(&ocsf);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let e = ocsf
        .iter()
        .find(|e| e["dst_endpoint"]["port"] == 8081)
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(e["actor"]["process"]["pid"], r4.pid);
    assert_eq!(e["firewall_rule"]["name"], "convert");
    assert_eq!(e["disposition"], "Blocked");
    assert!(ocsf.iter().all(|e| e["class_uid"] == 4001));

    // Filters apply before the conversion; ECS the same way.
    let (code, out, err) = portguard_tests::portguard(&[
        "events",
        "--format",
        "ecs",
        "--port",
        "8082",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let ecs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ecs.len(), 1, "{out}");
    assert_eq!(ecs[0]["source"]["port"], 8082);
    assert_eq!(ecs[0]["event"]["type"], json!(["connection", "denied"]));
    assert_eq!(ecs[0]["portguard"]["port"], 8082);
    // --summary is a table or JSON, and says so.
    let (code, _, err) = portguard_tests::portguard(&[
        "events",
        "--summary",
        "--format",
        "ocsf",
        log.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--summary prints a table or JSON"), "{err}");
}
