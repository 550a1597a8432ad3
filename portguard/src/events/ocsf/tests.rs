//! Unit tests of the OCSF and ECS forms of event lines: what each verdict,
//! hook and report becomes, that every kind validates against the OCSF
//! schema (scripts/ocsf_validate.py, offline), that the writer writes the
//! chosen form, and that the default JSON line is unchanged.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use portguard_common::Hook;
use serde_json::{Value, json};

use crate::{events::*, hook::spool::HookFailed};

const T: &str = "2026-11-22T02:41:07.093321594Z";

/// A decision as the agent writes it: a pod's container, denied a bind.
fn decision(verdict: Verdict, hook: EventHook) -> EventRecord {
    let mut r = EventRecord::new(verdict, hook, T.into(), "node-7");
    r.policy = Some("payments-web".into());
    r.rule = Some("bind[1].address".into());
    r.cgroup = Some("/kubepods/besteffort/pod2f0e/9b2a".into());
    r.cgroup_id = 73321;
    r.pid = 48213;
    r.tid = 48214;
    r.uid = 1000;
    r.gid = 1001;
    r.comm = "server".into();
    r.protocol = "tcp".into();
    r.address = "0.0.0.0".into();
    r.port = 9090;
    r.policy_cgroup = Some("/kubepods/besteffort/pod2f0e".into());
    r.policy_cgroup_id = 73318;
    r.identity = WorkloadIdentity {
        k8s_namespace: Some("payments".into()),
        k8s_pod: Some("web-0".into()),
        k8s_pod_uid: Some("2f0e1c2d-3b4a-4c5d-8e6f-7a8b9c0d1e2f".into()),
        container_name: Some("server".into()),
        container_id: Some("9b2a".into()),
        unit: None,
        identity_source: Some("cri"),
    };
    r
}

fn ocsf(r: &EventRecord) -> Value {
    serde_json::to_value(r.ocsf()).unwrap()
}

fn lost() -> LostRecord {
    LostRecord {
        schema_version: SCHEMA_VERSION,
        time: T.into(),
        host: "node-7".into(),
        lost: 93,
        lost_total: 412,
        since: Some("2026-11-22T02:41:01Z".into()),
        until: Some(T.into()),
        agent_restarted: true,
        policies: vec![PolicyLost {
            policy: "batch".into(),
            lost: 93,
            lost_total: 412,
        }],
    }
}

fn suppressed() -> SuppressedRecord {
    SuppressedRecord {
        schema_version: SCHEMA_VERSION,
        time: T.into(),
        host: "node-7".into(),
        policy: "batch".into(),
        suppressed: 48211,
        suppressed_total: 96530,
    }
}

fn hook_failure(action: &str) -> HookFailed {
    HookFailed {
        schema_version: SCHEMA_VERSION,
        time: T.into(),
        host: "node-7".into(),
        verdict: "hook_failed".into(),
        hook: "oci".into(),
        action: action.into(),
        reason: "the agent did not answer in time".into(),
        on_failure: if action == "refused_start" {
            "closed"
        } else {
            "open"
        }
        .into(),
        cgroup: "/kubepods/besteffort/pod2f0e/9b2a".into(),
        cgroup_id: 73321,
        container_id: Some("9b2a".into()),
        namespace: Some("payments".into()),
        pod: Some("web-0".into()),
        pod_uid: None,
        container: Some("server".into()),
        unit: None,
    }
}

