//! The serve loop: one single-threaded tokio loop handling, in turn,
//! signals, policy-file and cgroup changes, timers and ring-buffer
//! readiness; and the CRI runtime link it refreshes.

use std::{
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{debug, error, info, warn};
use sd_notify::NotifyState;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    events::{self, EventWriter},
    observe::health::Health,
    workload::cri,
};

use super::*;

/// The signals the agent handles, registered before anything else.
pub(super) struct Signals {
    pub(super) hup: tokio::signal::unix::Signal,
    pub(super) term: tokio::signal::unix::Signal,
    pub(super) int: tokio::signal::unix::Signal,
}

pub(super) async fn serve(
    agent: &mut Agent,
    events: crate::kernel::EventRing,
    mut writer: EventWriter,
    opts: &RunOptions,
    health: &Health,
    signals: Signals,
    (mut govern, mut explain): (
        tokio::sync::mpsc::Receiver<crate::hook::protocol::Pending>,
        tokio::sync::mpsc::Receiver<crate::hook::protocol::ExplainPending>,
    ),
) -> anyhow::Result<()> {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns it.
    let mut rb = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with tokio")?;
    let mut watcher = Watcher::new(&opts.policy, opts.watch)?;
    watcher.refresh(agent);
    // First ticks one period from now: start-up has just resolved everything.
    let now = tokio::time::Instant::now();
    let mut lost_tick = tokio::time::interval_at(now + opts.lost_interval, opts.lost_interval);
    let mut rescan_tick =
        tokio::time::interval_at(now + opts.rescan_interval, opts.rescan_interval);
    // `--inventory-interval 0`: never (a period that never comes).
    let inventory_every = if opts.inventory_interval.is_zero() {
        Duration::from_secs(100 * 365 * 24 * 3600)
    } else {
        opts.inventory_interval
    };
    let mut inventory_tick = tokio::time::interval_at(now + inventory_every, inventory_every);
    // `--policy-reports`: one window per tick (off: the branch is disabled).
    let report_every = agent
        .reports
        .as_ref()
        .map_or(Duration::from_secs(3600), |r| r.every);
    let mut report_tick = tokio::time::interval_at(now + report_every, report_every);
    let mut lost_seen = DropsSeen::new(agent.lost_seen);
    // The loss report's kernel read, while it runs on a thread of its own.
    let mut lost_read: Option<tokio::task::JoinHandle<LostReading>> = None;
    let mut pending_reload: Option<Instant> = None;
    let mut pending_rescan: Option<Instant> = None;
    // Rescans walk the tree on a thread of their own (`survey`).
    let mut surveys = Surveys::default();
    // The inventory tick's pass waits for a survey that began after it.
    let mut inventory_after: Option<u64> = None;
    // CRI refresh: when due, since when a pod cgroup exists that the runtime
    // does not list yet, and the event that started the wait (for timing).
    let mut cri_due: Option<Instant> = None;
    let mut cri_miss_since: Option<Instant> = None;
    let mut cri_link = CriLink {
        client: None,
        last_event_refresh: None,
    };
    let mut write_error_logged = false;
    let mut buffers = EventBuffers::default();

    let stop_at = opts.stop_after.map(|d| Instant::now() + d);
    let status = if agent.failed_closed() {
        format!(
            "FAIL-CLOSED: the policy could not be applied; binds denied in {} policies' cgroups",
            agent.policies.len()
        )
    } else {
        format!("enforcing {} policies", agent.policies.len())
    };
    sd_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    health.set_ready(&status);
    agent.shared.update(|f| f.status.clone_from(&status));
    // Sockets bound before we governed them.
    inventory_pass(
        agent,
        &mut rb,
        &mut writer,
        &mut cri_link,
        opts,
        &mut buffers,
    )
    .await;
    // Hooks that failed while no agent answered.
    agent.report_hook_failures(&mut writer);
    // Later passes (after changes of what is governed) at most every
    // INVENTORY_GAP: pod churn must not keep the loop listing sockets.
    let mut last_inventory = Instant::now();
    // A pass's listing, while it runs on a blocking thread.
    let mut inventory_list: Option<tokio::task::JoinHandle<inventory::Listed>> = None;
    debug!("daemon: ring buffer fd {}", rb.get_ref().as_raw_fd());

    loop {
        let mut timer_turn = false;
        // This runtime has one thread: the status socket's tasks read a
        // hook's request only while this loop waits. Before the next turn
        // (which may be an inventory pass, a settle, a survey's apply),
        // they get their turns: one to accept, one to read and hand the
        // request over, so that a hook that came while the last turn ran
        // is answered first (the select below is biased).
        for _ in 0..HANDOVER_YIELDS {
            tokio::task::yield_now().await;
        }
        health.beat();
        let deadline = [
            pending_reload,
            pending_rescan,
            cri_due,
            (agent.inventory_pending && inventory_list.is_none())
                .then_some(last_inventory + INVENTORY_GAP),
            agent.aggregator.next_deadline(),
            stop_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = hup.recv() => {
                info!("daemon: SIGHUP: reloading {}", agent.policy_path.display());
                agent.reload("SIGHUP");
                surveys.reloaded(agent);
                watcher.refresh(agent);
            }
            _ = term.recv() => { info!("daemon: SIGTERM"); break; }
            _ = int.recv() => { info!("daemon: SIGINT"); break; }
            // A hook waits for this before its workload's first
            // instruction: before inotify, timers and events.
            Some(first) = govern.recv() => {
                govern_batch(agent, vec![(first, Instant::now())], &mut govern, &mut cri_link, &mut surveys, opts).await;
                watcher.refresh(agent);
                // A pending rescan stays due: the hooks' cgroups were added
                // to the index, other changes inotify reported were not.
                agent.report_hook_failures(&mut writer);
            }
            // A survey's apply is settled (logs, event paths, status facts:
            // milliseconds with thousands of policies) after the hooks that
            // came while it ran are answered. Whatever reads what settling
            // writes settles first (`drain_events`, `inventory_finish`, an
            // apply).
            () = std::future::ready(()), if agent.unsettled.is_some() => {
                agent.settle();
            }
            // `portguard why`: read-only, answered from the maps as they are.
            Some(q) = explain.recv() => {
                let _ = q.reply.send(agent.explain(q.request.cgroup_id));
            }
            guard = watcher.fd.readable_mut() => {
                let mut guard = guard.context("polling inotify")?;
                guard.clear_ready();
                drop(guard);
                let changes = watcher.drain();
                if changes.iter().any(|c| matches!(c, Change::Cgroups)) {
                    // The caches stay: a survey replaces them (a hook's
                    // cgroup is looked up again meanwhile), so no request
                    // pays for stat()ing every policy's path on the loop.
                    surveys.cgroups_changed();
                    agent.last_cgroup_event = Some(Instant::now());
                    if Agent::needs_cri(&agent.policies) {
                        // A new pod or container cgroup: ask the runtime now.
                        cri_due = Some(Instant::now());
                        cri_miss_since.get_or_insert_with(Instant::now);
                    }
                }
                for change in changes {
                    let now = Instant::now();
                    match change {
                        // Editors write in several steps: wait for quiet.
                        Change::PolicyFile => pending_reload = Some(now + Duration::from_millis(100)),
                        Change::Cgroups => {
                            pending_rescan.get_or_insert(now + Duration::from_millis(5));
                        }
                    }
                }
            }
            () = sleep => {
                let now = Instant::now();
                if stop_at.is_some_and(|t| t <= now) {
                    info!("daemon: the requested time is up");
                    break;
                }
                let mut closed = agent.aggregator.expire(now);
                if !closed.is_empty() {
                    agent.write_records(&mut writer, &mut closed);
                    let _ = writer.flush();
                }
                if cri_due.is_some_and(|d| d <= now) {
                    cri_due = None;
                    let t = Instant::now();
                    refresh_cri(agent, &mut cri_link.client, &opts.cri_socket).await;
                    let asked = t.elapsed();
                    // On the loop (the pod tree; the whole tree when a
                    // `unit:` policy needs it): what the runtime lists next
                    // is judged against it. A survey in flight is older,
                    // and discarded.
                    agent.rescan();
                    debug!(
                        "daemon: CRI refresh took {asked:?} ({} pods), rescan {:?}",
                        agent.cri.as_ref().map_or(0, |c| c.pods.len()),
                        t.elapsed() - asked
                    );
                    let waiting = agent
                        .tree
                        .as_ref()
                        .zip(agent.cri.as_ref())
                        .map_or(0, |(t, c)| t.unknown_pods(c).len());
                    match cri_miss_since {
                        // A pod cgroup the runtime does not list yet: its
                        // sandbox is being created; ask again shortly.
                        Some(since) if waiting > 0 && since.elapsed() < Duration::from_secs(10) => {
                            cri_due = Some(Instant::now() + Duration::from_millis(10));
                        }
                        Some(since) => {
                            debug!("daemon: pod cgroups settled {:?} after the first change", since.elapsed());
                            cri_miss_since = None;
                        }
                        None => {}
                    }
                    watcher.refresh(agent);
                    // That was a rescan. A due reload is not skipped: the
                    // runtime may be asked every 10 ms for 10 s while a pod
                    // cgroup it does not list exists.
                    pending_rescan = None;
                }
                if pending_reload.is_some_and(|d| d <= now) {
                    pending_reload = None;
                    pending_rescan = None;
                    info!("daemon: {} changed: reloading", agent.policy_path.display());
                    agent.reload("file change");
                    // Also in place of a due rescan.
                    surveys.reloaded(agent);
                } else if pending_rescan.is_some_and(|d| d <= now) {
                    pending_rescan = None;
                    surveys.request(agent);
                }
                // The inventory's turn (below): a hook that came meanwhile
                // was answered first (this select is biased), instead of
                // waiting for a survey's apply and then for the inventory.
                timer_turn = true;
                if deadline.is_some() {
                    watcher.refresh(agent);
                }
            }
            _ = rescan_tick.tick() => {
                if Agent::needs_cri(&agent.policies) {
                    cri_due = Some(Instant::now());
                }
                surveys.request(agent);
                agent.sync_ephemeral(false);
                // Computed afresh each period, whatever `refresh` thinks.
                watcher.rebuild(agent);
            }
            _ = inventory_tick.tick() => {
                // Rescan first: a cgroup that appeared where no watch sees
                // it is governed before its sockets are judged.
                inventory_after.get_or_insert(surveys.started());
                surveys.request(agent);
            }
            // A rescan's walk is in: install it, re-resolve, apply.
            (seq, survey) = surveys.done() => {
                if let Some(s) = survey {
                    surveys.install(agent, s);
                }
                if inventory_after.is_some_and(|before| seq > before) {
                    inventory_after = None;
                    agent.inventory_pending = true;
                }
                if surveys.take_again() {
                    surveys.request(agent);
                }
                watcher.refresh(agent);
            }
            // A pass's listing is in: judge it (after pending hooks).
            listed = finished(&mut inventory_list) => {
                inventory_list = None;
                match listed {
                    Some(listed) => inventory_finish(agent, listed, &mut rb, &mut writer, &mut cri_link, opts, &mut buffers).await,
                    None => {
                        // Its thread died: the pass is due again.
                        warn!("daemon: inventory: listing the host's sockets failed; trying again");
                        agent.inventory_pending = true;
                    }
                }
                last_inventory = Instant::now();
            }
            _ = lost_tick.tick() => {
                agent.sweep_unended();
                agent.report_hook_failures(&mut writer);
                // Every policy's counters: tens of milliseconds with
                // thousands of policies, read on a thread of its own while
                // this loop serves signals, hooks and events; the report
                // follows when they are in.
                if lost_read.is_none() {
                    let shared = agent.shared.clone();
                    lost_read = Some(tokio::task::spawn_blocking(move || {
                        LostReading::read(&shared)
                    }));
                }
            }
            reading = finished(&mut lost_read) => {
                lost_read = None;
                if let Some(reading) = reading {
                    report_read(agent, &mut writer, &mut lost_seen, reading);
                }
                if let Err(e) = agent.loaded.write_stamp(lost_seen.lost) {
                    warn!("daemon: writing the version stamp: {e}");
                }
            }
            _ = report_tick.tick(), if agent.reports.is_some() => {
                if let Some(reports) = agent.reports.as_mut() {
                    reports.end_window();
                }
            }
            // Last, and `biased`: signals, timers and cgroup changes are
            // never starved by a ring buffer that a storm keeps readable.
            guard = rb.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                let (n, more) = drain_events(guard.get_inner_mut(), agent, &mut writer, &mut cri_link, &opts.cri_socket, &mut buffers).await;
                if !more {
                    guard.clear_ready();
                }
                drop(guard);
                if n > 0 {
                    match writer.flush() {
                        Ok(()) => write_error_logged = false,
                        Err(e) if !write_error_logged => {
                            error!("daemon: cannot write events: {e}; {} events dropped so far", writer.failed);
                            write_error_logged = true;
                        }
                        Err(_) => {}
                    }
                }
                if more {
                    // The ring stays readable through a storm: let the
                    // runtime poll its drivers (signals, timers, sockets)
                    // before the next batch, or SIGTERM would wait for the
                    // storm to end.
                    tokio::task::yield_now().await;
                }
            }
        }
        if agent.verify_pending {
            agent.verify();
        }
        // On the timer's turn; after any turn once overdue, so that a
        // stream of hooks or cgroup events (before the timer) cannot starve
        // it.
        let gap = if timer_turn {
            INVENTORY_GAP
        } else {
            INVENTORY_OVERDUE
        };
        if agent.inventory_pending && inventory_list.is_none() && last_inventory.elapsed() >= gap {
            inventory_list = agent
                .inventory_start()
                .then(|| tokio::task::spawn_blocking(inventory::list));
            if inventory_list.is_none() {
                last_inventory = Instant::now();
            }
        }
    }
    // What was queued when the stop came (at most a ring's worth: a storm
    // refills it as fast as it drains; with pinning the rest waits in the
    // ring for the next agent), and a final loss report.
    let ring_records =
        opts.ring_buffer_bytes as usize / (size_of::<portguard_common::Event>() + 8) + DRAIN_BATCH;
    let mut drained = 0;
    loop {
        let (n, more) = drain_events(
            rb.get_mut(),
            agent,
            &mut writer,
            &mut cri_link,
            &opts.cri_socket,
            &mut buffers,
        )
        .await;
        drained += n;
        if !more || drained >= ring_records {
            break;
        }
    }
    let mut pending = agent.aggregator.drain();
    agent.write_records(&mut writer, &mut pending);
    report_lost(agent, &mut writer, &mut lost_seen);
    writer.flush().context("flushing the event log")?;
    Ok(())
}

