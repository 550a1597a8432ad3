//! The command line: `check`, `--help`, and `run` refusing bad input before
//! touching the kernel. These need no root.

use portguard_tests::portguard;

#[test]
fn check_accepts_the_bundled_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.yaml");
    let (code, out, _) = portguard(&["check", example]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": ok: "), "{out}");
}

#[test]
fn check_lists_every_error_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "policies:\n  - name: a\n    cgroup: /a\n    bind:\n      - ports: [0, 70000, \"10-5\"]\n        protocol: sctp\n  - name: a\n    cgroup: /b\n    mode: strict\n    colour: red\n",
    )
    .unwrap();
    let (code, out, _) = portguard(&["check", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let path = f.display().to_string();
    for needle in [
        format!("{path}:5:17: error: policies[0].bind[0].ports[0]:"),
        format!("{path}:5:20: error: policies[0].bind[0].ports[1]: port 70000 is out of range"),
        format!("{path}:5:27: error: policies[0].bind[0].ports[2]: inverted range"),
        format!("{path}:6:19: error: policies[0].bind[0].protocol: unknown value `sctp`"),
        format!("{path}:7:11: error: policies[1].name: duplicate policy name `a`"),
        format!("{path}:9:11: error: policies[1].mode: unknown value `strict`"),
        format!("{path}:10:5: error: policies[1].colour: unknown key `colour`"),
    ] {
        assert!(out.contains(&needle), "missing {needle:?} in:\n{out}");
    }
    assert!(out.contains("invalid: 0 policies, 7 errors"), "{out}");
}

#[test]
fn check_warns_about_cgroups_that_do_not_exist_yet() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.yaml");
    std::fs::write(
        &f,
        "policies:\n  - {name: a, cgroup: /portguard-no-such-cgroup/x, bind: []}\n",
    )
    .unwrap();
    let (code, out, _) = portguard(&["check", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "warning: policies[0].cgroup: cgroup /portguard-no-such-cgroup/x does not exist"
        ),
        "{out}"
    );
}

#[test]
fn run_refuses_an_invalid_policy_before_loading_anything() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "policies:\n  - {name: a, cgroup: /a, bind: [{ports: [99999]}]}\n",
    )
    .unwrap();
    let (code, _, err) = portguard(&["run", "--policy", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.yaml:2:"), "{err}");
    assert!(err.contains("out of range"), "{err}");
    assert!(!err.contains("attached"), "nothing was attached: {err}");
    let (code, _, err) = portguard(&["run", "--policy", "/nonexistent/policy.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/policy.yaml"), "{err}");
}

#[test]
fn help_explains_every_option() {
    let (code, out, _) = portguard(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("run") && out.contains("check"), "{out}");
    let (_, run, _) = portguard(&["run", "--help"]);
    for opt in [
        "--policy",
        "--log",
        "--no-watch",
        "--max-cgroups",
        "--max-policies",
        "--max-port-chunks",
        "--ring-buffer-size",
        "--lost-report-interval",
        "--rescan-interval",
        "--attach-cgroup",
        "--cri-socket",
        "--health-listen",
        "--cgroup-root",
        "--require-lsm",
        "--aggregate-window",
        "--metrics-addr",
        "--status-socket",
        "--log-max-size",
        "--log-max-files",
        "journald",
        "SIGHUP",
        "--pin-dir",
        "--fail-closed",
        "uninstall",
    ] {
        assert!(run.contains(opt), "run --help lacks {opt}:\n{run}");
    }
    for (sub, opts) in [
        ("status", &["--socket", "--json"][..]),
        (
            "events",
            &[
                "--follow",
                "--since",
                "--until",
                "--policy",
                "--pod",
                "--namespace",
                "--port",
                "--verdict",
                "--summary",
                "--json",
            ][..],
        ),
        (
            "learn",
            &["--cgroup", "--pods", "--unit", "--duration", "--out"][..],
        ),
        ("uninstall", &["--pin-dir", "--dry-run"][..]),
    ] {
        let (code, help, _) = portguard(&[sub, "--help"]);
        assert_eq!(code, 0);
        for opt in opts {
            assert!(help.contains(opt), "{sub} --help lacks {opt}:\n{help}");
        }
    }
    assert!(
        out.contains("learn")
            && out.contains("status")
            && out.contains("events")
            && out.contains("uninstall"),
        "{out}"
    );
    let (_, check, _) = portguard(&["check", "--help"]);
    assert!(check.contains("Exits 0"), "{check}");
}

#[test]
fn check_manifests_refuses_bad_input_clearly() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.yaml");
    // A manifest path that does not exist: exit 1, naming it.
    let (code, _, err) = portguard(&[
        "check",
        "--policy",
        example,
        "--manifests",
        "/nonexistent/k8s",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--manifests /nonexistent/k8s"), "{err}");
    // No policy file at all: a usage error.
    let (code, _, err) = portguard(&["check", "--manifests", "/tmp"]);
    assert_eq!(code, 2, "{err}");
    // A manifest that is not YAML is an error at its line, even with
    // --warn-only the report says so (and the run passes).
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("chart.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ .Release.Name }}\n  labels: [\n",
    )
    .unwrap();
    let (code, out, _) = portguard(&["check", example, "--manifests", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let want = format!("{}:", f.display());
    assert!(
        out.lines().any(|l| l.starts_with(&want)
            && l.contains("error: YAML:")
            && l.ends_with("[manifest-invalid]")),
        "{out}"
    );
    let (code, out, _) = portguard(&[
        "check",
        example,
        "--manifests",
        f.to_str().unwrap(),
        "--warn-only",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[manifest-invalid]"), "{out}");
    // An invalid policy fails even with --warn-only.
    let bad = dir.path().join("bad-policy.yaml");
    std::fs::write(&bad, "policies: [{name: a}]\n").unwrap();
    let (code, out, _) = portguard(&[
        "check",
        "--policy",
        bad.to_str().unwrap(),
        "--manifests",
        dir.path().to_str().unwrap(),
        "--warn-only",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[policy-invalid]"), "{out}");
    // --help names every finding and format.
    let (_, help, _) = portguard(&["check", "--help"]);
    for word in [
        "port-not-allowed",
        "host-port-conflict",
        "reserved-port",
        "target-port-unmatched",
        "port-mismatch",
        "sarif",
        "--warn-only",
    ] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
}
