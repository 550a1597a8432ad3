//! From the ring buffer to the event log: decoding and enriching records,
//! naming the deciding rule, ending cut-off sockets, flood control and the
//! writer. Reports of events the kernel had to drop are `losses`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use log::{debug, error, info, warn};

use crate::{
    events::{self, EventWriter},
    workload::sockets,
};

use super::*;

impl Agent {
    /// Which part of its policy decided `rec` (the `rule` field). Every
    /// hook that judges a bound port (bind, post_bind, a listen or accept
    /// cut off, the inventory) judges it against the bind sets the file's
    /// `reserved:` ports were taken out of, so each can name `reserved`.
    pub(super) fn rule_for(&self, rec: &events::EventRecord) -> Option<String> {
        let name = rec.policy.as_deref()?;
        if name == IDENTIFYING {
            return Some(IDENTIFYING.to_owned());
        }
        let file = &self.parsed.as_ref()?.file;
        let bound_port = rec.hook.dir() == crate::policy::explain::Dir::Bind;
        crate::policy::explain::rule_in_file(file, name, &rec.judged(), bound_port)
    }

    /// Decode and enrich one ring-buffer record (`from` says where it was
    /// read, for the warning about a malformed one).
    pub(super) fn record_of(&mut self, bytes: &[u8], from: &str) -> Option<events::EventRecord> {
        match events::decode(bytes) {
            Ok(ev) => {
                let mut record = events::enrich(&ev, &self.names, &mut self.hierarchy, &self.host);
                if must_end(&ev) {
                    let action = self.end_cut_off_socket(&ev);
                    record.action = Some(action);
                    if action == "closed" && self.mark_failed_since() {
                        // Gone, or its task is, and a cut-off socket could
                        // not be marked for the packet guard (a mark needs
                        // socket storage, which a tenant can leave no room
                        // for): the socket may live on in another process
                        // with nothing to starve it. The inventory looks
                        // for it (within its gap), as for any socket:
                        // reported and ended if it lives.
                        self.inventory_pending = true;
                    } else if self.cut_off_cookies.len() < MAX_CUT_OFF_COOKIES {
                        // Its hook's to report: the inventory skips it.
                        // Bounded by what the kernel cuts off between two
                        // passes; cleared by each.
                        self.cut_off_cookies.insert(ev.sock_cookie);
                    }
                }
                Some(record)
            }
            Err(e) => {
                warn!("daemon: skipping a malformed event{from}: {e}");
                None
            }
        }
    }

    /// Name the workload of each record in `records` (emptied), pass them
    /// through flood control (with whatever aggregates expired) and write
    /// what comes out (`out`: a buffer, left empty).
    pub(super) fn publish(
        &mut self,
        writer: &mut EventWriter,
        records: &mut Vec<events::EventRecord>,
        out: &mut Vec<events::EventRecord>,
    ) {
        let now = Instant::now();
        out.append(&mut self.aggregator.expire(now));
        for mut record in records.drain(..) {
            if let Some(path) = &record.cgroup {
                record.identity = events::WorkloadIdentity::of(path, self.cri.as_ref());
            }
            self.aggregator.push(record, now, out);
        }
        self.write_records(writer, out);
    }

    /// Write event lines, each with its `rule`; `records` is left empty.
    pub(super) fn write_records(
        &mut self,
        writer: &mut EventWriter,
        records: &mut Vec<events::EventRecord>,
    ) {
        if records.is_empty() {
            return;
        }
        let mut written = 0;
        for r in records.iter_mut() {
            r.rule = self.rule_for(r);
            if writer.line(r).is_ok() {
                written += 1;
                // Counted only once written: a report never names a
                // decision the log lacks.
                if let Some(reports) = self.reports.as_mut() {
                    reports.count(r);
                }
            }
        }
        // Kept for `portguard why`, moved (not copied) out of the batch.
        self.shared.remember(records.drain(..));
        let aggregated = self.aggregator.aggregated;
        self.shared.update(|f| {
            f.events_written += written;
            f.events_aggregated = aggregated;
        });
    }