/// Ask the CRI runtime for its pods and containers; keep the last answer
/// when it does not reply.
pub(super) async fn refresh_cri(
    agent: &mut Agent,
    client: &mut Option<
        k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    >,
    socket: &Path,
) {
    if client.is_none() {
        match cri::connect_with_limit(socket, agent.cri_health.max_message_bytes).await {
            Ok(c) => *client = Some(c),
            Err(e) => {
                agent.cri_failed(socket, &e);
                return;
            }
        }
    }
    let Some(c) = client.as_mut() else {
        return;
    };
    match cri::snapshot(c, socket).await {
        Ok(s) => {
            if agent.cri.is_none() {
                info!("daemon: CRI runtime at {} answers", socket.display());
            }
            agent.cri = Some(s);
            agent.cri_answered(socket);
        }
        Err(e) => {
            agent.cri_failed(socket, &e);
            *client = None;
        }
    }
}

/// Whether the CRI runtime answers, as the agent last found it.
pub(super) struct CriHealth {
    /// `--cri-max-message-bytes`.
    pub(super) max_message_bytes: usize,
    /// Since when the runtime does not answer (`None`: it answers, or no
    /// CRI call was made yet).
    pub(super) failing_since: Option<Instant>,
    /// When the last "still not answering" line was logged.
    pub(super) last_complaint: Option<Instant>,
    /// Failed CRI refreshes in this run.
    pub(super) errors: u64,
}

