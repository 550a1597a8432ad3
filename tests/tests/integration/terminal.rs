//! Untrusted names never reach a terminal raw: a cgroup whose name carries
//! an ESC sequence (tenants choose their cgroup and unit names) shows up
//! escaped in the agent's log, in `portguard events` tables and in
//! `portguard status`, while the JSON outputs keep it exact.

use portguard_tests::{Agent, Cgroup, Probe, portguard, require_root};
use serde_json::json;

/// A port no other test uses.
const PORT: &str = "8137";

#[test]
fn hostile_cgroup_names_are_escaped_in_every_human_readable_output() {
    require_root!();
    // The kernel refuses '\n' in a cgroup name (EINVAL; the unit tests of
    // `observe::text` cover newlines); ESC, BEL and C1 bytes it accepts.
    let parent = Cgroup::new("esc");
    let name = "tenant\x1b[2J\x1b]0;pwned\x07x";
    let hostile = parent.child(name);
    let shown = r"tenant\x1b[2J\x1b]0;pwned\x07x";
    // YAML double quotes carry the control bytes (`\e`, `\a`).
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - name: tenant\n    cgroup: \"{}/tenant\\e[2J\\e]0;pwned\\ax\"\n    bind: []\n",
            parent.rel
        ),
        &["--aggregate-window", "0"],
    );
    let r = Probe::in_cgroup(&hostile).run(&["bind", "tcp", "127.0.0.1", PORT]);
    r.assert_eperm();
    // The JSON event keeps the exact name (serde escapes it).
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["cgroup"], hostile.rel, "{e}");
    assert_eq!(e["policy"], "tenant");

    let clean = |what: &str, text: &str| {
        assert!(
            !text.contains('\x1b') && !text.contains('\x07'),
            "{what} carries a raw control character:\n{text:?}"
        );
        assert!(
            text.contains(shown),
            "{what} does not show the escaped name {shown}:\n{text}"
        );
    };
    let sock = agent.status_socket().display().to_string();
    let (code, status, err) = portguard(&["status", "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    clean("portguard status", &status);
    let (code, out, err) = portguard(&["status", "--socket", &sock, "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["policies"][0]["cgroups"][0]["path"], hostile.rel);

    assert!(agent.stop().success());
    clean("the agent's log", &agent.stderr());
    let log = agent.log.display().to_string();
    let (code, table, err) = portguard(&["events", &log]);
    assert_eq!(code, 0, "{err}");
    clean("portguard events", &table);
    let (code, summary, err) = portguard(&["events", &log, "--summary"]);
    assert_eq!(code, 0, "{err}");
    clean("portguard events --summary", &summary);
    drop(hostile);
}
