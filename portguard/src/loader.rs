//! Thin aya layer: load the kernel object with maps sized for this host,
//! attach every hook to the cgroup2 root, and expose the maps as a
//! [`RuleSink`], the event ring buffer and the counters.
//!
//! Order matters and is the caller's: load, apply the first policy into the
//! maps, and only then [`Loaded::attach`], so no hook ever runs on half-written
//! state. Dropping [`Loaded`] detaches every program (aya links are fds).

use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::Path,
};

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, LsmCgroup, ProgramError, SockOps,
        links::{FdLink, LinkError},
    },
};
use log::{debug, info, warn};
use portguard_common::{
    AgentStamp, COUNTER_EVENTS_LOST, COUNTER_FENCE_FAILED, COUNTER_GUARD_DROPS, COUNTERS,
    CgroupKey, CgroupValue, DECISION_ALLOW, DECISION_AUDIT, DECISION_DENY, DECISION_REPORTED,
    DECISIONS, FENCE_PROGRAM, GLOBAL_SOCK_OFFSETS, GLOBAL_USERLOCKS, GLOBAL_V6ONLY_BIT,
    GUARD_PROGRAM, HOOKS, Hook, LAYOUT_VERSION, LSM_PROGRAMS, MAP_AGENT, MAP_CGROUPS, MAP_COUNTERS,
    MAP_EVENTS, MAP_NAMES, MAP_POLICIES, MAP_POLICY_COUNTERS, MAP_PORTSETS, MAP_SOCKETS, MAP_STATE,
    MAPS, POLICY_NAME_MAX, PROGRAMS, PolicyName, PolicyRecord, PortChunk, PortChunkKey,
    SOCK_OPS_PROGRAM, STAMP_MAGIC, SockOffsets, SocketState, State, USERLOCKS_UNKNOWN,
    V6ONLY_UNKNOWN, hook_counter, policy_counter,
};
use sha2::Digest;

use crate::{
    bpfsys::{self, attach_type},
    kernel_btf::{VMLINUX_BTF, ipv6only_bit_offset, sock_offsets, userlocks_offset},
    pins::{PinDir, program_names},
    rules_map::{Applier, Capacity, RuleSink, SinkError},
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
}

/// Entries of the policy-name map for `caps`: every policy of both
/// generations plus room for names that come and go between reloads.
pub const fn name_map_entries(caps: Capacity) -> u32 {
    caps.policies * 2 + 64
}

/// (key size, value size, max_entries) each map must have for `opts`.
fn expected_shape(name: &str, opts: &LoadOptions) -> (u32, u32, u32) {
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
        MAP_POLICY_COUNTERS => (4, 8, caps.policies.max(1) * DECISIONS),
        MAP_SOCKETS => (4, sz(size_of::<SocketState>()), 0),
        MAP_AGENT => (4, sz(size_of::<AgentStamp>()), 1),
        MAP_NAMES => (4, sz(size_of::<PolicyName>()), name_map_entries(caps)),
        _ => (0, 0, 0),
    }
}

/// The maps whose contents must stay consistent with each other: reused
/// together or rebuilt together.
const POLICY_MAPS: [&str; 4] = [MAP_STATE, MAP_CGROUPS, MAP_POLICIES, MAP_PORTSETS];

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

/// How each program came to be attached (see [`Loaded::attach_pinned`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Pinned links switched to the new program in place (`BPF_LINK_UPDATE`).
    pub updated: Vec<&'static str>,
    /// New links (nothing was pinned for them).
    pub created: Vec<&'static str>,
    /// Pinned links that were attached elsewhere or defunct, replaced.
    pub repaired: Vec<(&'static str, String)>,
    /// Pinned links of programs this agent does not attach, removed.
    pub removed: Vec<String>,
}

/// The expected `bpf_attach_type` of each program.
fn expected_attach_type(name: &str) -> u32 {
    match name {
        "portguard_bind4" => attach_type::INET4_BIND,
        "portguard_bind6" => attach_type::INET6_BIND,
        "portguard_post_bind4" => attach_type::INET4_POST_BIND,
        "portguard_post_bind6" => attach_type::INET6_POST_BIND,
        "portguard_connect4" => attach_type::INET4_CONNECT,
        "portguard_connect6" => attach_type::INET6_CONNECT,
        "portguard_sendmsg4" => attach_type::UDP4_SENDMSG,
        "portguard_sendmsg6" => attach_type::UDP6_SENDMSG,
        "portguard_sock_create" => attach_type::INET_SOCK_CREATE,
        SOCK_OPS_PROGRAM => attach_type::SOCK_OPS,
        GUARD_PROGRAM => attach_type::INET_INGRESS,
        FENCE_PROGRAM => attach_type::SETSOCKOPT,
        _ => attach_type::LSM_CGROUP,
    }
}

