//! `portguard run`: load, apply, attach, then serve until SIGTERM/SIGINT.
//!
//! One single-threaded tokio loop owns everything and handles, in turn:
//! ring-buffer readiness (events -> JSON lines), SIGHUP and policy-file
//! changes (reload), cgroup directory changes (a policy's cgroup appearing,
//! disappearing or being recreated), and a timer that reports events the
//! kernel had to drop.
//!
//! Invariants:
//! - the first policy is written into the maps before any program is
//!   attached, so nothing ever runs against half-written state;
//! - a reload is applied whole (generation flip) or not at all; an invalid
//!   policy file leaves the previous policy in force and is logged;
//! - dropping the loaded object on exit detaches every program.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use inotify::{Inotify, WatchDescriptor, WatchMask};
use log::{debug, error, info, warn};
use sd_notify::NotifyState;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    cgroupfs::Hierarchy,
    events::{self, EventWriter, LostRecord, PolicyNames},
    loader::{LoadOptions, Loaded},
    policy::{CompiledPolicy, compile, parse_policy_file},
    rules_map::{Applier, ApplyReport, Capacity, ResolvedCgroup, Target},
};

/// Options of `portguard run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    pub log: Option<PathBuf>,
    pub capacity: Capacity,
    pub ring_buffer_bytes: u32,
    /// Reload when the policy file changes (SIGHUP always reloads).
    pub watch: bool,
    /// How often to check the kernel's lost-event counter.
    pub lost_interval: Duration,
    /// How often to re-resolve policy cgroups even without inotify events.
    pub rescan_interval: Duration,
}

/// Stable small ids for policy names (events carry the id).
#[derive(Default)]
struct Registry {
    ids: HashMap<String, u32>,
    next: u32,
}

impl Registry {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        self.next += 1;
        self.ids.insert(name.to_owned(), self.next);
        self.next
    }
}

type Resolution = Vec<Option<(u64, u32)>>;

struct Agent {
    policy_path: PathBuf,
    hierarchy: Hierarchy,
    applier: Applier,
    loaded: Loaded,
    policies: Vec<CompiledPolicy>,
    resolved: Resolution,
    registry: Registry,
    names: PolicyNames,
}

impl Agent {
    fn resolve(&self, policies: &[CompiledPolicy]) -> Resolution {
        policies
            .iter()
            .map(|p| match self.hierarchy.resolve(&p.cgroup) {
                Ok(r) => r,
                Err(e) => {
                    warn!("daemon: policy `{}`: {e}; treating it as absent", p.name);
                    None
                }
            })
            .collect()
    }

    /// Apply `policies` with `resolved` cgroups; on success they become current.
    fn apply(
        &mut self,
        policies: Vec<CompiledPolicy>,
        resolved: Resolution,
    ) -> Result<ApplyReport, crate::rules_map::ApplyError> {
        let mut ids = Vec::with_capacity(policies.len());
        for p in &policies {
            let id = self.registry.id(&p.name);
            self.names.insert(id, &p.name);
            ids.push(id);
        }
        let targets: Vec<Target<'_>> = policies
            .iter()
            .zip(&resolved)
            .zip(&ids)
            .map(|((p, r), id)| Target {
                policy_id: *id,
                policy: p,
                cgroups: r
                    .map(|(id, level)| ResolvedCgroup { id, level })
                    .into_iter()
                    .collect(),
            })
            .collect();
        let report = self.applier.apply(&mut self.loaded.maps, &targets)?;
        // Per-policy lines for small policy sets; large ones get the summary.
        let level = if policies.len() <= 50 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        for (p, r) in policies.iter().zip(&resolved) {
            let before = self
                .policies
                .iter()
                .position(|q| q.name == p.name)
                .and_then(|i| self.resolved.get(i).copied().flatten());
            match (r, before) {
                (Some((id, _)), b) if b.map(|x| x.0) != Some(*id) => {
                    self.hierarchy.remember(*id, &p.cgroup);
                    log::log!(
                        level,
                        "daemon: policy `{}` ({}) governs cgroup {} (id {id})",
                        p.name,
                        p.mode.as_str(),
                        p.cgroup
                    );
                }
                (None, Some(_)) => log::log!(
                    if level == log::Level::Info {
                        log::Level::Warn
                    } else {
                        level
                    },
                    "daemon: policy `{}`: cgroup {} disappeared; it will be governed again when it reappears",
                    p.name,
                    p.cgroup
                ),
                (None, None) if !self.policies.iter().any(|q| q.name == p.name) => log::log!(
                    level,
                    "daemon: policy `{}`: cgroup {} does not exist yet; it will be governed as soon as it appears",
                    p.name,
                    p.cgroup
                ),
                _ => {}
            }
        }
        self.policies = policies;
        self.resolved = resolved;
        Ok(report)
    }

