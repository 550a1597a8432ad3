//! `portguard hook unit` and the agent's "govern this cgroup now": a unit
//! restarted again and again is governed by its own policy before its
//! first instruction, by construction rather than by winning a race; only
//! root may ask; a hook that cannot reach the agent fails closed (or open,
//! as configured) and the agent reports it.
//!
//! PID 1 here is not systemd: a restart is laid out as systemd does it
//! (the unit's cgroup removed and made again, `ExecStartPre=` run in it,
//! then `ExecStart=` in it), with the real hook binary and a real bind.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use portguard_tests::{
    Agent, Cgroup, Probe, agent_bin, cgroup2_root, join_before_exec, require_root,
};
use serde_json::{Value, json};

/// Run `cmd` inside `cg` (it joins before exec, as systemd's children do).
pub(crate) fn run_in(cg: &Cgroup, cmd: Command) -> Output {
    run_as_in(cg, cmd, None)
}

/// [`run_in`], as user `uid` (switched after joining the cgroup).
fn run_as_in(cg: &Cgroup, mut cmd: Command, uid: Option<u32>) -> Output {
    join_before_exec(&mut cmd, &cg.fs, uid);
    cmd.output().expect("running a command in a cgroup")
}

pub(crate) fn hook_unit(agent: &Agent, unit: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(agent_bin());
    c.args(["hook", "unit", "--socket"])
        .arg(agent.status_socket())
        .args(extra)
        .arg(unit);
    c
}

/// A unit-shaped cgroup layout: `<slice>/<unit>`, the slice removed on drop.
pub(crate) fn slice(tag: &str) -> Cgroup {
    let name = format!("pgtest-{tag}-{}.slice", std::process::id());
    Cgroup::existing(cgroup2_root().join(&name), &format!("/{name}"))
}

/// Restart `unit` in `slice` `n` times, its `ExecStart=` binding `port` at
/// once; with `hook`, `ExecStartPre=` runs `portguard hook unit` first.
/// Returns how many binds the kernel allowed (slips).
fn restarts(agent: &Agent, slice: &Cgroup, unit: &str, port: u16, n: usize, hook: bool) -> usize {
    let mut slips = 0;
    for i in 0..n {
        // systemd removes a stopped unit's cgroup and makes it again.
        let cg = slice.child(unit);
        if hook {
            let out = run_in(&cg, hook_unit(agent, unit, &["--timeout", "5s"]));
            assert!(
                out.status.success(),
                "restart {i}: ExecStartPre (portguard hook unit) failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                agent.stderr()
            );
        }
        let r = Probe::in_cgroup(&cg).host_netns().run(&[
            "bind",
            "tcp",
            "127.0.0.1",
            &port.to_string(),
        ]);
        if r.ok {
            slips += 1;
        } else {
            r.assert_eperm();
        }
        drop(cg);
    }
    slips
}

