//! Loading the kernel object: maps sized for this host (or adopted from
//! pins when they fit), globals patched from the running kernel's BTF, every
//! program loaded (the LSM ones only where the BPF LSM works); then the
//! event ring buffer and the version stamp.
//!
//! Order matters and is the caller's: load, apply the first policy into the
//! maps, and only then [`Loaded::attach`], so no hook ever runs on half-written
//! state. Dropping [`Loaded`] detaches every program (aya links are fds).

use super::*;
use std::path::Path;

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, RingBuf},
    programs::{LsmCgroup, ProgramError, links::LinkError},
};
use log::{debug, warn};
use portguard_common::{
    AgentStamp, COUNTERS, CgroupKey, CgroupValue, EventBudget, GLOBAL_CACHE_OFFSETS,
    GLOBAL_SOCK_OFFSETS, GLOBAL_USERLOCKS, GLOBAL_V6ONLY_BIT, Hook, LAYOUT_VERSION, LSM_PROGRAMS,
    MAP_AGENT, MAP_CGROUPS, MAP_COUNTERS, MAP_EVENT_BUCKETS, MAP_EVENT_BUDGET, MAP_EVENTS,
    MAP_NAMES, MAP_POLICIES, MAP_POLICY_COUNTERS, MAP_PORTSETS, MAP_SOCKETS, MAP_STATE, MAPS,
    POLICY_KINDS, PolicyName, PolicyRecord, PortChunk, PortChunkKey, STAMP_MAGIC, SockOffsets,
    SocketState, State, USERLOCKS_UNKNOWN, V6ONLY_UNKNOWN,
};
use sha2::Digest;

use crate::{
    apply::Capacity,
    kernel::btf::{VMLINUX_BTF, ipv6only_bit_offset, sock_offsets, userlocks_offset},
    kernel::pins::PinDir,
};

