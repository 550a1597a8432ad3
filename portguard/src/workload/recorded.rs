//! Which policy governs a cgroup named in a recorded event log, judged
//! offline (`portguard replay`): from the cgroup path and what the log says
//! about pods and containers ([`Known`]), never from the live system.
//!
//! The agent's rules, restated for one path: a policy selects a cgroup as
//! the resolver ([`super::resolve`]) selects it (`cgroup:` the path itself;
//! `unit:` and `pods:` the cgroups [`TreeIndex::from_paths`] indexes as the
//! unit's, the pod's or the container's); the most specific selector wins
//! ([`most_specific`]); and the kernel applies the policy of the nearest
//! governed ancestor-or-self.
//!
//! What a log cannot say is answered [`Governance::Unknown`] rather than
//! guessed: a `pods:` selector with a namespace or labels the log does not
//! record for the pod (the agent had no CRI answer; labels are never
//! written to events), or a container name it does not record. Labels are
//! known only where the log shows them: a pod governed by a `pods:`
//! selector with labels carries those labels ([`Known::labels`]). Whether a
//! cgroup lies in a delegated subtree (`delegated: skip`) is not recorded
//! either; replay assumes it does not.
//!
//! Pure: paths and selectors in, an answer out. May import `crate::policy`
//! and this folder.

use std::collections::{BTreeMap, HashMap};

use super::{identity, resolve::TreeIndex};
use crate::policy::{PodSelector, Selector, most_specific};

/// What an event log says about the pods and containers it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    /// Pod uid -> namespace (`k8s_namespace`).
    pub namespaces: HashMap<String, String>,
    /// Container id -> container name (`container_name`).
    pub containers: HashMap<String, String>,
    /// Pod uid -> labels the pod is known to carry.
    pub labels: HashMap<String, BTreeMap<String, String>>,
}

/// Who governs a recorded cgroup under one policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Governance {
    /// No policy: every operation is allowed.
    Ungoverned,
    /// Policy `policy` (index in the file), selected at `path` (the cgroup
    /// itself or an ancestor).
    By { policy: usize, path: String },
    /// The log does not say; `why` names the selector and what is missing.
    Unknown { why: String },
}

/// Whether one selector selects one path.
enum Selects {
    Yes,
    No,
    Unknown(String),
}

/// Whether `sel` selects exactly the cgroup at `path`.
fn selects(sel: &Selector, path: &str, known: &Known) -> Selects {
    let yes = |b: bool| if b { Selects::Yes } else { Selects::No };
    match sel {
        Selector::Cgroup(p) => yes(p == path),
        Selector::Unit(u) => yes(TreeIndex::from_paths([path]).units.contains_key(u)),
        Selector::Pods(p) => selects_pod(p, path, known),
    }
}

fn selects_pod(sel: &PodSelector, path: &str, known: &Known) -> Selects {
    let tree = TreeIndex::from_paths([path]);
    let Some(uid) = identity::parse(path).pod_uid else {
        return Selects::No;
    };
    match &sel.container {
        // The pod's own cgroup.
        None if tree.pods.get(&uid).map(String::as_str) != Some(path) => return Selects::No,
        None => {}
        Some(name) => {
            let Some((cid, _)) = tree.containers.iter().find(|(_, p)| p.as_str() == path) else {
                return Selects::No;
            };
            match known.containers.get(cid) {
                None => {
                    return Selects::Unknown(format!(
                        "container name of {cid} not recorded (selector wants `{name}`)"
                    ));
                }
                Some(n) if n != name => return Selects::No,
                Some(_) => {}
            }
        }
    }
    if let Some(want) = &sel.namespace {
        let Some(ns) = known.namespaces.get(&uid) else {
            return Selects::Unknown(format!(
                "namespace of pod {uid} not recorded (selector wants `{want}`)"
            ));
        };
        let ns_only = PodSelector {
            namespace: Some(want.clone()),
            ..PodSelector::default()
        };
        if !ns_only.matches_pod(ns, &BTreeMap::new()) {
            return Selects::No;
        }
    }
    let labels = known.labels.get(&uid);
    let mut missing = Vec::new();
    for (k, v) in &sel.labels {
        match labels.and_then(|l| l.get(k)) {
            Some(have) if have == v => {}
            Some(_) => return Selects::No,
            None => missing.push(format!("{k}={v}")),
        }
    }
    if missing.is_empty() {
        Selects::Yes
    } else {
        Selects::Unknown(format!(
            "labels of pod {uid} not recorded (selector wants {})",
            missing.join(", ")
        ))
    }
}

/// The cgroup and its ancestors, deepest first (`/a/b`: `/a/b`, `/a`, `/`).
fn ancestors_or_self(path: &str) -> Vec<String> {
    let mut out = vec![path.to_owned()];
    let mut p = path.trim_end_matches('/');
    while let Some((parent, _)) = p.rsplit_once('/') {
        out.push(if parent.is_empty() { "/" } else { parent }.to_owned());
        p = parent;
    }
    out.dedup();
    out
}

