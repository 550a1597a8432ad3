//! Dockerfiles: the `EXPOSE` instructions of the final stage (a stage built
//! `FROM` an earlier stage inherits its ports), with `ARG`/`ENV` defaults
//! substituted, line continuations and the `# escape=` directive honoured.
//!
//! Owns the Dockerfile reader (its own line-based tokenizer, no YAML). May
//! import the manifest model and value helpers (`super`) and `std`.

use std::{collections::HashMap, path::Path};

use super::{
    Check, Finding, Loc, Manifests, Origin, PortDecl, Proto, Unit, WorkloadId, values::port_range,
};

/// A word of an instruction and where it starts.
struct Word {
    text: String,
    line: usize,
    column: usize,
}

/// The instructions: keyword (upper case), its line, and its argument words.
fn instructions(text: &str) -> Vec<(String, usize, Vec<Word>)> {
    let mut escape = '\\';
    let mut out = Vec::new();
    let mut current: Option<(String, usize, Vec<Word>)> = None;
    let mut directives = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim_start();
        if directives {
            let d = trimmed.trim_start_matches('#').trim().to_ascii_lowercase();
            if trimmed.starts_with('#') && d.starts_with("escape=") {
                escape = d["escape=".len()..].chars().next().unwrap_or('\\');
                continue;
            }
            directives = trimmed.starts_with('#') && d.contains('=');
        }
        // Comment lines (also inside a continued instruction) and blank
        // lines are skipped.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let (body, continues) = match raw.trim_end().strip_suffix(escape) {
            Some(b) => (b, true),
            None => (raw, false),
        };
        let mut words = Vec::new();
        let mut col = 0;
        for piece in body.split(char::is_whitespace) {
            if !piece.is_empty() {
                words.push(Word {
                    text: piece.to_owned(),
                    line,
                    column: col + 1,
                });
            }
            col += piece.chars().count() + 1;
        }
        match current.as_mut() {
            Some((_, _, args)) => args.extend(words),
            None => {
                let mut it = words.into_iter();
                if let Some(kw) = it.next() {
                    current = Some((kw.text.to_ascii_uppercase(), line, it.collect()));
                }
            }
        }
        if !continues && let Some(done) = current.take() {
            out.push(done);
        }
    }
    out.extend(current);
    out
}

/// Substitute `$VAR`, `${VAR}`, `${VAR:-default}` from ARG/ENV values.
fn substitute(s: &str, vars: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, default, tail) = if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| s.to_owned())?;
            let inner = &r[..end];
            match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d), &r[end + 1..]),
                None => (inner, None, &r[end + 1..]),
            }
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..n], None, &after[n..])
        };
        match vars
            .get(name)
            .filter(|v| !v.is_empty())
            .map(String::as_str)
            .or(default)
        {
            Some(v) => out.push_str(v),
            None => return Err(name.to_owned()),
        }
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

fn unquote(s: &str) -> &str {
    s.trim_matches(|c| c == '"' || c == '\'')
}

/// The name a Dockerfile's image goes by: `NAME` of `Dockerfile.NAME` or
/// `NAME.Dockerfile`, else its directory's name.
fn image_name(path: &Path) -> String {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let lower = file.to_ascii_lowercase();
    if let Some(n) = lower.strip_prefix("dockerfile.") {
        return file[file.len() - n.len()..].to_owned();
    }
    if lower.ends_with(".dockerfile") {
        return file[..file.len() - ".dockerfile".len()].to_owned();
    }
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    dir.as_deref()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_owned()
}

