//! Start-up steps of `portguard run` that do not need the agent's state:
//! the policy's scope check, systemd notifications, memory hand-back and
//! the pinned-state adoption report.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Instant,
};

use anyhow::Context as _;
use log::{debug, error, info, warn};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    apply::{Applier, ApplyReport},
    events::{self, EventWriter, PolicyNames},
    kernel::pins::PinDir,
    kernel::{ListenCheck, LoadOptions, Loaded},
    observe::health::Health,
    policy::{
        CompiledPolicy, ParsedPolicy, PolicyError, compile_all, parse_policy_text, read_policy_file,
    },
    workload::cgroupfs::Hierarchy,
    workload::cri,
};

use super::*;

/// Policies outside the attach point could never be enforced: refuse them.
pub(super) fn check_scope(policies: &[CompiledPolicy], scope: &str) -> anyhow::Result<()> {
    let outside = crate::policy::builtin::outside_scope(policies, scope);
    if outside.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the programs are attached at {scope} (--attach-cgroup), so these policies could not be \
         enforced: {}",
        outside.join(", ")
    )
}

/// Parsing the kernel's BTF (twice: aya for relocations, us for one field
/// offset) and large policy files leaves freed heap that glibc keeps; hand it
/// back so the agent's resident size reflects what it actually holds.
pub(super) fn release_free_memory() {
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
}

pub(super) fn notify_status(status: &str) {
    sd_notify(&[NotifyState::Status(status)]);
}

/// Tell the service manager (`$NOTIFY_SOCKET`) about `states`, never
/// blocking: sd_notify::notify waits when the receiver's queue is full (its
/// default length is 10 datagrams), and an agent must not stall on its
/// supervisor. A notification that does not fit is dropped.
pub(super) fn sd_notify(states: &[NotifyState<'_>]) {
    use std::{fmt::Write as _, os::linux::net::SocketAddrExt as _, os::unix::net::UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    if sock.set_nonblocking(true).is_err() {
        return;
    }
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let res = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a)),
        None => sock.send_to(msg.as_bytes(), &path),
    };
    if let Err(e) = res {
        debug!("daemon: sd_notify {msg:?}: {e}");
    }
}

/// Say what was found in the pin directory and what will happen to it.
pub(super) fn describe_adoption(pins: &PinDir, a: &crate::kernel::Adoption) {
    let Some(prev) = a.previous else {
        info!(
            "daemon: no pinned state in {}: installing (programs, links and maps are pinned \
             there and keep enforcing if the agent stops)",
            pins.root().display()
        );
        return;
    };
    let hex = |b: &[u8; 32]| {
        b[..6]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let programs = if a.same_object() {
        format!("same kernel programs ({})", hex(&a.object_sha256))
    } else {
        format!(
            "kernel programs changed ({} -> {}): each link is switched to the new program in \
             place",
            hex(&prev.object_sha256),
            hex(&a.object_sha256)
        )
    };
    let maps = if a.replaced.is_empty() && a.policy_maps_reused {
        "every map reused".to_owned()
    } else if a.replaced.is_empty() {
        "the policy maps were missing: created and filled before any link switches to them"
            .to_owned()
    } else {
        format!(
            "maps rebuilt because their layout or size changed: {} (filled before any link \
             switches to them)",
            a.replaced.join(", ")
        )
    };
    info!(
        "daemon: adopting the pinned state in {} left by agent pid {}, without detaching: {programs}; {maps}",
        pins.root().display(),
        prev.pid
    );
}

/// The single-threaded tokio runtime and the signal handlers, first of all.
pub(super) fn runtime_and_signals() -> anyhow::Result<(tokio::runtime::Runtime, Signals)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let signals = {
        let _guard = rt.enter();
        Signals {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        }
    };
    Ok((rt, signals))
}

