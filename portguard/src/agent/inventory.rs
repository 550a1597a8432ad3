//! The inventory: sockets no hook judged (bound before portguard governed
//! their cgroup, or whose cut-off was lost, or made outside every attach
//! point and bound by a governed process they were handed to), found by the
//! cgroup the kernel says made them, else by their holder's, in every
//! network namespace on the host (see `workload::sockets`). Run at start, after each change of what is
//! governed, and every `--inventory-interval`. Each socket that breaks its
//! policy is reported once (verdict `preexisting`) and, under an enforcing
//! policy, ended (`action`: `destroyed`, `fenced`, `closed`, `failed`).
//!
//! A pass has two halves. The listing ([`list`]: /proc and every network
//! namespace's sockets, milliseconds on a busy host) needs nothing of the
//! agent and runs on a blocking thread while the serve loop answers hooks
//! (the loop spawns it once [`Agent::inventory_start`] says a pass is due);
//! the judging ([`inventory_finish`]) runs on the loop against the policies
//! and cgroups in force when it is in.

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

use log::{debug, info, warn};

use rustc_hash::FxHashMap;

use crate::{
    events::{self, EventWriter},
    policy::{Mode, classify},
    workload::{resolve::Governed, sockets},
};

use super::*;

/// What one pass found.
#[derive(Debug, Default)]
struct Tally {
    namespaces: usize,
    checked: usize,
    violations: usize,
    ended: usize,
}

/// The first half of a pass: every socket of every network namespace on
/// the host, listed, with the namespaces kept open to end sockets in.
/// Judged by [`Agent::inventory_judge`] once the events the kernel raised
/// meanwhile have been handled.
pub(super) struct Listed {
    /// How long the listing took (not the wait for the loop after it).
    took: Duration,
    scan: sockets::ProcScan,
    /// Each holding process's cgroup, read with the rest of the listing
    /// (at judging time its pid may name another process).
    holder_cgroups: FxHashMap<u32, Option<String>>,
    dumps: Vec<(u64, std::fs::File, Vec<sockets::DiagSocket>)>,
}

/// List every socket on the host. Reads /proc and each network namespace;
/// touches nothing of the agent's, so it runs on any thread.
pub(super) fn list() -> Listed {
    let started = Instant::now();
    let scan = sockets::scan_proc();
    let mut dumps = Vec::with_capacity(scan.netns.len());
    for (ns_ino, ns_path) in &scan.netns {
        let dump = sockets::open_netns(ns_path).and_then(|ns| Ok((sockets::dump_in(&ns)?, ns)));
        match dump {
            Ok((found, ns)) => dumps.push((*ns_ino, ns, found)),
            // Namespaces come and go with their processes.
            Err(e) => debug!(
                "daemon: inventory: network namespace {ns_ino} ({}): {e}",
                ns_path.display()
            ),
        }
    }
    let mut holder_cgroups = FxHashMap::default();
    for h in scan.holders.values() {
        holder_cgroups
            .entry(h.pid)
            .or_insert_with(|| holder_cgroup(h.pid));
    }
    Listed {
        took: started.elapsed(),
        scan,
        holder_cgroups,
        dumps,
    }
}

/// A socket that breaks the policy governing it, as the first half of
/// [`Agent::inventory_judge`] found it.
struct Breach<'a> {
    ns: usize,
    socket: &'a sockets::DiagSocket,
    cgroup: String,
    cgroup_id: u64,
    policy: usize,
    gov: Governed,
}

impl Agent {
    /// Whether a pass has anything to judge; when not (nothing is
    /// governed), what earlier passes remembered is forgotten. Clears
    /// `inventory_pending` either way: what changes from here on asks for
    /// another pass.
    pub(super) fn inventory_start(&mut self) -> bool {
        self.inventory_pending = false;
        self.inventory_has_work()
    }

    /// Whether anything is governed; when not, what earlier passes
    /// remembered is forgotten.
    fn inventory_has_work(&mut self) -> bool {
        if self.resolved.iter().all(Vec::is_empty) {
            self.inventory_reported.clear();
            self.cut_off_cookies.clear();
            return false;
        }
        true
    }

