//! Where workloads are and what they hold: the cgroup2 hierarchy
//! ([`cgroupfs`]), the kubelet's and systemd's layouts and the identity they
//! give a cgroup ([`identity`]), which cgroups each policy governs
//! ([`resolve`]; offline, for a cgroup an event log names: [`recorded`]),
//! the CRI runtime that names pods and containers ([`cri`]),
//! and the sockets of governed processes, listed and ended with sock_diag
//! ([`sockets`]).

pub mod cgroupfs;
pub mod cri;
pub mod identity;
pub mod recorded;
pub mod resolve;
pub mod sockets;