#[test]
fn a_restarted_unit_is_governed_before_its_first_instruction() {
    require_root!();
    let pid = std::process::id();
    let s = slice("hookunit");
    let unit = format!("pgtest-hooked-{pid}.service");
    // No rescan timer: only inotify (the race) or the hook governs it.
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: hooked, unit: {unit}, bind: [{{ports: [9000]}}]}}\n"),
        &["--rescan-interval", "1h", "--aggregate-window", "0"],
    );
    let (control_port, port) = (
        40000 + (pid % 1000) as u16 * 2,
        40001 + (pid % 1000) as u16 * 2,
    );
    // The control: the same restarts without ExecStartPre. The agent wins
    // the race only if it notices the cgroup before the bind (measured,
    // not asserted: it depends on scheduling).
    let slipped = restarts(&agent, &s, &unit, control_port, 100, false);
    eprintln!(
        "without the hook: {slipped} of 100 restarts bound a denied port before the agent governed the unit"
    );
    let slipped = restarts(&agent, &s, &unit, port, 100, true);
    assert_eq!(
        slipped,
        0,
        "with the hook, {slipped} of 100 restarts bound a denied port\n{}",
        agent.stderr()
    );
    // Each denial is an event naming the unit's policy and the unit.
    let denied: u64 = agent
        .events_matching(
            &[("policy", json!("hooked")), ("port", json!(port))],
            Duration::from_millis(500),
        )
        .iter()
        .inspect(|e| assert_eq!(e["unit"], unit.as_str(), "{e}"))
        .map(|e| e["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(denied, 100, "one deny event per restart");
    let status = agent_status(&agent);
    assert!(
        status["runtime_hooks"]["requests"].as_u64() >= Some(100),
        "{status}"
    );
}

#[test]
fn without_dac_read_search_the_hook_still_governs_its_unit() {
    require_root!();
    let pid = std::process::id();
    // Not a slice: the agent watches the root and the slices, so a unit
    // made in here is found by its hook alone, not by inotify first.
    let s = Cgroup::new("hookcaps");
    let unit = format!("pgtest-caps-{pid}.service");
    // Without CAP_DAC_READ_SEARCH the agent cannot turn a cgroup id into a
    // path: it must take the hook's path, checked against the id.
    let caps = portguard_tests::MINIMAL_CAPS.replace(",+dac_read_search", "");
    let agent = Agent::start_with_caps(
        &format!("policies:\n  - {{name: capped, unit: {unit}, bind: [{{ports: [9000]}}]}}\n"),
        &["--rescan-interval", "1h"],
        &caps,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let slipped = restarts(&agent, &s, &unit, 40100 + (pid % 1000) as u16, 20, true);
    assert_eq!(slipped, 0, "{}", agent.stderr());
}

#[test]
fn a_hook_is_refused_when_its_cgroup_cannot_be_applied() {
    require_root!();
    let pid = std::process::id();
    let s = slice("hookfull");
    let taken = s.child("taken");
    let unit = format!("pgtest-full-{pid}.service");
    // One cgroup fits the map, and `taken` has it: the unit's cannot be
    // added. Without --fail-closed the kernel keeps the previous state, and
    // the hook must not be told the unit is governed.
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: taken, cgroup: {}, bind: []}}\n  - {{name: full, unit: {unit}, bind: []}}\n",
            taken.rel
        ),
        &["--rescan-interval", "1h", "--max-cgroups", "1"],
    );
    let cg = s.child(&unit);
    let out = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "5s"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("applying cgroup changes failed"), "{err}");
    let e = agent.wait_event(&[("verdict", json!("hook_failed"))]);
    assert_eq!(e["action"], "refused_start", "{e}");
}

fn agent_status(agent: &Agent) -> Value {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(agent.status_socket())
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The cgroups `status` shows policy `name` governing.
pub(crate) fn governs(agent: &Agent, name: &str) -> Value {
    let status = agent_status(agent);
    status["policies"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .map(|p| p["cgroups"].clone())
        .unwrap_or_else(|| panic!("no `{name}` policy in {status}"))
}

#[test]
fn only_root_may_ask_and_the_agent_decides_the_policy() {
    require_root!();
    let pid = std::process::id();
    let s = slice("hookroot");
    let unit = format!("pgtest-root-{pid}.service");
    let other = s.child("not-a-unit");
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: strict, unit: {unit}, bind: []}}\n"),
        &["--rescan-interval", "1h"],
    );
    // Someone loosened the socket's mode: the agent still refuses a
    // request from a user other than root.
    let sock = agent.status_socket();
    for p in [sock.parent().unwrap(), sock.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let cg = s.child(&unit);
    let c = hook_unit(&agent, &unit, &["--on-failure", "closed"]);
    let out = run_as_in(&cg, c, Some(65534));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a user's request was answered: {err}"
    );
    assert!(err.contains("only root may ask"), "{err}");

    // The request names a cgroup, never a policy: a cgroup no policy
    // selects stays ungoverned, whoever asks.
    let a = agent.ask(&format!(
        r#"{{"request":"govern","cgroup_id":{},"cgroup":"{}","hook":"unit","unit":"{unit}"}}"#,
        other.id(),
        other.rel
    ));
    assert_eq!(
        (a["ok"].clone(), a["policy"].clone()),
        (json!(true), Value::Null),
        "{a}"
    );
    let a = agent.ask(&format!(
        r#"{{"request":"govern","cgroup_id":{},"cgroup":"{}","hook":"unit"}}"#,
        cg.id(),
        cg.rel
    ));
    assert_eq!(a["policy"], "strict", "{a}");
    assert_eq!(a["policy_cgroup"], cg.rel.as_str(), "{a}");
    // systemd 254+ with DelegateSubgroup= runs ExecStartPre= in the unit's
    // `.control` sub-cgroup: governed by the unit's policy all the same.
    let control = cg.child(".control");
    let a = agent.ask(&format!(
        r#"{{"request":"govern","cgroup_id":{},"cgroup":"{}","hook":"unit"}}"#,
        control.id(),
        control.rel
    ));
    assert_eq!(
        (a["policy"].as_str(), a["policy_cgroup"].as_str()),
        (Some("strict"), Some(cg.rel.as_str())),
        "{a}"
    );
    // A cgroup that does not exist, and what is not a request.
    let a = agent
        .ask(r#"{"request":"govern","cgroup_id":999999999999,"cgroup":"/nowhere","hook":"oci"}"#);
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("no cgroup with id 999999999999"),
        "{a}"
    );
    let a = agent.ask("{\"request\":\"reboot\"}\n");
    assert!(
        a["error"].as_str().unwrap().contains("not a request"),
        "{a}"
    );
    // Saying nothing still gets the status document.
    assert!(agent.ask("")["policies"].is_array());
}

