//! The selector of a policy: `cgroup:` (a normalised path), `unit:` (a
//! systemd unit name) or `pods:` (namespace pattern, labels, container).
//!
//! Owns the checks of those keys and [`normalize_cgroup`]. May import
//! `portguard_common` (the cgroup depth limit), the parser's node helpers
//! (`super::walk`), the policy model and its YAML tree.

use portguard_common::MAX_CGROUP_DEPTH;

use super::{Cx, walk::join};
use crate::policy::{
    PodSelector,
    yaml::{Kind, Node},
};

const POD_KEYS: &[&str] = &["namespace", "labels", "container"];

impl Cx {
    pub(super) fn cgroup(&mut self, node: &Node, field: &str) -> Option<String> {
        let raw = self.string(node, field)?;
        match normalize_cgroup(&raw) {
            Ok(p) => Some(p),
            Err(msg) => {
                self.err(node, field, format!("invalid cgroup path `{raw}`: {msg}"));
                None
            }
        }
    }

    pub(super) fn unit(&mut self, node: &Node, field: &str) -> Option<String> {
        let unit = self.string(node, field)?;
        let ok = unit.contains('.')
            && !unit.contains('/')
            && unit.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':' | '\\')
            });
        if !ok {
            self.err(
                node,
                field,
                format!(
                    "invalid unit name `{unit}`: expected a systemd unit such as nginx.service"
                ),
            );
            return None;
        }
        Some(unit)
    }

    pub(super) fn pods(&mut self, node: &Node, field: &str) -> Option<PodSelector> {
        let entries = self.mapping(node, field, POD_KEYS)?;
        let before = self.diags.len();
        let mut sel = PodSelector::default();
        for (key, _k, v) in &entries {
            let f = join(field, key);
            match *key {
                "namespace" => {
                    if let Some(ns) = self.string(v, &f) {
                        if let Err(e) = glob::Pattern::new(&ns) {
                            self.err(v, &f, format!("invalid namespace pattern `{ns}`: {e}"));
                        } else {
                            sel.namespace = Some(ns);
                        }
                    }
                }
                "labels" => {
                    let Kind::Map(labels) = &v.kind else {
                        self.err(
                            v,
                            &f,
                            format!(
                                "expected a mapping such as {{app: web}}, found {}",
                                v.type_name()
                            ),
                        );
                        continue;
                    };
                    for (lk, lv) in labels {
                        let (Kind::Scalar { text: k, .. }, Kind::Scalar { text: val, .. }) =
                            (&lk.kind, &lv.kind)
                        else {
                            self.err(lk, &f, "label keys and values must be strings");
                            continue;
                        };
                        sel.labels.insert(k.clone(), val.clone());
                    }
                }
                "container" => sel.container = self.string(v, &f),
                _ => {}
            }
        }
        (self.diags.len() == before).then_some(sel)
    }
}

/// `/a/b` (or `/`) from user input; rejects relative paths, `.`/`..`, empty
/// components and paths deeper than the kernel's ancestor walk.
pub fn normalize_cgroup(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(
            "must be an absolute path under the cgroup2 mount, e.g. /system.slice/web.service"
                .to_owned(),
        );
    }
    if raw.contains('\0') {
        return Err("contains a NUL byte".to_owned());
    }
    let trimmed = raw.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_owned());
    }
    let parts: Vec<&str> = trimmed[1..].split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err("empty path component (`//`)".to_owned()),
            "." | ".." => return Err("`.` and `..` are not allowed".to_owned()),
            _ => {}
        }
    }
    if parts.len() as u32 >= MAX_CGROUP_DEPTH {
        return Err(format!(
            "{} levels deep; portguard supports cgroups up to {} levels below the root",
            parts.len(),
            MAX_CGROUP_DEPTH - 1
        ));
    }
    Ok(trimmed.to_owned())
}
