//! Finding and reading manifest files: which files a path holds (walked
//! directories, files recognised by name), each read once and within a size
//! limit, and handed to the reader of its kind; the Dockerfiles compose
//! services build are read after them.
//!
//! Owns [`load`], [`read_text`] and the file recognition. May import the
//! manifest model and readers (`super`), the policy layer's YAML parser,
//! `std` and anyhow.

use std::path::{Path, PathBuf};

use super::{Check, Finding, Loc, Manifests, Severity, compose, dockerfile, kube, values::get};
use crate::policy::yaml::Kind;

/// What a file holds, judged by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FileKind {
    Yaml,
    Dockerfile,
}

pub(super) fn file_kind(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?;
    let lower = name.to_ascii_lowercase();
    if lower == "dockerfile"
        || lower == "containerfile"
        || lower.starts_with("dockerfile.")
        || lower.ends_with(".dockerfile")
    {
        return Some(FileKind::Dockerfile);
    }
    match path.extension()?.to_str()? {
        "yaml" | "yml" | "json" => Some(FileKind::Yaml),
        _ => None,
    }
}

/// Files under `path` worth reading, sorted; hidden directories skipped and
/// symlinked directories not followed (no loops).
fn walk(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(path)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            if !hidden {
                walk(&p, out)?;
            }
        } else if file_kind(&p).is_some() && !hidden {
            out.push(p);
        }
    }
    Ok(())
}

/// Largest manifest file read (a manifest is text written by people).
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Read every manifest under `paths` (files, or directories walked for
/// `*.yaml`, `*.yml`, `*.json`, `Dockerfile*`, `*.Dockerfile` and
/// `Containerfile`). Kubernetes objects without a namespace are placed in
/// `namespace`. Problems become findings; `Err` only for a path that does not
/// exist.
pub fn load(paths: &[PathBuf], namespace: &str) -> anyhow::Result<Manifests> {
    let mut files: Vec<(PathBuf, bool)> = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p)
            .map_err(|e| anyhow::anyhow!("--manifests {}: {e}", p.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found).map_err(|e| anyhow::anyhow!("--manifests {}: {e}", p.display()))?;
            files.extend(found.into_iter().map(|f| (f, false)));
        } else {
            files.push((p.clone(), true));
        }
    }
    let mut m = Manifests::default();
    let mut read: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut queue: std::collections::VecDeque<(PathBuf, Option<String>, bool)> =
        files.into_iter().map(|(p, e)| (p, None, e)).collect();
    while let Some((path, shown, explicit)) = queue.pop_front() {
        // Each file once, however it was reached.
        if !read.insert(std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone())) {
            continue;
        }
        let shown = shown.unwrap_or_else(|| path.display().to_string());
        let text = match read_limited(&path) {
            Ok(t) => t,
            Err(e) => {
                m.findings.push(Finding::new(
                    Check::ManifestInvalid,
                    Loc {
                        file: shown,
                        line: 1,
                        column: 1,
                    },
                    format!("cannot read: {e}"),
                ));
                continue;
            }
        };
        m.files += 1;
        let before = m.units.len() + m.services.len();
        read_into(&path, &shown, &text, namespace, &mut m);
        if explicit && m.units.len() + m.services.len() == before {
            let mut f = Finding::new(
                Check::ManifestUnresolved,
                Loc {
                    file: shown,
                    line: 1,
                    column: 1,
                },
                "no Kubernetes workload or Service, compose service or EXPOSE found in this file",
            );
            f.severity = Severity::Warning;
            m.findings.push(f);
        }
        // The Dockerfiles compose services build are part of the service.
        for (p, shown) in std::mem::take(&mut m.built) {
            if p.is_file() {
                queue.push_back((p, Some(shown), false));
            }
        }
    }
    Ok(m)
}

/// `dir/rel` as a user would write it (`./` and `x/..` folded), for showing.
pub(super) fn shown_join(dir: &str, rel: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    let joined = Path::new(dir).join(rel);
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir
                if parts.last().is_some_and(|p| p != ".." && p != "/") =>
            {
                parts.pop();
            }
            std::path::Component::RootDir => parts.push("/".to_owned()),
            c => parts.push(c.as_os_str().to_string_lossy().into_owned()),
        }
    }
    let s = parts.join("/");
    s.strip_prefix("//").map(|r| format!("/{r}")).unwrap_or(s)
}

/// Read one file's text, as what its name says it is (a Dockerfile, else
/// YAML), showing it as `shown`.
fn read_into(path: &Path, shown: &str, text: &str, namespace: &str, m: &mut Manifests) {
    match file_kind(path).unwrap_or(FileKind::Yaml) {
        FileKind::Dockerfile => dockerfile::read(path, shown, text, m),
        FileKind::Yaml => read_yaml(path, shown, text, namespace, m),
    }
}

/// [`load`] for one text already in memory (tests and fuzzing): `path`
/// decides the kind and anchors relative `build:` paths.
pub fn read_text(path: &Path, text: &str, namespace: &str) -> Manifests {
    let mut m = Manifests::default();
    read_into(path, &path.display().to_string(), text, namespace, &mut m);
    m.built.clear();
    m
}

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(text)
}

fn read_yaml(path: &Path, shown: &str, text: &str, namespace: &str, m: &mut Manifests) {
    let docs = match crate::policy::yaml::parse_stream(text) {
        Ok(d) => d,
        Err(e) => {
            m.findings.push(Finding::new(
                Check::ManifestInvalid,
                Loc {
                    file: shown.to_owned(),
                    line: e.pos.line,
                    column: e.pos.column,
                },
                format!("YAML: {}", e.message),
            ));
            return;
        }
    };
    for doc in &docs {
        if get(doc, "kind").is_some() && get(doc, "apiVersion").is_some() {
            kube::read(shown, doc, namespace, m);
        } else if get(doc, "services").is_some_and(|s| matches!(s.kind, Kind::Map(_))) {
            compose::read(path, shown, doc, m);
        }
    }
}