#[test]
fn a_starved_agent_fails_the_unit_hook_closed_or_open_and_says_so() {
    require_root!();
    let pid = std::process::id();
    let s = slice("hookstop");
    let unit = format!("pgtest-stop-{pid}.service");
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: stopped, unit: {unit}, bind: []}}\n"),
        &["--rescan-interval", "1h"],
    );
    let cg = s.child(&unit);
    let cont = agent.stop_until_dropped();
    let closed = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "300ms"]));
    let open = run_in(
        &cg,
        hook_unit(
            &agent,
            &unit,
            &["--timeout", "300ms", "--on-failure", "open"],
        ),
    );
    drop(cont);
    assert_eq!(closed.status.code(), Some(1), "the default fails closed");
    assert_eq!(
        open.status.code(),
        Some(0),
        "--on-failure open lets it start"
    );
    assert!(String::from_utf8_lossy(&closed.stderr).contains("did not answer in time"));
    for action in ["refused_start", "allowed_start"] {
        let e = agent.wait_event(&[("verdict", json!("hook_failed")), ("action", json!(action))]);
        assert_eq!(e["hook"], "unit", "{e}");
        assert_eq!(e["unit"], unit.as_str(), "{e}");
        assert_eq!(e["cgroup"], cg.rel.as_str(), "{e}");
        assert_eq!(e["cgroup_id"], cg.id(), "{e}");
        let errors = portguard_tests::schema_errors(&[e]);
        assert!(errors.is_empty(), "{errors:?}");
    }
    let m = agent.metrics_text();
    assert!(
        m.contains(
            r#"portguard_runtime_hook_failures_total{hook="unit",action="refused_start"} 1"#
        ),
        "{m}"
    );
}