    fn reload(&mut self, why: &str) {
        let started = Instant::now();
        let _ = sd_notify::notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        ]);
        let result = parse_policy_file(&self.policy_path)
            .map_err(anyhow::Error::from)
            .and_then(|file| {
                let policies: Vec<CompiledPolicy> = file.policies.iter().map(compile).collect();
                let resolved = self.resolve(&policies);
                self.apply(policies, resolved).map_err(anyhow::Error::from)
            });
        match result {
            Ok(report) => {
                let status = format!(
                    "enforcing {} policies (generation {}, reloaded on {why})",
                    report.policies, report.generation
                );
                info!(
                    "daemon: reloaded {} on {why}: {} policies, {} governed cgroups, {} port sets ({} written, {} freed) in {:.1} ms",
                    self.policy_path.display(),
                    report.policies,
                    report.cgroups,
                    report.sets_total,
                    report.sets_written,
                    report.sets_deleted,
                    started.elapsed().as_secs_f64() * 1e3
                );
                let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            Err(e) => {
                error!(
                    "daemon: reload on {why} rejected; the previous policy stays in force: {e:#}"
                );
                let status = format!(
                    "reload failed; previous policy ({} policies) still enforced",
                    self.policies.len()
                );
                let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
    }

    fn rescan(&mut self) {
        let policies = self.policies.clone();
        let resolved = self.resolve(&policies);
        if resolved == self.resolved {
            return;
        }
        match self.apply(policies, resolved) {
            Ok(r) => debug!(
                "daemon: cgroups changed; generation {} now governs {} cgroups",
                r.generation, r.cgroups
            ),
            Err(e) => error!("daemon: applying cgroup changes failed: {e}"),
        }
    }

    /// Directories to watch so that each policy cgroup's appearance,
    /// disappearance or re-creation is noticed.
    fn cgroup_watch_dirs(&self) -> HashSet<PathBuf> {
        let mut dirs = HashSet::new();
        for p in &self.policies {
            let path = self.hierarchy.fs_path(&p.cgroup);
            if path == self.hierarchy.root() {
                continue;
            }
            let mut dir = path.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                if d.is_dir() {
                    dirs.insert(d);
                    break;
                }
                if d == self.hierarchy.root() {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
        dirs
    }
}

struct Watcher {
    fd: AsyncFd<Inotify>,
    file_wd: Option<WatchDescriptor>,
    file_name: Option<std::ffi::OsString>,
    dirs: HashMap<PathBuf, WatchDescriptor>,
}

enum Change {
    PolicyFile,
    Cgroups,
}

impl Watcher {
    fn new(policy: &Path, watch_file: bool) -> anyhow::Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mut file_wd = None;
        let mut file_name = None;
        if watch_file {
            let abs = std::path::absolute(policy).unwrap_or_else(|_| policy.to_owned());
            if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
                // Watch the directory: editors and config managers replace the
                // file (rename), which a watch on the file itself would miss.
                file_wd = Some(
                    inotify
                        .watches()
                        .add(
                            dir,
                            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
                        )
                        .with_context(|| format!("watching {}", dir.display()))?,
                );
                file_name = Some(name.to_owned());
            }
        }
        Ok(Self {
            // SAFETY: Inotify owns its fd for as long as the AsyncFd owns it.
            fd: unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("registering inotify with tokio")?,
            file_wd,
            file_name,
            dirs: HashMap::new(),
        })
    }

    fn set_dirs(&mut self, want: &HashSet<PathBuf>) {
        let mut watches = self.fd.get_ref().watches();
        self.dirs.retain(|d, wd| {
            if want.contains(d) {
                return true;
            }
            let _ = watches.remove(wd.clone());
            false
        });
        for d in want {
            if self.dirs.contains_key(d) {
                continue;
            }
            match watches.add(
                d,
                WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::MOVED_TO
                    | WatchMask::ONLYDIR,
            ) {
                Ok(wd) => {
                    self.dirs.insert(d.clone(), wd);
                }
                Err(e) => debug!("daemon: cannot watch {}: {e}", d.display()),
            }
        }
    }

    /// Drain pending inotify events into the kinds of change they signal.
    fn drain(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let events = match self.fd.get_mut().read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("daemon: reading inotify events: {e}");
                    break;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                if Some(&ev.wd) == self.file_wd.as_ref() {
                    if ev.name.is_some() && ev.name.map(std::ffi::OsStr::to_owned) == self.file_name
                    {
                        out.push(Change::PolicyFile);
                    }
                } else {
                    out.push(Change::Cgroups);
                }
            }
            if !any {
                break;
            }
        }
        out
    }
}

