use std::path::Path;

use super::{
    load::{FileKind, file_kind, shown_join},
    values::interpolate,
    *,
};

/// Issue 13: a manifest whose YAML error the parser placed past its
/// last line (fuzz/corpus/manifest/issue-13-past-the-end).
#[test]
fn a_yaml_error_at_the_end_is_reported_on_the_last_line() {
    let text = crate::policy::yaml::tests::PAST_THE_END;
    assert_eq!(text.matches(['\r', '\n']).count(), 5, "six lines");
    let m = read_text(Path::new("k8s.yaml"), text, "shop");
    let [f] = &m.findings[..] else {
        panic!("one finding: {:?}", m.findings)
    };
    assert_eq!(f.check, Check::ManifestInvalid);
    assert_eq!((f.loc.file.as_str(), f.loc.line), ("k8s.yaml", 6), "{f:?}");
    // The corpus holds the same input, as the fuzzer read it (its first
    // byte, 0, picks the YAML reader).
    let corpus = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/manifest/issue-13-past-the-end"
    ))
    .unwrap();
    assert_eq!(corpus.split_first(), Some((&0u8, text.as_bytes())));
}

#[test]
fn image_repositories_drop_tags_and_digests_and_expand_hub_names() {
    assert_eq!(
        image_repository("postgres:16"),
        "docker.io/library/postgres"
    );
    assert_eq!(
        image_repository("docker.io/library/postgres"),
        "docker.io/library/postgres"
    );
    assert_eq!(image_repository("bitnami/redis"), "docker.io/bitnami/redis");
    assert_eq!(
        image_repository("registry.example.com:5000/shop/api:1.4@sha256:ab"),
        "registry.example.com:5000/shop/api"
    );
    assert_eq!(image_repository("localhost/api"), "localhost/api");
    assert_eq!(image_name("registry.example.com/shop/api:dev"), "api");
}

#[test]
fn interpolation_uses_defaults_and_refuses_to_guess() {
    assert_eq!(interpolate("${PORT:-8080}:80").unwrap(), "8080:80");
    assert_eq!(interpolate("${PORT-9}").unwrap(), "9");
    assert_eq!(interpolate("a$$b").unwrap(), "a$b");
    assert_eq!(interpolate("${PORT}").unwrap_err(), "PORT");
    assert_eq!(interpolate("$PORT:80").unwrap_err(), "PORT");
}

#[test]
fn shown_paths_read_like_the_user_wrote_them() {
    assert_eq!(
        shown_join("", Path::new("./api/Dockerfile")),
        "api/Dockerfile"
    );
    assert_eq!(
        shown_join("ci", Path::new("../api/Dockerfile")),
        "api/Dockerfile"
    );
    assert_eq!(
        shown_join("/x/y", Path::new("./Dockerfile")),
        "/x/y/Dockerfile"
    );
    assert_eq!(
        shown_join("..", Path::new("../Dockerfile")),
        "../../Dockerfile"
    );
}

#[test]
fn dockerfiles_compose_builds_are_read_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("api")).unwrap();
    std::fs::write(dir.path().join("api/Dockerfile"), "FROM x\nEXPOSE 3000\n").unwrap();
    let compose = dir.path().join("compose.yaml");
    std::fs::write(
        &compose,
        "services:\n  api: {build: ./api, ports: [\"3000\"]}\n",
    )
    .unwrap();
    let m = load(std::slice::from_ref(&compose), "default").unwrap();
    assert_eq!(m.files, 2);
    let df = m
        .units
        .iter()
        .find(|u| u.origin == Origin::Dockerfile)
        .unwrap();
    assert_eq!(
        df.ports[0].loc.file,
        format!("{}/api/Dockerfile", dir.path().display())
    );
    // Named as well, or found in a directory: still read once.
    let m = load(&[compose, dir.path().to_owned()], "default").unwrap();
    assert_eq!(m.files, 2);
    assert_eq!(m.units.len(), 2);
}

#[test]
fn files_are_recognised_by_name() {
    for (name, kind) in [
        ("Dockerfile", Some(FileKind::Dockerfile)),
        ("Dockerfile.api", Some(FileKind::Dockerfile)),
        ("api.Dockerfile", Some(FileKind::Dockerfile)),
        ("Containerfile", Some(FileKind::Dockerfile)),
        ("deploy.yaml", Some(FileKind::Yaml)),
        ("compose.yml", Some(FileKind::Yaml)),
        ("list.json", Some(FileKind::Yaml)),
        ("README.md", None),
    ] {
        assert_eq!(file_kind(Path::new(name)), kind, "{name}");
    }
}

/// tests/fixtures/capabilities: NET_RAW/NET_ADMIN added or privileged is a
/// `net-capability` warning at the line that grants it, for governed
/// containers and compose services only; keeping the runtime's default
/// NET_RAW is a note in the summary, not a finding.
#[test]
fn net_raw_and_net_admin_of_governed_containers_are_reported() {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/capabilities"
    ));
    let plan =
        crate::policy::parse_policy_str(&std::fs::read_to_string(dir.join("policy.yaml")).unwrap())
            .unwrap();
    let mut m = read_text(
        Path::new("k8s.yaml"),
        &std::fs::read_to_string(dir.join("k8s.yaml")).unwrap(),
        "default",
    );
    let compose = read_text(
        &dir.join("compose.yaml"),
        &std::fs::read_to_string(dir.join("compose.yaml")).unwrap(),
        "default",
    );
    m.units.extend(compose.units);
    assert!(m.findings.is_empty(), "{:?}", m.findings);
    let a = analyze::analyze(&plan, "policy.yaml", &m);
    let got: Vec<(Check, Severity, &str, usize, &str)> = a
        .findings
        .iter()
        .map(|f| {
            let cap = ["NET_RAW", "NET_ADMIN", "privileged"]
                .into_iter()
                .find(|c| f.message.contains(&format!("adds capability {c}")))
                .unwrap_or("privileged");
            (
                f.check,
                f.severity,
                f.loc.file.rsplit('/').next().unwrap(),
                f.loc.line,
                cap,
            )
        })
        .collect();
    let w = |file, line, cap| (Check::NetCapability, Severity::Warning, file, line, cap);
    assert_eq!(
        got,
        vec![
            // The compose service is governed: it shares the image of a
            // governed Kubernetes container.
            w("compose.yaml", 4, "NET_RAW"),
            w("compose.yaml", 4, "NET_ADMIN"),
            w("compose.yaml", 5, "privileged"),
            w("k8s.yaml", 15, "NET_RAW"),
            w("k8s.yaml", 20, "NET_ADMIN"),
            w("k8s.yaml", 24, "privileged"),
        ],
        "{:#?}",
        a.findings
    );
    let f = &a.findings[3];
    assert!(
        f.message.contains("AF_PACKET") && f.message.contains("drop: [ALL]"),
        "{}",
        f.message
    );
    assert!(a.findings[4].message.contains("REDIRECT/TPROXY"));
    // Only `default` keeps the runtime's NET_RAW (`router` drops ALL;
    // `sniffer` and `root` were warned about already).
    assert_eq!(a.keep_net_raw.len(), 1, "{:?}", a.keep_net_raw);
    assert!(
        a.keep_net_raw[0].starts_with("k8s.yaml:33:")
            && a.keep_net_raw[0].contains("container `default`"),
        "{:?}",
        a.keep_net_raw
    );
}