    /// Judge what [`list`] found, against the policies and cgroups in force
    /// now. A socket a kernel program cut off is its hook's to report and
    /// end: one whose `cut_off` event was handled since the last pass (the
    /// serve loop drains the ring between the listing and this), or one the
    /// agent keeps watching as unended, is skipped, so it is never reported
    /// twice. One whose event was lost is not, and is ended here.
    pub(super) fn inventory_judge(&mut self, found: Listed, writer: &mut EventWriter) {
        let judging = Instant::now();
        let Listed {
            took: listing,
            scan,
            holder_cgroups,
            dumps,
        } = found;
        let mut tally = Tally::default();
        let breaches = self.breaches(&scan, &holder_cgroups, &dumps, &mut tally);
        let mut still = HashSet::new();
        for b in breaches {
            let (ns_ino, ns, _) = &dumps[b.ns];
            let d = b.socket;
            // Reported once while it lives (a socket that could not be
            // ended would otherwise be reported on every pass).
            if !still.insert((*ns_ino, d.cookie))
                || self.inventory_reported.contains(&(*ns_ino, d.cookie))
            {
                continue;
            }
            let holder = scan
                .holders
                .get(&u64::from(d.inode))
                .cloned()
                .unwrap_or_default();
            let family = match d.local {
                IpAddr::V4(_) => libc::AF_INET as u8,
                IpAddr::V6(_) => libc::AF_INET6 as u8,
            };
            let policy = &self.policies[b.policy];
            // The --fail-closed stand-ins hold a policy that could not
            // be applied: they deny new binds, but cannot say what the
            // real policy allows, so they only report.
            let (name, mode) = (policy.name.clone(), policy.mode);
            let end = mode == Mode::Enforce && !name.starts_with(FAIL_CLOSED);
            let action = end.then(|| {
                self.end_socket(ns, family, d.protocol, d.port, d.cookie, holder.pid, false)
            });
            if matches!(action, Some("destroyed" | "fenced" | "closed")) {
                tally.ended += 1;
            }
            let view = classify(d.local);
            let record = events::EventRecord {
                policy: Some(name),
                cgroup: Some(b.cgroup.clone()),
                cgroup_id: b.cgroup_id,
                pid: holder.pid,
                tid: holder.pid,
                uid: holder.uid,
                gid: holder.gid,
                comm: holder.comm,
                family: events::family_name(view.family),
                protocol: events::protocol_name(d.protocol),
                address: d.local.to_string(),
                port: d.port,
                policy_cgroup: Some(b.gov.path),
                policy_cgroup_id: b.gov.id,
                v4_mapped: view.v4_mapped,
                dual_stack: view.unspecified_v6 && !d.v6only,
                socket_inode: Some(u64::from(d.inode)),
                action,
                identity: events::WorkloadIdentity::of(&b.cgroup, self.cri.as_ref()),
                ..events::EventRecord::new(
                    events::Verdict::Preexisting,
                    events::EventHook::Inventory,
                    events::format_time(std::time::SystemTime::now()),
                    &self.host,
                )
            };
            self.write_records(writer, &mut vec![record]);
        }
        // Forget what is gone (or allowed now); keep what still breaks its
        // policy, so it is not reported again.
        self.inventory_reported = still;
        let _ = writer.flush();
        let judged = judging.elapsed();
        let took = listing + judged;
        self.shared.update(|f| {
            let inv = &mut f.inventory;
            inv.passes += 1;
            inv.checked = tally.checked as u64;
            inv.violations = tally.violations as u64;
            inv.ended += tally.ended as u64;
            inv.last_seconds = took.as_secs_f64();
        });
        let msg = format!(
            "daemon: inventory: {} listening/bound sockets of governed cgroups checked in {} \
             network namespaces, {} break their policy (reported as \"preexisting\"), {} ended, \
             in {:?} ({:?} listing, {:?} judging)",
            tally.checked, tally.namespaces, tally.violations, tally.ended, took, listing, judged
        );
        if tally.violations > 0 {
            warn!("{msg}");
        } else {
            info!("{msg}");
        }
    }