/// One of the agent's test gates (debug builds, `portguard::testgate`):
/// pass N of what it gates (a survey, a status document) parks until
/// `release-N` exists. Every pass is released on drop, so the agent can exit
/// whatever the test did.
pub(crate) struct Gate(pub(crate) tempfile::TempDir, &'static str);

impl Gate {
    pub(crate) fn new(what: &'static str) -> Self {
        Self(tempfile::tempdir().expect("tempdir"), what)
    }

    pub(crate) fn wait_parked(&self, n: u32, agent: &Agent) {
        let parked = self.0.path().join(format!("parked-{n}"));
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !parked.exists() {
            assert!(
                std::time::Instant::now() < until,
                "{} {n} never parked (is the agent a debug build?)\n{}",
                self.1,
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn release(&self, n: u32) {
        std::fs::write(self.0.path().join(format!("release-{n}")), b"").expect("releasing");
    }

    /// Wait until the agent says it installed survey `n`.
    pub(crate) fn wait_installed(&self, n: u32, agent: &Agent) {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !agent
            .stderr()
            .contains(&format!("cgroup survey {n} installed"))
        {
            assert!(
                std::time::Instant::now() < until,
                "survey {n} was not installed\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn release_all(&self) {
        for n in 1..=64 {
            self.release(n);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.release_all();
    }
}

#[test]
fn a_rescan_in_flight_neither_holds_a_hook_nor_undoes_what_it_governed() {
    require_root!();
    let pid = std::process::id();
    let s = slice("survey");
    let unit = format!("pgtest-surveyed-{pid}.service");
    let gate = Gate::new("survey");
    let other = format!("pgtest-other-{pid}.service");
    let agent = Agent::start_with_env(
        &format!(
            "policies:\n  - {{name: surveyed, unit: {unit}, bind: [{{ports: [9000]}}]}}\n  \
             - {{name: other, unit: {other}, bind: [{{ports: [9000]}}]}}\n"
        ),
        &["--rescan-interval", "1h", "--inventory-interval", "0"],
        // The test reads the agent's debug lines whatever RUST_LOG says.
        &[
            ("PORTGUARD_TEST_SURVEY_GATE", gate.0.path()),
            ("RUST_LOG", Path::new("debug")),
        ],
    );
    // A unit started without a hook: its cgroup appearing in a watched slice
    // starts a rescan, which walks the tree (the other unit's cgroup does
    // not exist yet) and parks before it is installed.
    let other_cg = s.child(&other);
    gate.wait_parked(1, &agent);
    // The unit (re)starts with its hook: answered while a walk is in flight
    // (a walk on the loop would hold it past its timeout).
    let start = || {
        let cg = s.child(&unit);
        let out = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "5s"]));
        assert!(
            out.status.success(),
            "the hook was not answered while a rescan was in flight: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.stderr()
        );
        cg
    };
    let port = 40000 + (pid % 1000) as u16 * 2;
    let bind = |cg: &Cgroup| {
        Probe::in_cgroup(cg)
            .host_netns()
            .run(&["bind", "tcp", "127.0.0.1", &port.to_string()])
    };
    let cg = start();
    bind(&cg).assert_eperm();
    // Nothing has governed the hookless unit yet: only the survey can.
    assert!(
        bind(&other_cg).ok,
        "the hookless unit was governed before its survey was installed"
    );
    // The rescan that walked before the unit existed is installed now: the
    // hookless unit it found is governed, and what the hook governed stays
    // governed (the next survey stays parked, so nothing else re-governs
    // it).
    gate.release(1);
    gate.wait_installed(1, &agent);
    bind(&other_cg).assert_eperm();
    bind(&cg).assert_eperm();
    let denied = agent.events_matching(
        &[("policy", json!("surveyed")), ("port", json!(port))],
        Duration::from_millis(300),
    );
    assert_eq!(denied.len(), 2, "{denied:?}");
    for e in &denied {
        assert_eq!(e["verdict"], "deny", "{e}");
        assert_eq!(e["unit"], unit.as_str(), "{e}");
    }
    // The unit's cgroup appearing made survey 1's walk stale: survey 2 walks
    // now and sees the unit (and its cgroup's id). The unit restarts while it
    // is parked: a new cgroup, a new id, governed by its hook; installing
    // survey 2 must not put the old id back in its place.
    gate.wait_parked(2, &agent);
    drop(cg);
    let cg = start();
    bind(&cg).assert_eperm();
    gate.release(2);
    gate.wait_installed(2, &agent);
    bind(&cg).assert_eperm();
    // Survey 1's tree lacked the unit: the loop resolved again. Survey 2's
    // resolution is taken, with the unit's new id in place of the one its
    // walk saw (debug builds check it against a resolve on the loop).
    let installed = |n: u32| {
        let log = agent.stderr();
        log.lines()
            .find(|l| l.contains(&format!("cgroup survey {n} installed")))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert!(installed(1).contains("resolved again"), "{}", installed(1));
    assert!(
        installed(2).contains("its resolution taken"),
        "{}",
        installed(2)
    );
    let now = governs(&agent, "surveyed");
    assert_eq!(now.as_array().map(Vec::len), Some(1), "{now}");
    assert_eq!(now[0]["path"], json!(cg.rel), "{now}");
    gate.release_all();
}

/// A status document and a /metrics page are built off the agent's loop
/// (with thousands of policies each takes a tenth of a second and more):
/// a unit's hook is answered, and the unit governed, while one of each is
/// parked half-built.
#[test]
fn a_status_request_or_a_scrape_in_flight_holds_no_hook() {
    require_root!();
    let pid = std::process::id();
    let s = slice("scraped");
    let unit = format!("pgtest-scraped-{pid}.service");
    let gate = Gate::new("status document or /metrics page");
    let agent = Agent::start_with_env(
        &format!("policies:\n  - {{name: scraped, unit: {unit}, bind: [{{ports: [9000]}}]}}\n"),
        &["--rescan-interval", "1h", "--inventory-interval", "0"],
        &[("PORTGUARD_TEST_STATUS_GATE", gate.0.path())],
    );
    // A client asks for the status document (an empty request)...
    let socket = agent.status_socket();
    let status = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(socket).expect("status socket");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text)
            .expect("reading the status document");
        text
    });
    gate.wait_parked(1, &agent);
    // ... and Prometheus scrapes.
    let url = format!("http://127.0.0.1:{}/metrics", agent.metrics_port());
    let scrape = std::thread::spawn(move || {
        let mut resp = ureq::get(&url).call().expect("GET /metrics");
        assert_eq!(resp.status(), 200);
        resp.body_mut().read_to_string().expect("reading /metrics")
    });
    gate.wait_parked(2, &agent);
    // The unit starts with its hook while both are being built.
    let cg = s.child(&unit);
    let out = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "5s"]));
    assert!(
        out.status.success(),
        "the hook was not answered while a status document and a scrape were being built: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.stderr()
    );
    let port = 41000 + (pid % 1000) as u16 * 2;
    Probe::in_cgroup(&cg)
        .host_netns()
        .run(&["bind", "tcp", "127.0.0.1", &port.to_string()])
        .assert_eperm();
    let e = agent.wait_event(&[("policy", json!("scraped")), ("port", json!(port))]);
    assert_eq!(e["verdict"], "deny", "{e}");
    assert_eq!(e["unit"], unit.as_str(), "{e}");
    // Both were still waiting: the hook did not go through after them.
    assert!(!status.is_finished() && !scrape.is_finished());
    // Two are built at once at most (anyone may scrape): a third request
    // waits for a turn, and gets one when a build ends.
    let scrape_url = format!("http://127.0.0.1:{}/metrics", agent.metrics_port());
    let third = std::thread::spawn(move || {
        let mut resp = ureq::get(&scrape_url).call().expect("GET /metrics");
        resp.body_mut().read_to_string().expect("reading /metrics")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !gate.0.path().join("parked-3").exists(),
        "a third page was being built while two were"
    );
    gate.release(1);
    gate.wait_parked(3, &agent);
    // Released, each answers what the agent knew when it began (it copied
    // the facts before parking), and a status asked for now shows the hook's
    // cgroup governed.
    for n in 2..=4 {
        gate.release(n);
    }
    assert!(third.join().expect("third client").ends_with("# EOF\n"));
    let doc: Value = serde_json::from_str(&status.join().expect("status client"))
        .expect("the status document is JSON");
    assert!(
        doc["policies"].is_array() && doc["version"].is_string(),
        "{doc}"
    );
    let page = scrape.join().expect("scrape client");
    assert!(page.ends_with("# EOF\n"), "{page}");
    assert!(page.contains("portguard_governed_cgroups "), "{page}");
    let scraped = governs(&agent, "scraped");
    assert_eq!(scraped[0]["path"], cg.rel.as_str(), "{scraped}");
}