/// The kernel object, built by build.rs from portguard-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portguard"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the kernel object failed: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("the kernel object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("the kernel object has no map {name}")]
    MissingMap { name: &'static str },
    #[error(
        "the kernel rejected program {name} (hook cgroup/{hook}); this kernel cannot enforce \
         with it: {source}"
    )]
    ProgramLoad {
        name: &'static str,
        hook: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// Never reaches the user: [`Loaded::load`] loads the object without
    /// the cache instead.
    #[error(
        "the kernel rejected program {name} (hook cgroup/{hook}) of the object with the \
         per-cgroup policy cache, which its bind4 passed: {source}"
    )]
    CachedProgramLoad {
        name: &'static str,
        hook: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot attach {name} to cgroup/{hook} on {cgroup}: {source}")]
    Attach {
        name: &'static str,
        hook: &'static str,
        cgroup: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("ring buffer size {bytes} is invalid: it must be a power of two and at least 4096")]
    RingBufferSize { bytes: u32 },
    #[error("the link of {name} cannot be kept as a file descriptor: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("pinned state in {dir}: {what}")]
    Pin {
        dir: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Sizes chosen at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub capacity: Capacity,
    /// Event ring buffer size in bytes (power of two, >= page size).
    pub ring_buffer_bytes: u32,
    /// A kernel object to load instead of the built-in one (testing
    /// upgrades: `--kernel-object`).
    pub object: Option<Vec<u8>>,
    /// Events each policy may write per second and CPU (0: unlimited) and
    /// its burst: written to the kernel's event budget before anything is
    /// attached (see [`EventBudget`]).
    pub event_rate: u32,
    pub event_burst: u32,
    /// Load the object with the per-cgroup policy cache where the kernel
    /// accepts it (`--no-cgroup-cache`: false; see `kernel::cache`).
    pub cgroup_cache: bool,
}

/// Entries of the policy-name map for `caps`: every policy of both
/// generations plus room for names that come and go between reloads.
pub const fn name_map_entries(caps: Capacity) -> u32 {
    caps.policies * 2 + 64
}

/// (key size, value size, max_entries) each map must have for `opts`.
pub(super) fn expected_shape(name: &str, opts: &LoadOptions) -> (u32, u32, u32) {
    let caps = opts.capacity;
    let sz = |n: usize| n as u32;
    match name {
        MAP_STATE => (4, sz(size_of::<State>()), 1),
        MAP_CGROUPS => (
            sz(size_of::<CgroupKey>()),
            sz(size_of::<CgroupValue>()),
            caps.cgroup_map_entries().max(1),
        ),
        MAP_POLICIES => (
            4,
            sz(size_of::<PolicyRecord>()),
            caps.policy_map_entries().max(1),
        ),
        MAP_PORTSETS => (
            sz(size_of::<PortChunkKey>()),
            sz(size_of::<PortChunk>()),
            caps.chunks.max(1),
        ),
        MAP_EVENTS => (0, 0, opts.ring_buffer_bytes),
        MAP_COUNTERS => (4, 8, COUNTERS),
        MAP_POLICY_COUNTERS => (4, 8, caps.policies.max(1) * POLICY_KINDS),
        MAP_EVENT_BUDGET => (4, sz(size_of::<EventBudget>()), 1),
        MAP_EVENT_BUCKETS => (4, 8, caps.policies.max(1)),
        MAP_SOCKETS => (4, sz(size_of::<SocketState>()), 0),
        MAP_AGENT => (4, sz(size_of::<AgentStamp>()), 1),
        MAP_NAMES => (4, sz(size_of::<PolicyName>()), name_map_entries(caps)),
        _ => (0, 0, 0),
    }
}

/// The maps whose contents must stay consistent with each other: reused
/// together or rebuilt together.
pub(super) const POLICY_MAPS: [&str; 4] = [MAP_STATE, MAP_CGROUPS, MAP_POLICIES, MAP_PORTSETS];

/// What the loader found pinned and decided about it.
#[derive(Clone, Debug, Default)]
pub struct Adoption {
    /// The version stamp of the state found (None: no pinned state).
    pub previous: Option<AgentStamp>,
    /// The policy maps (state, cgroups, records, port sets) are the pinned
    /// ones: the agent continues from what they hold.
    pub policy_maps_reused: bool,
    /// Pinned maps whose layout or size differ: rebuilt, the old ones kept
    /// aside until every link runs the new programs.
    pub replaced: Vec<&'static str>,
    /// SHA-256 of the kernel object being loaded.
    pub object_sha256: [u8; 32],
}

impl Adoption {
    /// Same programs as the pinned ones.
    pub fn same_object(&self) -> bool {
        self.previous
            .is_some_and(|s| s.object_sha256 == self.object_sha256)
    }
}

/// Counts of one kind each: allowed, denied, audited, reported (the
/// `DECISION_*` order), then, per policy only, events suppressed and lost
/// (`POLICY_EVENTS_*`; always 0 for a hook).
pub type Decisions = [u64; POLICY_KINDS as usize];

/// Loaded programs and the maps they share.
pub struct Loaded {
    pub(super) ebpf: Ebpf,
    pub maps: KernelMaps,
    pub(super) events: Option<RingBuf<MapData>>,
    pub(super) stamp: Array<MapData, AgentStamp>,
    pub adoption: Adoption,
    /// Links this process owns (unpinned runs: they end with it).
    pub(super) links: Vec<ProgLink>,
    pub(super) attached: Vec<Hook>,
    /// Why the BPF LSM checks (listen/accept) are not loaded, if they are not.
    pub(super) lsm_unavailable: Option<String>,
    /// The sock_ops listen reporter is loaded (fallback without the LSM).
    pub(super) sock_ops_loaded: bool,
    /// The decision programs' attach points, by cgroup id (see `points`).
    pub(super) points: std::collections::BTreeMap<u64, Point>,
    /// The pin directory, when links are pinned.
    pub(super) pin_root: Option<std::path::PathBuf>,
    /// The decision programs are pinned in `progs/` by this agent.
    pub(super) decision_programs_pinned: bool,
    /// Where the decision programs must run, while attaching them waits
    /// for the first policy to be written (see `Loaded::defer_points`).
    pub(super) deferred_points: Option<Vec<std::path::PathBuf>>,
    /// Why the decision programs walk every time (the object without the
    /// per-cgroup policy cache was loaded), if they do.
    pub cgroup_cache_off: Option<String>,
}

/// Try to lift RLIMIT_MEMLOCK for kernels that still charge BPF memory to it
/// (before 5.11). Newer kernels charge memcg instead, so failing here (no
/// CAP_SYS_RESOURCE, e.g. in some containers) only matters on old kernels.
/// See https://lwn.net/Articles/837122/.
pub(super) fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        warn!(
            "loader: could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11, which charge \
             BPF memory to the memory cgroup",
            std::io::Error::last_os_error()
        );
    }
}