    /// The first half of [`Agent::inventory_judge`]: each listed socket
    /// that breaks the policy governing it and is not its hook's to end.
    fn breaches<'a>(
        &mut self,
        scan: &sockets::ProcScan,
        holder_cgroups: &FxHashMap<u32, Option<String>>,
        dumps: &'a [(u64, std::fs::File, Vec<sockets::DiagSocket>)],
        tally: &mut Tally,
    ) -> Vec<Breach<'a>> {
        let (ephemeral, _) = sockets::host_ephemeral_range();
        let cut_off = std::mem::take(&mut self.cut_off_cookies);
        let unended: HashSet<u64> = self.unended.iter().map(|u| u.cookie).collect();
        // Governed cgroups by path, borrowed from the resolution in force.
        let by_path: FxHashMap<&str, (usize, &Governed)> = self
            .resolved
            .iter()
            .enumerate()
            .flat_map(|(i, govs)| govs.iter().map(move |g| (g.path.as_str(), (i, g))))
            .collect();
        let mut out = Vec::new();
        for (n, (_, _, found)) in dumps.iter().enumerate() {
            tally.namespaces += 1;
            for d in found {
                if d.connected || d.cgroup_id == 0 {
                    continue;
                }
                // Judged by the cgroup that made it; a socket made where no
                // policy governs (outside every attach point, so no hook
                // judged it) and held by a governed process, by the
                // holder's cgroup.
                let made_in = self.hierarchy.path_of(d.cgroup_id);
                let (cgroup, cgroup_id, (pi, gov)) =
                    match made_in.as_deref().and_then(|c| governing(&by_path, c)) {
                        Some(g) => (made_in.clone().unwrap_or_default(), d.cgroup_id, g),
                        None => {
                            let Some((c, g)) = scan
                                .holders
                                .get(&u64::from(d.inode))
                                .and_then(|h| holder_cgroups.get(&h.pid)?.clone())
                                .and_then(|c| governing(&by_path, &c).map(|g| (c, g)))
                            else {
                                continue;
                            };
                            let id = self
                                .hierarchy
                                .resolve(&c)
                                .ok()
                                .flatten()
                                .map_or(0, |(id, _)| id);
                            (c, id, g)
                        }
                    };
                let tcp = d.protocol == portguard_common::IPPROTO_TCP;
                let in_range = (ephemeral.0..=ephemeral.1).contains(&d.port);
                // An unconnected UDP socket on an ephemeral port is most
                // likely a client that autobound by sending.
                if !tcp && in_range {
                    continue;
                }
                tally.checked += 1;
                let proto = if tcp {
                    portguard_common::Proto::Tcp
                } else {
                    portguard_common::Proto::Udp
                };
                let view = classify(d.local);
                let dual = view.unspecified_v6 && !d.v6only;
                // `ephemeral` allows a port the kernel chose inside the
                // host's range; who chose a port found here is unknown, so
                // outside that range it allows nothing (a port bound before
                // the cgroup was governed is judged on its number alone).
                if self.policies[*pi].allows_bound(proto, view, d.port, dual, in_range) {
                    continue;
                }
                if cut_off.contains(&d.cookie) || unended.contains(&d.cookie) {
                    continue;
                }
                tally.violations += 1;
                out.push(Breach {
                    ns: n,
                    socket: d,
                    cgroup,
                    cgroup_id,
                    policy: *pi,
                    gov: (*gov).clone(),
                });
            }
        }
        out
    }
}

/// The second half of a pass, once the listing is in. Between listing the
/// host's sockets and judging them, the events already in the ring are
/// handled: a listener a hook cut off while the list was taken is then its
/// hook's to report and end (one `cut_off` event), not also the
/// inventory's (a second, `preexisting` one). At most a ring's worth is
/// drained (a storm refills it as fast).
pub(super) async fn inventory_finish(
    agent: &mut Agent,
    listed: Listed,
    rb: &mut AsyncFd<crate::kernel::EventRing>,
    writer: &mut EventWriter,
    cri_link: &mut CriLink,
    opts: &RunOptions,
    buffers: &mut EventBuffers,
) {
    // It names sockets' cgroups by the paths an apply's settling records.
    agent.settle();
    let ring_records = opts.ring_buffer_bytes as usize / (size_of::<portguard_common::Event>() + 8);
    let mut drained = 0;
    loop {
        let (n, more) = drain_events(
            rb.get_mut(),
            agent,
            writer,
            cri_link,
            &opts.cri_socket,
            buffers,
        )
        .await;
        drained += n;
        if !more || drained >= ring_records {
            break;
        }
    }
    // What changed meanwhile may have left nothing governed.
    if agent.inventory_has_work() {
        agent.inventory_judge(listed, writer);
    }
}

/// A whole pass on the loop (at start, before any hook can be waiting).
pub(super) async fn inventory_pass(
    agent: &mut Agent,
    rb: &mut AsyncFd<crate::kernel::EventRing>,
    writer: &mut EventWriter,
    cri_link: &mut CriLink,
    opts: &RunOptions,
    buffers: &mut EventBuffers,
) {
    if agent.inventory_start() {
        inventory_finish(agent, list(), rb, writer, cri_link, opts, buffers).await;
    }
}

/// The cgroup of the process holding a socket, as a path of the host's
/// hierarchy; `None` when it cannot be read, or reads relative to this
/// agent's own cgroup namespace (`/..`: a namespaced agent judges sockets
/// by the cgroup that made them only).
fn holder_cgroup(pid: u32) -> Option<String> {
    if pid == 0 {
        return None;
    }
    let path = crate::hook::oci::cgroup_of_pid(pid).ok()?;
    (!path.starts_with("/..")).then_some(path)
}

/// The policy governing `cgroup`: its nearest ancestor-or-self with a
/// policy, as the kernel programs find it.
fn governing<'a, 'g>(
    by_path: &'a FxHashMap<&str, (usize, &'g Governed)>,
    cgroup: &str,
) -> Option<&'a (usize, &'g Governed)> {
    crate::workload::cgroupfs::ancestors(cgroup).find_map(|path| by_path.get(path))
}