/// The text of a [`PolicyName`] map value.
fn name_text(n: &PolicyName) -> String {
    let len = (n.len as usize).min(POLICY_NAME_MAX);
    String::from_utf8_lossy(&n.bytes[..len]).into_owned()
}

/// Read the version stamp pinned at `path`.
pub fn read_stamp(path: &Path) -> Option<AgentStamp> {
    let data = MapData::from_pin(path).ok()?;
    let map: Array<MapData, AgentStamp> = Array::try_from(Map::Array(data)).ok()?;
    map.get(&0, 0).ok().filter(|s| s.magic == STAMP_MAGIC)
}

/// The kernel counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub reported: u64,
    pub events_lost: u64,
}

/// Decisions of one kind each: allowed, denied, audited, reported (the
/// `DECISION_*` order).
pub type Decisions = [u64; DECISIONS as usize];

/// The kernel's counter maps. Shared (read-only) between the agent and the
/// metrics and status endpoints; reads take no lock.
pub struct CounterMaps {
    hooks: PerCpuArray<MapData, u64>,
    policies: PerCpuArray<MapData, u64>,
}

impl CounterMaps {
    fn sum(map: &PerCpuArray<MapData, u64>, i: u32) -> Result<u64, MapError> {
        Ok(map.get(&i, 0)?.iter().copied().sum())
    }

    /// Decisions by hook (every hook, in `Hook` order).
    pub fn by_hook(&self) -> Result<Vec<(Hook, Decisions)>, MapError> {
        (1..=HOOKS as u8)
            .filter_map(Hook::from_u8)
            .map(|h| {
                let mut d = Decisions::default();
                for (k, v) in d.iter_mut().enumerate() {
                    *v = Self::sum(&self.hooks, hook_counter(h as u32, k as u32))?;
                }
                Ok((h, d))
            })
            .collect()
    }

    /// Decisions of the policy in record slot `slot` (since the slot was
    /// created; see the agent's baselines for slots that changed hands).
    pub fn by_slot(&self, slot: u32) -> Result<Decisions, MapError> {
        let mut d = Decisions::default();
        for (k, v) in d.iter_mut().enumerate() {
            *v = Self::sum(&self.policies, policy_counter(slot, k as u32))?;
        }
        Ok(d)
    }

    pub fn events_lost(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_EVENTS_LOST)
    }

    /// Packets the packet guard dropped.
    pub fn guard_drops(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_GUARD_DROPS)
    }

    /// Cut-off sockets the kernel would not fence.
    pub fn fence_failures(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_FENCE_FAILED)
    }

    /// Totals over every hook.
    pub fn totals(&self) -> Result<Counters, MapError> {
        let mut c = Counters {
            events_lost: self.events_lost()?,
            ..Counters::default()
        };
        for (_, d) in self.by_hook()? {
            c.allowed += d[DECISION_ALLOW as usize];
            c.denied += d[DECISION_DENY as usize];
            c.audited += d[DECISION_AUDIT as usize];
            c.reported += d[DECISION_REPORTED as usize];
        }
        Ok(c)
    }
}

/// Loaded programs and the maps they share.
pub struct Loaded {
    ebpf: Ebpf,
    pub maps: KernelMaps,
    events: Option<RingBuf<MapData>>,
    stamp: Array<MapData, AgentStamp>,
    pub adoption: Adoption,
    /// Links this process owns (unpinned runs: they end with it).
    links: Vec<ProgLink>,
    attached: Vec<Hook>,
    /// Why the BPF LSM checks (listen/accept) are not loaded, if they are not.
    lsm_unavailable: Option<String>,
    /// The sock_ops listen reporter is loaded (fallback without the LSM).
    sock_ops_loaded: bool,
}