impl CriHealth {
    pub(super) fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            failing_since: None,
            last_complaint: None,
            errors: 0,
        }
    }
}

/// How often a runtime that keeps failing is complained about.
const CRI_COMPLAINT_INTERVAL: Duration = Duration::from_secs(30);

impl Agent {
    /// A CRI refresh failed: count it, say so loudly (at once, then every
    /// [`CRI_COMPLAINT_INTERVAL`]), publish it to status and metrics.
    pub(super) fn cri_failed(&mut self, socket: &Path, e: &cri::CriError) {
        let h = &mut self.cri_health;
        h.errors += 1;
        let first = h.failing_since.is_none();
        let since = *h.failing_since.get_or_insert_with(Instant::now);
        let hint = if e.too_large() {
            format!(
                " (its answer is larger than --cri-max-message-bytes {}: raise it)",
                h.max_message_bytes
            )
        } else {
            String::new()
        };
        if self.cri.is_none() {
            // It never answered (a wrong --cri-socket, or not up yet):
            // nothing is held for it, or every pod would be blocked.
            if first {
                warn!(
                    "daemon: {e}{hint}; `pods:` policies govern nothing until the runtime answers"
                );
            } else {
                debug!("daemon: {e}{hint}");
            }
        } else if first
            || h.last_complaint
                .is_none_or(|t| t.elapsed() >= CRI_COMPLAINT_INTERVAL)
        {
            h.last_complaint = Some(Instant::now());
            error!(
                "daemon: CRI runtime at {} NOT ANSWERING for {:.0?}: {e}{hint}; pods keep the \
                 policies of its last answer, and new pod cgroups are held by `{IDENTIFYING}` \
                 (every bind denied) until it answers",
                socket.display(),
                since.elapsed()
            );
        } else {
            debug!("daemon: {e}{hint}");
        }
        self.publish_cri();
    }

