//! Enforcement that outlives the agent: pinned programs, links and maps
//! survive SIGKILL, a restarted agent adopts them without detaching and reads
//! the events queued meanwhile, an upgraded agent switches programs in place
//! (and rebuilds maps whose size changed) while binds keep being judged,
//! a pinned link attached to the wrong cgroup is repaired, a start the
//! kernel refuses a program to leaves the pins as it found them, and
//! `uninstall` removes every kernel object.

use std::{path::Path, process::Command, time::Duration};

use portguard_tests::{
    Agent, Cgroup, EVENT_TIMEOUT, Loop, Probe, TestBpffs, require_root, uninstall,
};
use serde_json::{Value, json};

fn policy(cg: &Cgroup) -> String {
    format!(
        "policies:\n  - name: pinned\n    cgroup: {}\n    bind: [{{ports: [8080]}}]\n",
        cg.rel
    )
}

/// `bpftool -j ARGS` as JSON.
fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("running bpftool (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn pinned_prog(dir: &Path, name: &str) -> Value {
    bpftool(&[
        "prog",
        "show",
        "pinned",
        dir.join("progs").join(name).to_str().unwrap(),
    ])
}

fn pinned_link(dir: &Path, name: &str) -> Value {
    bpftool(&[
        "link",
        "show",
        "pinned",
        dir.join("links").join(name).to_str().unwrap(),
    ])
}

/// The pin name of `program`'s link on the one attach point of the
/// decision programs (`cg<cgroup id>-<program>`): exactly one is expected.
fn point_pin(dir: &Path, program: &str) -> String {
    let names: Vec<String> = std::fs::read_dir(dir.join("links"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("cg") && n.ends_with(&format!("-{program}")))
        .collect();
    assert_eq!(names.len(), 1, "one attach point of {program}: {names:?}");
    names.into_iter().next().unwrap()
}

/// Every result of a loop: all EPERM (`want_ok == false`) or all allowed.
fn assert_all(results: &[portguard_tests::ProbeResult], want_ok: bool, what: &str) {
    assert!(!results.is_empty(), "{what}: the loop made no attempt");
    let wrong: Vec<_> = results
        .iter()
        .filter(|r| r.ok != want_ok || (!r.ok && r.errno != libc::EPERM))
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} attempts got the wrong answer, e.g. {:?}",
        wrong.len(),
        results.len(),
        wrong.first()
    );
}

/// Without pinning (`--pin-dir none`), SIGTERM detaches every program.
#[test]
fn without_pinning_stopping_the_agent_detaches_enforcement() {
    require_root!();
    let cg = Cgroup::new("detach");
    let mut agent = Agent::start_with(&policy(&cg), &["--pin-dir", "none"]);
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "8081"]).assert_eperm();
    let status = agent.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(agent.stderr().contains("detaching programs"));
    p.run(&["bind", "tcp", "127.0.0.1", "8081"]).assert_ok();
}