/// Put the pins as a failed load found them: the maps it moved aside back
/// where they were pinned (the previous programs still run on them),
/// dropping the new pins in their place, and the maps it pinned where none
/// was unpinned again, so that a second load (the object without the
/// cache) or the next agent finds what this one did.
fn restore_pins(pins: Option<&PinDir>, replaced: &[&'static str], created: &[&'static str]) {
    let Some(pins) = pins else {
        return;
    };
    for name in created {
        let _ = std::fs::remove_file(pins.map(name));
    }
    for name in replaced {
        // move_pin replaces the new pin only once it holds the old map.
        if let Err(e) = pins::move_pin(&pins.old_map(name), &pins.map(name)) {
            warn!("loader: restoring the pinned map {name}: {e}");
        }
    }
}

pub(super) fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    conv: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, LoaderError> {
    let map = ebpf
        .take_map(name)
        .ok_or(LoaderError::MissingMap { name })?;
    conv(map).map_err(|source| LoaderError::Map { name, source })
}

impl Loaded {
    /// Load the object and its programs (nothing is attached yet). With
    /// `pins`, maps pinned there by a previous agent are reused when their
    /// layout and size match (the policy maps only all together); the
    /// others are moved aside and rebuilt (see [`Adoption`]).
    pub fn load(opts: &LoadOptions, pins: Option<&PinDir>) -> Result<Self, LoaderError> {
        let choice = cache::choose(
            OBJECT,
            opts.cgroup_cache && opts.object.is_none(),
            opts.capacity.policies,
        );
        match Self::load_object(opts, pins, choice) {
            // The probe passed the cached bind4, but the kernel refused
            // another of its programs (a verifier limit, a helper): the
            // object without the cache enforces the same policies.
            Err(LoaderError::CachedProgramLoad { name, hook, source }) => {
                let why = format!(
                    "the kernel refused its program {name} (cgroup/{hook}): {}",
                    cache::verifier_tail(&source)
                );
                warn!("loader: per-cgroup policy cache: {why}; loading the programs without it");
                Self::load_object(opts, pins, cache::Choice::plain(OBJECT, why))
            }
            other => other,
        }
    }

