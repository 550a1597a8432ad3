//! The event stream: lost events are counted by the kernel and reported.

use std::time::{Duration, Instant};

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::Value;
use serde_json::json;

/// With the agent stopped (SIGSTOP) and a one-page ring buffer, a burst of
/// denials overflows the buffer. Every denial must be accounted for: either
/// delivered as an event or counted as lost and reported in a `lost` line.
#[test]
fn events_that_do_not_fit_are_counted_and_reported() {
    require_root!();
    let cg = Cgroup::new("storm");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: storm, cgroup: {}, bind: []}}\n",
            cg.rel
        ),
        &["--ring-buffer-size", "4096"],
    );
    agent.signal(libc::SIGSTOP);
    const N: usize = 500;
    let child = Probe::in_cgroup(&cg).spawn_loop(&["bind", "tcp", "127.0.0.1", "8080"], N, 0);
    let out = child.wait_with_output().unwrap();
    let denied = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(r#""error":"EPERM""#))
        .count();
    assert_eq!(
        denied, N,
        "every bind was denied while the agent was stopped"
    );
    agent.signal(libc::SIGCONT);

    let deadline = Instant::now() + Duration::from_secs(10);
    let (delivered, lost_total) = loop {
        let events = agent.events();
        let delivered = events
            .iter()
            .filter(|e| e.get("verdict") == Some(&json!("deny")))
            .count();
        let lost_lines: Vec<_> = events.iter().filter(|e| e.get("lost").is_some()).collect();
        let lost_total = lost_lines
            .last()
            .map_or(0, |e| e["lost_total"].as_u64().unwrap());
        let summed: u64 = lost_lines.iter().map(|e| e["lost"].as_u64().unwrap()).sum();
        assert_eq!(summed, lost_total, "lost deltas add up to the total");
        if delivered + lost_total as usize == N {
            break (delivered, lost_total);
        }
        assert!(
            Instant::now() < deadline,
            "delivered {delivered} + lost {lost_total} != {N}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(lost_total > 0, "a 4 KiB ring cannot hold {N} events");
    assert!(
        delivered > 0,
        "the queued events were delivered after SIGCONT"
    );
    let lost = agent
        .events()
        .into_iter()
        .find(|e| e.get("lost").is_some())
        .unwrap();
    assert!(lost["time"].is_string());
    assert!(
        agent.stderr().contains("the kernel dropped"),
        "{}",
        agent.stderr()
    );
}

/// Every kind of line the agent writes validates against the published
/// schema (docs/event.schema.json): denials of each hook, audit, reported
/// listeners, pre-existing sockets, socket creation, a unit's identity, an
/// aggregate and a loss report. The schema forbids fields it does not
/// document, so a new field must be documented to pass.
#[test]
fn every_kind_of_event_matches_the_published_schema() {
    require_root!();
    let pid = std::process::id();
    let slice = Cgroup::existing(
        portguard_tests::cgroup2_root().join(format!("pgtest-schema-{pid}.slice")),
        &format!("/pgtest-schema-{pid}.slice"),
    );
    let unit = slice.child(&format!("pgschema-{pid}.service"));
    let audited = Cgroup::new("schema-audit");
    // Bound before the agent starts: reported as pre-existing.
    let (held, _h) = Probe::in_cgroup(&unit).hold(&["hold", "tcp", "0.0.0.0", "9999"]);
    held.assert_ok();
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - name: unit\n    unit: pgschema-{pid}.service\n    bind:\n      - {{ports: [8080]}}\n      - {{ports: [9000], address: loopback}}\n    connect: [{{ports: [53]}}]\n  - {{name: audited, cgroup: {}, mode: audit, bind: []}}\n",
            audited.rel
        ),
        &["--aggregate-window", "1s", "--ring-buffer-size", "4096"],
    );
    agent.wait_event(&[("verdict", json!("preexisting"))]);
    let p = Probe::in_cgroup(&unit);
    let cut_off = portguard_tests::every_kind_of_event(
        &agent,
        &p,
        &audited,
        &[
            &["bind", "tcp", "127.0.0.1", "8081"],
            &["bind", "tcp", "0.0.0.0", "9000"],
            &["bind", "udp", "::", "8081"],
            &["bind", "tcp", "::ffff:127.0.0.1", "8082"],
            &["bind", "udp", "127.0.0.1", "0"],
            &["connect", "tcp", "127.0.0.1", "80"],
            &["connect", "udp", "::1", "443"],
            &["sendto", "127.0.0.1", "5353"],
            &["socket", "raw4"],
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.stop().success());

    let events = agent.events();
    let errors = portguard_tests::schema_errors(&events);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // The kinds this test meant to produce are all there.
    let has = |k: &str, v: Value| events.iter().any(|e| e.get(k) == Some(&v));
    if cut_off {
        assert!(has("verdict", json!("cut_off")), "{events:#?}");
        assert!(has("action", json!("destroyed")), "{events:#?}");
    }
    for (k, v) in [
        ("hook", json!("bind4")),
        ("hook", json!("bind6")),
        ("hook", json!("post_bind4")),
        ("hook", json!("connect4")),
        ("hook", json!("connect6")),
        ("hook", json!("sendmsg4")),
        ("hook", json!("sock_create")),
        ("hook", json!("listen")),
        ("hook", json!("inventory")),
        ("verdict", json!("audit")),
        ("rule", json!("bind")),
        ("rule", json!("bind[1].address")),
        ("rule", json!("connect")),
        ("rule", json!("allow_sockets")),
        ("rule", json!("bind[]")),
        ("unit", json!(format!("pgschema-{pid}.service"))),
        ("v4_mapped", json!(true)),
        ("dual_stack", json!(true)),
        ("count", json!(2)),
    ] {
        assert!(has(k, v.clone()), "no event with {k} = {v}: {events:#?}");
    }
    assert!(
        events.iter().any(|e| e.get("lost").is_some()),
        "no loss report"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(events.iter().all(|e| e["host"] == host.trim()));
    assert!(events.iter().all(|e| e["schema_version"] == 1));
}

/// `--log journald`: one native journal entry per event, with the JSON as
/// MESSAGE and each field as PORTGUARD_<FIELD>. No journald runs on the
/// test machines, so the agent runs in a private mount namespace whose
/// /run/systemd/journal/socket is a datagram socket this test reads: the
/// same socket and protocol journald serves.
#[test]
fn events_go_to_journald_natively() {
    require_root!();
    let cg = Cgroup::new("journald");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("journal.jsonl");
    let listener = r#"
import ctypes, json, os, socket, sys
ctypes.CDLL(None).prctl(1, 15)  # PR_SET_PDEATHSIG: go when the agent goes
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as out:
    while True:
        data = s.recv(1 << 20).decode()
        entry = dict(l.split("=", 1) for l in data.splitlines() if "=" in l)
        out.write(json.dumps(entry) + "\n")
        out.flush()
"#;
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; \
         python3 -c '{listener}' /run/systemd/journal/socket {out} & \
         while [ ! -S /run/systemd/journal/socket ]; do sleep 0.05; done; exec \"$@\"",
        out = out.display()
    );
    let wrapper: Vec<String> = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([script, "sh".to_owned()])
        .collect();
    let mut agent = Agent::start_wrapped(
        &format!(
            "policies:\n  - {{name: jd, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &["--log", "journald"],
        &wrapper,
    );
    let r = Probe::in_cgroup(&cg).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = r.pid.to_string();
    let entry = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(e) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["PORTGUARD_PID"].as_str() == Some(pid.as_str()))
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no journal entry for pid {}: {text}\n{}",
            r.pid,
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(entry["SYSLOG_IDENTIFIER"], "portguard");
    assert_eq!(entry["PRIORITY"], "4", "a denial is a warning");
    assert_eq!(entry["PORTGUARD_VERDICT"], "deny");
    assert_eq!(entry["PORTGUARD_POLICY"], "jd");
    assert_eq!(entry["PORTGUARD_PORT"], "8081");
    assert_eq!(entry["PORTGUARD_CGROUP"], cg.rel);
    let msg: Value = serde_json::from_str(entry["MESSAGE"].as_str().unwrap()).unwrap();
    assert_eq!(msg["port"], 8081);
    assert!(portguard_tests::schema_errors(&[msg]).is_empty());
    assert!(agent.stop().success());
}
