//! Thin aya layer: load the kernel object with maps sized for this host,
//! attach every hook to the cgroup2 root, and expose the maps as a
//! [`RuleSink`], the event ring buffer and the counters.
//!
//! Order matters and is the caller's: load, apply the first policy into the
//! maps, and only then [`Loaded::attach`], so no hook ever runs on half-written
//! state. Dropping [`Loaded`] detaches every program (aya links are fds).

use std::{fs::File, path::Path};

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, LsmCgroup, ProgramError, SockOps},
};
use log::{debug, info, warn};
use portguard_common::{
    COUNTER_EVENTS_LOST, CgroupKey, CgroupValue, DECISION_ALLOW, DECISION_AUDIT, DECISION_DENY,
    DECISION_REPORTED, DECISIONS, GLOBAL_SOCK_OFFSETS, GLOBAL_V6ONLY_BIT, HOOKS, Hook,
    LSM_PROGRAMS, MAP_CGROUPS, MAP_COUNTERS, MAP_EVENTS, MAP_POLICIES, MAP_POLICY_COUNTERS,
    MAP_PORTSETS, MAP_STATE, PROGRAMS, PolicyRecord, PortChunk, PortChunkKey, SOCK_OPS_PROGRAM,
    SockOffsets, State, V6ONLY_UNKNOWN, hook_counter, policy_counter,
};

use crate::{
    kernel_btf::{VMLINUX_BTF, ipv6only_bit_offset, sock_offsets},
    rules_map::{Capacity, RuleSink, SinkError},
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
}

/// Sizes chosen at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub capacity: Capacity,
    /// Event ring buffer size in bytes (power of two, >= page size).
    pub ring_buffer_bytes: u32,
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
    /// `sock_ops` after the fact: violations are reported, not denied.
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
    conv: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, LoaderError> {
    let map = ebpf
        .take_map(name)
        .ok_or(LoaderError::MissingMap { name })?;
    conv(map).map_err(|source| LoaderError::Map { name, source })
}

impl Loaded {
    /// Load the object and its programs (nothing is attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self, LoaderError> {
        let rb = opts.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() {
            return Err(LoaderError::RingBufferSize { bytes: rb });
        }
        bump_memlock_rlimit();
        let caps = opts.capacity;
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
        let offsets = match sock_offsets(Path::new(VMLINUX_BTF)) {
            Ok(o) => o,
            Err(e) => {
                warn!("loader: {e}");
                SockOffsets::default()
            }
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_V6ONLY_BIT, &v6only_bit, true)
            .override_global(GLOBAL_SOCK_OFFSETS, &offsets, true)
            .map_max_entries(MAP_CGROUPS, caps.cgroup_map_entries().max(1))
            .map_max_entries(MAP_POLICIES, caps.policy_map_entries().max(1))
            .map_max_entries(MAP_PORTSETS, caps.chunks.max(1))
            .map_max_entries(MAP_POLICY_COUNTERS, caps.policies.max(1) * DECISIONS)
            .map_max_entries(MAP_EVENTS, rb)
            .load(OBJECT)
            .map_err(|e| LoaderError::Load(Box::new(e)))?;
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
        let maps = KernelMaps {
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

    /// Attach every program to `cgroup` (the cgroup2 root). All or nothing:
    /// on error, the programs attached so far are detached again.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoaderError> {
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let mut links = Vec::new();
        for (name, hook) in PROGRAMS {
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingProgram { name })?;
            let attach_err = |source: ProgramError| LoaderError::Attach {
                name,
                hook: hook.name(),
                cgroup: cgroup.display().to_string(),
                source: Box::new(source),
            };
            // `Single` through bpf_link_create coexists with other programs
            // on the same cgroup (the kernel treats links as multi-attach).
            let res = match hook {
                Hook::PostBind4 | Hook::PostBind6 | Hook::SockCreate => {
                    let p: &mut CgroupSock = prog.try_into().map_err(attach_err)?;
                    p.attach(&file, CgroupAttachMode::Single)
                        .map(|id| LinkId::Sock(name, id))
                }
                _ => {
                    let p: &mut CgroupSockAddr = prog.try_into().map_err(attach_err)?;
                    p.attach(&file, CgroupAttachMode::Single)
                        .map(|id| LinkId::SockAddr(name, id))
                }
            };
            match res {
                Ok(id) => links.push(id),
                Err(source) => {
                    self.detach_links(links);
                    return Err(attach_err(source));
                }
            }
            self.attached.push(hook);
        }
        if self.lsm_unavailable.is_none() {
            for (name, lsm_hook, hook) in LSM_PROGRAMS {
                let res = self
                    .ebpf
                    .program_mut(name)
                    .ok_or(LoaderError::MissingProgram { name })
                    .and_then(|prog| {
                        let p: &mut LsmCgroup =
                            prog.try_into().map_err(|source: ProgramError| {
                                LoaderError::Attach {
                                    name,
                                    hook: lsm_hook,
                                    cgroup: cgroup.display().to_string(),
                                    source: Box::new(source),
                                }
                            })?;
                        p.attach(&file).map_err(|source| LoaderError::Attach {
                            name,
                            hook: lsm_hook,
                            cgroup: cgroup.display().to_string(),
                            source: Box::new(source),
                        })
                    });
                match res {
                    Ok(_) => self.attached.push(hook),
                    Err(e) => {
                        self.lsm_unavailable = Some(e.to_string());
                        break;
                    }
                }
            }
        } else if self.sock_ops_loaded {
            let res = self
                .ebpf
                .program_mut(SOCK_OPS_PROGRAM)
                .ok_or(LoaderError::MissingProgram {
                    name: SOCK_OPS_PROGRAM,
                })
                .and_then(|prog| {
                    let attach_err = |source: ProgramError| LoaderError::Attach {
                        name: SOCK_OPS_PROGRAM,
                        hook: "sock_ops",
                        cgroup: cgroup.display().to_string(),
                        source: Box::new(source),
                    };
                    let p: &mut SockOps = prog.try_into().map_err(attach_err)?;
                    p.attach(&file, CgroupAttachMode::Single)
                        .map_err(attach_err)
                });
            match res {
                Ok(_) => self.attached.push(Hook::Listen),
                Err(e) => warn!("loader: {e}"),
            }
        }
        info!(
            "loader: attached {} programs to {}",
            self.attached.len(),
            cgroup.display()
        );
        Ok(())
    }

    fn detach_links(&mut self, links: Vec<LinkId>) {
        for link in links {
            let res = match link {
                LinkId::Sock(name, id) => self
                    .ebpf
                    .program_mut(name)
                    .and_then(|p| <&mut CgroupSock>::try_from(p).ok())
                    .map(|p| p.detach(id)),
                LinkId::SockAddr(name, id) => self
                    .ebpf
                    .program_mut(name)
                    .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
                    .map(|p| p.detach(id)),
            };
            if let Some(Err(e)) = res {
                warn!("loader: detaching after a failed attach: {e}");
            }
        }
        self.attached.clear();
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

enum LinkId {
    Sock(&'static str, aya::programs::cgroup_sock::CgroupSockLinkId),
    SockAddr(
        &'static str,
        aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    ),
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
}
