//! JSON Schema validation: event lines against docs/event.schema.json, or
//! any documents against any schema (Python's `jsonschema`); OCSF events
//! against the OCSF schema (scripts/ocsf_validate.py, offline); and the
//! workload that makes an agent write every kind of event for them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

use crate::{Agent, Cgroup, Probe};

/// Make `agent` write every kind of event a schema test validates, from
/// `p` (in a cgroup whose policy allows none of this): each op in `denied`
/// (each must fail with EPERM); an unbound `listen()`, denied, or cut off
/// where the BPF LSM is unusable; an audited bind in `audited` (an
/// audit-mode policy with `bind: []`); an aggregate (one denial three times
/// within a 1 s `--aggregate-window`); and a loss report (200 denials while
/// the agent is stopped, more than a 4096-byte ring holds). The agent is
/// running again on return; its loss report may still be on its way.
/// Returns whether listeners are cut off (not denied) here.
pub fn every_kind_of_event(agent: &Agent, p: &Probe, audited: &Cgroup, denied: &[&[&str]]) -> bool {
    for op in denied {
        p.run(op).assert_eperm();
    }
    let cut_off = !agent.listen_denied();
    let r = p.clone().serve().run(&["listen-unbound", "tcp", "4"]);
    if cut_off {
        assert_eq!(r.served, Some(false), "{r:?}");
    } else {
        r.assert_eperm();
    }
    Probe::in_cgroup(audited)
        .run(&["bind", "tcp", "127.0.0.1", "7000"])
        .assert_ok();
    for _ in 0..3 {
        p.run(&["bind", "tcp", "127.0.0.1", "8085"]).assert_eperm();
    }
    agent.signal(libc::SIGSTOP);
    let child = p.spawn_loop(&["bind", "tcp", "127.0.0.1", "8086"], 200, 0);
    child.wait_with_output().unwrap();
    agent.signal(libc::SIGCONT);
    cut_off
}

/// docs/event.schema.json.
pub fn event_schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/event.schema.json")
}

/// Validate event lines against the published JSON Schema (with Python's
/// `jsonschema`, which kubernetes-validate brings). Returns one message per
/// invalid line.
pub fn schema_errors(events: &[Value]) -> Vec<String> {
    json_schema_errors(&event_schema_path(), events)
}

/// Validate each of `docs` against the JSON Schema at `schema` (the draft
/// its `$schema` names). Returns one message per error.
pub fn json_schema_errors(schema: &Path, docs: &[Value]) -> Vec<String> {
    let script = r#"
import json, sys
from jsonschema.validators import validator_for
schema = json.load(open(sys.argv[1]))
cls = validator_for(schema)
cls.check_schema(schema)
v = cls(schema)
errors = []
for i, line in enumerate(json.load(sys.stdin)):
    for e in v.iter_errors(line):
        errors.append(f"line {i}: {e.message} at {list(e.absolute_path)}; context: {[c.message for c in e.context][:6]}: {json.dumps(line)[:2000]}")
print(json.dumps(errors))
"#;
    let mut python = Command::new("python3");
    python.arg("-c").arg(script).arg(schema);
    errors_from(python, docs, "schema validation failed to run")
}

/// Run a Python validator: `docs` as one JSON array on its standard input,
/// a JSON array of error messages on its standard output (`what`: the
/// panic message if it does not run).
fn errors_from(mut python: Command, docs: &[Value], what: &str) -> Vec<String> {
    let mut child = python
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (run scripts/setup.sh)");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(serde_json::to_string(docs).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Validate OCSF events (`--format ocsf` lines) against the OCSF schema of
/// the version, class and profiles each names, with scripts/ocsf_validate.py
/// (PyPI's ocsf-json-schema, which ships the schema: nothing is downloaded).
/// Returns one message per error.
pub fn ocsf_errors(events: &[Value]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ocsf_validate.py");
    let mut python = Command::new("python3");
    python.arg(&script);
    errors_from(
        python,
        events,
        "the OCSF validator did not run (scripts/setup.sh installs ocsf-json-schema)",
    )
}