    /// A CRI refresh succeeded.
    pub(super) fn cri_answered(&mut self, socket: &Path) {
        if let Some(since) = self.cri_health.failing_since.take() {
            info!(
                "daemon: CRI runtime at {} answers again after {:.1?}",
                socket.display(),
                since.elapsed()
            );
        }
        self.cri_health.last_complaint = None;
        self.publish_cri();
    }

    fn publish_cri(&self) {
        let h = &self.cri_health;
        let facts = crate::observe::snapshot::CriFacts {
            up: h.failing_since.is_none(),
            errors: h.errors,
            failing_since: h
                .failing_since
                .map(|t| events::format_time(std::time::SystemTime::now() - t.elapsed())),
        };
        self.shared.update(|f| f.cri = Some(facts));
    }
}

/// The CRI client and when it was last asked because of an unknown name.
pub(super) struct CriLink {
    pub(super) client: Option<
        k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    >,
    pub(super) last_event_refresh: Option<Instant>,
}

/// What a job on a thread of its own returned, once it is in (`None`: it
/// panicked); pending while there is none.
async fn finished<T>(job: &mut Option<tokio::task::JoinHandle<T>>) -> Option<T> {
    match job.as_mut() {
        Some(job) => job.await.ok(),
        None => std::future::pending().await,
    }
}
