//! Small helpers over what manifests hold: accessors of the YAML tree,
//! port numbers and ranges, image references, and compose-style
//! `${VAR:-default}` interpolation.
//!
//! Owns these helpers, shared by the readers and the analysis. May import
//! `std` and the policy layer's YAML tree only.

use std::collections::BTreeMap;

use crate::policy::yaml::{Kind, Node};

/// Value of `key` in a mapping, or in what it merges (`<<: *base`, or a
/// list of them, first first), as Kubernetes' and Compose's YAML readers
/// do: a key written in the mapping wins over a merged one.
pub(super) fn get<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    entries(Some(node))
        .into_iter()
        .find(|(k, _)| text(k) == Some(key))
        .map(|(_, v)| v)
}

/// Merges nest at most this deep (aliases cannot loop, but a file can
/// chain many).
const MERGE_DEPTH: usize = 16;

/// The YAML merge key: a plain `<<`.
fn is_merge_key(k: &Node) -> bool {
    matches!(&k.kind, Kind::Scalar { text, plain: true } if text == "<<")
}

/// Whether a scalar is boolean true as Kubernetes' YAML reader (YAML 1.1:
/// `true`, `True`, `yes`, `on`, `y`, ...) or Compose's reads it. A quoted
/// one counts too: the check errs towards seeing what may be applied.
pub(super) fn truthy(node: &Node) -> bool {
    text(node).is_some_and(|t| {
        matches!(
            t,
            "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "y" | "Y"
        )
    })
}

/// Follow a path of keys.
pub(super) fn path<'n>(node: &'n Node, keys: &[&str]) -> Option<&'n Node> {
    keys.iter().try_fold(node, |n, k| get(n, k))
}

/// A scalar's text (not null).
pub(super) fn text(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Scalar { text, .. } if !node.is_null() => Some(text),
        _ => None,
    }
}

pub(super) fn items(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.kind) {
        Some(Kind::Seq(items)) => items,
        _ => &[],
    }
}

/// A mapping's entries, with what it merges (`<<`) that it does not
/// write itself, as [`get`] reads them.
pub(super) fn entries(node: Option<&Node>) -> Vec<(&Node, &Node)> {
    let mut out = Vec::new();
    if let Some(node) = node {
        merged_entries(node, &mut out, 0);
    }
    out
}

fn merged_entries<'n>(node: &'n Node, out: &mut Vec<(&'n Node, &'n Node)>, depth: usize) {
    let Kind::Map(e) = &node.kind else {
        return;
    };
    let mut merges = Vec::new();
    for (k, v) in e {
        if is_merge_key(k) {
            merges.push(v);
        } else if !out
            .iter()
            .any(|(o, _)| text(o).is_some() && text(o) == text(k))
        {
            out.push((k, v));
        }
    }
    if depth >= MERGE_DEPTH {
        return;
    }
    for m in merges {
        match &m.kind {
            Kind::Map(_) => merged_entries(m, out, depth + 1),
            Kind::Seq(bases) => {
                for b in bases {
                    merged_entries(b, out, depth + 1);
                }
            }
            Kind::Scalar { .. } => {}
        }
    }
}

/// A string-to-string mapping (labels, selectors); non-scalar values skipped.
pub(super) fn string_map(node: Option<&Node>) -> BTreeMap<String, String> {
    entries(node)
        .iter()
        .filter_map(|(k, v)| Some((text(k)?.to_owned(), text(v).unwrap_or("").to_owned())))
        .collect()
}

/// A port number 1..=65535. Leading zeros, base prefixes and digit
/// separators are refused: YAML 1.1 (Kubernetes) reads `026` as 22 and
/// `0x50` as 80, YAML 1.2 (Compose) reads `026` as 26, so the check could
/// not say which port is meant.
pub(super) fn port_number(s: &str) -> Result<u16, String> {
    let t = s.trim();
    if (t.len() > 1 && t.starts_with('0')) || t.contains('_') {
        return Err(format!(
            "`{s}` is read as another number by some YAML readers (octal, hex, digit \
             separators): write the port in plain decimal"
        ));
    }
    match t.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        Ok(n) => Err(format!("port {n} is out of range (1-65535)")),
        Err(_) => Err(format!("`{s}` is not a port number")),
    }
}

/// `a` or `a-b`.
pub(super) fn port_range(s: &str) -> Result<(u16, u16), String> {
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port_number(a)?, port_number(b)?);
            if a > b {
                return Err(format!("range `{s}` is backwards"));
            }
            Ok((a, b))
        }
        None => port_number(s).map(|p| (p, p)),
    }
}

/// An image reference without tag or digest: `registry/path/name`. Docker
/// Hub's short names are expanded, so `postgres` and
/// `docker.io/library/postgres` are the same image.
pub fn image_repository(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A tag follows the last ':' after the last '/' (a registry port does not).
    let slash = no_digest.rfind('/').map_or(0, |i| i + 1);
    let repo = match no_digest[slash..].rfind(':') {
        Some(i) => &no_digest[..slash + i],
        None => no_digest,
    };
    let first = repo.split('/').next().unwrap_or("");
    let has_registry =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, repo.contains('/')) {
        (true, _) => repo.to_owned(),
        (false, true) => format!("docker.io/{repo}"),
        (false, false) => format!("docker.io/library/{repo}"),
    }
}

/// Last path segment of an image repository (`api` of `reg/shop/api:1`).
pub fn image_name(image: &str) -> String {
    let repo = image_repository(image);
    repo.rsplit('/').next().unwrap_or(&repo).to_owned()
}

/// Replace compose-style `${VAR:-default}` / `${VAR-default}` with the
/// default and `$$` with `$`. `Err(VAR)` for a variable without a default
/// (check does not read the environment, so CI results do not depend on it).
pub(super) fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| s.to_owned())?;
            let inner = &r[..end];
            let default = inner
                .split_once(":-")
                .or_else(|| inner.split_once('-'))
                .map(|(_, d)| d);
            match default {
                Some(d) => out.push_str(d),
                None => return Err(inner.to_owned()),
            }
            rest = &r[end + 1..];
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            return Err(name);
        }
    }
    out.push_str(rest);
    Ok(out)
}