    /// End the socket a `cut_off` event names, and say what was done:
    /// `destroyed`, `fenced` (the kernel would not destroy it: fenced, and
    /// the packet guard backs the fence until it is gone), `closed`
    /// (already gone), or `dropped` (neither fenced nor destroyable: the
    /// packet guard is attached until it is gone).
    pub(super) fn end_cut_off_socket(&mut self, ev: &portguard_common::Event) -> &'static str {
        // A fence the kernel refused (counted before this event was read)
        // keeps the packet guard attached, whatever becomes of this event.
        self.check_fence_failures();
        let pid = (ev.pid_tgid >> 32) as u32;
        let family = event_socket_family(ev);
        let ns = match event_netns(ev) {
            Ok(ns) => ns,
            Err(e) => {
                // The task is gone. Its socket may live on in another
                // process: the fence holds it, or, where the fence failed,
                // the packet guard (attached above) does.
                debug!("daemon: the cut-off socket's task is gone ({e})");
                return "closed";
            }
        };
        self.end_socket(&ns, family, ev.protocol, ev.port, ev.sock_cookie, pid, true)
    }

    /// End one socket that breaks its policy, in the network namespace open
    /// as `ns` (`pid`: who holds it, for messages; 0 if nobody is known):
    /// what [`Agent::end_cut_off_socket`] returns. `marked`: a kernel
    /// program marked it cut off, so the packet guard can drop its traffic
    /// should it not be destroyed; otherwise that is `failed`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_socket(
        &mut self,
        ns: &std::fs::File,
        family: u8,
        protocol: u8,
        port: u16,
        cookie: u64,
        pid: u32,
        marked: bool,
    ) -> &'static str {
        let unended = |fenced| Unended {
            ns: ns.try_clone().ok(),
            family,
            protocol,
            port,
            cookie,
            fenced,
        };
        match sockets::end(ns, family, protocol, port, cookie) {
            Ok(sockets::Ended::Destroyed) => "destroyed",
            Ok(sockets::Ended::Fenced) => {
                // The fence is not proof enough for a socket that lives on:
                // a 32-bit (compat) setsockopt never runs the cgroup hook
                // that keeps it, and a workload with CAP_NET_ADMIN in its
                // own netns can create an interface with the fence's
                // index. The packet guard backs it until it is gone.
                let u = unended(true);
                self.unended.push(u);
                self.ensure_packet_guard();
                "fenced"
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "closed",
            Err(e) if !marked => {
                warn!(
                    "daemon: the socket on port {port} of pid {pid} breaks its policy and cannot be \
                     destroyed ({e}); restart the workload that holds it"
                );
                "failed"
            }
            Err(e) => {
                warn!(
                    "daemon: the cut-off socket on port {port} of pid {pid} is neither fenced nor \
                     destroyable ({e}); the packet guard drops its traffic until it is gone"
                );
                let u = unended(false);
                self.unended.push(u);
                if self.ensure_packet_guard() {
                    "dropped"
                } else {
                    "failed"
                }
            }
        }
    }

    /// Attach the packet guard to the root if it is not; false if it
    /// cannot be.
    pub(super) fn ensure_packet_guard(&mut self) -> bool {
        if self.packet_guard.is_some() {
            return true;
        }
        let root = self.hierarchy.fs_path(&self.attach_cgroup);
        match self.loaded.attach_packet_guard(&root) {
            Ok(link) => {
                info!("daemon: packet guard attached to {}", root.display());
                self.packet_guard = Some(link);
                true
            }
            Err(e) => {
                error!("daemon: cannot attach the packet guard: {e}");
                false
            }
        }
    }

    /// A cut-off socket the kernel would not fence (bound to a device by a
    /// process without `CAP_NET_RAW`) may outlive its event: its task may
    /// exit before the agent looks, or the event may be lost. Each new
    /// fence failure attaches the packet guard (which drops what is
    /// addressed to any cut-off socket, fenced or not) for the rest of this
    /// agent's run.
    /// Whether the kernel failed to mark a cut-off socket for the packet
    /// guard since this was last asked (an unreadable counter: yes).
    fn mark_failed_since(&mut self) -> bool {
        let Ok(now) = self.loaded.maps.counters.mark_failures() else {
            return true;
        };
        let failed = now > self.mark_failures_seen;
        if failed {
            warn!(
                "daemon: {} cut-off socket(s) could not be marked for the packet guard (no \
                 memory for socket storage); the socket inventory looks for them",
                now - self.mark_failures_seen
            );
            self.mark_failures_seen = now;
        }
        failed
    }

    pub(super) fn check_fence_failures(&mut self) {
        let Ok(now) = self.loaded.maps.counters.fence_failures() else {
            return;
        };
        if now > self.fence_failures_seen {
            warn!(
                "daemon: {} cut-off socket(s) could not be fenced (bound to a device by a process \
                 without CAP_NET_RAW): the packet guard stays attached for the rest of this run",
                now - self.fence_failures_seen
            );
            self.fence_failures_seen = now;
            self.guard_held = true;
            self.ensure_packet_guard();
        }
    }

    /// Forget cut-off sockets that are gone, say so when a fenced one was
    /// taken off its fence, and detach the packet guard when nothing needs
    /// it.
    pub(super) fn sweep_unended(&mut self) {
        self.check_fence_failures();
        if self.unended.is_empty() {
            return;
        }
        let mut unfenced = Vec::new();
        self.unended.retain_mut(|u| {
            let Some(ns) = &u.ns else {
                return false;
            };
            match sockets::find(ns, u.family, u.protocol, u.port, u.cookie) {
                Ok(None) => false,
                Ok(Some(s)) => {
                    if u.fenced && s.interface != portguard_common::FENCE_IFINDEX as u32 {
                        unfenced.push(u.port);
                        u.fenced = false;
                    }
                    true
                }
                Err(_) => true,
            }
        });
        for port in unfenced {
            warn!(
                "daemon: the fenced socket on port {port} was taken off its fence (bound to \
                 another interface): the packet guard drops its traffic until it is gone"
            );
            self.ensure_packet_guard();
        }
        let needed = self.guard_held || !self.unended.is_empty();
        if !needed && self.packet_guard.take().is_some() {
            info!("daemon: the last unended cut-off socket is gone: packet guard detached");
        }
    }
}

