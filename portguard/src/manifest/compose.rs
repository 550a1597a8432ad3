//! docker-compose files: `services.NAME.ports` (short and long syntax),
//! `expose`, `network_mode: host`, `image` and `build`.
//!
//! Owns the compose reader. May import the manifest model, value helpers
//! and path display (`super`), `std` and the policy layer's YAML tree.

use std::path::{Path, PathBuf};

use super::{
    Check, Finding, HostClaim, Loc, Manifests, NetCaps, Origin, PortDecl, Proto, Unit, WorkloadId,
    load::shown_join,
    values::{entries, get, interpolate, items, port_range, text},
};
use crate::policy::yaml::Node;

/// One `ports:` item in short syntax:
/// `[[HOST_IP:][HOST_PORT[-HOST_PORT]]:]CONTAINER_PORT[-CONTAINER_PORT][/PROTOCOL]`.
#[derive(Debug, PartialEq, Eq)]
struct ShortPort {
    ip: Option<String>,
    host: Option<(u16, u16)>,
    container: (u16, u16),
    proto: Proto,
}

fn parse_short(s: &str) -> Result<ShortPort, String> {
    let (spec, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (
            a,
            Proto::parse(p).ok_or_else(|| format!("unknown protocol `{p}`"))?,
        ),
        None => (s, Proto::Tcp),
    };
    // A bracketed IPv6 host address may hold colons.
    let (ip, rest) = match spec.strip_prefix('[') {
        Some(r) => {
            let (ip, r) = r
                .split_once("]:")
                .ok_or_else(|| format!("`{s}`: unterminated [address]"))?;
            (Some(ip.to_owned()), Some(r))
        }
        None => (None, None),
    };
    let parts: Vec<&str> = rest.unwrap_or(spec).split(':').collect();
    let (ip, host, container) = match (ip, parts.as_slice()) {
        (None, [c]) => (None, None, *c),
        (None, [h, c]) => (None, Some(*h), *c),
        (None, [ip, h, c]) => (Some((*ip).to_owned()), Some(*h), *c),
        (Some(ip), [h, c]) => (Some(ip), Some(*h), *c),
        (Some(ip), [c]) => (Some(ip), None, *c),
        _ => return Err(format!("`{s}` is not HOST_IP:HOST_PORT:CONTAINER_PORT")),
    };
    let container = port_range(container)?;
    let host = host.filter(|h| !h.is_empty()).map(port_range).transpose()?;
    Ok(ShortPort {
        ip: ip.filter(|ip| !matches!(ip.as_str(), "" | "0.0.0.0" | "::")),
        host,
        container,
        proto,
    })
}

/// The Dockerfile a `build:` value builds, relative to the compose file.
fn dockerfile_of(compose_dir: &Path, build: &Node) -> Option<PathBuf> {
    build_path(build).map(|rel| {
        let p = compose_dir.join(rel);
        std::fs::canonicalize(&p).unwrap_or(p)
    })
}

/// `build:`'s Dockerfile relative to the compose file's directory.
fn build_path(build: &Node) -> Option<PathBuf> {
    let (context, dockerfile) = match text(build) {
        Some(ctx) => (ctx, "Dockerfile"),
        None => (
            get(build, "context").and_then(text).unwrap_or("."),
            get(build, "dockerfile")
                .and_then(text)
                .unwrap_or("Dockerfile"),
        ),
    };
    // A remote context (git URL) has no local Dockerfile.
    if context.contains("://") || context.starts_with("git@") {
        return None;
    }
    Some(Path::new(context).join(dockerfile))
}