/// SIGKILL the agent while a process keeps binding a denied port: every
/// attempt stays denied. A second process denies itself 50 times while no
/// agent runs; the restarted agent adopts the pinned state (no detach) and
/// logs those 50 denials from the ring buffer, named by policy, or reports
/// what the kernel dropped as `lost` with the period.
#[test]
fn kill9_keeps_enforcing_and_the_restarted_agent_reads_the_gap() {
    require_root!();
    let cg = Cgroup::new("kill9");
    let mut a = Agent::start(&policy(&cg));
    let dir = a.pin_dir.clone().expect("the fixture pins");
    let p = Probe::in_cgroup(&cg);
    let l = Loop::start(&p, &["bind", "tcp", "127.0.0.1", "8081"], 2);
    l.wait_more(20);
    a.kill9();
    let killed_at = l.count();
    l.wait_more(100);
    // Only while no agent runs: 50 UDP binds of another port.
    let gap = p.spawn_loop(&["bind", "udp", "127.0.0.1", "8082"], 50, 1);
    let out = gap.wait_with_output().expect("gap loop");
    let gap_results: Vec<portguard_tests::ProbeResult> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("probe line"))
        .collect();
    assert_eq!(gap_results.len(), 50);
    assert_all(&gap_results, false, "binds while no agent runs");

    // No agent: `portguard status` reads what the pinned maps enforce.
    let out = Command::new(portguard_tests::agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(a.status_socket())
        .args(["--pin-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["agent_running"], json!(false), "{doc}");
    assert_eq!(doc["policies"][0]["name"], json!("pinned"), "{doc}");
    assert_eq!(
        doc["policies"][0]["cgroups"][0]["path"],
        json!(cg.rel),
        "{doc}"
    );
    assert!(
        doc["policies"][0]["decisions"]["deny"].as_u64().unwrap() > 100,
        "{doc}"
    );
    assert!(
        doc["hooks"].as_array().unwrap().contains(&json!("bind4")),
        "{doc}"
    );

    let b = Agent::start_with(&policy(&cg), &["--pin-dir", dir.to_str().unwrap()]);
    let log = b.stderr();
    assert!(
        log.contains("adopting the pinned state") && log.contains("same kernel programs"),
        "{log}"
    );
    assert!(log.contains("switched in place"), "{log}");
    l.wait_more(50);
    let results = l.finish();
    assert!(results.len() > killed_at + 100);
    assert_all(&results, false, "binds before, during and after the gap");

    // The gap's events, read by the new agent from the pinned ring buffer.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    let (seen, lost) = loop {
        let events = b.events();
        let seen = events
            .iter()
            .filter(|e| {
                e["port"] == json!(8082)
                    && e["verdict"] == json!("deny")
                    && e["protocol"] == json!("udp")
            })
            .count();
        let lost: u64 = events
            .iter()
            .filter(|e| e["agent_restarted"] == json!(true))
            .map(|e| e["lost"].as_u64().unwrap_or(0))
            .sum();
        if seen as u64 + lost >= 50 || std::time::Instant::now() > deadline {
            break (seen, lost);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        seen as u64 + lost,
        50,
        "every denial made while no agent ran is logged or counted lost ({seen} logged, {lost} \
         lost)\n{}",
        b.stderr()
    );
    let e = b.wait_event(&[("port", json!(8082)), ("verdict", json!("deny"))]);
    assert_eq!(
        e["policy"],
        json!("pinned"),
        "named by the previous agent's id: {e}"
    );
    assert_eq!(e["hook"], json!("bind4"));
    // Denials of the looping process from the gap are there too.
    let gap_8081 = b
        .events()
        .into_iter()
        .filter(|e| e["port"] == json!(8081))
        .count();
    assert!(gap_8081 > 0, "the looping process's gap denials are read");
}

/// With a ring buffer too small for what happens while no agent runs, the
/// adopting agent reads what was queued and reports the rest as one `lost`
/// line with the period (`since` = the previous agent's last sign of life,
/// `until` = now): queued + lost = the denials made meanwhile, exactly. The
/// line matches the published schema.
#[test]
fn events_dropped_while_no_agent_runs_are_reported_with_the_period() {
    require_root!();
    let cg = Cgroup::new("gaplost");
    let small = ["--ring-buffer-size", "4096"];
    let mut a = Agent::start_with(&policy(&cg), &small);
    let dir = a.pin_dir.clone().unwrap();
    a.kill9();
    let killed = std::time::SystemTime::now();
    let p = Probe::in_cgroup(&cg);
    let gap = p.spawn_loop(&["bind", "udp", "127.0.0.1", "8083"], 300, 0);
    let out = gap.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 300);
    let b = Agent::start_with(
        &policy(&cg),
        &["--pin-dir", dir.to_str().unwrap(), small[0], small[1]],
    );
    let report = b.wait_event(&[("agent_restarted", json!(true))]);
    let lost = report["lost"].as_u64().unwrap();
    let read = b
        .events_matching(&[("port", json!(8083))], Duration::from_millis(500))
        .len() as u64;
    assert!(lost > 0, "a 4 KiB ring cannot hold 300 events: {report}");
    assert_eq!(
        read + lost,
        300,
        "queued ({read}) + lost ({lost}) = denials: {report}"
    );
    let since = humantime::parse_rfc3339(report["since"].as_str().unwrap()).unwrap();
    let until = humantime::parse_rfc3339(report["until"].as_str().unwrap()).unwrap();
    assert!(since <= killed && killed <= until, "{report}");
    let errors = portguard_tests::schema_errors(&[report]);
    assert!(errors.is_empty(), "{errors:?}");
}

/// A restarted agent whose kernel object changed switches every pinned link
/// to the new program in place, and one whose map sizes changed rebuilds
/// the maps before switching, while a denied and an allowed bind loop run
/// back to back throughout: no denied bind gets through, no allowed one is
/// denied.
#[test]
fn upgrades_switch_programs_in_place_with_no_bind_slipping_through() {
    require_root!();
    let variant = std::env::var("PORTGUARD_VARIANT_OBJECT").expect(
        "PORTGUARD_VARIANT_OBJECT is not set: run the tests through `cargo xtask \
         integration-test`, which builds the changed kernel object",
    );
    let cg = Cgroup::new("upgrade");
    let mut a = Agent::start(&policy(&cg));
    let dir = a.pin_dir.clone().unwrap();
    let d = dir.to_str().unwrap();
    let p = Probe::in_cgroup(&cg);
    let denied = Loop::counting(&p, &["bind", "tcp", "127.0.0.1", "8081"], 0);
    let allowed = Loop::counting(&p, &["bind", "tcp", "127.0.0.1", "8080"], 0);
    denied.wait_more(100);
    allowed.wait_more(100);
    let tag_before = pinned_prog(&dir, "portguard_bind4")["tag"].clone();
    let link_before = pinned_link(&dir, &point_pin(&dir, "portguard_bind4"));

    // 1. New kernel programs, same maps: stopped cleanly, then upgraded.
    let st = a.stop();
    assert!(st.success(), "{st}\n{}", a.stderr());
    denied.wait_more(100);
    let mut b = Agent::start_with(&policy(&cg), &["--pin-dir", d, "--kernel-object", &variant]);
    let log = b.stderr();
    assert!(log.contains("kernel programs changed"), "{log}");
    assert!(log.contains("every map reused"), "{log}");
    let tag_after = pinned_prog(&dir, "portguard_bind4")["tag"].clone();
    assert_ne!(
        tag_before, tag_after,
        "bind4 runs different instructions now"
    );
    let link_after = pinned_link(&dir, &point_pin(&dir, "portguard_bind4"));
    assert_eq!(
        link_before["id"], link_after["id"],
        "the same link, switched in place"
    );
    assert_eq!(
        link_after["prog_id"],
        pinned_prog(&dir, "portguard_bind4")["id"],
        "the link runs the new program"
    );
    denied.wait_more(200);
    allowed.wait_more(200);

    // 2. Killed, then back to the built-in programs with larger maps: the
    // policy maps are rebuilt and filled before any link switches.
    b.kill9();
    let c = Agent::start_with(&policy(&cg), &["--pin-dir", d, "--max-cgroups", "4096"]);
    let log = c.stderr();
    assert!(log.contains("maps rebuilt"), "{log}");
    assert!(log.contains("PORTGUARD_CGROUPS"), "{log}");
    assert_eq!(
        pinned_link(&dir, &point_pin(&dir, "portguard_bind4"))["id"],
        link_before["id"],
        "still the same link"
    );
    denied.wait_more(200);
    allowed.wait_more(200);
    let d = denied.finish_tally();
    let a = allowed.finish_tally();
    eprintln!("upgrade: denied port {d:?}; allowed port {a:?}");
    assert!(d.total() > 600 && a.total() > 600, "the loops kept running");
    assert_eq!(d.ok, 0, "denied binds got through during the switches");
    assert_eq!(d.other, 0, "{:?}", d.other_samples);
    assert_eq!(a.eperm, 0, "allowed binds were denied during the switches");
    assert!(
        a.other * 1000 < a.total(),
        "allowed binds failing otherwise: {:?}",
        a.other_samples
    );
    c.wait_event(&[("port", json!(8081)), ("verdict", json!("deny"))]);
}

/// A pinned link attached to another cgroup than the one the agent attaches
/// to is found (by the kernel's link info, not the pin's existence) and
/// replaced; enforcement holds in the new scope.
#[test]
fn a_pinned_link_on_the_wrong_cgroup_is_repaired() {
    require_root!();
    let scope = Cgroup::new("repair");
    let work = scope.child("w");
    let mut a = Agent::start_with(&policy(&work), &["--attach-cgroup", &scope.rel]);
    let dir = a.pin_dir.clone().unwrap();
    assert_eq!(
        pinned_link(&dir, "portguard_setsockopt")["cgroup_id"],
        json!(scope.id())
    );
    a.kill9();
    let b = Agent::start_with(&policy(&work), &["--pin-dir", dir.to_str().unwrap()]);
    let log = b.stderr();
    assert!(
        log.contains(&format!("attached to cgroup id {}", scope.id())) && log.contains("replaced"),
        "{log}"
    );
    // cgroup id 1: the cgroup2 root.
    assert_eq!(
        pinned_link(&dir, "portguard_setsockopt")["cgroup_id"],
        json!(1)
    );
    Probe::in_cgroup(&work)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    Probe::in_cgroup(&work)
        .run(&["bind", "tcp", "127.0.0.1", "8080"])
        .assert_ok();
}

/// The map pins in `dir`, by name (`old-` ones: moved aside).
fn pinned_maps(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("maps"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A start whose program the kernel refuses fails, names the program, and
/// leaves the pin directory as it found it, so that nothing half-installed
/// is adopted later:
/// - a first start: nothing pinned;
/// - a restart over a killed agent's pins whose maps it cannot reuse (that
///   agent ran with another `--max-policies`, so the restart moves them
///   aside to build its own): that agent's maps are put back where they
///   were, its programs keep enforcing on them, and the next agent with its
///   settings adopts every one of them.
///
/// Debug builds take the program `PORTGUARD_TEST_REFUSE` names as refused
/// by the kernel, in either object (with the cache and without).
#[test]
fn a_start_the_kernel_refuses_a_program_to_leaves_the_pins_as_it_found_them() {
    require_root!();
    let cg = Cgroup::new("refused");
    let bpffs = TestBpffs::new("refused");
    let dir = bpffs.path.join("pins");
    let pin_dir = ["--pin-dir", dir.to_str().unwrap()];
    let refuse = [("PORTGUARD_TEST_REFUSE", Path::new("portguard_bind6"))];

    let err = Agent::try_start_with_env(&policy(&cg), &pin_dir, &refuse)
        .err()
        .expect("a start with a refused program fails");
    assert!(err.contains("portguard_bind6"), "{err}");
    let left = pinned_maps(&dir);
    assert!(
        left.is_empty(),
        "a failed first start left maps pinned: {left:?}"
    );
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_ok();

    let small = ["--pin-dir", dir.to_str().unwrap(), "--max-policies", "100"];
    let mut a = Agent::start_with(&policy(&cg), &small);
    a.kill9();
    let before = pinned_maps(&dir);
    assert!(!before.is_empty());
    let err = Agent::try_start_with_env(&policy(&cg), &pin_dir, &refuse)
        .err()
        .expect("a restart with a refused program fails");
    assert!(err.contains("portguard_bind6"), "{err}");
    assert_eq!(pinned_maps(&dir), before, "the killed agent's map pins");
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8080"])
        .assert_ok();

    let b = Agent::start_with(&policy(&cg), &small);
    let log = b.stderr();
    assert!(
        log.contains("adopting the pinned state") && log.contains("every map reused"),
        "{log}"
    );
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
}

/// Objects named in `portguard uninstall --dry-run` output: (kind, id).
fn listed_ids(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (kind, id) = match (w.next(), w.next(), w.next(), w.next(), w.next()) {
                (Some("would"), Some("remove"), Some(kind), Some("id"), Some(id)) => (kind, id),
                _ => return None,
            };
            Some((kind.to_owned(), id.trim_end_matches(':').parse().ok()?))
        })
        .collect()
}

/// `uninstall` refuses while the agent runs, `--dry-run` lists every object
/// with its id and removes nothing, and the real run leaves none of them in
/// the kernel (bpftool) and the cgroup unrestricted.
#[test]
fn uninstall_removes_every_kernel_object() {
    require_root!();
    let cg = Cgroup::new("uninstall");
    let mut a = Agent::start(&policy(&cg));
    let dir = a.pin_dir.clone().unwrap();
    let p = Probe::in_cgroup(&cg);
    let refused = uninstall(&dir);
    assert!(
        refused.contains("another portguard agent is running"),
        "{refused}"
    );
    assert!(a.stop().success());
    // Stopped: still enforcing.
    p.run(&["bind", "tcp", "127.0.0.1", "8081"]).assert_eperm();

    let out = Command::new(portguard_tests::agent_bin())
        .args(["uninstall", "--dry-run", "--pin-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ids = listed_ids(&text);
    let count = |k: &str| ids.iter().filter(|(kind, _)| kind == k).count();
    assert!(count("link") >= 9 && count("program") >= 9, "{text}");
    // Every map the kernel object has (portguard_common::MAPS): state,
    // cgroups, policies, port sets, counters (2), events, names, agent
    // stamp, socket storage, and the event budget and its buckets.
    assert_eq!(count("map"), 12, "{text}");
    p.run(&["bind", "tcp", "127.0.0.1", "8081"]).assert_eperm();

    let done = uninstall(&dir);
    assert!(
        done.contains(&format!("removed {} pinned objects", ids.len())),
        "{done}"
    );
    assert!(!dir.exists(), "the pin directory is removed");
    p.run(&["bind", "tcp", "127.0.0.1", "8081"]).assert_ok();
    // The kernel frees programs and maps once unreferenced (asynchronously).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<(String, u64)> = ids
            .iter()
            .filter(|(kind, id)| {
                let list = match kind.as_str() {
                    "link" => bpftool(&["link", "show"]),
                    "program" => bpftool(&["prog", "show"]),
                    _ => bpftool(&["map", "show"]),
                };
                list.as_array()
                    .is_some_and(|l| l.iter().any(|o| o["id"] == json!(id)))
            })
            .cloned()
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in the kernel after uninstall: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
