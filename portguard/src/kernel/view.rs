//! The offline view of pinned state (`portguard status` without an agent,
//! `uninstall`): read-only, takes no lock.

use std::{os::fd::AsFd, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use portguard_common::{
    AgentStamp, CgroupKey, CgroupValue, MAP_AGENT, MAP_CGROUPS, MAP_COUNTERS, MAP_NAMES,
    MAP_POLICIES, MAP_POLICY_COUNTERS, MAP_PORTSETS, MAP_STATE, PolicyName, PolicyRecord,
    STAMP_MAGIC, State,
};

use crate::{
    kernel::bpfsys::{self},
    kernel::pins::program_names,
};

use super::*;

/// Read the version stamp pinned at `path`.
pub fn read_stamp(path: &Path) -> Option<AgentStamp> {
    let data = MapData::from_pin(path).ok()?;
    let map: Array<MapData, AgentStamp> = Array::try_from(Map::Array(data)).ok()?;
    map.get(&0, 0).ok().filter(|s| s.magic == STAMP_MAGIC)
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
    // The host-wide links, then the decision programs' on each attach
    // point (`cg<cgroup id>-<program>`).
    let mut pinned: Vec<(String, std::path::PathBuf)> = program_names()
        .map(|name| (name.to_owned(), pins.join("links").join(name)))
        .collect();
    let mut points: Vec<_> = std::fs::read_dir(pins.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let (_, program) = pins::parse_point_link(&file)?;
            (!file.ends_with("-new")).then(|| (program.to_owned(), e.path()))
        })
        .collect();
    points.sort();
    pinned.extend(points);
    for (name, path) in pinned {
        if let Ok(fd) = bpfsys::obj_get(&path)
            && let Ok(i) = bpfsys::link_info(fd.as_fd())
        {
            view.links.push((name, i.id, i.prog_id, i.cgroup_id));
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
