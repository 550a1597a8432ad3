//! What the harness relies on, with a throwaway shell hook: containerd 1.6
//! runs a `base_runtime_spec` `createRuntime` hook for app containers (at
//! StartContainer, not CreateContainer) and never for pod sandboxes; what
//! it hands a container's and a sandbox's hook on stdin (saved as
//! `fixtures/oci/*.json` with `PORTGUARD_WRITE_OCI_FIXTURES=1`); a failing
//! or overdue hook fails the start. The findings are in docs/oci-hook.md.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use portguard::workload::cri::api::ContainerState;
use portguard_tests::{
    cgroup2_root,
    containerd::{Containerd, Hook, container_config, unavailable},
    probe_bin, require_root,
};
use serde_json::Value;

/// A hook script that saves what it is given and then does what `DIR/mode`
/// says: nothing (exit 0), `fail` (exit 3, a line on stderr) or `sleep`
/// (exec `sleep 37`, past any test timeout). For each run it writes
/// `state-<n>.json` (stdin, as received), `config-<n>.json` (the bundle's
/// config.json as runc handed it to the hook) and `cgroup-<n>` (the waiting
/// container process's /proc/PID/cgroup).
fn recording_hook(dir: &Path) -> PathBuf {
    let path = dir.join("hook.sh");
    std::fs::write(
        &path,
        format!(
            r#"#!/bin/sh
d={dir}
n=$(date +%s%N)-$$
cat > "$d/state-$n.json.tmp"
mv "$d/state-$n.json.tmp" "$d/state-$n.json"
bundle=$(jq -r .bundle "$d/state-$n.json")
pid=$(jq -r .pid "$d/state-$n.json")
cp "$bundle/config.json" "$d/config-$n.json"
cat "/proc/$pid/cgroup" > "$d/cgroup-$n"
case "$(cat "$d/mode" 2>/dev/null)" in
  fail) echo "pg-test-hook: refusing on purpose" >&2; exit 3 ;;
  sleep) exec sleep 37 ;;
esac
exit 0
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    path
}

/// The hook runs recorded in `dir`, oldest first: (name stem, state JSON
/// text).
fn hook_runs(dir: &Path) -> Vec<(String, String)> {
    let mut runs: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name
                .strip_prefix("state-")?
                .strip_suffix(".json")?
                .to_owned();
            Some((stem, std::fs::read_to_string(e.path()).unwrap()))
        })
        .collect();
    runs.sort();
    runs
}

/// Processes running `sleep 37` (the overdue hook).
fn overdue_hooks() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x0037\x00"))
        .count()
}

fn annotation<'a>(state: &'a Value, key: &str) -> &'a str {
    state["annotations"][key].as_str().unwrap_or_default()
}