/// Every kind of line portguard writes, as OCSF events.
fn every_kind() -> Vec<Value> {
    let kernel = |h| EventHook::Kernel(h);
    let mut out = Vec::new();
    for verdict in [
        Verdict::Deny,
        Verdict::Audit,
        Verdict::CutOff,
        Verdict::Reported,
        Verdict::Unknown,
    ] {
        for hook in [
            Hook::Bind4,
            Hook::Bind6,
            Hook::PostBind4,
            Hook::PostBind6,
            Hook::Connect4,
            Hook::Connect6,
            Hook::Sendmsg4,
            Hook::Sendmsg6,
            Hook::Listen,
            Hook::Accept,
            Hook::SockCreate,
            Hook::Setsockopt,
        ] {
            let mut r = decision(verdict, kernel(hook));
            if matches!(hook, Hook::Bind6 | Hook::Connect6 | Hook::PostBind6) {
                r.family = "ipv6";
                r.address = "::1".into();
            }
            if hook == Hook::SockCreate {
                r.socket = Some("raw");
                r.protocol = "raw".into();
                r.address = String::new();
                r.port = 0;
            }
            out.push(ocsf(&r));
        }
    }
    let mut unknown = decision(Verdict::Deny, EventHook::Unknown);
    unknown.protocol = "132".into();
    out.push(ocsf(&unknown));
    // The inventory: held by a process, and by none (pid 0), under an
    // enforcing policy (destroyed, failed) and an audit one (no action).
    for (pid, action) in [(48213, Some("destroyed")), (0, Some("failed")), (0, None)] {
        let mut r = decision(Verdict::Preexisting, EventHook::Inventory);
        r.pid = pid;
        r.action = action;
        r.socket_inode = Some(991);
        out.push(ocsf(&r));
    }
    let mut cut = decision(Verdict::CutOff, EventHook::Kernel(Hook::Listen));
    cut.action = Some("fenced");
    cut.autobind = true;
    out.push(ocsf(&cut));
    // An aggregate of a systemd unit's denials, without a rule or identity
    // source beyond the path.
    let mut agg = decision(Verdict::Deny, EventHook::Kernel(Hook::Bind6));
    agg.identity = WorkloadIdentity {
        unit: Some("nginx.service".into()),
        identity_source: Some("cgroup-path"),
        ..WorkloadIdentity::default()
    };
    agg.family = "ipv6";
    agg.address = "::".into();
    agg.dual_stack = true;
    agg.count = 50;
    agg.first_seen = Some(T.into());
    agg.last_seen = Some("2026-11-22T02:41:17.5Z".into());
    agg.pids = vec![48213, 48299];
    agg.pid_count = Some(2);
    out.push(ocsf(&agg));
    // The cgroup was gone before the event was read: no policy, no path.
    let mut gone = decision(Verdict::Deny, EventHook::Kernel(Hook::Connect4));
    gone.policy = None;
    gone.rule = None;
    gone.cgroup = None;
    gone.identity = WorkloadIdentity::default();
    out.push(ocsf(&gone));
    out.push(serde_json::to_value(lost().ocsf()).unwrap());
    let mut quiet = lost();
    quiet.agent_restarted = false;
    quiet.since = None;
    quiet.until = None;
    quiet.policies.clear();
    out.push(serde_json::to_value(quiet.ocsf()).unwrap());
    out.push(serde_json::to_value(suppressed().ocsf()).unwrap());
    for action in ["refused_start", "allowed_start"] {
        out.push(serde_json::to_value(EventLine::ocsf(&hook_failure(action))).unwrap());
    }
    out
}

/// Validate OCSF events with scripts/ocsf_validate.py (`version`: against
/// that OCSF release instead of the one each event names).
pub(crate) fn ocsf_errors(events: &[Value], version: Option<&str>) -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ocsf_validate.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (run scripts/setup.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(events).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OCSF validator did not run (scripts/setup.sh installs ocsf-json-schema): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_kind_of_line_is_a_valid_ocsf_event() {
    let events = every_kind();
    assert_eq!(events.len(), 5 * 12 + 1 + 3 + 1 + 1 + 1 + 2 + 1 + 2);
    let errors = ocsf_errors(&events, None);
    assert!(errors.is_empty(), "{errors:#?}");
    // The same events read as OCSF 1.8.0's (the newest the package has):
    // nothing they use was dropped or changed since 1.3.0.
    let errors = ocsf_errors(&events, Some("1.8.0"));
    assert!(errors.is_empty(), "{errors:#?}");
}

/// The validator is not a rubber stamp: it rejects what OCSF forbids.
#[test]
fn the_ocsf_validator_rejects_invalid_events() {
    let good = ocsf(&decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4)));
    let mut bad_disposition = good.clone();
    bad_disposition["disposition_id"] = json!(1234);
    let mut unknown_field = good.clone();
    unknown_field["verdict"] = json!("deny");
    let mut no_action = good.clone();
    no_action.as_object_mut().unwrap().remove("action_id");
    let mut bad_ip = good.clone();
    bad_ip["dst_endpoint"]["ip"] = json!("not-an-ip");
    let bad = [bad_disposition, unknown_field, no_action, bad_ip];
    let errors = ocsf_errors(&bad, None);
    for i in 0..bad.len() {
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("event {i} "))),
            "event {i} passed: {errors:#?}"
        );
    }
    assert!(ocsf_errors(&[good], None).is_empty());
}