pub fn read(path: &Path, file: &str, doc: &Node, m: &mut Manifests) {
    let dir = path.parent().unwrap_or(Path::new("."));
    for (name_node, svc) in entries(get(doc, "services")) {
        let Some(name) = text(name_node) else {
            continue;
        };
        let host_network = get(svc, "network_mode").and_then(text) == Some("host");
        let mut ports = Vec::new();
        for item in items(get(svc, "ports")) {
            if let Some(d) = port_item(file, item, host_network, m) {
                ports.push(d);
            }
        }
        for item in items(get(svc, "expose")) {
            let Some(s) = scalar_port(file, item, "expose", m) else {
                continue;
            };
            match parse_short(&s) {
                Ok(ShortPort {
                    container: (lo, hi),
                    proto,
                    host: None,
                    ip: None,
                }) => ports.push(PortDecl {
                    lo,
                    hi,
                    proto,
                    name: None,
                    loc: Loc::at(file, item),
                    host: host_network.then(|| HostClaim {
                        lo,
                        hi,
                        ip: None,
                        loc: Loc::at(file, item),
                        same_as_container: true,
                    }),
                }),
                Ok(_) => m.invalid(
                    file,
                    item,
                    format!("expose: `{s}` is a container port, not HOST:CONTAINER"),
                ),
                Err(e) => m.invalid(file, item, format!("expose: {e}")),
            }
        }
        if let Some(rel) = get(svc, "build").and_then(build_path) {
            let shown_dir = Path::new(file)
                .parent()
                .and_then(Path::to_str)
                .unwrap_or("");
            m.built.push((dir.join(&rel), shown_join(shown_dir, &rel)));
        }
        m.units.push(Unit {
            origin: Origin::Compose,
            workload: WorkloadId {
                kind: "compose service".to_owned(),
                namespace: file.to_owned(),
                name: name.to_owned(),
            },
            container: name.to_owned(),
            labels: Default::default(),
            image: get(svc, "image").and_then(text).map(str::to_owned),
            dockerfile: get(svc, "build").and_then(|b| dockerfile_of(dir, b)),
            host_network,
            ports,
            net: NetCaps::read(
                file,
                get(svc, "cap_add"),
                get(svc, "cap_drop"),
                get(svc, "privileged"),
            ),
            loc: Loc::at(file, name_node),
            scope: file.to_owned(),
            probes: Vec::new(),
        });
    }
}

/// A scalar port value with `${VAR:-default}` interpolated; a variable
/// without a default is reported, not guessed.
fn scalar_port(file: &str, node: &Node, field: &str, m: &mut Manifests) -> Option<String> {
    let Some(raw) = text(node) else {
        m.invalid(
            file,
            node,
            format!("{field}: expected a port, found {}", node.type_name()),
        );
        return None;
    };
    match interpolate(raw) {
        Ok(s) => Some(s),
        Err(var) => {
            m.findings.push(Finding::new(
                Check::ManifestUnresolved,
                Loc::at(file, node),
                format!("{field}: `{raw}` uses ${var}, which has no default here; not checked"),
            ));
            None
        }
    }
}