/// Read, parse and compile the policy file, and check it against the
/// attach point: nothing touches the kernel before this succeeds.
pub(super) fn load_policy(
    opts: &RunOptions,
) -> anyhow::Result<(ParsedPolicy, Vec<CompiledPolicy>)> {
    let parsed = parse_policy_text(read_policy_file(&opts.policy)?).map_err(|diagnostics| {
        PolicyError::Invalid {
            path: opts.policy.clone(),
            diagnostics,
        }
    })?;
    let mut policies = compile_all(&parsed.file.policies);
    crate::policy::apply_reserved(&mut policies, &parsed.file.reserved);
    check_scope(&policies, &opts.attach_cgroup)?;
    Ok((parsed, policies))
}

/// The cgroup2 hierarchy, with the attach point checked to exist.
pub(super) fn hierarchy(opts: &RunOptions, policies: usize) -> anyhow::Result<Hierarchy> {
    let hierarchy = match &opts.cgroup_root {
        Some(root) => Hierarchy::at(root.clone()).context("--cgroup-root")?,
        None => Hierarchy::discover()?,
    };
    let attach_path = hierarchy.fs_path(&opts.attach_cgroup);
    if !attach_path.is_dir() {
        anyhow::bail!(
            "--attach-cgroup {}: no such cgroup ({} does not exist)",
            opts.attach_cgroup,
            attach_path.display()
        );
    }
    info!(
        "daemon: cgroup2 mounted at {}; {} policies in {}",
        hierarchy.root().display(),
        policies,
        opts.policy.display()
    );
    Ok(hierarchy)
}

/// Where event lines go: `--log` (a file, or `journald`), else the journal
/// when standard output is it, else standard output.
pub(super) fn event_writer(opts: &RunOptions) -> anyhow::Result<EventWriter> {
    let writer = match &opts.log {
        Some(p) if p.as_os_str() == "journald" => EventWriter::journald(),
        Some(p) => EventWriter::file(p, opts.log_rotation)
            .with_context(|| format!("cannot open event log {}", p.display()))?,
        None if EventWriter::stdout_is_journal() => {
            info!(
                "daemon: standard output is the journal: events go to it natively \
                 (journalctl -t portguard PORTGUARD_VERDICT=deny)"
            );
            EventWriter::journald()
        }
        None => EventWriter::stdout(),
    };
    Ok(writer.with_format(opts.log_format))
}

/// Refuse to start without the capabilities the kernel side needs; warn
/// about the ones that only narrow what the agent can see.
pub(super) fn preflight_capabilities() -> anyhow::Result<()> {
    match crate::kernel::caps::Caps::effective() {
        Ok(caps) => {
            let (errors, warnings) = crate::kernel::caps::assess(caps);
            for w in &warnings {
                warn!("daemon: without {w}");
            }
            if !errors.is_empty() {
                anyhow::bail!(
                    "portguard run lacks {} (effective capabilities {:#x}); run it as root or, in a \
                     container, grant the capabilities listed in docs/deployment.md",
                    errors.join(", "),
                    caps.0
                );
            }
        }
        Err(e) => warn!("daemon: cannot read this process's capabilities: {e}"),
    }
    Ok(())
}

/// Load the kernel object (from `--kernel-object`, else the one built in),
/// adopting pinned maps where they fit.
/// Open the pin directory (see [`PinDir::open_or_replace`]); what it had
/// to do about a planted one is logged as an error and kept for `status`.
pub(super) fn open_pins(dir: &Path, degraded: &mut Vec<String>) -> anyhow::Result<Option<PinDir>> {
    let (pins, msg) = PinDir::open_or_replace(dir)?;
    if let Some(msg) = msg {
        error!("daemon: {msg}");
        degraded.push(msg);
    }
    Ok(pins)
}

pub(super) fn load_kernel(opts: &RunOptions, pins: Option<&PinDir>) -> anyhow::Result<Loaded> {
    let object = match &opts.kernel_object {
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("--kernel-object {}", p.display()))?)
        }
        None => None,
    };
    let loaded = Loaded::load(
        &LoadOptions {
            capacity: opts.capacity,
            ring_buffer_bytes: opts.ring_buffer_bytes,
            object,
            event_rate: opts.event_rate,
            event_burst: opts.event_burst,
            cgroup_cache: opts.cgroup_cache,
        },
        pins,
    )?;
    match &loaded.cgroup_cache_off {
        None => info!(
            "loader: per-cgroup policy cache on: a decision reads its cgroup's governing policy \
             from the cgroup's own storage until a policy changes"
        ),
        Some(why) => info!(
            "loader: per-cgroup policy cache off ({why}): every decision walks its cgroup's \
             ancestry"
        ),
    }
    if let Some(p) = pins {
        describe_adoption(p, &loaded.adoption);
    }
    Ok(loaded)
}