/// (verdict, action) -> (action_id, disposition_id, status_id, severity_id).
#[test]
fn each_verdict_has_its_security_control_outcome() {
    let table = [
        (Verdict::Deny, None, (2, 2, 2, 3)),
        (Verdict::Deny, Some("destroyed"), (2, 2, 2, 3)),
        (Verdict::Audit, None, (1, 15, 1, 2)),
        (Verdict::CutOff, Some("destroyed"), (2, 2, 1, 3)),
        (Verdict::CutOff, Some("fenced"), (2, 2, 1, 3)),
        (Verdict::CutOff, Some("dropped"), (2, 2, 1, 3)),
        (Verdict::CutOff, Some("failed"), (2, 27, 1, 4)),
        (Verdict::Reported, None, (2, 2, 1, 3)),
        (Verdict::Preexisting, Some("destroyed"), (2, 2, 1, 3)),
        (Verdict::Preexisting, Some("closed"), (2, 2, 1, 3)),
        (Verdict::Preexisting, Some("failed"), (2, 27, 1, 4)),
        (Verdict::Preexisting, None, (1, 15, 1, 2)),
        (Verdict::Unknown, None, (0, 0, 0, 0)),
    ];
    for (verdict, action, want) in table {
        let mut r = decision(verdict, EventHook::Kernel(Hook::Bind4));
        r.action = action;
        let e = ocsf(&r);
        let got = (
            e["action_id"].as_u64().unwrap(),
            e["disposition_id"].as_u64().unwrap(),
            e["status_id"].as_u64().unwrap(),
            e["severity_id"].as_u64().unwrap(),
        );
        assert_eq!(got, want, "{verdict:?} {action:?}: {e}");
        // The captions go with the ids.
        let disposition = match want.1 {
            2 => "Blocked",
            15 => "Detected",
            27 => "Error",
            _ => "Unknown",
        };
        assert_eq!(e["disposition"], disposition, "{verdict:?} {action:?}");
        assert_eq!(
            e["status_code"].as_str(),
            (verdict == Verdict::Deny).then_some("EPERM")
        );
        assert_eq!(e["unmapped"]["verdict"], json!(verdict));
    }
}

/// hook -> (activity_id, direction_id, where the address goes).
#[test]
fn each_hook_has_its_network_activity() {
    let table = [
        (EventHook::Kernel(Hook::Bind4), 7, 1, "dst"),
        (EventHook::Kernel(Hook::Bind6), 7, 1, "dst"),
        (EventHook::Kernel(Hook::PostBind4), 7, 1, "dst"),
        (EventHook::Kernel(Hook::PostBind6), 7, 1, "dst"),
        (EventHook::Kernel(Hook::Listen), 7, 1, "dst"),
        (EventHook::Inventory, 7, 1, "dst"),
        (EventHook::Kernel(Hook::Accept), 1, 1, "dst"),
        (EventHook::Kernel(Hook::Connect4), 1, 2, "remote"),
        (EventHook::Kernel(Hook::Connect6), 1, 2, "remote"),
        (EventHook::Kernel(Hook::Sendmsg4), 6, 2, "remote"),
        (EventHook::Kernel(Hook::Sendmsg6), 6, 2, "remote"),
        (EventHook::Kernel(Hook::SockCreate), 99, 0, "dst"),
        (EventHook::Kernel(Hook::Setsockopt), 99, 0, "dst"),
        (EventHook::Unknown, 0, 0, "dst"),
    ];
    for (hook, activity, direction, side) in table {
        let e = ocsf(&decision(Verdict::Deny, hook));
        assert_eq!(e["class_uid"], 4001, "{hook:?}");
        assert_eq!(e["category_uid"], 4);
        assert_eq!(e["activity_id"], activity, "{hook:?}");
        assert_eq!(e["type_uid"], 400_100 + activity, "{hook:?}");
        assert_eq!(e["connection_info"]["direction_id"], direction, "{hook:?}");
        assert_eq!(e["unmapped"]["hook"], hook.name());
        if activity == 99 {
            assert_eq!(e["activity_name"], hook.name());
        }
        let dst = &e["dst_endpoint"];
        assert_eq!(
            (&dst["ip"], &dst["port"]),
            (&json!("0.0.0.0"), &json!(9090))
        );
        if side == "remote" {
            // The caller is the source; the destination is not its host.
            assert_eq!(e["src_endpoint"]["hostname"], "node-7", "{hook:?}");
            assert_eq!(e["src_endpoint"]["container"]["uid"], "9b2a");
            assert!(dst.get("hostname").is_none(), "{hook:?}");
        } else {
            // The bound address is the caller's own end.
            assert!(e.get("src_endpoint").is_none(), "{hook:?}");
            assert_eq!(dst["hostname"], "node-7");
            assert_eq!(dst["container"]["uid"], "9b2a");
        }
    }
}

