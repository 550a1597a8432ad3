//! Hostile input and hostile neighbours: oversized and alias-bomb policy
//! files are refused in bounded memory (by `check`, at start and on reload,
//! where the previous policy stays in force); unprivileged local users
//! cannot read or change the agent's pins, status socket or event log; a
//! pin directory planted by another user is moved aside and a squatted
//! metrics port costs the metrics, never enforcement.

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
};

use portguard_tests::{Agent, Cgroup, Probe, agent_bin, require_root};

/// Run `portguard ARGS` and return (exit code, output, peak RSS in KiB).
/// Measured by a small Python parent: a child's `ru_maxrss` also counts the
/// memory of whatever exec'd it, and this test process is large.
fn portguard_rss(args: &[&str]) -> (i32, String, i64) {
    let script = "import resource, subprocess, sys\n\
                  p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n\
                  sys.stdout.write(p.stdout + p.stderr)\n\
                  print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
                  sys.exit(p.returncode)\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(agent_bin())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("MAXRSS ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no MAXRSS in {text}"));
    (out.status.code().unwrap_or(-1), text, rss)
}

/// A policy whose aliases expand ten levels deep (10^10 rules from 1 KiB).
fn alias_bomb(cg: &str) -> String {
    let mut s = String::from(
        "x0: &x0 [{ports: [80]}, {ports: [81]}, {ports: [82]}, {ports: [83]}, {ports: [84]}, {ports: [85]}, {ports: [86]}, {ports: [87]}, {ports: [88]}, {ports: [89]}]\n",
    );
    for i in 1..10 {
        let refs = vec![format!("*x{}", i - 1); 10].join(", ");
        s.push_str(&format!("x{i}: &x{i} [{refs}]\n"));
    }
    s.push_str(&format!(
        "policies:\n  - name: bomb\n    cgroup: {cg}\n    bind: *x9\n"
    ));
    s
}

#[test]
fn oversized_and_alias_bomb_policies_are_refused_in_bounded_memory() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // 100 MB (sparse), a million rules (24 MB) and an alias bomb.
    let huge = dir.path().join("huge.yaml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let million = dir.path().join("million.yaml");
    let mut text = String::from("policies:\n  - name: m\n    cgroup: /m\n    bind:\n");
    for i in 0..1_000_000u32 {
        text.push_str(&format!("      - {{ports: [{}]}}\n", i % 65535 + 1));
    }
    std::fs::write(&million, &text).unwrap();
    let bomb = dir.path().join("bomb.yaml");
    std::fs::write(&bomb, alias_bomb("/m")).unwrap();
    for (file, why) in [
        (&huge, "larger than"),
        (&million, "larger than"),
        (&bomb, "YAML nodes"),
    ] {
        let (code, out, rss_kib) = portguard_rss(&["check", file.to_str().unwrap()]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(why), "{}: {out}", file.display());
        assert!(
            rss_kib < 200 * 1024,
            "{}: check peaked at {rss_kib} KiB",
            file.display()
        );
        eprintln!(
            "{}: refused, peak RSS {} MiB",
            file.display(),
            rss_kib / 1024
        );
    }

    // A running agent given the bomb on reload keeps its policy.
    let cg = Cgroup::new("bomb");
    let mut agent = Agent::start(&format!(
        "policies:\n  - {{name: ok, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
        cg.rel
    ));
    let status = agent.reload(&alias_bomb(&cg.rel));
    assert!(status.contains("reload failed"), "{status}");
    assert!(agent.stderr().contains("YAML nodes"), "{}", agent.stderr());
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "8081"]).assert_eperm();
}