/// `--program-stats`: the kernel's run statistics of `loaded`'s programs,
/// on from now. When the kernel refuses, the agent runs without them,
/// loudly (a warning, and `degraded` in status): what a program costs is
/// never worth its enforcement.
pub(super) fn program_stats(
    opts: &RunOptions,
    loaded: &Loaded,
    degraded: &mut Vec<String>,
) -> Option<crate::kernel::ProgramStats> {
    if !opts.program_stats {
        return None;
    }
    crate::kernel::ProgramStats::enable(loaded)
        .inspect_err(|e| {
            warn!("daemon: {e}; running without program statistics");
            degraded.push(e.clone());
        })
        .ok()
}

impl Agent {
    /// The agent over a freshly loaded kernel object, and the event ring.
    pub(super) fn new(
        opts: &RunOptions,
        hierarchy: Hierarchy,
        mut loaded: Loaded,
        parsed: ParsedPolicy,
        programs: Option<crate::kernel::ProgramStats>,
    ) -> anyhow::Result<(Self, crate::kernel::EventRing)> {
        let events = loaded
            .take_events()
            .context("event ring buffer already taken")?;
        let counter_maps = loaded.maps.counters.clone();
        let mut agent = Agent {
            policy_path: opts.policy.clone(),
            attach_cgroup: opts.attach_cgroup.clone(),
            decide_everywhere: opts.decide_everywhere,
            hierarchy,
            applier: Applier::new(opts.capacity),
            loaded,
            policies: Vec::new(),
            resolved: Vec::new(),
            provisional: Vec::new(),
            names: PolicyNames::default(),
            name_map_full: false,
            quiesce_warned: false,
            fail_closed: opts.fail_closed,
            lost_seen: 0,
            resolve_cache: Default::default(),
            last_resolve: None,
            fresh_resolves: 0,
            resolved_with: None,
            policy_ids: Vec::new(),
            writable_cache: HashMap::new(),
            refused: None,
            max_delegated: opts.max_delegated_cgroups,
            unfit_hold: Vec::new(),
            next_unfit_hold: Vec::new(),
            left_out_logged: HashSet::new(),
            next_left_out: Default::default(),
            tree: None,
            cri: None,
            cri_health: CriHealth::new(opts.cri_max_message_bytes),
            ties_logged: HashSet::new(),
            quarantine: Vec::new(),
            unidentified_since: HashMap::new(),
            next_quarantine: Vec::new(),
            last_cgroup_event: None,
            parsed: Some(parsed),
            verify_pending: false,
            inventory_pending: false,
            inventory_reported: HashSet::new(),
            cut_off_cookies: HashSet::new(),
            health: Health::new(HEALTH_STALE_AFTER.max(opts.lost_interval * 3)),
            host: events::host_name(),
            capacity: opts.capacity,
            shared: std::sync::Arc::new(crate::observe::snapshot::Snapshot {
                counters: counter_maps,
                facts: std::sync::Mutex::new(crate::observe::snapshot::Facts {
                    attach_cgroup: opts.attach_cgroup.clone(),
                    status: "starting".into(),
                    host: events::host_name(),
                    started: events::format_time(std::time::SystemTime::now()),
                    ..Default::default()
                }),
                recent: std::sync::Mutex::default(),
                programs,
            }),
            slot_owners: HashMap::new(),
            unended: Vec::new(),
            packet_guard: None,
            fence_failures_seen: 0,
            mark_failures_seen: 0,
            guard_held: false,
            hook_dir: opts
                .status_socket
                .as_deref()
                .map(crate::hook::spool::dir_of),
            selection_published: None,
            settle_later: false,
            unsettled: None,
            watch_inputs: 0,
            policies_version: 0,
            aggregator: events::aggregate::Aggregator::new(opts.aggregate_window, AGGREGATE_KINDS),
            reports: opts
                .policy_reports
                .map(|every| reports::Reports::new(every, &events::host_name())),
        };
        // Name ids as the previous agent did (its events may still be queued).
        for (id, name) in agent.loaded.maps.names() {
            agent.names.seed(id, &name);
        }
        Ok((agent, events))
    }