/// The network namespace of the task an event names (its thread's, else
/// its process's), opened.
pub(super) fn event_netns(ev: &portguard_common::Event) -> Result<std::fs::File, String> {
    let (pid, tid) = ((ev.pid_tgid >> 32) as u32, ev.pid_tgid as u32);
    let mut errors = Vec::new();
    for ns in [
        format!("/proc/{pid}/task/{tid}/ns/net"),
        format!("/proc/{pid}/ns/net"),
    ] {
        match std::fs::File::open(&ns) {
            Ok(f) => return Ok(f),
            Err(e) => errors.push(format!("{ns}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// The sock_diag family of the socket an event names (a v4-mapped address
/// belongs to an IPv6 socket).
pub(super) fn event_socket_family(ev: &portguard_common::Event) -> u8 {
    use portguard_common::{EVENT_F_V4_MAPPED, Family};
    if ev.family == Family::Ipv6 as u8 || ev.flags & EVENT_F_V4_MAPPED != 0 {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

/// At most this many cut-off sockets are remembered between two inventory
/// passes (a storm of cut-offs past it: the inventory may report one of
/// them a second time, as `preexisting`, if its hook could not end it).
const MAX_CUT_OFF_COOKIES: usize = 1 << 16;

/// Whether the agent must end the socket an event names: one a hook that
/// cannot deny cut off (a listener without the BPF LSM), or a UDP socket
/// whose autobind a send hook refused (the port stays taken).
pub(super) fn must_end(ev: &portguard_common::Event) -> bool {
    use portguard_common::{EVENT_F_AUTOBIND, VERDICT_CUT_OFF, VERDICT_DENY};
    ev.sock_cookie != 0
        && (ev.verdict == VERDICT_CUT_OFF
            || (ev.verdict == VERDICT_DENY && ev.flags & EVENT_F_AUTOBIND != 0))
}

/// A cut-off socket the agent could not destroy (fenced or not): the
/// packet guard stays attached until the last one is gone.
pub(super) struct Unended {
    /// Its network namespace (`None`: could not be kept open).
    pub(super) ns: Option<std::fs::File>,
    pub(super) family: u8,
    pub(super) protocol: u8,
    pub(super) port: u16,
    pub(super) cookie: u64,
    /// It was fenced when last seen (a change is logged).
    pub(super) fenced: bool,
}

/// Records read from the ring buffer and lines on their way to the writer,
/// kept from one drain to the next (a storm drains hundreds of thousands a
/// second; buffers made anew for each batch cost more than the events).
#[derive(Default)]
pub(super) struct EventBuffers {
    read: Vec<events::EventRecord>,
    out: Vec<events::EventRecord>,
}

/// Records published at a time within a drain (bounds the buffers above).
const PUBLISH_CHUNK: usize = 256;

/// Read the ring buffer (up to [`DRAIN_BATCH`] records, or for
/// [`DRAIN_BATCH_TIME`]) and publish what it held, a chunk at a time.
/// Returns the records read and whether the ring may hold more.
pub(super) async fn drain_events(
    rb: &mut crate::kernel::EventRing,
    agent: &mut Agent,
    writer: &mut EventWriter,
    cri_link: &mut CriLink,
    cri_socket: &Path,
    bufs: &mut EventBuffers,
) -> (usize, bool) {
    // Events are named by the paths an apply's settling records.
    agent.settle();
    let mut n = 0;
    let mut more = false;
    let started = Instant::now();
    loop {
        let read = n + bufs.read.len();
        if read >= DRAIN_BATCH || (read % 64 == 63 && started.elapsed() >= DRAIN_BATCH_TIME) {
            // A storm refills the ring as fast as it drains: write what we
            // have and come back (the ring stays readable), so that memory
            // stays bounded, lines keep flowing and the loop keeps turning.
            more = true;
            break;
        }
        let Some(item) = rb.next() else {
            break;
        };
        bufs.read.extend(agent.record_of(&item, ""));
        drop(item);
        if bufs.read.len() >= PUBLISH_CHUNK {
            n += bufs.read.len();
            name_and_publish(agent, writer, cri_link, cri_socket, bufs).await;
        }
    }
    n += bufs.read.len();
    name_and_publish(agent, writer, cri_link, cri_socket, bufs).await;
    (n, more)
}

/// Publish the records read so far, after asking the CRI runtime for the
/// names of pods and containers its last snapshot does not know yet
/// (started since), at most every 100 ms.
async fn name_and_publish(
    agent: &mut Agent,
    writer: &mut EventWriter,
    cri_link: &mut CriLink,
    cri_socket: &Path,
    bufs: &mut EventBuffers,
) {
    if bufs.read.is_empty() {
        return;
    }
    if agent.cri.is_some() || Agent::needs_cri(&agent.policies) {
        let unknown = bufs.read.iter().any(|r| {
            r.cgroup.as_deref().is_some_and(|p| {
                let id = events::WorkloadIdentity::of(p, agent.cri.as_ref());
                (id.k8s_pod_uid.is_some() && id.k8s_pod.is_none())
                    || (id.container_id.is_some()
                        && id.container_name.is_none()
                        && id.k8s_pod_uid.is_some())
            })
        });
        if unknown
            && cri_link
                .last_event_refresh
                .is_none_or(|t| t.elapsed() > Duration::from_millis(100))
        {
            cri_link.last_event_refresh = Some(Instant::now());
            refresh_cri(agent, &mut cri_link.client, cri_socket).await;
        }
    }
    agent.publish(writer, &mut bufs.read, &mut bufs.out);
}

/// Read a replaced ring buffer to the end (events decoded as current ones).
pub(super) fn drain_replaced(
    rb: &mut crate::kernel::EventRing,
    agent: &mut Agent,
    writer: &mut EventWriter,
) -> usize {
    let mut records = Vec::new();
    while let Some(item) = rb.next() {
        records.extend(agent.record_of(&item, " from the replaced ring"));
    }
    let n = records.len();
    agent.publish(writer, &mut records, &mut Vec::new());
    n
}