/// A hook's answer leaves before the apply's bookkeeping (log lines, facts,
/// the hooks' selection: milliseconds with thousands of policies), which
/// runs on the same thread as the socket's tasks: the hook returns, and its
/// unit's bind is denied, while the loop is parked before that bookkeeping.
#[test]
fn a_hook_is_answered_before_the_bookkeeping_of_its_apply() {
    require_root!();
    let pid = std::process::id();
    let s = slice("settle");
    let unit = format!("pgtest-settled-{pid}.service");
    let gate = Gate::new("the bookkeeping after a hook's apply");
    // Surveys stay parked: the hook's request, not a rescan, governs the
    // unit (a rescan installed first would leave the request nothing to
    // apply).
    let surveys = Gate::new("survey");
    let agent = Agent::start_with_env(
        &format!("policies:\n  - {{name: settled, unit: {unit}, bind: [{{ports: [9000]}}]}}\n"),
        &["--rescan-interval", "1h", "--inventory-interval", "0"],
        &[
            ("PORTGUARD_TEST_SETTLE_GATE", gate.0.path()),
            ("PORTGUARD_TEST_SURVEY_GATE", surveys.0.path()),
        ],
    );
    let cg = s.child(&unit);
    surveys.wait_parked(1, &agent);
    let out = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "5s"]));
    assert!(
        out.status.success(),
        "the hook's answer waited for the bookkeeping of its apply: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.stderr()
    );
    // The answer came from an apply whose bookkeeping is still to run: the
    // loop is parked there now, and the kernel maps already govern the unit.
    gate.wait_parked(1, &agent);
    let port = 42000 + (pid % 1000) as u16 * 2;
    Probe::in_cgroup(&cg)
        .host_netns()
        .run(&["bind", "tcp", "127.0.0.1", &port.to_string()])
        .assert_eperm();
    gate.release(1);
    let e = agent.wait_event(&[("policy", json!("settled")), ("port", json!(port))]);
    assert_eq!(e["verdict"], "deny", "{e}");
    assert_eq!(e["unit"], unit.as_str(), "{e}");
    // Settled: `status` shows the cgroup governed.
    let settled = governs(&agent, "settled");
    assert_eq!(settled[0]["path"], cg.rel.as_str(), "{settled}");
}
