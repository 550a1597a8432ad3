//! Sockets bound before portguard governed them: listed at start and after
//! each reload that changed the governed set, and reported (verdict
//! `preexisting`) when they break their policy.

use std::{collections::HashSet, time::Instant};

use log::{info, warn};

use rustc_hash::FxHashMap;

use crate::{
    events::{self, EventWriter},
    policy::classify,
    workload::resolve::Governed,
    workload::sockets,
};

use super::*;

impl Agent {
    /// Report every socket held by a governed process that its policy would
    /// not have allowed (bound before portguard governed it).
    pub(super) fn inventory(&mut self, writer: &mut EventWriter) {
        self.inventory_pending = false;
        let started = Instant::now();
        let by_path: FxHashMap<&str, (usize, &Governed)> = self
            .resolved
            .iter()
            .enumerate()
            .flat_map(|(i, govs)| govs.iter().map(move |g| (g.path.as_str(), (i, g))))
            .collect();
        if by_path.is_empty() {
            return;
        }
        // Nearest ancestor-or-self with a policy, by path.
        let governing = |cg: &str| -> Option<(usize, &Governed)> {
            let mut path = cg;
            loop {
                if let Some(found) = by_path.get(path) {
                    return Some(*found);
                }
                if path == "/" || path.is_empty() {
                    return None;
                }
                path = match path.rfind('/') {
                    Some(0) => "/",
                    Some(i) => &path[..i],
                    None => return None,
                };
            }
        };
        let holders = sockets::holders(|cg| governing(cg).is_some());
        let netns = sockets::sockets_by_netns(&holders);
        let index: FxHashMap<(u64, u32), &sockets::DiagSocket> = netns
            .iter()
            .flat_map(|(ns, s)| s.sockets.iter().map(move |d| ((*ns, d.inode), d)))
            .collect();
        let mut seen = HashSet::new();
        let (mut checked, mut violations) = (0usize, 0usize);
        let mut holders = holders;
        holders.sort_by_key(|h| h.pid);
        for h in &holders {
            let Some((pi, gov)) = governing(&h.cgroup) else {
                continue;
            };
            let policy = &self.policies[pi];
            let ephemeral = netns
                .get(&h.netns.0)
                .map_or((32768, 60999), |n| n.ephemeral);
            for inode in &h.inodes {
                let Ok(inode32) = u32::try_from(*inode) else {
                    continue;
                };
                let Some(d) = index.get(&(h.netns.0, inode32)) else {
                    continue;
                };
                if !seen.insert((h.netns.0, inode32)) || d.connected {
                    continue;
                }
                let proto = if d.protocol == portguard_common::IPPROTO_TCP {
                    portguard_common::Proto::Tcp
                } else {
                    // An unconnected UDP socket on an ephemeral port is most
                    // likely a client that autobound by sending.
                    if (ephemeral.0..=ephemeral.1).contains(&d.port) {
                        continue;
                    }
                    portguard_common::Proto::Udp
                };
                checked += 1;
                let view = classify(d.local);
                let dual = view.unspecified_v6 && !d.v6only;
                if policy.allows_bound(proto, view, d.port, dual, true) {
                    continue;
                }
                violations += 1;
                let cgroup_id = std::fs::metadata(self.hierarchy.fs_path(&h.cgroup))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap_or(0);
                let policy_cgroup_id = gov.id;
                let record = events::EventRecord {
                    policy: Some(policy.name.clone()),
                    cgroup: Some(h.cgroup.clone()),
                    cgroup_id,
                    pid: h.pid,
                    tid: h.pid,
                    uid: h.uid,
                    gid: h.gid,
                    comm: h.comm.clone(),
                    family: events::family_name(view.family),
                    protocol: events::protocol_name(if proto == portguard_common::Proto::Tcp {
                        portguard_common::IPPROTO_TCP
                    } else {
                        portguard_common::IPPROTO_UDP
                    }),
                    address: d.local.to_string(),
                    port: d.port,
                    policy_cgroup: Some(gov.path.clone()),
                    policy_cgroup_id,
                    v4_mapped: view.v4_mapped,
                    dual_stack: dual,
                    socket_inode: Some(*inode),
                    identity: events::WorkloadIdentity::of(&h.cgroup, self.cri.as_ref()),
                    ..events::EventRecord::new(
                        events::Verdict::Preexisting,
                        events::EventHook::Inventory,
                        events::format_time(std::time::SystemTime::now()),
                        &self.host,
                    )
                };
                self.write_records(writer, vec![record]);
            }
        }
        let _ = writer.flush();
        let msg = format!(
            "daemon: inventory: {checked} listening/bound sockets in {} governed processes checked, \
             {violations} break their policy (reported as \"preexisting\") in {:?}",
            holders.len(),
            started.elapsed()
        );
        if violations > 0 {
            warn!("{msg}");
        } else {
            info!("{msg}");
        }
    }
}