fn notify_status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Run the agent until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Validate the policy before touching the kernel.
    let file = parse_policy_file(&opts.policy)?;
    let policies: Vec<CompiledPolicy> = file.policies.iter().map(compile).collect();
    let hierarchy = Hierarchy::discover()?;
    info!(
        "daemon: cgroup2 mounted at {}; {} policies in {}",
        hierarchy.root().display(),
        policies.len(),
        opts.policy.display()
    );
    let writer = match &opts.log {
        Some(p) => EventWriter::file(p)
            .with_context(|| format!("cannot open event log {}", p.display()))?,
        None => EventWriter::stdout(),
    };
    let mut loaded = Loaded::load(&LoadOptions {
        capacity: opts.capacity,
        ring_buffer_bytes: opts.ring_buffer_bytes,
    })?;
    let events = loaded
        .take_events()
        .context("event ring buffer already taken")?;
    let mut agent = Agent {
        policy_path: opts.policy.clone(),
        hierarchy,
        applier: Applier::new(opts.capacity),
        loaded,
        policies: Vec::new(),
        resolved: Vec::new(),
        registry: Registry::default(),
        names: PolicyNames::default(),
    };
    let started = Instant::now();
    let resolved = agent.resolve(&policies);
    let report = agent
        .apply(policies, resolved)
        .context("applying the policy to the kernel maps")?;
    info!(
        "daemon: applied {} policies ({} governed cgroups, {} port sets in {} chunks) in {:.1} ms",
        report.policies,
        report.cgroups,
        report.sets_total,
        report.chunks_total,
        started.elapsed().as_secs_f64() * 1e3
    );
    let root = agent.hierarchy.root().to_owned();
    agent.loaded.attach(&root)?;
    let hooks: Vec<&str> = agent.loaded.attached().iter().map(|h| h.name()).collect();
    info!(
        "daemon: enforcing {} policies ({} governed cgroups) with hooks {}",
        report.policies,
        report.cgroups,
        hooks.join(", ")
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = rt.block_on(serve(&mut agent, events, writer, &opts));
    info!("daemon: detaching programs; enforcement stops");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    drop(agent);
    result
}

async fn serve(
    agent: &mut Agent,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    mut writer: EventWriter,
    opts: &RunOptions,
) -> anyhow::Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns it.
    let mut rb = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with tokio")?;
    let mut watcher = Watcher::new(&opts.policy, opts.watch)?;
    watcher.set_dirs(&agent.cgroup_watch_dirs());
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut lost_tick = tokio::time::interval(opts.lost_interval);
    let mut rescan_tick = tokio::time::interval(opts.rescan_interval);
    let mut lost_seen = 0u64;
    let mut pending_reload: Option<Instant> = None;
    let mut pending_rescan: Option<Instant> = None;
    let mut write_error_logged = false;

    let status = format!("enforcing {} policies", agent.policies.len());
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    debug!("daemon: ring buffer fd {}", rb.get_ref().as_raw_fd());

    loop {
        let deadline = match (pending_reload, pending_rescan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = rb.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                let n = drain_events(guard.get_inner_mut(), agent, &mut writer);
                guard.clear_ready();
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
            }
            _ = hup.recv() => {
                info!("daemon: SIGHUP: reloading {}", agent.policy_path.display());
                agent.reload("SIGHUP");
                watcher.set_dirs(&agent.cgroup_watch_dirs());
            }
            _ = term.recv() => { info!("daemon: SIGTERM"); break; }
            _ = int.recv() => { info!("daemon: SIGINT"); break; }
            guard = watcher.fd.readable_mut() => {
                let mut guard = guard.context("polling inotify")?;
                guard.clear_ready();
                drop(guard);
                for change in watcher.drain() {
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
                if pending_reload.is_some_and(|d| d <= now) {
                    pending_reload = None;
                    pending_rescan = None;
                    info!("daemon: {} changed: reloading", agent.policy_path.display());
                    agent.reload("file change");
                } else if pending_rescan.is_some_and(|d| d <= now) {
                    pending_rescan = None;
                    agent.rescan();
                }
                watcher.set_dirs(&agent.cgroup_watch_dirs());
            }
            _ = rescan_tick.tick() => {
                agent.rescan();
                watcher.set_dirs(&agent.cgroup_watch_dirs());
            }
            _ = lost_tick.tick() => {
                report_lost(agent, &mut writer, &mut lost_seen);
            }
        }
    }
    // Whatever is still queued, and a final loss report.
    drain_events(rb.get_mut(), agent, &mut writer);
    report_lost(agent, &mut writer, &mut lost_seen);
    writer.flush().context("flushing the event log")?;
    Ok(())
}

fn drain_events(
    rb: &mut aya::maps::RingBuf<aya::maps::MapData>,
    agent: &mut Agent,
    writer: &mut EventWriter,
) -> usize {
    let mut n = 0;
    while let Some(item) = rb.next() {
        n += 1;
        match events::decode(&item) {
            Ok(ev) => {
                let record = events::enrich(&ev, &agent.names, &mut agent.hierarchy);
                let _ = writer.line(&record);
            }
            Err(e) => warn!("daemon: skipping a malformed event: {e}"),
        }
    }
    n
}

fn report_lost(agent: &Agent, writer: &mut EventWriter, seen: &mut u64) {
    match agent.loaded.maps.counters() {
        Ok(c) if c.events_lost > *seen => {
            let lost = c.events_lost - *seen;
            *seen = c.events_lost;
            warn!(
                "daemon: the kernel dropped {lost} events (ring buffer full; {} in total)",
                c.events_lost
            );
            notify_status(&format!("{} events lost in total", c.events_lost));
            let _ = writer.line(&LostRecord {
                time: events::format_time(std::time::SystemTime::now()),
                lost,
                lost_total: c.events_lost,
            });
            let _ = writer.flush();
        }
        Ok(_) => {}
        Err(e) => warn!("daemon: reading counters: {e}"),
    }
}