/// The actor (process, user, group, container, pod), the device, the
/// policy and every portguard field OCSF has no attribute for.
#[test]
fn a_decision_carries_who_where_and_which_policy() {
    let mut r = decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4));
    r.address = "127.0.0.1".into();
    let e = ocsf(&r);
    assert_eq!(e["time"], 1_795_315_267_093_i64);
    assert_eq!(e["time_dt"], T);
    assert_eq!(e["metadata"]["version"], "1.3.0");
    assert_eq!(e["metadata"]["product"]["name"], "portguard");
    assert_eq!(e["metadata"]["original_time"], T);
    assert_eq!(
        e["metadata"]["profiles"],
        json!([
            "host",
            "container",
            "security_control",
            "linux/linux_users",
            "datetime"
        ])
    );
    assert_eq!(e["device"]["hostname"], "node-7");
    let p = &e["actor"]["process"];
    assert_eq!(
        (&p["pid"], &p["tid"], &p["name"]),
        (&json!(48213), &json!(48214), &json!("server"))
    );
    assert_eq!(p["user"]["uid"], "1000");
    assert_eq!(p["group"]["uid"], "1001");
    assert_eq!(e["actor"]["user"]["uid"], "1000");
    assert_eq!(
        p["container"],
        json!({"uid": "9b2a", "name": "server",
               "pod_uuid": "2f0e1c2d-3b4a-4c5d-8e6f-7a8b9c0d1e2f", "orchestrator": "Kubernetes"})
    );
    assert_eq!(
        e["firewall_rule"],
        json!({"name": "payments-web", "type": "portguard policy", "condition": "bind[1].address"})
    );
    let c = &e["connection_info"];
    assert_eq!(
        (&c["protocol_name"], &c["protocol_num"]),
        (&json!("tcp"), &json!(6))
    );
    assert_eq!(c["protocol_ver_id"], 4);
    assert_eq!(
        (&c["boundary_id"], &c["boundary"]),
        (&json!(1), &json!("Localhost"))
    );
    let u = &e["unmapped"];
    assert_eq!(u["k8s_namespace"], "payments");
    assert_eq!(u["k8s_pod"], "web-0");
    assert_eq!(u["cgroup"], "/kubepods/besteffort/pod2f0e/9b2a");
    assert_eq!(u["cgroup_id"], 73321);
    assert_eq!(u["policy_cgroup_id"], 73318);
    assert_eq!(u["identity_source"], "cri");
    assert_eq!(u["rule"], "bind[1].address");
    assert_eq!(
        e["message"],
        "portguard denied: bind4 tcp 127.0.0.1:9090 by server (pid 48213) in payments/web-0/server; \
         policy payments-web, rule bind[1].address"
    );
    // Not loopback: no boundary claimed.
    let wide = ocsf(&decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4)));
    assert!(wide["connection_info"].get("boundary_id").is_none());
    // A pod uid that is no UUID stays out of `pod_uuid` (and in unmapped).
    let mut odd = decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4));
    odd.identity.k8s_pod_uid = Some("2f0e".into());
    let e = ocsf(&odd);
    assert!(e["actor"]["process"]["container"].get("pod_uuid").is_none());
    assert_eq!(e["unmapped"]["k8s_pod_uid"], "2f0e");
}

#[test]
fn an_aggregate_is_one_event_with_its_count_and_period() {
    let mut r = decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4));
    r.count = 50;
    r.first_seen = Some(T.into());
    r.last_seen = Some("2026-11-22T02:41:17.5Z".into());
    r.pids = vec![1, 2];
    r.pid_count = Some(2);
    let e = ocsf(&r);
    assert_eq!(e["count"], 50);
    assert_eq!(e["start_time"], 1_795_315_267_093_i64);
    assert_eq!(e["end_time"], 1_795_315_277_500_i64);
    assert_eq!(e["end_time_dt"], "2026-11-22T02:41:17.5Z");
    assert_eq!(e["unmapped"]["pids"], json!([1, 2]));
    assert_eq!(e["unmapped"]["pid_count"], 2);
    assert!(e["message"].as_str().unwrap().ends_with("; 50 times"));
    // A single decision: count 1, no period.
    let one = ocsf(&decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4)));
    assert_eq!(one["count"], 1);
    assert!(one.get("start_time").is_none() && one.get("end_time").is_none());
}

