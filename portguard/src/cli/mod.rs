//! Command-line interface. Doc comments here are the `--help` text.

pub mod check;
pub mod events;
pub mod hook;
pub mod learn;
pub mod replay;
pub mod report;
pub mod run;
pub mod status;
pub mod uninstall;
pub mod why;

pub use check::{CheckArgs, CheckFormat};
pub use learn::LearnArgs;
pub use run::{MetricsAddr, PinDirArg, RunArgs};
pub use status::StatusArgs;
pub use uninstall::UninstallArgs;
pub use why::WhyArgs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kernel-enforced port policy for cgroups.
///
/// portguard attaches cgroup eBPF programs (bind, post_bind, connect, sendmsg;
/// IPv4 and IPv6) where its policies govern (the parent of each governed
/// cgroup; listen checks on the cgroup2 root) and keeps the processes of each
/// governed cgroup (a container, a pod, a systemd service, any cgroup and everything
/// below it) from binding, and optionally connecting to, ports outside the
/// policy's allowed set. Every denial is reported as a JSON line.
///
/// `run` enforces; `check` validates a policy file (and, with --manifests,
/// holds deployment manifests against it); `status` shows what the
/// running agent enforces; `events` reads and summarises the event log;
/// `learn` watches a workload and writes its policy; `replay` shows what a
/// candidate policy would change for the decisions an event log recorded;
/// `why` says why an operation of a workload is denied and what would allow
/// it; `report --policy-report` renders the event log as Kubernetes
/// PolicyReport objects; `hook` governs a
/// container or unit before its first instruction (an OCI runtime hook, a
/// systemd `ExecStartPre=`); `uninstall` removes the pinned programs, links
/// and maps that keep enforcing after the agent stops, and the hooks.
///
/// Agent logs go to standard error; set RUST_LOG (e.g. RUST_LOG=debug) to
/// change their level.
#[derive(Debug, Parser)]
#[command(name = "portguard", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(Box<RunArgs>),
    Check(CheckArgs),
    Learn(LearnArgs),
    Replay(replay::ReplayArgs),
    Status(StatusArgs),
    Events(events::EventsArgs),
    Report(report::ReportArgs),
    Hook(hook::HookArgs),
    Uninstall(UninstallArgs),
    Why(Box<WhyArgs>),
}

impl Cli {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(a) => run::execute(a),
            Command::Check(a) => check::execute(a),
            Command::Learn(a) => learn::execute(a),
            Command::Replay(a) => replay::execute(&a),
            Command::Status(a) => status::execute(a),
            Command::Events(a) => events::run(&a),
            Command::Report(a) => report::run(&a),
            Command::Hook(a) => hook::execute(a),
            Command::Uninstall(a) => uninstall::execute(a),
            Command::Why(a) => why::execute(*a),
        }
    }
}
