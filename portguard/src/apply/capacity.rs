//! How many entries each policy map holds ([`Capacity`]): set by flags,
//! checked by the planner before it writes anything.

/// Map capacities, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Governed cgroups per generation.
    pub cgroups: u32,
    /// Policies per generation.
    pub policies: u32,
    /// 512-port chunks across all port sets.
    pub chunks: u32,
}

impl Capacity {
    /// `max_entries` of each map for these capacities.
    pub const fn cgroup_map_entries(&self) -> u32 {
        self.cgroups * 2
    }
    pub const fn policy_map_entries(&self) -> u32 {
        self.policies * 2
    }
}