/// A socket no process holds (pid 0) has no actor; the socket's container
/// still shows on its endpoint.
#[test]
fn a_preexisting_socket_without_a_process_has_no_actor() {
    let mut r = decision(Verdict::Preexisting, EventHook::Inventory);
    r.pid = 0;
    r.action = Some("destroyed");
    let e = ocsf(&r);
    assert!(e.get("actor").is_none(), "{e}");
    assert_eq!(e["dst_endpoint"]["container"]["name"], "server");
    assert_eq!(e["status_detail"], "destroyed");
    assert_eq!(e["unmapped"]["action"], "destroyed");
}

/// Loss and suppression reports are about the event log, not the
/// network: Event Log Activity, with the decisions they stand for as
/// `count`, so no SIEM query over Network Activity counts them twice.
#[test]
fn reports_are_event_log_activity() {
    let e = serde_json::to_value(lost().ocsf()).unwrap();
    assert_eq!(
        (&e["class_uid"], &e["category_uid"]),
        (&json!(1008), &json!(1))
    );
    assert_eq!(
        (&e["activity_id"], &e["activity_name"]),
        (&json!(99), &json!("Events Lost"))
    );
    assert_eq!(e["type_uid"], 100_899);
    assert_eq!(e["count"], 93);
    assert_eq!(e["status_id"], 2);
    assert_eq!(e["start_time_dt"], "2026-11-22T02:41:01Z");
    assert_eq!(e["end_time_dt"], T);
    assert_eq!(e["unmapped"]["lost_total"], 412);
    assert_eq!(e["unmapped"]["agent_restarted"], true);
    assert_eq!(e["unmapped"]["policies"][0]["policy"], "batch");
    assert_eq!(e["metadata"]["profiles"], json!(["host", "datetime"]));
    let s = serde_json::to_value(suppressed().ocsf()).unwrap();
    assert_eq!(s["class_uid"], 1008);
    assert_eq!(s["activity_name"], "Events Suppressed");
    assert_eq!(s["count"], 48211);
    assert_eq!(s["unmapped"]["policy"], "batch");
    assert_eq!(s["unmapped"]["suppressed_total"], 96530);
}

#[test]
fn a_hook_failure_is_application_lifecycle() {
    let refused = serde_json::to_value(EventLine::ocsf(&hook_failure("refused_start"))).unwrap();
    assert_eq!(
        (&refused["class_uid"], &refused["category_uid"]),
        (&json!(6002), &json!(6))
    );
    assert_eq!(refused["activity_name"], "Hook Failed");
    assert_eq!(refused["app"]["feature"]["name"], "hook oci");
    assert_eq!(refused["status_id"], 2);
    assert_eq!(refused["severity_id"], 3);
    assert_eq!(refused["status_detail"], "the agent did not answer in time");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("payments/web-0/server")
    );
    assert_eq!(refused["unmapped"]["action"], "refused_start");
    assert_eq!(refused["unmapped"]["pod"], "web-0");
    let allowed = serde_json::to_value(EventLine::ocsf(&hook_failure("allowed_start"))).unwrap();
    // It may have run ungoverned.
    assert_eq!(allowed["severity_id"], 4);
}

/// The writer writes the chosen form, one line per record; the default
/// is portguard's JSON line, byte for byte.
#[test]
fn the_writer_writes_the_chosen_format() {
    let rec = decision(Verdict::Deny, EventHook::Kernel(Hook::Bind4));
    let write = |format: Option<Format>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut w = EventWriter::memory(buf.clone());
        if let Some(f) = format {
            w = w.with_format(f);
        }
        w.line(&rec).unwrap();
        w.line(&lost()).unwrap();
        w.line(&suppressed()).unwrap();
        w.line(&hook_failure("allowed_start")).unwrap();
        w.flush().unwrap();
        String::from_utf8(buf.lock().unwrap().clone()).unwrap()
    };
    let default = write(None);
    let expected = [
        serde_json::to_string(&rec).unwrap(),
        serde_json::to_string(&lost()).unwrap(),
        serde_json::to_string(&suppressed()).unwrap(),
        serde_json::to_string(&hook_failure("allowed_start")).unwrap(),
    ]
    .join("\n")
        + "\n";
    assert_eq!(default, expected);
    assert_eq!(write(Some(Format::Json)), expected);
    let lines: Vec<Value> = write(Some(Format::Ocsf))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let classes: Vec<_> = lines
        .iter()
        .map(|e| e["class_uid"].as_u64().unwrap())
        .collect();
    assert_eq!(classes, [4001, 1008, 1008, 6002]);
    assert!(ocsf_errors(&lines, None).is_empty());
    let ecs: Vec<Value> = write(Some(Format::Ecs))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ecs.len(), 4);
    for d in &ecs {
        assert_eq!(d["ecs"]["version"], ecs::ECS_VERSION);
        assert!(
            d["@timestamp"].is_string() && d["event"]["kind"].is_string(),
            "{d}"
        );
    }
}