    /// Ask the CRI runtime for its pods and containers, when a policy
    /// selects pods.
    pub(super) fn connect_cri(
        &mut self,
        rt: &tokio::runtime::Runtime,
        opts: &RunOptions,
        policies: &[CompiledPolicy],
    ) {
        if !Agent::needs_cri(policies) {
            return;
        }
        match rt.block_on(async {
            let mut c =
                cri::connect_with_limit(&opts.cri_socket, opts.cri_max_message_bytes).await?;
            cri::snapshot(&mut c, &opts.cri_socket).await
        }) {
            Ok(snap) => {
                info!(
                    "daemon: CRI runtime at {}: {} pods, {} containers",
                    opts.cri_socket.display(),
                    snap.pods.len(),
                    snap.containers.len()
                );
                self.cri = Some(snap);
                self.cri_answered(&opts.cri_socket);
            }
            Err(e) => {
                warn!(
                    "daemon: {e}; `pods:` policies govern nothing until the runtime answers \
                     (retried on every cgroup change and every --rescan-interval); events carry \
                     cgroup-path identities only{}",
                    if e.too_large() {
                        format!(
                            " (its answer is larger than --cri-max-message-bytes {}: raise it)",
                            opts.cri_max_message_bytes
                        )
                    } else {
                        String::new()
                    }
                );
                // Counted and published; logged once above.
                self.cri_health.failing_since = Some(Instant::now());
                self.cri_failed(&opts.cri_socket, &e);
            }
        }
    }

    /// Write the first policy into both generations of the maps, before any
    /// program is attached (or, over adopted maps, with the usual
    /// generation flips).
    pub(super) fn first_apply(
        &mut self,
        opts: &RunOptions,
        mut policies: Vec<CompiledPolicy>,
    ) -> anyhow::Result<ApplyReport> {
        // Programs of a previous agent may be running on the adopted maps:
        // the applier continues from what they hold, and flips generations
        // with the usual grace periods; fresh maps are read by nothing yet.
        let adopted = self.loaded.adoption.policy_maps_reused;
        if adopted {
            self.applier = self
                .loaded
                .maps
                .read_back(opts.capacity)
                .context("reading back the pinned policy maps")?;
        }
        // Where the decision programs run is settled by these applies, and
        // they are attached there by `attach`, once the maps hold the policy.
        self.loaded.defer_points();
        let started = Instant::now();
        let mut resolved = self.resolve(&policies, true);
        let report = match self.apply(policies.clone(), resolved.clone()) {
            Ok(r) => r,
            Err(e) if opts.fail_closed => {
                let r = self.apply_fail_closed(&policies, &e)?;
                policies = self.policies.clone();
                resolved = self.resolved.clone();
                r
            }
            Err(e) => return Err(e).context("applying the policy to the kernel maps"),
        };
        // Fill the standby generation too (with fresh maps nothing reads
        // them yet, so no grace period applies): reloads then only ever
        // write what changed.
        if !adopted {
            self.applier.unattached();
        }
        self.apply(policies, resolved)
            .context("applying the policy to the kernel maps")?;
        // With fresh maps still nothing is attached: no program can be
        // reading the old generation, so the first reload need not wait.
        if !adopted {
            self.applier.unattached();
        }
        info!(
            "daemon: applied {} policies ({} governed cgroups, {} port sets in {} chunks) to both generations in {:.1} ms",
            report.policies,
            report.cgroups,
            report.sets_total,
            report.chunks_total,
            started.elapsed().as_secs_f64() * 1e3
        );
        self.sync_ephemeral(true);
        if let Some(why) =
            crate::kernel::btf::port0_unenforced(crate::kernel::btf::running_release())
        {
            warn!("daemon: bind(port 0) is NOT fully enforced: {why}");
        }
        Ok(report)
    }

