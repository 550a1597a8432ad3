//! The deployment files under deploy/: every Kubernetes manifest validates
//! offline against the Kubernetes schema (kubernetes-validate, strict), and
//! they agree with the agent: the arguments parse, every path an argument
//! names is mounted, the probes hit the health port, the capabilities are
//! the tested minimum, the bundled policies pass `portguard check`. The
//! systemd unit passes `systemd-analyze verify`. These need no root.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use portguard::cli::{Cli, Command as Sub, RunArgs};
use portguard_tests::{MINIMAL_CAPS, agent_bin};
use serde_json::Value;

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of `path`, as JSON (through PyYAML, which
/// kubernetes-validate brings).
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3 (run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "parsing {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_policy_text(what: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("policy.yaml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new(agent_bin())
        .arg("check")
        .arg(&f)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: portguard check failed:\n{stdout}"
    );
    assert!(stdout.contains(": ok:"), "{what}:\n{stdout}");
    assert!(!stdout.contains(": error:"), "{what}:\n{stdout}");
}

fn run_args(argv: &[String]) -> RunArgs {
    let argv: Vec<&str> = std::iter::once("portguard")
        .chain(argv.iter().map(String::as_str))
        .collect();
    match Cli::try_parse_from(&argv) {
        Ok(Cli {
            command: Sub::Run(a),
        }) => *a,
        Ok(other) => panic!("{argv:?} is not `portguard run`: {other:?}"),
        Err(e) => panic!("{argv:?} does not parse: {e}"),
    }
}

/// "+bpf,+net_admin" -> {"BPF", "NET_ADMIN"}.
fn minimal_caps() -> BTreeSet<String> {
    MINIMAL_CAPS
        .split(',')
        .map(|c| c.trim_start_matches('+').to_uppercase())
        .collect()
}