/// `portguard events --format` reads lines back into records: nothing a
/// line says is lost on the way.
#[test]
fn lines_read_back_into_the_same_records() {
    let mut agg = decision(Verdict::CutOff, EventHook::Kernel(Hook::Listen));
    agg.action = Some("dropped");
    agg.count = 3;
    agg.first_seen = Some(T.into());
    agg.last_seen = Some(T.into());
    agg.pids = vec![7];
    agg.pid_count = Some(1);
    agg.autobind = true;
    let mut sock = decision(Verdict::Audit, EventHook::Kernel(Hook::SockCreate));
    sock.socket = Some("sctp");
    let inventory = decision(Verdict::Preexisting, EventHook::Inventory);
    for r in [agg, sock, inventory] {
        let text = serde_json::to_string(&r).unwrap();
        let back: EventRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r, "{text}");
    }
    let l: LostRecord = serde_json::from_str(&serde_json::to_string(&lost()).unwrap()).unwrap();
    assert_eq!(l, lost());
    let s: SuppressedRecord =
        serde_json::from_str(&serde_json::to_string(&suppressed()).unwrap()).unwrap();
    assert_eq!(s, suppressed());
    // A newer agent's vocabulary: read, as unknown.
    let newer: EventRecord = serde_json::from_value(json!({
        "time": T, "verdict": "quarantine", "hook": "bind9", "family": "ipv4",
        "action": "vaporised", "socket": "quic", "count": 1}))
    .unwrap();
    assert_eq!(
        (newer.verdict, newer.hook),
        (Verdict::Unknown, EventHook::Unknown)
    );
    assert_eq!(
        (newer.action, newer.socket),
        (Some("unknown"), Some("other"))
    );
}

#[test]
fn a_decision_as_ecs() {
    let d = decision(Verdict::Deny, EventHook::Kernel(Hook::Connect4)).ecs();
    assert_eq!(d["@timestamp"], T);
    assert_eq!(d["event"]["category"], json!(["network"]));
    assert_eq!(d["event"]["type"], json!(["connection", "denied"]));
    assert_eq!(d["event"]["outcome"], "failure");
    assert_eq!(d["event"]["action"], "connect4");
    assert_eq!(
        d["destination"],
        json!({"ip": "0.0.0.0", "address": "0.0.0.0", "port": 9090})
    );
    assert!(d.get("source").is_none());
    assert_eq!(
        d["network"],
        json!({"type": "ipv4", "direction": "egress", "transport": "tcp"})
    );
    assert_eq!(
        d["process"],
        json!({"pid": 48213, "name": "server", "thread": {"id": 48214}})
    );
    assert_eq!(d["user"]["id"], "1000");
    assert_eq!(d["container"], json!({"id": "9b2a", "name": "server"}));
    assert_eq!(
        d["orchestrator"],
        json!({"type": "kubernetes", "namespace": "payments",
               "resource": {"type": "pod", "name": "web-0",
                            "id": "2f0e1c2d-3b4a-4c5d-8e6f-7a8b9c0d1e2f"}})
    );
    assert_eq!(d["rule"]["name"], "payments-web");
    assert_eq!(d["rule"]["id"], "payments-web/bind[1].address");
    assert_eq!(d["host"]["name"], "node-7");
    // The portguard line, whole.
    assert_eq!(
        d["portguard"],
        serde_json::to_value(decision(Verdict::Deny, EventHook::Kernel(Hook::Connect4))).unwrap()
    );
    let audit = decision(Verdict::Audit, EventHook::Kernel(Hook::Bind4)).ecs();
    assert_eq!(audit["event"]["type"], json!(["connection", "allowed"]));
    assert_eq!(audit["event"]["kind"], "alert");
    assert_eq!(audit["source"]["port"], 9090);
    assert_eq!(audit["network"]["direction"], "ingress");
}