/// How `listen()` is checked on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenCheck {
    /// BPF LSM `socket_listen`/`socket_accept`: violations are denied.
    Denied,
    /// `sock_ops` right after listen(): a violating listener is cut off
    /// (fenced, SOCK_DESTROY), not denied.
    Reported { why: String },
    /// Not checked at all.
    Unchecked { why: String },
}

pub const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether the BPF LSM is active (listed in /sys/kernel/security/lsm).
/// Mounts securityfs if it is not mounted yet.
pub fn bpf_lsm_active() -> Result<(), String> {
    let read = || std::fs::read_to_string(LSM_LIST);
    let list = match read() {
        Ok(l) => l,
        Err(_) => {
            // SAFETY: mount(2) with static, NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    c"securityfs".as_ptr(),
                    c"/sys/kernel/security".as_ptr(),
                    c"securityfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                debug!(
                    "loader: mounting securityfs: {}",
                    std::io::Error::last_os_error()
                );
            }
            read().map_err(|e| {
                format!("cannot read {LSM_LIST} ({e}), so the BPF LSM cannot be confirmed")
            })?
        }
    };
    if list.trim().split(',').any(|l| l == "bpf") {
        Ok(())
    } else {
        Err(format!(
            "the BPF LSM is not active (active LSMs: {}); boot with `lsm={},bpf` to enable it",
            list.trim(),
            list.trim()
        ))
    }
}

/// The policy maps, as a [`RuleSink`].
pub struct KernelMaps {
    names: HashMap<MapData, u32, PolicyName>,
    state: Array<MapData, State>,
    cgroups: HashMap<MapData, CgroupKey, CgroupValue>,
    policies: Array<MapData, PolicyRecord>,
    portsets: HashMap<MapData, PortChunkKey, PortChunk>,
    pub counters: std::sync::Arc<CounterMaps>,
}