pub fn read(path: &Path, file: &str, text: &str, m: &mut Manifests) {
    // Ports per stage; the final stage is the last FROM.
    let mut stages: Vec<Vec<PortDecl>> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    for (kw, _line, args) in instructions(text) {
        match kw.as_str() {
            "FROM" => {
                let words: Vec<&str> = args
                    .iter()
                    .map(|w| w.text.as_str())
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let inherited = words
                    .first()
                    .and_then(|base| names.get(&base.to_ascii_lowercase()))
                    .map(|&i| stages[i].clone())
                    .unwrap_or_default();
                if let [_, as_kw, name] = words.as_slice()
                    && as_kw.eq_ignore_ascii_case("as")
                {
                    names.insert(name.to_ascii_lowercase(), stages.len());
                }
                stages.push(inherited);
            }
            "ARG" => {
                for w in &args {
                    let (k, v) = w.text.split_once('=').unwrap_or((&w.text, ""));
                    if !v.is_empty() || !vars.contains_key(k) {
                        vars.insert(k.to_owned(), unquote(v).to_owned());
                    }
                }
            }
            "ENV" => {
                if args.len() >= 2 && !args[0].text.contains('=') {
                    let v: Vec<&str> = args[1..].iter().map(|w| w.text.as_str()).collect();
                    vars.insert(args[0].text.clone(), unquote(&v.join(" ")).to_owned());
                } else {
                    for w in &args {
                        if let Some((k, v)) = w.text.split_once('=') {
                            vars.insert(k.to_owned(), unquote(v).to_owned());
                        }
                    }
                }
            }
            "EXPOSE" => {
                if stages.is_empty() {
                    stages.push(Vec::new());
                }
                for w in &args {
                    let loc = Loc {
                        file: file.to_owned(),
                        line: w.line,
                        column: w.column,
                    };
                    let value = match substitute(unquote(&w.text), &vars) {
                        Ok(v) => v,
                        Err(var) => {
                            m.findings.push(Finding::new(
                                Check::ManifestUnresolved,
                                loc,
                                format!(
                                    "EXPOSE {}: ${var} has no ARG or ENV default; not checked",
                                    w.text
                                ),
                            ));
                            continue;
                        }
                    };
                    let (ports, proto) = match value.split_once('/') {
                        Some((p, proto)) => (p, Proto::parse(proto)),
                        None => (value.as_str(), Some(Proto::Tcp)),
                    };
                    match (port_range(ports), proto) {
                        (Ok((lo, hi)), Some(proto)) => {
                            if let Some(stage) = stages.last_mut() {
                                stage.push(PortDecl {
                                    lo,
                                    hi,
                                    proto,
                                    name: None,
                                    loc,
                                    host: None,
                                });
                            }
                        }
                        (Err(e), _) => m.findings.push(Finding::new(
                            Check::ManifestInvalid,
                            loc,
                            format!("EXPOSE: {e}"),
                        )),
                        (_, None) => m.findings.push(Finding::new(
                            Check::ManifestInvalid,
                            loc,
                            format!("EXPOSE {value}: the protocol must be tcp, udp or sctp"),
                        )),
                    }
                }
            }
            _ => {}
        }
    }
    let ports = stages.pop().unwrap_or_default();
    if ports.is_empty() {
        return;
    }
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    m.units.push(Unit {
        origin: Origin::Dockerfile,
        workload: WorkloadId {
            kind: "Dockerfile".to_owned(),
            namespace: String::new(),
            name: file.to_owned(),
        },
        container: image_name(path),
        labels: Default::default(),
        image: None,
        dockerfile: Some(canonical),
        host_network: false,
        net: Default::default(),
        loc: ports[0].loc.clone(),
        ports,
        scope: file.to_owned(),
        probes: Vec::new(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Manifests {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api").join("Dockerfile");
        std::fs::create_dir(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        let mut m = Manifests::default();
        read(&p, "api/Dockerfile", text, &mut m);
        m
    }

    fn ports(m: &Manifests) -> Vec<(String, usize, usize)> {
        m.units
            .iter()
            .flat_map(|u| &u.ports)
            .map(|d| (d.describe(), d.loc.line, d.loc.column))
            .collect()
    }

    #[test]
    fn expose_with_variables_continuations_and_protocols() {
        let m = load(
            "# syntax=docker/dockerfile:1\nFROM golang:1.23 AS build\nEXPOSE 1111\nFROM gcr.io/distroless/static\nARG PORT=3000\nENV METRICS 9090\nexpose ${PORT} \\\n  # a comment inside\n  $METRICS/tcp 5353/udp \\\n  ${ADMIN:-9901} 7000-7002\n",
        );
        assert!(m.findings.is_empty(), "{:?}", m.findings);
        assert_eq!(m.units.len(), 1);
        assert_eq!(m.units[0].container, "api");
        assert_eq!(
            ports(&m),
            [
                ("3000/tcp".into(), 7, 8),
                ("9090/tcp".into(), 9, 3),
                ("5353/udp".into(), 9, 16),
                ("9901/tcp".into(), 10, 3),
                ("7000-7002/tcp".into(), 10, 18),
            ]
        );
    }

    #[test]
    fn stages_inherit_from_earlier_stages_only() {
        let m = load("FROM alpine AS base\nEXPOSE 80\nFROM base\nEXPOSE 81\n");
        assert_eq!(ports(&m).len(), 2);
        let m = load("FROM alpine AS base\nEXPOSE 80\nFROM alpine\n");
        assert!(m.units.is_empty());
    }

    #[test]
    fn unresolved_and_invalid_values_are_reported() {
        let m = load("FROM alpine\nEXPOSE $PORT 70000 80/icmp 81\n");
        let got: Vec<_> = m.findings.iter().map(|f| (f.check, f.loc.column)).collect();
        assert_eq!(
            got,
            [
                (Check::ManifestUnresolved, 8),
                (Check::ManifestInvalid, 14),
                (Check::ManifestInvalid, 20),
            ]
        );
        assert_eq!(ports(&m), [("81/tcp".into(), 2, 28)]);
    }

    #[test]
    fn escape_directive() {
        let m = load("# escape=`\nFROM mcr.microsoft.com/windows\nEXPOSE 80 `\n  443\n");
        assert_eq!(ports(&m).len(), 2);
    }
}
