//! `portguard hook ...`: what runs portguard from inside another program's
//! start-up so that a workload is governed before its first instruction.
//! [`systemd`] writes and removes the systemd drop-ins that run
//! `portguard hook unit` in a service's `ExecStartPre=`.

pub mod systemd;