    /// [`Loaded::load`] with the object `choice` names. A program the
    /// kernel refuses puts the pinned maps back as they were.
    fn load_object(
        opts: &LoadOptions,
        pins: Option<&PinDir>,
        choice: cache::Choice,
    ) -> Result<Self, LoaderError> {
        let rb = opts.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() {
            return Err(LoaderError::RingBufferSize { bytes: rb });
        }
        bump_memlock_rlimit();
        let v6only_bit = match ipv6only_bit_offset(Path::new(VMLINUX_BTF)) {
            Ok(bit) => {
                debug!("loader: skc_ipv6only is bit {bit} of struct sock");
                bit
            }
            Err(e) => {
                warn!(
                    "loader: {e}; binds to [::] will be judged as dual-stack (the port must be \
                     allowed for IPv4 and IPv6) even on IPV6_V6ONLY sockets"
                );
                V6ONLY_UNKNOWN
            }
        };
        let userlocks = match userlocks_offset(Path::new(VMLINUX_BTF)) {
            Ok(off) => off,
            Err(e) => {
                warn!(
                    "loader: {e}; `ephemeral` will not allow ports the kernel picks at listen() \
                     or by UDP autobind (only bind(port 0), judged when it happens)"
                );
                USERLOCKS_UNKNOWN
            }
        };
        let offsets = match sock_offsets(Path::new(VMLINUX_BTF)) {
            Ok(o) => o,
            Err(e) => {
                warn!("loader: {e}");
                SockOffsets::default()
            }
        };
        let object: &[u8] = opts.object.as_deref().unwrap_or(choice.object);
        let mut adoption = Adoption {
            object_sha256: sha2::Sha256::digest(object).into(),
            ..Adoption::default()
        };
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_V6ONLY_BIT, &v6only_bit, true)
            .override_global(GLOBAL_SOCK_OFFSETS, &offsets, true)
            .override_global(GLOBAL_USERLOCKS, &userlocks, true);
        if let Some(offsets) = &choice.offsets {
            loader.override_global(GLOBAL_CACHE_OFFSETS, offsets, true);
        }
        // Sized from the same shapes that decide whether a pinned map fits.
        for name in [
            MAP_CGROUPS,
            MAP_POLICIES,
            MAP_PORTSETS,
            MAP_POLICY_COUNTERS,
            MAP_EVENT_BUCKETS,
            MAP_NAMES,
            MAP_EVENTS,
        ] {
            loader.map_max_entries(name, expected_shape(name, opts).2);
        }
        // Maps pinned where nothing was: unpinned again if the load fails.
        let mut created: Vec<&'static str> = Vec::new();
        if let Some(pins) = pins {
            adoption.previous = read_stamp(&pins.map(MAP_AGENT));
            let layout_ok = adoption
                .previous
                .is_some_and(|s| s.layout == LAYOUT_VERSION);
            // None: nothing pinned under that name.
            let fits = |name: &str| -> Option<bool> {
                let path = pins.map(name);
                if !path.exists() {
                    return None;
                }
                let shape = MapInfo::from_pin(&path)
                    .map(|i| (i.key_size(), i.value_size(), i.max_entries()))
                    .ok();
                Some(layout_ok && shape == Some(expected_shape(name, opts)))
            };
            let policy_maps_fit = POLICY_MAPS.iter().all(|m| fits(m) == Some(true));
            adoption.policy_maps_reused = policy_maps_fit;
            for name in MAPS {
                let reuse =
                    fits(name).map(|ok| ok && (policy_maps_fit || !POLICY_MAPS.contains(&name)));
                if reuse == Some(false) {
                    // Programs still attached keep using the old map; its
                    // pin waits aside until they are replaced.
                    pins::move_pin(&pins.map(name), &pins.old_map(name)).map_err(|source| {
                        LoaderError::Pin {
                            dir: pins.root().display().to_string(),
                            what: format!("moving the incompatible map {name} aside"),
                            source,
                        }
                    })?;
                    adoption.replaced.push(name);
                }
                if reuse.is_none() {
                    created.push(name);
                }
                // Reused when pinned there, created and pinned otherwise.
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = match loader.load(object) {
            Ok(e) => e,
            Err(e) => {
                restore_pins(pins, &adoption.replaced, &created);
                return Err(LoaderError::Load(Box::new(e)));
            }
        };
        // Everything up to here may still fail (a refused program, a map the
        // object lacks): the pins go back as they were found.
        let rest = programs::load_programs(&mut ebpf, choice.offsets.is_some(), offsets.valid != 0)
            .and_then(|programs| {
                let maps = KernelMaps {
                    names: take(&mut ebpf, MAP_NAMES, HashMap::try_from)?,
                    state: take(&mut ebpf, MAP_STATE, Array::try_from)?,
                    cgroups: take(&mut ebpf, MAP_CGROUPS, HashMap::try_from)?,
                    policies: take(&mut ebpf, MAP_POLICIES, Array::try_from)?,
                    portsets: take(&mut ebpf, MAP_PORTSETS, HashMap::try_from)?,
                    counters: std::sync::Arc::new(CounterMaps {
                        hooks: take(&mut ebpf, MAP_COUNTERS, PerCpuArray::try_from)?,
                        policies: take(&mut ebpf, MAP_POLICY_COUNTERS, PerCpuArray::try_from)?,
                    }),
                };
                let mut budget: Array<MapData, EventBudget> =
                    take(&mut ebpf, MAP_EVENT_BUDGET, Array::try_from)?;
                let b = EventBudget::new(opts.event_rate, opts.event_burst, rb);
                budget.set(0, b, 0).map_err(|source| LoaderError::Map {
                    name: MAP_EVENT_BUDGET,
                    source,
                })?;
                debug!("loader: event budget {b:?}");
                let events = take(&mut ebpf, MAP_EVENTS, RingBuf::try_from)?;
                let stamp = take(&mut ebpf, MAP_AGENT, Array::try_from)?;
                Ok((programs, maps, events, stamp))
            });
        let ((lsm_unavailable, sock_ops_loaded), maps, events, stamp) = match rest {
            Ok(rest) => rest,
            Err(e) => {
                drop(ebpf);
                restore_pins(pins, &adoption.replaced, &created);
                return Err(e);
            }
        };
        let mut loaded = Self {
            ebpf,
            maps,
            events: Some(events),
            stamp,
            adoption,
            links: Vec::new(),
            attached: Vec::new(),
            lsm_unavailable,
            sock_ops_loaded,
            points: Default::default(),
            pin_root: pins.map(|p| p.root().to_owned()),
            decision_programs_pinned: false,
            deferred_points: None,
            cgroup_cache_off: choice.off,
        };
        if let Some(p) = pins {
            loaded.adopt_points(p.root());
        }
        Ok(loaded)
    }

    /// How `listen()` is checked (after [`Loaded::attach`]).
    pub fn listen_check(&self) -> ListenCheck {
        match &self.lsm_unavailable {
            None => ListenCheck::Denied,
            Some(why) if self.attached.contains(&Hook::Listen) => {
                ListenCheck::Reported { why: why.clone() }
            }
            Some(why) => ListenCheck::Unchecked { why: why.clone() },
        }
    }

    pub(super) fn load_lsm(ebpf: &mut Ebpf) -> Result<(), String> {
        let btf = Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"))?;
        for (name, lsm_hook, _) in LSM_PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("the kernel object has no program {name}"))?;
            let p: &mut LsmCgroup = prog.try_into().map_err(|e| format!("{name}: {e}"))?;
            p.load(lsm_hook, &btf)
                .map_err(|e| format!("the kernel rejected {name} (lsm_cgroup/{lsm_hook}): {e}"))?;
            debug!("loader: loaded {name}");
        }
        Ok(())
    }

    /// Remove the pins of maps moved aside (by this agent, or by one that
    /// died mid-upgrade), once every link runs this agent's programs.
    pub fn drop_replaced_maps(&mut self, pins: &PinDir) {
        self.adoption.replaced.clear();
        for name in MAPS {
            let old = pins.old_map(name);
            if let Err(e) = std::fs::remove_file(&old)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("loader: removing {}: {e}", old.display());
            }
        }
    }

    /// The ring buffer a previous agent's programs wrote to, when it was
    /// replaced (events still queued there are read before it goes).
    pub fn replaced_events(&self, pins: &PinDir) -> Option<RingBuf<MapData>> {
        if !self.adoption.replaced.contains(&MAP_EVENTS) {
            return None;
        }
        let data = MapData::from_pin(pins.old_map(MAP_EVENTS)).ok()?;
        RingBuf::try_from(Map::RingBuf(data)).ok()
    }

    /// Write the version stamp: these programs, this agent, the lost-event
    /// count it has reported, now.
    pub fn write_stamp(&mut self, lost_reported: u64) -> Result<(), MapError> {
        let stamp = AgentStamp {
            magic: STAMP_MAGIC,
            layout: LAYOUT_VERSION,
            pid: std::process::id(),
            object_sha256: self.adoption.object_sha256,
            lost_reported,
            alive_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        self.stamp.set(0, stamp, 0)
    }

    /// Hooks attached so far.
    pub fn attached(&self) -> &[Hook] {
        &self.attached
    }

    /// The event ring buffer (can be taken once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}