/// Try to lift RLIMIT_MEMLOCK for kernels that still charge BPF memory to it
/// (before 5.11). Newer kernels charge memcg instead, so failing here (no
/// CAP_SYS_RESOURCE, e.g. in some containers) only matters on old kernels.
/// See https://lwn.net/Articles/837122/.
fn bump_memlock_rlimit() {
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

fn take<T>(
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
        let object: &[u8] = opts.object.as_deref().unwrap_or(OBJECT);
        let mut adoption = Adoption {
            object_sha256: sha2::Sha256::digest(object).into(),
            ..Adoption::default()
        };
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_V6ONLY_BIT, &v6only_bit, true)
            .override_global(GLOBAL_SOCK_OFFSETS, &offsets, true)
            .override_global(GLOBAL_USERLOCKS, &userlocks, true);
        // Sized from the same shapes that decide whether a pinned map fits.
        for name in [
            MAP_CGROUPS,
            MAP_POLICIES,
            MAP_PORTSETS,
            MAP_POLICY_COUNTERS,
            MAP_NAMES,
            MAP_EVENTS,
        ] {
            loader.map_max_entries(name, expected_shape(name, opts).2);
        }
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
                    crate::pins::move_pin(&pins.map(name), &pins.old_map(name)).map_err(
                        |source| LoaderError::Pin {
                            dir: pins.root().display().to_string(),
                            what: format!("moving the incompatible map {name} aside"),
                            source,
                        },
                    )?;
                    adoption.replaced.push(name);
                }
                // Reused when pinned there, created and pinned otherwise.
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = match loader.load(object) {
            Ok(e) => e,
            Err(e) => {
                // Put the pinned state back as it was: the previous programs
                // still run on the maps moved aside.
                if let Some(pins) = pins {
                    for name in &adoption.replaced {
                        let _ = std::fs::remove_file(pins.map(name));
                        if let Err(e) = crate::pins::move_pin(&pins.old_map(name), &pins.map(name))
                        {
                            warn!("loader: restoring the pinned map {name}: {e}");
                        }
                    }
                }
                return Err(LoaderError::Load(Box::new(e)));
            }
        };
        for (name, hook) in PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingProgram { name })?;
            let load_err = |source: ProgramError| LoaderError::ProgramLoad {
                name,
                hook: hook.name(),
                source: Box::new(source),
            };
            let res = match hook {
                Hook::PostBind4 | Hook::PostBind6 | Hook::SockCreate => {
                    let p: &mut CgroupSock = prog.try_into().map_err(load_err)?;
                    p.load()
                }
                _ => {
                    let p: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
                    p.load()
                }
            };
            res.map_err(load_err)?;
            debug!("loader: loaded {name}");
        }
        {
            let name = GUARD_PROGRAM;
            let load_err = |source: ProgramError| LoaderError::ProgramLoad {
                name,
                hook: "cgroup_skb/ingress",
                source: Box::new(source),
            };
            let prog = ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingProgram { name })?;
            let p: &mut CgroupSkb = prog.try_into().map_err(load_err)?;
            p.load().map_err(load_err)?;
            debug!("loader: loaded {name}");
        }
        {
            let name = FENCE_PROGRAM;
            let load_err = |source: ProgramError| LoaderError::ProgramLoad {
                name,
                hook: "cgroup/setsockopt",
                source: Box::new(source),
            };
            let prog = ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingProgram { name })?;
            let p: &mut CgroupSockopt = prog.try_into().map_err(load_err)?;
            p.load().map_err(load_err)?;
            debug!("loader: loaded {name}");
        }
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
        let events = take(&mut ebpf, MAP_EVENTS, RingBuf::try_from)?;
        let stamp = take(&mut ebpf, MAP_AGENT, Array::try_from)?;
        let lsm_unavailable = if offsets.valid == 0 {
            Some("kernel BTF lacks the socket layout the checks read".to_owned())
        } else {
            bpf_lsm_active()
                .and_then(|()| Self::load_lsm(&mut ebpf))
                .err()
        };
        let mut sock_ops_loaded = false;
        if let Some(why) = &lsm_unavailable {
            debug!("loader: BPF LSM unusable ({why}); loading the sock_ops listen reporter");
            match ebpf
                .program_mut(SOCK_OPS_PROGRAM)
                .ok_or(LoaderError::MissingProgram {
                    name: SOCK_OPS_PROGRAM,
                })
                .and_then(|p| {
                    let p: &mut SockOps =
                        p.try_into().map_err(|source| LoaderError::ProgramLoad {
                            name: SOCK_OPS_PROGRAM,
                            hook: "sock_ops",
                            source: Box::new(source),
                        })?;
                    p.load().map_err(|source| LoaderError::ProgramLoad {
                        name: SOCK_OPS_PROGRAM,
                        hook: "sock_ops",
                        source: Box::new(source),
                    })
                }) {
                Ok(()) => sock_ops_loaded = true,
                Err(e) => warn!("loader: {e}"),
            }
        }
        Ok(Self {
            ebpf,
            maps,
            events: Some(events),
            stamp,
            adoption,
            links: Vec::new(),
            attached: Vec::new(),
            lsm_unavailable,
            sock_ops_loaded,
        })
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

    fn load_lsm(ebpf: &mut Ebpf) -> Result<(), String> {
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

    /// The programs to attach, in order: every cgroup hook, then the LSM
    /// checks or (without the BPF LSM) the sock_ops listen reporter.
    fn wanted(&self) -> Vec<(&'static str, Kind, Hook)> {
        let mut v: Vec<(&'static str, Kind, Hook)> = PROGRAMS
            .iter()
            .map(|&(name, hook)| {
                let kind = match hook {
                    Hook::PostBind4 | Hook::PostBind6 | Hook::SockCreate => Kind::Sock,
                    _ => Kind::SockAddr,
                };
                (name, kind, hook)
            })
            .collect();
        // The fence's keeper: a socket a hook that cannot deny cut off (UDP
        // autobinds everywhere, listeners without the LSM) stays fenced.
        v.push((FENCE_PROGRAM, Kind::Sockopt, Hook::Setsockopt));
        if self.lsm_unavailable.is_none() {
            v.extend(LSM_PROGRAMS.iter().map(|&(n, _, h)| (n, Kind::Lsm, h)));
        } else if self.sock_ops_loaded {
            v.push((SOCK_OPS_PROGRAM, Kind::SockOps, Hook::Listen));
        }
        v
    }

    /// Attach one program to `file` with a new link.
    fn attach_new(
        &mut self,
        name: &'static str,
        kind: Kind,
        file: &File,
        cgroup: &Path,
    ) -> Result<ProgLink, LoaderError> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingProgram { name })?;
        let err = |source: ProgramError| LoaderError::Attach {
            name,
            hook: kind.hook_name(name),
            cgroup: cgroup.display().to_string(),
            source: Box::new(source),
        };
        let link_err = |source: LinkError| LoaderError::Link { name, source };
        // `Single` through bpf_link_create coexists with other programs on
        // the same cgroup (the kernel treats links as multi-attach).
        match kind {
            Kind::Sock => {
                let p: &mut CgroupSock = prog.try_into().map_err(err)?;
                let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::SockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::SockOps => {
                let p: &mut SockOps = prog.try_into().map_err(err)?;
                let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::Skb => {
                let p: &mut CgroupSkb = prog.try_into().map_err(err)?;
                let id = p
                    .attach(file, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                    .map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::Sockopt => {
                // aya 0.14 cannot turn a cgroup sockopt link into an FdLink
                // (to pin it): the link is made here.
                let p: &mut CgroupSockopt = prog.try_into().map_err(err)?;
                let fd = p.fd().map_err(err)?;
                bpfsys::link_create(fd.as_fd(), file.as_fd(), expected_attach_type(name))
                    .map(ProgLink::Own)
                    .map_err(|e| {
                        err(ProgramError::SyscallError(aya::sys::SyscallError {
                            call: "bpf_link_create",
                            io_error: e,
                        }))
                    })
            }
            Kind::Lsm => {
                let p: &mut LsmCgroup = prog.try_into().map_err(err)?;
                let id = p.attach(file).map_err(err)?;
                Ok(ProgLink::Aya(p.take_link(id).map_err(err)?.into()))
            }
        }
    }

    /// Attach every program to `cgroup` (the cgroup2 root), owned by this
    /// process: they detach when it exits. All or nothing: on error, the
    /// programs attached so far are detached again.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoaderError> {
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        for (name, kind, hook) in self.wanted() {
            match self.attach_new(name, kind, &file, cgroup) {
                Ok(link) => {
                    self.links.push(link);
                    self.attached.push(hook);
                }
                Err(e) if kind == Kind::Lsm || kind == Kind::SockOps => {
                    self.note_listen_failure(kind, &e);
                }
                Err(e) => {
                    self.links.clear();
                    self.attached.clear();
                    return Err(e);
                }
            }
        }
        info!(
            "loader: attached {} programs to {}",
            self.attached.len(),
            cgroup.display()
        );
        Ok(())
    }

    /// Attach the packet guard ([`GUARD_PROGRAM`]) to `cgroup` (the cgroup2
    /// root). It stays attached while the returned link lives, and is
    /// never pinned: it is only needed while this agent tracks a cut-off
    /// socket the fence and `SOCK_DESTROY` could not end.
    pub fn attach_packet_guard(&mut self, cgroup: &Path) -> Result<ProgLink, LoaderError> {
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        self.attach_new(GUARD_PROGRAM, Kind::Skb, &file, cgroup)
    }

    fn note_listen_failure(&mut self, kind: Kind, e: &LoaderError) {
        if kind == Kind::Lsm {
            // The other LSM program may be attached: listen() checks are
            // all or nothing, so say they are unavailable.
            self.attached
                .retain(|h| !matches!(h, Hook::Listen | Hook::Accept));
            self.lsm_unavailable = Some(e.to_string());
        } else {
            warn!("loader: {e}");
        }
    }

    /// Attach every program to `cgroup` through links pinned in `pins`, so
    /// they stay attached after the agent exits. A pinned link that is
    /// attached to `cgroup` with the right hook is switched to the newly
    /// loaded program in place (`BPF_LINK_UPDATE`: each call runs either the
    /// old or the new program, never neither); one attached elsewhere or
    /// defunct (its cgroup removed) is replaced; a missing one is created.
    /// Programs are pinned beside their links.
    pub fn attach_pinned(
        &mut self,
        cgroup: &Path,
        pins: &PinDir,
    ) -> Result<AttachReport, LoaderError> {
        let pin_err = |what: String| {
            let dir = pins.root().display().to_string();
            move |source: std::io::Error| LoaderError::Pin { dir, what, source }
        };
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let cgroup_id = file
            .metadata()
            .map_err(|source| LoaderError::OpenCgroup {
                path: cgroup.display().to_string(),
                source,
            })?
            .ino();
        let mut report = AttachReport::default();
        let wanted = self.wanted();
        for &(name, kind, hook) in &wanted {
            let path = pins.link(name);
            let pinned = match bpfsys::obj_get(&path) {
                Ok(fd) => Some(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                Err(e) => return Err(pin_err(format!("opening {}", path.display()))(e)),
            };
            let mismatch = match &pinned {
                None => None,
                Some(fd) => match bpfsys::link_info(fd.as_fd()) {
                    Ok(i)
                        if i.link_type == bpfsys::LINK_TYPE_CGROUP
                            && i.cgroup_id == cgroup_id
                            && i.attach_type == expected_attach_type(name) =>
                    {
                        None
                    }
                    Ok(i) if i.cgroup_id == 0 => {
                        Some("defunct (the cgroup it was attached to is gone)".to_owned())
                    }
                    Ok(i) => Some(format!(
                        "attached to cgroup id {} with attach type {} (expected cgroup id {}                          ({}) and attach type {})",
                        i.cgroup_id,
                        i.attach_type,
                        cgroup_id,
                        cgroup.display(),
                        expected_attach_type(name)
                    )),
                    Err(e) => Some(format!("unreadable ({e})")),
                },
            };
            match (pinned, mismatch) {
                (Some(link), None) => {
                    let prog = self
                        .ebpf
                        .program(name)
                        .ok_or(LoaderError::MissingProgram { name })?;
                    let prog_fd = prog.fd().map_err(|source| LoaderError::Attach {
                        name,
                        hook: kind.hook_name(name),
                        cgroup: cgroup.display().to_string(),
                        source: Box::new(source),
                    })?;
                    bpfsys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(pin_err(
                        format!("switching {} to the new program", path.display()),
                    ))?;
                    report.updated.push(name);
                }
                (old, why) => {
                    let link = match self.attach_new(name, kind, &file, cgroup) {
                        Ok(l) => l,
                        Err(e) if kind == Kind::Lsm || kind == Kind::SockOps => {
                            self.note_listen_failure(kind, &e);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if old.is_some() {
                        // Pin the replacement first, then swap the names:
                        // the wrong link is detached only once the right one
                        // runs.
                        let staged = pins.new_link(name);
                        let _ = std::fs::remove_file(&staged);
                        link.pin(&staged).map_err(|e| {
                            pin_err(format!("pinning {}", staged.display()))(std::io::Error::other(
                                e,
                            ))
                        })?;
                        crate::pins::move_pin(&staged, &path)
                            .map_err(pin_err(format!("replacing {}", path.display())))?;
                        let why = why.unwrap_or_default();
                        warn!(
                            "loader: pinned link {} was {why}; replaced by a new link on {}",
                            path.display(),
                            cgroup.display()
                        );
                        report.repaired.push((name, why));
                    } else {
                        link.pin(&path).map_err(|e| {
                            pin_err(format!("pinning {}", path.display()))(std::io::Error::other(e))
                        })?;
                        report.created.push(name);
                    }
                }
            }
            self.attached.push(hook);
            // The program pin follows the link.
            let prog_path = pins.prog(name);
            let _ = std::fs::remove_file(&prog_path);
            if let Some(p) = self.ebpf.program_mut(name)
                && let Err(e) = p.pin(&prog_path)
            {
                warn!("loader: pinning {}: {e}", prog_path.display());
            }
        }
        // Links of programs this agent does not attach (e.g. the sock_ops
        // reporter once the BPF LSM works): removing the pin detaches them.
        for name in program_names() {
            if self.attached_name(name, &wanted) {
                continue;
            }
            for path in [pins.link(name), pins.prog(name)] {
                if path.exists() {
                    std::fs::remove_file(&path)
                        .map_err(pin_err(format!("removing {}", path.display())))?;
                    report.removed.push(path.display().to_string());
                }
            }
        }
        info!(
            "loader: {} programs attached to {} through links pinned in {} ({} switched in \
             place, {} new, {} repaired)",
            self.attached.len(),
            cgroup.display(),
            pins.root().display(),
            report.updated.len(),
            report.created.len(),
            report.repaired.len()
        );
        Ok(report)
    }

    fn attached_name(&self, name: &str, wanted: &[(&'static str, Kind, Hook)]) -> bool {
        wanted
            .iter()
            .find(|(n, _, _)| *n == name)
            .is_some_and(|(_, _, h)| self.attached.contains(h))
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

/// A program's link to a cgroup: it detaches when dropped, unless pinned.
#[derive(Debug)]
pub enum ProgLink {
    Aya(FdLink),
    /// Made with [`bpfsys::link_create`].
    Own(std::os::fd::OwnedFd),
}

impl ProgLink {
    /// Pin the link at `path`: it stays attached after the agent exits.
    fn pin(self, path: &Path) -> Result<(), String> {
        match self {
            Self::Aya(l) => l.pin(path).map(drop).map_err(|e| e.to_string()),
            Self::Own(fd) => bpfsys::obj_pin(fd.as_fd(), path).map_err(|e| e.to_string()),
        }
    }
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sock,
    SockAddr,
    SockOps,
    Lsm,
    Skb,
    Sockopt,
}

impl Kind {
    fn hook_name(self, name: &str) -> &'static str {
        match self {
            Self::SockOps => "sock_ops",
            Self::Skb => "cgroup_skb/ingress",
            Self::Sockopt => "cgroup/setsockopt",
            Self::Lsm => LSM_PROGRAMS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or("lsm_cgroup", |(_, h, _)| h),
            _ => PROGRAMS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("cgroup", |(_, h)| h.name()),
        }
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SinkError {
    move |source| match &source {
        MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) =>
        {
            SinkError::Full { map }
        }
        _ => SinkError::Map { map, source },
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl KernelMaps {
    /// Sum the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, MapError> {
        self.counters.totals()
    }

    /// The live state, as the kernel sees it.
    pub fn state(&self) -> Result<State, MapError> {
        self.state.get(&0, 0)
    }

    /// A mirror of what the (adopted) policy maps hold, for the applier to
    /// continue from.
    pub fn read_back(&self, caps: Capacity) -> Result<Applier, MapError> {
        let cgroups = self.cgroups.iter().collect::<Result<Vec<_>, _>>()?;
        let chunks = self.portsets.iter().collect::<Result<Vec<_>, _>>()?;
        let state = self.state()?;
        Ok(Applier::from_kernel(
            caps,
            state,
            cgroups,
            |i| self.policies.get(&i, 0).ok(),
            chunks,
        ))
    }

    /// Policy names a previous agent recorded (id -> name).
    pub fn names(&self) -> Vec<(u32, String)> {
        self.names
            .iter()
            .filter_map(Result::ok)
            .map(|(id, n)| (id, name_text(&n)))
            .collect()
    }

    /// Record the name of a policy id (longer names are cut; events from
    /// before a restart then carry the cut name).
    pub fn put_name(&mut self, id: u32, name: &str) -> Result<(), SinkError> {
        let mut v = PolicyName {
            len: 0,
            _pad: 0,
            bytes: [0; POLICY_NAME_MAX],
        };
        let mut len = name.len().min(POLICY_NAME_MAX);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        v.bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        v.len = len as u32;
        self.names.insert(id, v, 0).map_err(map_err(MAP_NAMES))
    }

    pub fn del_name(&mut self, id: u32) -> Result<(), SinkError> {
        match self.names.remove(&id) {
            Err(e) if !is_not_found(&e) => Err(map_err(MAP_NAMES)(e)),
            _ => Ok(()),
        }
    }
}

impl RuleSink for KernelMaps {
    fn put_chunk(&mut self, key: PortChunkKey, chunk: &PortChunk) -> Result<(), SinkError> {
        self.portsets
            .insert(key, chunk, 0)
            .map_err(map_err(MAP_PORTSETS))
    }

    fn del_chunk(&mut self, key: PortChunkKey) -> Result<(), SinkError> {
        match self.portsets.remove(&key) {
            Err(e) if !is_not_found(&e) => Err(map_err(MAP_PORTSETS)(e)),
            _ => Ok(()),
        }
    }

    fn put_policy(&mut self, index: u32, record: &PolicyRecord) -> Result<(), SinkError> {
        self.policies
            .set(index, record, 0)
            .map_err(map_err(MAP_POLICIES))
    }

    fn put_cgroup(&mut self, key: CgroupKey, value: CgroupValue) -> Result<(), SinkError> {
        self.cgroups
            .insert(key, value, 0)
            .map_err(map_err(MAP_CGROUPS))
    }

    fn del_cgroup(&mut self, key: CgroupKey) -> Result<(), SinkError> {
        match self.cgroups.remove(&key) {
            Err(e) if !is_not_found(&e) => Err(map_err(MAP_CGROUPS)(e)),
            _ => Ok(()),
        }
    }

    fn put_state(&mut self, state: &State) -> Result<(), SinkError> {
        self.state.set(0, state, 0).map_err(map_err(MAP_STATE))
    }

    /// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()`: cgroup
    /// programs run under `rcu_read_lock()`, so when it returns every
    /// program that started before has finished, even one preempted for a
    /// long time on a busy host.
    fn wait_for_readers(&mut self) -> bool {
        const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
        // SAFETY: membarrier takes no pointers.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if r != 0 {
            debug!(
                "loader: membarrier(MEMBARRIER_CMD_GLOBAL): {}",
                std::io::Error::last_os_error()
            );
        }
        r == 0
    }
}

/// What pinned state holds, read without an agent (`portguard status` when
/// none answers).
#[derive(Clone, Debug, Default)]
pub struct PinnedView {
    pub stamp: Option<AgentStamp>,
    /// (program, link id, program id, cgroup id; 0 = defunct).
    pub links: Vec<(String, u32, u32, u64)>,
    /// Live generation's policies: (id, name, mode, slot, decisions).
    pub policies: Vec<(u32, String, u8, u32, Decisions)>,
    /// Live generation's governed cgroups: (cgroup id, policy id).
    pub cgroups: Vec<(u64, u32)>,
    pub events_lost: u64,
}

/// Read the pinned maps and links in `pins` (read-only; takes no lock).
pub fn read_pinned(pins: &Path) -> Result<PinnedView, String> {
    let map = |name: &str| -> Result<Map, String> {
        let path = pins.join("maps").join(name);
        let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(match name {
            MAP_CGROUPS | MAP_PORTSETS | MAP_NAMES => Map::HashMap(data),
            MAP_COUNTERS | MAP_POLICY_COUNTERS => Map::PerCpuArray(data),
            _ => Map::Array(data),
        })
    };
    let err = |e: MapError| e.to_string();
    let mut view = PinnedView {
        stamp: read_stamp(&pins.join("maps").join(MAP_AGENT)),
        ..PinnedView::default()
    };
    for name in program_names() {
        let path = pins.join("links").join(name);
        if let Ok(fd) = bpfsys::obj_get(&path)
            && let Ok(i) = bpfsys::link_info(fd.as_fd())
        {
            view.links
                .push((name.to_owned(), i.id, i.prog_id, i.cgroup_id));
        }
    }
    let state: Array<MapData, State> = Array::try_from(map(MAP_STATE)?).map_err(err)?;
    let state = state.get(&0, 0).map_err(err)?;
    let live = state.generation & 1;
    let cgroups: HashMap<MapData, CgroupKey, CgroupValue> =
        HashMap::try_from(map(MAP_CGROUPS)?).map_err(err)?;
    let records: Array<MapData, PolicyRecord> = Array::try_from(map(MAP_POLICIES)?).map_err(err)?;
    let names: HashMap<MapData, u32, PolicyName> =
        HashMap::try_from(map(MAP_NAMES)?).map_err(err)?;
    let counters = CounterMaps {
        hooks: PerCpuArray::try_from(map(MAP_COUNTERS)?).map_err(err)?,
        policies: PerCpuArray::try_from(map(MAP_POLICY_COUNTERS)?).map_err(err)?,
    };
    view.events_lost = counters.events_lost().map_err(err)?;
    let mut seen = std::collections::BTreeSet::new();
    for entry in cgroups.iter() {
        let (k, v) = entry.map_err(err)?;
        if k.generation != live {
            continue;
        }
        let Ok(rec) = records.get(&v.policy_index, 0) else {
            continue;
        };
        view.cgroups.push((k.cgroup_id, rec.policy_id));
        if seen.insert(rec.policy_id) {
            let name = names
                .get(&rec.policy_id, 0)
                .map_or_else(|_| format!("policy #{}", rec.policy_id), |n| name_text(&n));
            let decisions = counters.by_slot(rec.slot).unwrap_or_default();
            view.policies
                .push((rec.policy_id, name, rec.mode, rec.slot, decisions));
        }
    }
    Ok(view)
}