#[test]
fn containerd_runs_base_spec_create_runtime_hooks() {
    require_root!();
    if let Some(why) = unavailable() {
        panic!("the OCI hook tests need containerd here: {why}");
    }
    let rec = tempfile::tempdir().unwrap();
    let hook = Hook {
        path: recording_hook(rec.path()),
        args: vec!["pg-test-hook".into(), "arg1".into()],
        timeout_s: Some(2),
    };
    let mut ctrd = Containerd::start_with_hook(&probe_bin(), Some(hook.clone()));

    // RunPodSandbox: containerd builds the sandbox (pause) container's
    // spec from its built-in default, not from the base spec: no hook.
    let (sb, uid, pod_cg) = ctrd.run_pod("oci-facts", "web-0", &[("app", "web")]);
    let runs = hook_runs(rec.path());
    assert_eq!(
        runs.len(),
        0,
        "no base spec hook for the sandbox: {runs:#?}"
    );

    // CreateContainer runs no hook (containerd 1.6 creates the runc
    // container, and its cgroup, at StartContainer); StartContainer does.
    let config = container_config("web", 0, &["/bin/sleep", "3600"]);
    let id = ctrd.create_container(&sb, config);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hook_runs(rec.path()).len(), 0, "CreateContainer ran a hook");
    assert!(
        !cgroup2_root()
            .join(pod_cg.trim_start_matches('/'))
            .join(&id)
            .exists(),
        "the container's cgroup exists before StartContainer"
    );
    ctrd.try_start(&id).unwrap();
    let runs = hook_runs(rec.path());
    assert_eq!(runs.len(), 1, "one hook run for the container: {runs:#?}");
    let (ctr_stem, ctr_text) = runs[0].clone();
    let ctr_state: Value = serde_json::from_str(&ctr_text).unwrap();
    eprintln!("container state: {ctr_text}");
    assert_eq!(ctr_state["id"], id);
    assert_eq!(ctr_state["status"], "creating");
    assert_eq!(
        annotation(&ctr_state, "io.kubernetes.cri.container-type"),
        "container"
    );
    assert_eq!(annotation(&ctr_state, "io.kubernetes.cri.sandbox-id"), sb);
    assert_eq!(
        annotation(&ctr_state, "io.kubernetes.cri.container-name"),
        "web"
    );

    // The same hook put into a sandbox's spec by the runc wrapper (as a
    // runtime wrapper or NRI plugin would): what a sandbox's hook is given.
    ctrd.hook_sandboxes(Some(&hook));
    let (sb1, _, _) = ctrd.run_pod("oci-facts", "web-1", &[("app", "web")]);
    ctrd.hook_sandboxes(None);
    let runs = hook_runs(rec.path());
    assert_eq!(
        runs.len(),
        2,
        "one more hook run for the sandbox: {runs:#?}"
    );
    let (sb_stem, sb_text) = runs.into_iter().find(|(s, _)| *s != ctr_stem).unwrap();
    let sb_state: Value = serde_json::from_str(&sb_text).unwrap();
    eprintln!("sandbox state: {sb_text}");
    assert_eq!(sb_state["id"], sb1);
    assert_eq!(sb_state["status"], "creating");
    assert_eq!(
        annotation(&sb_state, "io.kubernetes.cri.container-type"),
        "sandbox"
    );
    assert_eq!(annotation(&sb_state, "io.kubernetes.cri.sandbox-id"), sb1);
    assert_eq!(
        annotation(&sb_state, "io.kubernetes.cri.sandbox-name"),
        "web-1"
    );
    assert_eq!(
        annotation(&sb_state, "io.kubernetes.cri.sandbox-namespace"),
        "oci-facts"
    );

    for (stem, what) in [(&sb_stem, "sandbox"), (&ctr_stem, "container")] {
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(rec.path().join(format!("config-{stem}.json"))).unwrap(),
        )
        .unwrap();
        eprintln!(
            "{what}: cgroupsPath {} hooks {}\n{what}: /proc/PID/cgroup of the waiting process:\n{}",
            config["linux"]["cgroupsPath"],
            config["hooks"],
            std::fs::read_to_string(rec.path().join(format!("cgroup-{stem}"))).unwrap()
        );
        // The hook survives the harness's runc wrapper (jq) and the CRI's
        // own spec options.
        assert_eq!(
            config["hooks"]["createRuntime"][0]["args"][0],
            "pg-test-hook"
        );
    }
    let ctr_config: Value = serde_json::from_str(
        &std::fs::read_to_string(rec.path().join(format!("config-{ctr_stem}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ctr_config["linux"]["cgroupsPath"],
        format!("{}/{id}", pod_cg.trim_start_matches('/')),
        "cgroupfs driver: the container's cgroup is <pod cgroup>/<id>, relative"
    );
    assert!(pod_cg.contains(&uid));
    if std::env::var_os("PORTGUARD_WRITE_OCI_FIXTURES").is_some() {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/oci");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("containerd-1.6-sandbox-state.json"), &sb_text).unwrap();
        std::fs::write(out.join("containerd-1.6-container-state.json"), &ctr_text).unwrap();
        eprintln!("wrote {}", out.display());
    }

    // A hook exiting non-zero fails StartContainer; the process never runs.
    std::fs::write(rec.path().join("mode"), "fail").unwrap();
    let probe = ["/pgprobe", "bind", "tcp", "0.0.0.0", "8080"];
    let refused = ctrd.create_container(&sb, container_config("web", 1, &probe));
    let err = ctrd
        .try_start(&refused)
        .expect_err("a failing hook fails the start");
    eprintln!(
        "failing hook: StartContainer: {:?}: {}",
        err.code(),
        err.message()
    );
    assert!(err.message().contains("hook"), "{}", err.message());
    let (state, code) = ctrd.container_state(&refused);
    eprintln!("failing hook: container state {state:?}, exit code {code}");
    assert_ne!(state, ContainerState::ContainerRunning);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ctrd.attempt_log(&sb, "web", 1),
        "",
        "the entrypoint never ran"
    );
    eprintln!(
        "failing hook: its stderr in containerd's log: {}",
        ctrd.log().contains("pg-test-hook: refusing on purpose")
    );
    // RunPodSandbox runs no base spec hook, so it succeeds...
    ctrd.try_run_pod("oci-facts", "web-2", &[], &[], false)
        .unwrap_or_else(|e| panic!("RunPodSandbox ran the base spec hook: {e}"));
    // ... and fails if the sandbox's own spec has the hook.
    ctrd.hook_sandboxes(Some(&hook));
    let r = ctrd.try_run_pod("oci-facts", "web-3", &[], &[], false);
    ctrd.hook_sandboxes(None);
    let err = r.expect_err("a failing sandbox hook fails RunPodSandbox");
    eprintln!(
        "failing hook: RunPodSandbox: {:?}: {}",
        err.code(),
        err.message()
    );

    // A hook past its OCI timeout is killed and fails the start.
    std::fs::write(rec.path().join("mode"), "sleep").unwrap();
    let overdue = ctrd.create_container(&sb, container_config("web", 2, &probe));
    let t0 = Instant::now();
    let err = ctrd
        .try_start(&overdue)
        .expect_err("an overdue hook fails the start");
    let took = t0.elapsed();
    eprintln!(
        "overdue hook: StartContainer failed after {took:?}: {:?}: {}",
        err.code(),
        err.message()
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert_eq!(overdue_hooks(), 0, "the overdue hook was killed");
    assert_eq!(
        ctrd.attempt_log(&sb, "web", 2),
        "",
        "the entrypoint never ran"
    );
    let log = ctrd.log();
    for l in log.lines().filter(|l| l.contains("hook")) {
        eprintln!("containerd.log: {l}");
    }
}
