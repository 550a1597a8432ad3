//! One service across files: which declarations are the same service (the
//! same image repository; a compose service and the Dockerfile it builds;
//! a compose service or Dockerfile named like a Kubernetes container), and
//! the ports one kind of file declares for it and no other kind does.
//!
//! Owns the grouping and the `port-mismatch` check. May import the manifest
//! model, the analysis's message helpers (`super`), port sets and `std`.

use std::collections::BTreeMap;

use super::{capitalize, describe_set, range_set};
use crate::{
    manifest::{Check, Finding, Loc, Origin, Proto, Unit, image_name, image_repository},
    policy::PortSet,
};

/// Union-find over unit indexes.
struct Groups(Vec<usize>);

impl Groups {
    fn find(&mut self, i: usize) -> usize {
        let mut r = i;
        while self.0[r] != r {
            r = self.0[r];
        }
        let mut j = i;
        while self.0[j] != r {
            let next = self.0[j];
            self.0[j] = r;
            j = next;
        }
        r
    }

    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// Tie declarations of one service together (see the module docs).
pub(super) fn group(units: &[Unit]) -> Vec<usize> {
    let mut g = Groups((0..units.len()).collect());
    let mut by_key: BTreeMap<(u8, String), usize> = BTreeMap::new();
    let mut link =
        |g: &mut Groups, kind: u8, key: String, i: usize| match by_key.get(&(kind, key.clone())) {
            Some(&j) => g.join(i, j),
            None => {
                by_key.insert((kind, key), i);
            }
        };
    // Keys: 0 image repository, 1 Dockerfile path, 2 name.
    for (i, u) in units.iter().enumerate() {
        if let Some(img) = &u.image {
            link(&mut g, 0, image_repository(img), i);
        }
        if let Some(df) = &u.dockerfile {
            link(&mut g, 1, df.display().to_string(), i);
        }
    }
    // Names join across origins only: two Kubernetes containers both called
    // `app` are not the same service.
    let mut names: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, u) in units.iter().enumerate() {
        let mut keys = vec![u.container.clone()];
        if u.origin == Origin::Kubernetes
            && let Some(img) = &u.image
        {
            keys.push(image_name(img));
        }
        for k in keys.into_iter().filter(|k| !k.is_empty()) {
            names.entry(k).or_default().push(i);
        }
    }
    // Linear per name: the pairwise rules, joined through one member.
    for (name, members) in &names {
        let of = |o: Origin| {
            members
                .iter()
                .copied()
                .filter(move |&i| units[i].origin == o)
        };
        let compose: Vec<usize> = of(Origin::Compose).collect();
        let dockerfiles: Vec<usize> = of(Origin::Dockerfile).collect();
        // A compose service joins the Kubernetes containers of its name.
        if let Some(&c) = compose.first() {
            for k in of(Origin::Kubernetes).filter(|&k| units[k].container == *name) {
                g.join(c, k);
            }
            compose.iter().for_each(|&o| g.join(c, o));
        }
        // A Dockerfile joins every compose service or container of its name
        // (or whose image has its name).
        if let Some(&d) = dockerfiles.first() {
            let others: Vec<usize> = of(Origin::Kubernetes).chain(of(Origin::Compose)).collect();
            if !others.is_empty() {
                for o in others.into_iter().chain(dockerfiles.iter().copied()) {
                    g.join(d, o);
                }
            }
        }
    }
    (0..units.len()).map(|i| g.find(i)).collect()
}

/// A port one kind of file declares for a service and no other kind does.
pub(super) fn mismatches(units: &[Unit], groups: &[usize], out: &mut Vec<Finding>) {
    let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        members.entry(*g).or_default().push(i);
    }
    for ids in members.values() {
        // Ports per origin (only origins that declare any).
        let mut by_origin: BTreeMap<Origin, BTreeMap<Proto, PortSet>> = BTreeMap::new();
        let mut first: BTreeMap<Origin, (Loc, String)> = BTreeMap::new();
        for &i in ids {
            let u = &units[i];
            for d in &u.ports {
                by_origin
                    .entry(u.origin)
                    .or_default()
                    .entry(d.proto)
                    .or_default()
                    .insert_range(d.lo, d.hi);
            }
            if !u.ports.is_empty() {
                first
                    .entry(u.origin)
                    .or_insert_with(|| (u.ports[0].loc.clone(), u.describe()));
            }
        }
        if by_origin.len() < 2 {
            continue;
        }
        // What each kind of file declares, for messages.
        let declared: BTreeMap<Origin, String> = by_origin
            .iter()
            .map(|(o, sets)| {
                let all: Vec<String> = sets
                    .iter()
                    .map(|(p, s)| format!("{} {}", p.as_str(), describe_set(s)))
                    .collect();
                (*o, all.join(", "))
            })
            .collect();
        for &i in ids {
            let u = &units[i];
            let others: Vec<Origin> = by_origin
                .keys()
                .copied()
                .filter(|o| *o != u.origin)
                .collect();
            for d in &u.ports {
                let mut elsewhere = PortSet::default();
                for o in &others {
                    if let Some(s) = by_origin[o].get(&d.proto) {
                        elsewhere.union_with(s);
                    }
                }
                if !range_set(d.lo, d.hi).intersection(&elsewhere).is_empty() {
                    continue;
                }
                let mut f = Finding::new(
                    Check::PortMismatch,
                    d.loc.clone(),
                    format!(
                        "{} declares {}, which the same service's other files do not: {}",
                        capitalize(&u.describe()),
                        d.describe(),
                        others
                            .iter()
                            .map(|o| format!("{} declares {}", o.as_str(), declared[o]))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
                for o in &others {
                    if let Some((loc, who)) = first.get(o) {
                        f.related
                            .push((loc.clone(), format!("{}: {who}", o.as_str())));
                    }
                }
                out.push(f);
            }
        }
    }
}
