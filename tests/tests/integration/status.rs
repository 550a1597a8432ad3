//! `portguard status` (from the running agent's socket) and `portguard
//! events` (filters and summary over a real log).

use std::{os::unix::fs::PermissionsExt as _, process::Command};

use portguard_tests::{Agent, Cgroup, Probe, agent_bin, cgroup2_root, portguard, require_root};
use serde_json::Value;

#[test]
fn status_and_events_show_what_is_enforced_and_what_was_denied() {
    require_root!();
    let pid = std::process::id();
    let web = Cgroup::new("stweb");
    let slice = Cgroup::existing(
        cgroup2_root().join(format!("pgtest-st-{pid}.slice")),
        &format!("/pgtest-st-{pid}.slice"),
    );
    let unit = slice.child(&format!("pgst-{pid}.service"));
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: web, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: svc, unit: pgst-{pid}.service, mode: audit, bind: []}}\n",
            web.rel
        ),
        &["--aggregate-window", "10s"],
    );
    let p = Probe::in_cgroup(&web);
    for _ in 0..5 {
        p.run(&["bind", "tcp", "127.0.0.1", "9999"]).assert_eperm();
    }
    p.run(&["bind", "tcp", "127.0.0.1", "9998"]).assert_eperm();
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    Probe::in_cgroup(&unit)
        .run(&["bind", "udp", "0.0.0.0", "5353"])
        .assert_ok();

    // The socket is root's only.
    let sock = agent.status_socket();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let sock = sock.display().to_string();
    let (code, out, err) = portguard(&["status", "--socket", &sock, "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["status"], "enforcing 2 policies");
    assert!(
        doc["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "bind4")
    );
    assert_eq!(doc["governed_cgroups"], 2);
    let policy = |name: &str| {
        doc["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no policy {name}: {doc}"))
            .clone()
    };
    let w = policy("web");
    assert_eq!(w["decisions"]["deny"], 6);
    assert_eq!(w["decisions"]["allow"], 1);
    assert_eq!(w["cgroups"][0]["path"], web.rel);
    let s = policy("svc");
    assert_eq!(s["mode"], "audit");
    assert_eq!(s["decisions"]["audit"], 1);
    assert_eq!(s["cgroups"][0]["unit"], format!("pgst-{pid}.service"));
    // The human view has the same numbers.
    let (code, text, _) = portguard(&["status", "--socket", &sock]);
    assert_eq!(code, 0);
    let row = text
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{text}"));
    let header: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("POLICY "))
        .unwrap_or_else(|| panic!("{text}"))
        .split_whitespace()
        .collect();
    let cols: Vec<&str> = row.split_whitespace().collect();
    // Counted from the right: the selector (`cgroup /path`) has a space.
    let col = |name: &str| {
        cols[cols.len() - (header.len() - header.iter().position(|h| *h == name).unwrap())]
    };
    assert_eq!(
        ["ALLOWED", "DENIED", "AUDITED", "REPORTED"].map(col),
        ["1", "6", "0", "0"],
        "{row}"
    );
    assert!(text.contains(&format!("pgst-{pid}.service")), "{text}");

    // No agent there: a clear error, exit 1.
    let (code, _, err) = portguard(&["status", "--socket", "/nonexistent/status.sock"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the agent at /nonexistent/status.sock"),
        "{err}"
    );

    // `portguard events` over the log: 9999 is first written at once and
    // its 4 repeats wait in the aggregation window; stop the agent so that
    // they are written.
    let mut agent = agent;
    assert!(agent.stop().success());
    let log = agent.log.display().to_string();
    let (code, out, err) = portguard(&["events", &log, "--summary", "--json", "--verdict", "deny"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["workload"], web.rel);
    assert_eq!(rows[0]["port"], 9999);
    assert_eq!(rows[0]["count"], 5, "the aggregate counts");
    assert_eq!(rows[1]["port"], 9998);
    assert_eq!(rows.len(), 2);
    let (_, out, _) = portguard(&["events", &log, "--json", "--port", "5353"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["verdict"], "audit");
    let (_, out, _) = portguard(&["events", &log, "--unit", &format!("pgst-{pid}.service")]);
    assert_eq!(out.lines().count(), 2, "header and one row: {out}");
    let (_, out, _) = portguard(&["events", &log, "--since", "1h", "--policy", "web"]);
    assert_eq!(
        out.lines().count(),
        4,
        "header, 9999, its aggregate, 9998: {out}"
    );
    let (_, out, _) = portguard(&["events", &log, "--until", "2000-01-01T00:00:00Z"]);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");
    // From standard input, with non-event lines mixed in.
    let mut child = Command::new(agent_bin())
        .args(["events", "-", "--summary"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(
            stdin,
            "[2026-11-22T00:00:00Z INFO  portguard::daemon] not an event"
        )
        .unwrap();
        stdin
            .write_all(std::fs::read_to_string(&agent.log).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().nth(1).unwrap().starts_with("5 "), "{text}");
}