#[test]
fn kubernetes_manifests_validate_and_agree_with_the_agent() {
    let dir = deploy_dir().join("kubernetes");
    // The kustomization lists every manifest in the directory.
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources");

    // Schema validation, offline and strict (unknown fields are errors).
    let files: Vec<PathBuf> = listed.iter().map(|f| dir.join(f)).collect();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .output()
        .expect("python3 -m kubernetes_validate (run scripts/setup.sh)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate:\n{report}");
    for f in &listed {
        assert!(
            report.contains(&format!("{f} passed")),
            "{f} was not validated:\n{report}"
        );
    }

    let docs: Vec<Value> = files.iter().flat_map(|f| yaml_docs(f)).collect();
    let of_kind = |kind: &str| -> &Value {
        let mut it = docs.iter().filter(|d| d["kind"] == kind);
        let d = it.next().unwrap_or_else(|| panic!("no {kind}"));
        assert!(it.next().is_none(), "one {kind} only");
        d
    };
    let ns = of_kind("Namespace")["metadata"]["name"].as_str().unwrap();
    // Cluster-scoped objects have no namespace (the PolicyReport RBAC).
    let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
    for d in &docs {
        if !cluster_scoped.contains(&d["kind"].as_str().unwrap()) {
            assert_eq!(d["metadata"]["namespace"], ns, "{} namespace", d["kind"]);
        }
    }

    // The ConfigMap's policy is valid.
    let cm = of_kind("ConfigMap");
    let cm_name = cm["metadata"]["name"].as_str().unwrap();
    let policy_text = cm["data"]["policy.yaml"]
        .as_str()
        .expect("data.policy.yaml");
    check_policy_text("ConfigMap policy.yaml", policy_text);

    let ds = of_kind("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "sockets bound before start need host /proc"
    );
    assert_eq!(
        pod["serviceAccountName"],
        of_kind("ServiceAccount")["metadata"]["name"]
    );
    // `--policy-reports` RBAC: the agent's service account may write
    // PolicyReports, and nothing else.
    let role = of_kind("ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["wgpolicyk8s.io"], "resources": ["policyreports"],
                            "verbs": ["get", "create", "patch"]}])
    );
    let binding = of_kind("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                            "namespace": ns}])
    );
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint: {}",
        pod["tolerations"]
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let argv: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let args = run_args(&argv);

    // Every path the agent is given is mounted from the right volume.
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volume_for = |path: &Path| -> &Value {
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{} is not mounted", path.display()));
        volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]))
    };
    let v = volume_for(&args.policy);
    assert_eq!(
        v["configMap"]["name"], cm_name,
        "--policy comes from the ConfigMap"
    );
    assert_eq!(args.policy.file_name().unwrap(), "policy.yaml");
    let root = args.cgroup_root.as_deref().expect("--cgroup-root");
    assert_eq!(volume_for(root)["hostPath"]["path"], "/sys/fs/cgroup");
    let pins = args.pin_dir.0.as_deref().expect("--pin-dir");
    assert_eq!(
        volume_for(pins)["hostPath"]["path"],
        "/sys/fs/bpf",
        "pins live on the node's bpffs, so they outlive the pod"
    );
    let v = volume_for(&args.cri_socket);
    assert_eq!(v["hostPath"]["type"], "Socket");
    assert_eq!(v["hostPath"]["path"], args.cri_socket.to_str().unwrap());
    let status = args.status_socket.0.as_deref().expect("--status-socket");
    let run = volume_for(status);
    assert_eq!(
        run["hostPath"]["path"], "/run/portguard",
        "the status socket is on the node, where the OCI hook reaches it"
    );
    // The init container installs a hook that asks the agent where the
    // node has its socket, runs the binary it copied, and writes the base
    // spec where containerd's config is.
    let init = &pod["initContainers"][0];
    let init_args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let arg = |name: &str| -> &str {
        init_args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("the init container has no --{name}"))
    };
    assert_eq!(init_args[..3], ["hook", "install", "--containerd"]);
    assert_eq!(arg("socket"), status.to_str().unwrap());
    assert_eq!(
        arg("fail-open-namespace"),
        ns,
        "a stopped agent's own pods must start, or it never answers again"
    );
    let init_mount = |path: &str| -> (String, &Value) {
        let m = init["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{path} is not mounted in the init container"));
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        let node = path.replacen(
            m["mountPath"].as_str().unwrap(),
            v["hostPath"]["path"].as_str().unwrap(),
            1,
        );
        (node, v)
    };
    assert_eq!(init_mount(arg("install-bin")).0, arg("bin"));
    assert_eq!(
        init_mount(arg("containerd-base-spec")).0,
        "/etc/containerd/portguard-base-spec.json"
    );
    for path in ["/sys/fs/bpf", "/sys/kernel/security"] {
        assert_eq!(volume_for(Path::new(path))["hostPath"]["path"], path);
    }

    // The probes reach the health endpoint.
    let health = args.health_listen.expect("--health-listen");
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "health")
        .expect("a port named health");
    assert_eq!(port["containerPort"], health.port());
    assert!(health.ip().is_unspecified(), "kubelet probes the pod IP");
    // Metrics on the pod's address, on the port named `metrics`.
    let metrics = args.metrics_addr.0.expect("--metrics-addr");
    let mport = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(mport["containerPort"], metrics.port());
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        metrics.port().to_string()
    );
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "events carry the node name"
    );
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "health", "{probe}");
    }
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][kind][r].is_string(), "resources.{kind}.{r}");
        }
    }

    // Exactly the capabilities the deploy tests prove sufficient.
    let sc = &c["securityContext"];
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(added, minimal_caps());
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["runAsUser"], 0);

    // The NetworkPolicy selects the DaemonSet's pods and admits only the
    // monitoring namespace, only to the metrics port.
    let np = of_kind("NetworkPolicy");
    let template_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selector = np["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("podSelector.matchLabels");
    assert!(
        !selector.is_empty(),
        "an empty podSelector selects every pod"
    );
    for (k, v) in selector {
        assert_eq!(
            &template_labels[k], v,
            "podSelector {k} vs the pod template"
        );
    }
    assert!(np["spec"].get("podSelector").unwrap()["matchExpressions"].is_null());
    assert_eq!(np["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1, "one rule: {ingress:?}");
    let from = ingress[0]["from"].as_array().unwrap();
    assert_eq!(
        from,
        &vec![
            serde_json::json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})
        ]
    );
    let np_ports = ingress[0]["ports"].as_array().unwrap();
    assert_eq!(np_ports.len(), 1, "{np_ports:?}");
    let metrics = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a container port named metrics");
    let port = &np_ports[0]["port"];
    assert!(
        *port == metrics["name"] || *port == metrics["containerPort"],
        "the NetworkPolicy's port {port} is the container's metrics port {metrics}"
    );
    assert_eq!(np_ports[0]["protocol"], metrics["protocol"]);
    // ... which is the port --metrics-addr serves on.
    assert_eq!(
        args.metrics_addr.0.map(|a| u64::from(a.port())),
        metrics["containerPort"].as_u64()
    );
}

#[test]
fn the_systemd_unit_verifies_and_agrees_with_the_agent() {
    let dir = deploy_dir().join("systemd");
    check_policy_text(
        "deploy/systemd/policy.yaml",
        &std::fs::read_to_string(dir.join("policy.yaml")).unwrap(),
    );
    let unit = std::fs::read_to_string(dir.join("portguard.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let exec = value("ExecStart");
    assert_eq!(exec.len(), 1);
    let argv: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert_eq!(argv[0], "/usr/local/bin/portguard");
    let args = run_args(&argv[1..]);
    assert_eq!(args.policy, Path::new("/etc/portguard/policy.yaml"));
    assert_eq!(
        value("ConditionPathExists"),
        vec![args.policy.display().to_string()]
    );
    let bounding: BTreeSet<String> = value("CapabilityBoundingSet")[0]
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert!(
        bounding.is_superset(&minimal_caps()),
        "CapabilityBoundingSet {bounding:?} lacks some of {:?}",
        minimal_caps()
    );
    assert_eq!(value("Type"), vec!["notify"], "the agent sends READY=1");

    // systemd's own checker, with the binary where the unit expects it.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("portguard.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/portguard", agent_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (the systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{stderr}");
    assert!(
        !stderr.contains("portguard.service"),
        "systemd-analyze complains about the unit:\n{stderr}"
    );
}