fn port_item(file: &str, item: &Node, host_network: bool, m: &mut Manifests) -> Option<PortDecl> {
    let loc = Loc::at(file, item);
    // Long syntax: {target, published, host_ip, protocol}.
    if let Some(target) = get(item, "target") {
        let t = scalar_port(file, target, "ports.target", m)?;
        let container = match port_range(&t) {
            Ok(c) => c,
            Err(e) => {
                m.invalid(file, target, format!("ports.target: {e}"));
                return None;
            }
        };
        let proto = match get(item, "protocol").and_then(text) {
            None => Proto::Tcp,
            Some(p) => match Proto::parse(p) {
                Some(p) => p,
                None => {
                    m.invalid(file, item, format!("ports.protocol: unknown `{p}`"));
                    return None;
                }
            },
        };
        let ip = get(item, "host_ip")
            .and_then(text)
            .filter(|ip| !matches!(*ip, "0.0.0.0" | "::"))
            .map(str::to_owned);
        let host = match get(item, "published") {
            Some(p) => {
                let s = scalar_port(file, p, "ports.published", m)?;
                match port_range(&s) {
                    Ok((lo, hi)) => Some(HostClaim {
                        lo,
                        hi,
                        ip,
                        loc: Loc::at(file, p),
                        same_as_container: false,
                    }),
                    Err(e) => {
                        m.invalid(file, p, format!("ports.published: {e}"));
                        return None;
                    }
                }
            }
            None => host_network.then(|| HostClaim {
                lo: container.0,
                hi: container.1,
                ip,
                loc: Loc::at(file, target),
                same_as_container: true,
            }),
        };
        return Some(PortDecl {
            lo: container.0,
            hi: container.1,
            proto,
            name: get(item, "name").and_then(text).map(str::to_owned),
            loc: Loc::at(file, target),
            host,
        });
    }
    let s = scalar_port(file, item, "ports", m)?;
    match parse_short(&s) {
        Ok(sp) => {
            let host = match sp.host {
                Some((lo, hi)) => Some(HostClaim {
                    lo,
                    hi,
                    ip: sp.ip,
                    loc: loc.clone(),
                    same_as_container: false,
                }),
                None if host_network => Some(HostClaim {
                    lo: sp.container.0,
                    hi: sp.container.1,
                    ip: sp.ip,
                    loc: loc.clone(),
                    same_as_container: true,
                }),
                // Published on a port the engine picks: no fixed claim.
                None => None,
            };
            Some(PortDecl {
                lo: sp.container.0,
                hi: sp.container.1,
                proto: sp.proto,
                name: None,
                loc,
                host,
            })
        }
        Err(e) => {
            m.invalid(file, item, format!("ports: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_syntax() {
        let p = |s: &str| parse_short(s).unwrap();
        assert_eq!(p("3000").container, (3000, 3000));
        assert_eq!(p("3000").host, None);
        let full = p("127.0.0.1:8080:80/udp");
        assert_eq!(full.ip.as_deref(), Some("127.0.0.1"));
        assert_eq!((full.host, full.container), (Some((8080, 8080)), (80, 80)));
        assert_eq!(full.proto, Proto::Udp);
        assert_eq!(p("9000-9002:9000-9002").host, Some((9000, 9002)));
        assert_eq!(p("127.0.0.1::80").host, None);
        assert_eq!(p("[::1]:5432:5432").ip.as_deref(), Some("::1"));
        assert_eq!(p("0.0.0.0:80:80").ip, None);
        assert!(parse_short("a:b:c:d").is_err());
        assert!(parse_short("80/icmp").is_err());
        assert!(parse_short("99999").is_err());
    }

    #[test]
    fn services_with_every_form() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("api")).unwrap();
        std::fs::write(dir.path().join("api/Dockerfile"), "EXPOSE 1\n").unwrap();
        let text = "services:\n  api:\n    build: ./api\n    ports:\n      - \"8080:3000\"\n      - target: 9090\n        published: \"19090\"\n        protocol: udp\n      - ${HOST_PORT}:80\n    expose: [\"3001\", 4000-4001]\n  agent:\n    image: reg/agent\n    network_mode: host\n    ports: [\"${AGENT_PORT:-9200}\"]\n";
        let doc = crate::policy::yaml::parse(text).unwrap().unwrap();
        let mut m = Manifests::default();
        let path = dir.path().join("compose.yaml");
        read(&path, "compose.yaml", &doc, &mut m);
        assert_eq!(m.units.len(), 2);
        let api = &m.units[0];
        assert_eq!(
            api.dockerfile.as_deref(),
            Some(
                std::fs::canonicalize(dir.path().join("api/Dockerfile"))
                    .unwrap()
                    .as_path()
            )
        );
        let got: Vec<_> = api
            .ports
            .iter()
            .map(|d| (d.describe(), d.loc.line, d.host.as_ref().map(|h| h.lo)))
            .collect();
        assert_eq!(
            got,
            [
                ("3000/tcp".to_owned(), 5, Some(8080)),
                ("9090/udp".to_owned(), 6, Some(19090)),
                ("3001/tcp".to_owned(), 10, None),
                ("4000-4001/tcp".to_owned(), 10, None),
            ]
        );
        // ${HOST_PORT} has no default: reported, not guessed.
        assert_eq!(m.findings.len(), 1, "{:?}", m.findings);
        assert_eq!(m.findings[0].check, Check::ManifestUnresolved);
        assert_eq!(m.findings[0].loc.line, 9);
        let agent = &m.units[1];
        let h = agent.ports[0].host.as_ref().unwrap();
        assert!(agent.host_network && h.same_as_container && h.lo == 9200);
    }
}
