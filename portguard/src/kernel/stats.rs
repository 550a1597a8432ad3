//! What this agent's programs cost (`portguard run --program-stats`): the
//! kernel's own run statistics of each program this agent loaded (runs and
//! nanoseconds, `run_cnt` and `run_time_ns` of `bpf_prog_info`).
//!
//! The kernel counts them only while run-time statistics are enabled, and
//! then for every BPF program on the host (a clock read around each run, some
//! tens of nanoseconds): [`ProgramStats::enable`] holds the `BPF_ENABLE_STATS`
//! fd for the agent's lifetime, and closing it (the agent exiting) turns the
//! counting off again unless someone else holds one too.
//!
//! A program is one kernel object however many cgroups it is attached to
//! (the decision programs have a link per attach point), so its counts
//! already cover every attach point. The fds are duplicated here, so the
//! /metrics and status endpoints read the statistics themselves, off the
//! agent's loop: one `BPF_OBJ_GET_INFO_BY_FD` per program.

use std::os::fd::{AsFd as _, OwnedFd};

use aya::sys::{Stats, enable_stats};

use super::{Loaded, bpfsys};

/// One program's cost so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    /// The program's label: its name without the `portguard_` prefix (the
    /// hook it serves: `bind4`, `post_bind6`, `listen`, `sock_ops`, ...).
    pub program: String,
    /// The kernel's id of the program (`bpftool prog show id N`).
    pub id: u32,
    /// Runs counted while statistics were on.
    pub runs: u64,
    /// Nanoseconds spent in those runs.
    pub run_ns: u64,
}

/// The run statistics of this agent's loaded programs, kept on while this
/// lives.
pub struct ProgramStats {
    /// Holding it keeps the kernel counting (`BPF_STATS_RUN_TIME`).
    _enabled: OwnedFd,
    programs: Vec<(String, OwnedFd)>,
}

impl std::fmt::Debug for ProgramStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramStats")
            .field("programs", &self.programs.len())
            .finish()
    }
}

impl ProgramStats {
    /// Turn run-time statistics on (kernel 5.8+, CAP_SYS_ADMIN) and keep a
    /// handle on every program `loaded` holds (those the kernel accepted;
    /// the LSM or sock_ops ones may not be).
    pub fn enable(loaded: &Loaded) -> Result<Self, String> {
        let enabled = enable_stats(Stats::RunTime).map_err(|e| {
            format!(
                "--program-stats: the kernel would not enable BPF run-time statistics \
                 (BPF_ENABLE_STATS needs kernel 5.8 and CAP_SYS_ADMIN): {e}"
            )
        })?;
        let mut programs = Vec::new();
        for (name, prog) in loaded.ebpf.programs() {
            let Ok(fd) = prog.fd() else {
                continue; // not loaded on this kernel
            };
            let fd = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("--program-stats: duplicating the fd of {name}: {e}"))?;
            programs.push((label(name), fd));
        }
        programs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            _enabled: enabled,
            programs,
        })
    }

    /// Each program's runs and run time, now.
    pub fn read(&self) -> std::io::Result<Vec<ProgramCost>> {
        self.programs
            .iter()
            .map(|(program, fd)| {
                let s = bpfsys::prog_run_stats(fd.as_fd())?;
                Ok(ProgramCost {
                    program: program.clone(),
                    id: s.id,
                    runs: s.runs,
                    run_ns: s.run_ns,
                })
            })
            .collect()
    }
}

/// A program's label: its name without the `portguard_` prefix.
fn label(name: &str) -> String {
    name.strip_prefix("portguard_").unwrap_or(name).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_hooks() {
        for (name, hook) in portguard_common::PROGRAMS {
            assert_eq!(label(name), hook.name());
        }
        for (name, _, hook) in portguard_common::LSM_PROGRAMS {
            assert_eq!(label(name), hook.name());
        }
        assert_eq!(label(portguard_common::SOCK_OPS_PROGRAM), "sock_ops");
        assert_eq!(label(portguard_common::GUARD_PROGRAM), "ingress");
        assert_eq!(label(portguard_common::FENCE_PROGRAM), "setsockopt");
    }
}