/// Who governs the recorded cgroup `cgroup` under `selectors` (a policy
/// file's, in file order).
pub fn governing(selectors: &[&Selector], cgroup: &str, known: &Known) -> Governance {
    for path in ancestors_or_self(cgroup) {
        let mut yes = Vec::new();
        let mut maybe = Vec::new();
        for (i, sel) in selectors.iter().enumerate() {
            match selects(sel, &path, known) {
                Selects::Yes => yes.push((i, *sel)),
                Selects::No => {}
                Selects::Unknown(why) => maybe.push((i, *sel, why)),
            }
        }
        let winner = most_specific(yes.iter().copied());
        // A selector the log cannot decide that would win if it matched.
        let beaten_by = maybe.iter().find(|(j, s, _)| {
            winner.is_none_or(|w| most_specific([(w, selectors[w]), (*j, *s)]) == Some(*j))
        });
        if let Some((j, _, why)) = beaten_by {
            return Governance::Unknown {
                why: format!("policy #{} ({}): {why}", j + 1, selectors[*j].describe()),
            };
        }
        if let Some(w) = winner {
            return Governance::By { policy: w, path };
        }
    }
    Governance::Ungoverned
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2f0e3e8f-7b1a-4c2e-9d3a-0f6f3c1a2b4c";
    const CID: &str = "9b2a45c9e4f4f0d3b1a0f6c2e8d7a1b3c4d5e6f708192a3b4c5d6e7f80912a3b";

    fn pods(ns: Option<&str>, labels: &[(&str, &str)], container: Option<&str>) -> Selector {
        Selector::Pods(PodSelector {
            namespace: ns.map(str::to_owned),
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            container: container.map(str::to_owned),
        })
    }

    fn by(policy: usize, path: &str) -> Governance {
        Governance::By {
            policy,
            path: path.to_owned(),
        }
    }

    #[test]
    fn the_nearest_ancestor_with_the_most_specific_selector_governs() {
        let a = Selector::Cgroup("/app".into());
        let web = Selector::Cgroup("/app/web".into());
        let unit = Selector::Unit("nginx.service".into());
        let k = Known::default();
        let sels = [&a, &web, &unit];
        assert_eq!(governing(&sels, "/app/web/worker", &k), by(1, "/app/web"));
        assert_eq!(governing(&sels, "/app/db", &k), by(0, "/app"));
        assert_eq!(governing(&sels, "/other", &k), Governance::Ungoverned);
        assert_eq!(
            governing(&sels, "/system.slice/nginx.service", &k),
            by(2, "/system.slice/nginx.service")
        );
        // A cgroup: path beats a unit on the same cgroup, wherever it is.
        let here = Selector::Cgroup("/system.slice/nginx.service".into());
        assert_eq!(
            governing(&[&unit, &here], "/system.slice/nginx.service", &k),
            by(1, "/system.slice/nginx.service")
        );
        assert_eq!(ancestors_or_self("/"), ["/"]);
        assert_eq!(ancestors_or_self("/a/b"), ["/a/b", "/a", "/"]);
    }

    #[test]
    fn pod_selectors_decide_what_the_log_records_and_say_what_it_does_not() {
        let pod = format!("/kubepods/besteffort/pod{UID}");
        let ctr = format!("{pod}/{CID}");
        let mut k = Known::default();
        let every = pods(None, &[], None);
        let shop = pods(Some("shop"), &[], None);
        let web = pods(None, &[("app", "web")], None);
        let envoy = pods(None, &[], Some("envoy"));
        // Every pod: no identity needed.
        assert_eq!(governing(&[&every], &ctr, &k), by(0, &pod));
        // A namespace the log does not record: unknown, and it would win.
        assert!(matches!(
            governing(&[&every, &shop], &ctr, &k),
            Governance::Unknown { why } if why.contains("namespace of pod") && why.contains("#2")
        ));
        k.namespaces.insert(UID.into(), "shop".into());
        assert_eq!(governing(&[&every, &shop], &ctr, &k), by(1, &pod));
        k.namespaces.insert(UID.into(), "bank".into());
        assert_eq!(governing(&[&every, &shop], &ctr, &k), by(0, &pod));
        // Labels: unknown until the log shows them; a known other value is
        // no match.
        assert!(matches!(
            governing(&[&web], &ctr, &k),
            Governance::Unknown { why } if why.contains("app=web")
        ));
        k.labels
            .entry(UID.into())
            .or_default()
            .insert("app".into(), "api".into());
        assert_eq!(governing(&[&web], &ctr, &k), Governance::Ungoverned);
        k.labels
            .entry(UID.into())
            .or_default()
            .insert("app".into(), "web".into());
        assert_eq!(governing(&[&web], &ctr, &k), by(0, &pod));
        // An undecidable selector less specific than the winner is moot.
        let ns_only = pods(Some("bank"), &[], None);
        let tier = pods(None, &[("tier", "front")], None);
        assert_eq!(governing(&[&tier, &ns_only], &ctr, &k), by(1, &pod));
        // Containers: by name, on the container's own cgroup only.
        assert!(matches!(
            governing(&[&envoy], &ctr, &k),
            Governance::Unknown { .. }
        ));
        k.containers.insert(CID.into(), "envoy".into());
        assert_eq!(governing(&[&every, &envoy], &ctr, &k), by(1, &ctr));
        assert_eq!(
            governing(&[&envoy], &format!("{ctr}/nested"), &k),
            by(0, &ctr)
        );
        k.containers.insert(CID.into(), "server".into());
        assert_eq!(governing(&[&envoy], &ctr, &k), Governance::Ungoverned);
        // Outside Kubernetes no pod selector applies.
        assert_eq!(governing(&[&every], "/app", &k), Governance::Ungoverned);
    }
}