/// Run `sh -c SCRIPT` as uid/gid 65534 (nobody); (success, output).
fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn unprivileged_users_cannot_reach_pins_socket_or_log() {
    require_root!();
    let cg = Cgroup::new("unpriv");
    // The log in a directory anyone may enter: only the file's mode protects it.
    let public = tempfile::tempdir().unwrap();
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = public.path().join("events.jsonl");
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: u, cgroup: {}, bind: []}}\n", cg.rel),
        &["--log", log.to_str().unwrap()],
    );
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    let deadline = std::time::Instant::now() + portguard_tests::EVENT_TIMEOUT;
    while std::fs::read_to_string(&log).map_or(true, |t| !t.contains("\"port\":8081")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no event in {}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pins = agent.pin_dir.clone().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pins), 0o700, "pin directory mode");
    assert_eq!(mode(&log), 0o600, "event log mode");
    let sock = agent.status_socket();
    assert_eq!(mode(&sock), 0o600, "status socket mode");

    let map = pins.join("maps/PORTGUARD_CGROUPS");
    let link = pins.join("links/portguard_setsockopt");
    for (what, script) in [
        ("list the pins", format!("ls {}", pins.display())),
        ("open a pinned map", format!("cat {}", map.display())),
        ("remove a pinned link", format!("rm -f {}", link.display())),
        ("read the event log", format!("cat {}", log.display())),
        (
            "write the event log",
            format!("echo x >> {}", log.display()),
        ),
        (
            "talk to the status socket",
            format!(
                "python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect(\"{}\")'",
                sock.display()
            ),
        ),
        (
            "run portguard status",
            format!(
                "{} status --socket {}",
                agent_bin().display(),
                sock.display()
            ),
        ),
        (
            "run portguard uninstall",
            format!(
                "{} uninstall --pin-dir {}",
                agent_bin().display(),
                pins.display()
            ),
        ),
    ] {
        let (ok, out) = as_nobody(&script);
        assert!(!ok, "nobody could {what}: {out}");
        eprintln!("nobody cannot {what}: {}", out.lines().last().unwrap_or(""));
    }
    // Still there and still enforcing.
    assert!(link.exists() && map.exists());
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8082"])
        .assert_eperm();
}

/// /sys/fs/bpf is usually world-writable: a directory another user made
/// first (to own the pins) is never used, and never keeps the agent from
/// enforcing: an empty one is removed and the agent pins in a fresh
/// directory of its own; one with anything in it is left for inspection and
/// the agent enforces unpinned. Either way its log and `status` say so.
#[test]
fn a_pin_directory_planted_by_another_user_does_not_stop_enforcement() {
    require_root!();
    let planted =
        Path::new(portguard_tests::TEST_PIN_ROOT).join(format!("planted-{}", std::process::id()));
    std::fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let cg = Cgroup::new("planted");
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: p, cgroup: {}, bind: []}}\n", cg.rel),
        &["--pin-dir", planted.to_str().unwrap()],
    );
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    let md = std::fs::metadata(&planted).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!((md.uid(), md.permissions().mode() & 0o777), (0, 0o700));
    assert!(
        planted.join("links/portguard_setsockopt").exists(),
        "pinned in the fresh directory"
    );
    assert!(
        agent.stderr().contains("was made by uid 65534"),
        "{}",
        agent.stderr()
    );
    let (code, out, err) = portguard_tests::portguard(&[
        "status",
        "--socket",
        agent.status_socket().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("WARNING: pin directory"), "{out}");
    assert!(out.contains("removed (it was empty)"), "{out}");
    drop(agent);

    // One with something in it is left as it is (for inspection), and the
    // agent enforces without pinning.
    std::fs::create_dir_all(planted.join("links")).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: p, cgroup: {}, bind: []}}\n", cg.rel),
        &["--pin-dir", planted.to_str().unwrap()],
    );
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    assert!(
        agent.stderr().contains("enforcing WITHOUT pinning"),
        "{}",
        agent.stderr()
    );
    assert_eq!(std::fs::metadata(&planted).unwrap().uid(), 65534);
    assert!(!planted.join("links/portguard_setsockopt").exists());
    drop(agent);
    let _ = std::fs::remove_dir_all(&planted);
}

/// A local user holding the metrics port first costs the metrics, loudly,
/// not enforcement.
#[test]
fn a_squatted_metrics_port_does_not_stop_enforcement() {
    require_root!();
    let squat = Command::new(portguard_tests::probe_bin())
        .args(["--uid", "65534", "hold", "tcp", "127.0.0.1", "29620"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut squat = Kill(squat);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squat.0.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains(r#""ok":true"#), "{line}");
    let cg = Cgroup::new("squat");
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: p, cgroup: {}, bind: []}}\n", cg.rel),
        &["--metrics-addr", "127.0.0.1:29620"],
    );
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    assert!(
        agent
            .stderr()
            .contains("--metrics-addr 127.0.0.1:29620: cannot listen"),
        "{}",
        agent.stderr()
    );
    let (code, out, err) = portguard_tests::portguard(&[
        "status",
        "--json",
        "--socket",
        agent.status_socket().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cannot listen"), "{out}");
}
