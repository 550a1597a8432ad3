//! The dispatch floor: what the kernel charges for running *a* program on
//! each hook an allowed bind or connect runs, before any portguard logic.
//!
//! An empty program (`r0 = 1; exit`: allow) is loaded for each of those
//! hooks (`sock_create`, `bind4`, `post_bind4`, `connect4`) and attached,
//! through links that end with this value, to the floor setup's own
//! cgroup. Measured like every other setup (pairs against the baseline, and
//! back to back against Landlock), it tells how much of portguard's cost is
//! the kernel's cgroup-program dispatch, which no program can avoid, and
//! how much is portguard's own work: portguard's figure less the floor's.
//! bpf_stats of the empty programs, likewise, is the stats' own clock
//! reading per run, the least any program shows there.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use crate::runner::{ProgramCost, one_run};
use portguard::kernel::bpfsys::{
    attach_type, link_create, prog_load, prog_run_stats,
    prog_type::{CGROUP_SOCK, CGROUP_SOCK_ADDR},
};

/// The hooks an allowed bind (`socket` + `bind` + `close`, TCP) and an
/// allowed connect (`socket` + `connect` + `close`, UDP) run portguard
/// programs on (section 1's breakdown lists the same ones).
const HOOKS: [(&str, u32, u32); 4] = [
    ("sock_create", CGROUP_SOCK, attach_type::INET_SOCK_CREATE),
    ("bind4", CGROUP_SOCK_ADDR, attach_type::INET4_BIND),
    ("post_bind4", CGROUP_SOCK, attach_type::INET4_POST_BIND),
    ("connect4", CGROUP_SOCK_ADDR, attach_type::INET4_CONNECT),
];

/// Empty programs attached to one cgroup; detached when dropped (the links
/// are this value's only references).
pub(crate) struct Floor {
    /// (hook name, program, link).
    progs: Vec<(&'static str, OwnedFd, OwnedFd)>,
}

/// Load `r0 = 1; exit` as a program of `prog_type` for `attach`.
fn load_empty(prog_type: u32, attach: u32, name: &str) -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K (r0 = 1), then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    prog_load(prog_type, attach, name, &insns)
}

impl Floor {
    /// Attach an empty program on each hook of [`HOOKS`] to `cgroup`.
    pub(crate) fn attach(cgroup: &Path) -> Self {
        let cg = File::open(cgroup).expect("opening the floor cgroup");
        let progs = HOOKS
            .iter()
            .map(|&(hook, prog_type, attach)| {
                let prog = load_empty(prog_type, attach, &format!("pgfloor_{hook}"))
                    .unwrap_or_else(|e| panic!("loading the empty {hook} program: {e}"));
                let link = link_create(prog.as_fd(), cg.as_fd(), attach)
                    .unwrap_or_else(|e| panic!("attaching the empty {hook} program: {e}"));
                (hook, prog, link)
            })
            .collect();
        Self { progs }
    }

    /// Each empty program's (runs, ns) so far (bpf_stats).
    fn snapshot(&self) -> Vec<(u64, u64)> {
        self.progs
            .iter()
            .map(|(_, p, _)| prog_run_stats(p.as_fd()).map_or((0, 0), |s| (s.runs, s.run_ns)))
            .collect()
    }

    /// Each empty program's own run time (ns) and runs per operation while
    /// one extra run of `op` goes in `cg` (kernel.bpf_stats_enabled), for
    /// the hooks that ran: as [`crate::runner::program_breakdown`] gives
    /// portguard's.
    pub(crate) fn breakdown(&self, cg: &Path, op: &str, iters: u64) -> Vec<ProgramCost> {
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enabling bpf_stats");
        let before = self.snapshot();
        one_run(cg, op, iters);
        let after = self.snapshot();
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        let per_op = |n: u64| n as f64 / iters as f64;
        self.progs
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a.0 > b.0)
            .map(|((hook, _, _), (b, a))| {
                ((*hook).to_owned(), per_op(a.1 - b.1), per_op(a.0 - b.0))
            })
            .collect()
    }
}