    /// Attach the programs to the attach point: through pinned links
    /// (adopting a previous agent's, reading what its replaced ring still
    /// held), or owned by this process.
    pub(super) fn attach(
        &mut self,
        opts: &RunOptions,
        pins: Option<&PinDir>,
        writer: &mut EventWriter,
    ) -> anyhow::Result<()> {
        let attach_path = self.hierarchy.fs_path(&opts.attach_cgroup);
        // The decision programs first: the host-wide step below removes
        // the root links an earlier version pinned for them.
        self.loaded.attach_deferred_points()?;
        self.publish_points();
        match pins {
            Some(p) => {
                self.loaded.attach_pinned(&attach_path, p)?;
                // The previous programs' ring, if it was replaced: what
                // they queued is read before it goes.
                if let Some(mut old) = self.loaded.replaced_events(p) {
                    let n = drain_replaced(&mut old, self, writer);
                    info!("daemon: read {n} events queued in the replaced ring buffer");
                }
                self.loaded.drop_replaced_maps(p);
                report_restart_losses(self, writer);
            }
            None => self.loaded.attach(&attach_path)?,
        }
        if let Err(e) = self.loaded.write_stamp(self.lost_seen) {
            warn!("daemon: writing the version stamp: {e}");
        }
        Ok(())
    }

    /// Say how `listen()` is enforced here and what is enforced, to the log
    /// and the status snapshot; refuse to go on under `--require-lsm`
    /// without the BPF LSM.
    pub(super) fn announce(
        &mut self,
        opts: &RunOptions,
        report: &ApplyReport,
    ) -> anyhow::Result<()> {
        match self.loaded.listen_check() {
            ListenCheck::Denied => info!(
                "daemon: listen() and accept() are enforced (BPF LSM): an unbound listen() or a \
                 socket bound outside the policy is denied"
            ),
            ListenCheck::Reported { why } | ListenCheck::Unchecked { why } if opts.require_lsm => {
                anyhow::bail!(
                    "--require-lsm: listen()/accept() cannot be denied on this host: {why}"
                );
            }
            ListenCheck::Reported { why } => warn!(
                "daemon: listen() cannot be denied here ({why}): a listener on a port outside the \
                 policy (including an unbound listen() that the kernel autobinds, and a socket \
                 bound elsewhere and handed in) is CUT OFF instead: the kernel fences it (no \
                 packet reaches it; a client is refused) and the agent destroys it (verdict \
                 \"cut_off\"). Binds, connects, sends and socket creation are denied."
            ),
            ListenCheck::Unchecked { why } => warn!(
                "daemon: listen() and accept() are NOT checked: {why}. Binds, connects, sends and \
                 socket creation are enforced."
            ),
        }
        release_free_memory();
        let hooks: Vec<&'static str> = self.loaded.attached().iter().map(|h| h.name()).collect();
        // The file's policies; the built-in holds (`portguard:identifying`,
        // `portguard:fail-closed:unfit`) come and go with the cgroups.
        let held = report.policies.saturating_sub(self.policies.len());
        info!(
            "daemon: enforcing {} policies ({} governed cgroups{}) with hooks {}",
            self.policies.len(),
            report.cgroups,
            if held > 0 {
                format!(", {held} built-in holds")
            } else {
                String::new()
            },
            hooks.join(", ")
        );
        let listen_mode = match self.loaded.listen_check() {
            ListenCheck::Denied => "denied (BPF LSM)".to_owned(),
            ListenCheck::Reported { why } => format!("cut off, not denied: {why}"),
            ListenCheck::Unchecked { why } => format!("not checked: {why}"),
        };
        self.shared.update(|f| {
            f.hooks = hooks;
            f.listen_mode = listen_mode;
        });
        Ok(())
    }
}
