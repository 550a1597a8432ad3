//! The kernel maps the planner writes through ([`KernelMaps`] implements
//! [`crate::apply::RuleSink`]), reading them back after a restart, and the
//! policy id-to-name map.

use aya::maps::{Array, HashMap, MapData, MapError};
use log::debug;
use portguard_common::{
    CgroupKey, CgroupValue, MAP_CGROUPS, MAP_NAMES, MAP_POLICIES, MAP_PORTSETS, MAP_STATE,
    POLICY_NAME_MAX, PolicyName, PolicyRecord, PortChunk, PortChunkKey, State,
};

use crate::apply::{Applier, Capacity, RuleSink, SinkError};

use super::*;

/// The policy maps, as a [`RuleSink`].
pub struct KernelMaps {
    pub(super) names: HashMap<MapData, u32, PolicyName>,
    pub(super) state: Array<MapData, State>,
    pub(super) cgroups: HashMap<MapData, CgroupKey, CgroupValue>,
    pub(super) policies: Array<MapData, PolicyRecord>,
    pub(super) portsets: HashMap<MapData, PortChunkKey, PortChunk>,
    pub counters: std::sync::Arc<CounterMaps>,
}

/// The text of a [`PolicyName`] map value.
pub(super) fn name_text(n: &PolicyName) -> String {
    let len = (n.len as usize).min(POLICY_NAME_MAX);
    String::from_utf8_lossy(&n.bytes[..len]).into_owned()
}

pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SinkError {
    move |source| match &source {
        MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) =>
        {
            SinkError::Full { map }
        }
        _ => SinkError::Map {
            map,
            source: Box::new(source),
        },
    }
}

pub(super) fn is_not_found(e: &MapError) -> bool {
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

    /// The id of the policy the live generation gives cgroup `cgroup_id`
    /// itself (not an ancestor), if any: what the kernel enforces there.
    pub fn policy_of(&self, cgroup_id: u64) -> Result<Option<u32>, MapError> {
        let generation = self.state()?.generation;
        let key = CgroupKey {
            cgroup_id,
            generation,
            _pad: 0,
        };
        match self.cgroups.get(&key, 0) {
            Ok(v) => Ok(Some(self.policies.get(&v.policy_index, 0)?.policy_id)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
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

    /// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()` while
    /// more than one CPU is online: cgroup programs run under
    /// `rcu_read_lock()`, so when it returns every program that started
    /// before has finished, even one preempted for a long time on a busy
    /// host. With one CPU online the kernel returns at once without it
    /// (`kernel/sched/membarrier.c`), which is no barrier where RCU readers
    /// can be preempted: then this answers false.
    fn wait_for_readers(&mut self) -> bool {
        membarrier_global()
    }

    /// The same barrier, needing nothing of the maps: it may run on a
    /// thread of its own.
    fn reader_barrier(&self) -> Option<fn() -> bool> {
        Some(membarrier_global)
    }
}

/// `membarrier(MEMBARRIER_CMD_GLOBAL)`; false if the kernel refused it
/// (nohz_full), or if one CPU was online before or after it (the kernel
/// then skips `synchronize_rcu()`).
fn membarrier_global() -> bool {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    let several = || {
        // SAFETY: sysconf takes no pointers.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        online > 1
    };
    if !several() {
        return false;
    }
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        debug!(
            "loader: membarrier(MEMBARRIER_CMD_GLOBAL): {}",
            std::io::Error::last_os_error()
        );
    }
    r == 0 && several()
}
