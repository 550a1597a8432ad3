//! `portguard hook`: the runtime hooks that close the start window, and
//! installing them.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Subcommand};

use crate::hook::{self, HookOptions, OnFailure, install, systemd};

/// Govern a container or a unit before its first instruction.
///
/// Without a hook, the agent governs a new container or unit when it
/// notices its cgroup: a race it usually wins by milliseconds, not by
/// construction. A hook runs after the cgroup exists and before the first
/// instruction (an OCI runtime's `createRuntime` stage; a unit's
/// `ExecStartPre=`), asks the agent over its status socket to govern that
/// cgroup with the policy that selects it, and lets the start go on only
/// once the kernel maps say so.
///
/// When the agent does not answer within --timeout (stopped, starved of
/// CPU, not running), `--on-failure` decides: `closed` fails the start,
/// `open` lets it go on; either way the failure is printed on standard
/// error (the runtime's log) and reported by the agent as a
/// `"verdict": "hook_failed"` event when it runs again.
#[derive(Debug, Args)]
pub struct HookArgs {
    #[command(subcommand)]
    pub command: HookCommand,
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    Oci(OciArgs),
    Unit(UnitArgs),
    Install(InstallArgs),
    Uninstall(UninstallHooksArgs),
}

/// How to reach the agent, shared by the hooks.
#[derive(Debug, Args)]
pub struct AgentLink {
    /// The agent's --status-socket.
    #[arg(long, value_name = "PATH", default_value = crate::observe::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The longest the hook waits for the agent's answer before failing
    /// (e.g. 1s, 500ms). The workload's start waits this long at most.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// The OCI runtime hook (run by runc/crun at `createRuntime`, with the
/// container's state on standard input).
///
/// Install it with `portguard hook install --containerd` (containerd 1.6
/// and 1.7, through `base_runtime_spec`) or `--crio` (CRI-O's hooks.d).
/// Exit status 0: the container may start (governed, or failing open);
/// 1: it must not (failing closed).
#[derive(Debug, Args)]
pub struct OciArgs {
    #[command(flatten)]
    pub link: AgentLink,
    /// When the agent cannot confirm the container is governed: `auto`
    /// fails closed for a container of a pod that a `pods:` policy may
    /// select (by the list of selected pods and namespaces the agent keeps
    /// next to its socket), open for anything else; `closed`; `open`.
    #[arg(long, value_enum, default_value = "auto")]
    pub on_failure: OnFailure,
    /// Containers of pods in this namespace fail open, whatever
    /// --on-failure says (repeatable). Name the agent's own namespace
    /// (the DaemonSet's `portguard-system`): a stopped agent must be able
    /// to start again.
    #[arg(long, value_name = "NAMESPACE")]
    pub fail_open_namespace: Vec<String>,
    /// Whose annotations name the pod and container: `containerd`
    /// (`io.kubernetes.cri.*`), `crio`, or `auto` (CRI-O's when present).
    /// `hook install` sets it: on CRI-O a pod's own annotations are copied
    /// into the state too, so only the runtime's own keys are trusted.
    #[arg(long, value_enum, default_value = "auto")]
    pub runtime: hook::oci::Runtime,
}

/// The systemd unit hook: governs its own cgroup, so run it from the
/// unit's `ExecStartPre=+` (portguard writes that drop-in: `portguard hook
/// install --systemd POLICY`).
///
/// Exit status 0: the unit may start (governed, or failing open); 1: it
/// must not.
#[derive(Debug, Args)]
pub struct UnitArgs {
    #[command(flatten)]
    pub link: AgentLink,
    /// When the agent cannot confirm the unit is governed (`auto` is
    /// `closed`: the drop-in exists only for units a policy names).
    #[arg(long, value_enum, default_value = "auto")]
    pub on_failure: OnFailure,
    /// The unit (`%n` in the drop-in), for messages and events.
    pub unit: String,
}

/// Install the hooks: the OCI hook for containerd or CRI-O, the systemd
/// drop-ins for the units a policy names (and print what else to do).
/// Idempotent: running it again changes nothing.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Write a drop-in running `portguard hook unit` in `ExecStartPre=+`
    /// for each `.service` this policy file's `unit:` selectors name, and
    /// remove portguard's drop-ins for units it no longer names. Then run
    /// `systemctl daemon-reload` (the command does when systemd runs).
    #[arg(long, value_name = "POLICY")]
    pub systemd: Option<PathBuf>,
    /// Where the drop-ins go (`<unit>.d/50-portguard.conf` below it).
    #[arg(long, value_name = "DIR", default_value = systemd::DEFAULT_UNIT_DIR)]
    pub unit_dir: PathBuf,
    /// The agent's own unit: the drop-ins order their service after it and
    /// want it, and it never gets one. `none`: no ordering.
    #[arg(long, value_name = "UNIT", default_value = systemd::AGENT_UNIT)]
    pub agent_unit: String,
    /// Write containerd's base runtime spec (--containerd-base-spec) with
    /// the hook. Then set `base_runtime_spec` to that file under
    /// `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]`
    /// and restart containerd (the command prints the lines).
    #[arg(long)]
    pub containerd: bool,
    /// Where containerd's base spec goes.
    #[arg(long, value_name = "FILE", default_value = install::CONTAINERD_BASE_SPEC)]
    pub containerd_base_spec: PathBuf,
    /// Start the base spec from this whole OCI spec (default: the file
    /// already there, else containerd's default spec).
    #[arg(long, value_name = "FILE")]
    pub base_spec_from: Option<PathBuf>,
    /// Write the hook into CRI-O's hooks directory (read at once by CRI-O).
    #[arg(long)]
    pub crio: bool,
    /// CRI-O's hooks directory.
    #[arg(long, value_name = "DIR", default_value = install::CRIO_HOOKS_DIR)]
    pub crio_hooks_dir: PathBuf,
    /// The portguard binary the runtime runs, as the node sees it
    /// (default: --install-bin, else this one).
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// First copy this binary there (replaced atomically, mode 0755): how
    /// the DaemonSet's init container puts the hook on the node. The copy
    /// needs the node's C library (glibc as new as the build's).
    #[arg(long, value_name = "PATH")]
    pub install_bin: Option<PathBuf>,
    /// The agent's --status-socket, as the node sees it.
    #[arg(long, value_name = "PATH", default_value = crate::observe::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The hook's --timeout.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The hook's --on-failure.
    #[arg(long, value_enum, default_value = "auto")]
    pub on_failure: OnFailure,
    /// The hook's --fail-open-namespace (repeatable; give the agent's own).
    #[arg(long, value_name = "NAMESPACE")]
    pub fail_open_namespace: Vec<String>,
}

/// Remove the hooks `hook install` wrote (all of them when no runtime is
/// named), and the agent's list of selected pods (without an agent, a hook
/// must not fail closed on it). containerd's base spec is kept, without
/// the hook: its configuration still names the file.
#[derive(Debug, Args)]
pub struct UninstallHooksArgs {
    /// Only containerd's base spec.
    #[arg(long)]
    pub containerd: bool,
    #[arg(long, value_name = "FILE", default_value = install::CONTAINERD_BASE_SPEC)]
    pub containerd_base_spec: PathBuf,
    /// Only CRI-O's hooks.d file.
    #[arg(long)]
    pub crio: bool,
    #[arg(long, value_name = "DIR", default_value = install::CRIO_HOOKS_DIR)]
    pub crio_hooks_dir: PathBuf,
    /// Only the systemd drop-ins (portguard's, recognised by their first
    /// line; any other file is left alone).
    #[arg(long)]
    pub systemd: bool,
    #[arg(long, value_name = "DIR", default_value = systemd::DEFAULT_UNIT_DIR)]
    pub unit_dir: PathBuf,
    /// The agent's --status-socket (the selection is next to it).
    #[arg(long, value_name = "PATH", default_value = crate::observe::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Carry out the verb.
pub fn execute(a: HookArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        HookCommand::Oci(o) => {
            let mut state = String::new();
            let read = std::io::stdin()
                .take(hook::oci::MAX_STATE_BYTES as u64)
                .read_to_string(&mut state);
            if let Err(e) = read {
                state.clear();
                eprintln!("portguard hook: reading the OCI state on standard input: {e}");
            }
            let mut opts = options(&o.link, o.on_failure);
            opts.fail_open_namespaces = o.fail_open_namespace;
            opts.runtime = o.runtime;
            Ok(exit(&hook::oci(&opts, &state)))
        }
        HookCommand::Unit(u) => {
            let opts = options(&u.link, u.on_failure);
            Ok(exit(&hook::unit(&opts, &u.unit)))
        }
        HookCommand::Install(i) => install_hooks(&i),
        HookCommand::Uninstall(u) => {
            for c in uninstall_hooks(&u)? {
                println!("{c}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn options(link: &AgentLink, on_failure: OnFailure) -> HookOptions {
    HookOptions {
        socket: link.socket.clone(),
        timeout: link.timeout,
        on_failure,
        fail_open_namespaces: Vec::new(),
        runtime: hook::oci::Runtime::Auto,
    }
}

fn exit(o: &hook::Outcome) -> ExitCode {
    if o.proceed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn install_hooks(i: &InstallArgs) -> anyhow::Result<ExitCode> {
    if !i.containerd && !i.crio && i.systemd.is_none() {
        anyhow::bail!("name what to install: --containerd, --crio and/or --systemd POLICY");
    }
    if let Some(to) = &i.install_bin {
        println!("{}", install::copy_binary(&std::env::current_exe()?, to)?);
    }
    let bin = match (&i.bin, &i.install_bin) {
        (Some(b), _) | (None, Some(b)) => b.clone(),
        (None, None) => std::env::current_exe()?,
    };
    let line = install::HookLine {
        bin,
        socket: i.socket.clone(),
        timeout: i.timeout,
        on_failure: i.on_failure,
        fail_open_namespaces: i.fail_open_namespace.clone(),
        runtime: None,
    };
    if i.containerd {
        let line = install::HookLine {
            runtime: Some("containerd"),
            ..line.clone()
        };
        let c = install::install_containerd(
            &i.containerd_base_spec,
            i.base_spec_from.as_deref(),
            &line,
        )?;
        println!("{c}");
        println!(
            "containerd: set, in /etc/containerd/config.toml (version 2),\n  \
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n    \
             base_runtime_spec = \"{}\"\nand the same under every other runtime handler there \
             (a RuntimeClass without it starts containers without the hook), then restart \
             containerd (running containers are not affected; every container started \
             afterwards runs the hook)",
            i.containerd_base_spec.display()
        );
    }
    if i.crio {
        let line = install::HookLine {
            runtime: Some("crio"),
            ..line.clone()
        };
        println!("{}", install::install_crio(&i.crio_hooks_dir, &line)?);
    }
    if let Some(policy) = &i.systemd {
        install_dropins(i, policy, &line)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The systemd part of `hook install`.
fn install_dropins(i: &InstallArgs, policy: &Path, line: &install::HookLine) -> anyhow::Result<()> {
    let file = crate::policy::parse_policy_file(policy)?;
    let (services, others) = systemd::service_units(file.policies.iter().map(|p| &p.selector));
    let agent_unit = (i.agent_unit != "none").then(|| i.agent_unit.clone());
    for u in &others {
        if let Some(why) = systemd::no_dropin_reason(u) {
            eprintln!(
                "warning: {}: no drop-in for unit `{u}`: {why}",
                policy.display()
            );
        }
    }
    let services: Vec<String> = services
        .into_iter()
        .filter(|u| {
            let own = agent_unit.as_deref() == Some(u.as_str());
            if own {
                eprintln!(
                    "warning: {}: no drop-in for unit `{u}`: it is the agent's own unit (its \
                     start would wait for itself)",
                    policy.display()
                );
            }
            !own
        })
        .collect();
    let opts = systemd::DropinOptions {
        bin: line.bin.clone(),
        socket: line.socket.clone(),
        timeout: line.timeout,
        on_failure: match line.on_failure {
            // A drop-in exists only for units a policy names.
            OnFailure::Auto | OnFailure::Closed => systemd::OnFailure::Closed,
            OnFailure::Open => systemd::OnFailure::Open,
        },
        agent_unit,
    };
    let report = systemd::install(&services, &i.unit_dir, &opts)?;
    for p in &report.written {
        println!("wrote {}", p.display());
    }
    for p in &report.unchanged {
        println!("unchanged {}", p.display());
    }
    for p in &report.removed {
        println!("removed {}", p.display());
    }
    reload_systemd(report.written.len() + report.removed.len());
    Ok(())
}

/// `systemctl daemon-reload` after drop-ins changed, when systemd runs.
fn reload_systemd(changed: usize) {
    if changed == 0 {
        return;
    }
    if !systemd::systemd_running() {
        println!("systemd is not running here: run `systemctl daemon-reload` where it does");
        return;
    }
    match std::process::Command::new("systemctl")
        .arg("daemon-reload")
        .status()
    {
        Ok(s) if s.success() => println!("ran systemctl daemon-reload"),
        Ok(s) => eprintln!("warning: systemctl daemon-reload failed ({s}): run it yourself"),
        Err(e) => eprintln!("warning: cannot run systemctl daemon-reload ({e}): run it yourself"),
    }
}

/// Remove the hooks `u` names (all when none), reporting each file.
pub fn uninstall_hooks(u: &UninstallHooksArgs) -> anyhow::Result<Vec<install::Change>> {
    let all = !u.containerd && !u.crio && !u.systemd;
    let mut out = Vec::new();
    if all || u.containerd {
        out.push(install::uninstall_containerd(
            &u.containerd_base_spec,
            u.dry_run,
        )?);
    }
    if all || u.crio {
        out.push(install::uninstall_crio(&u.crio_hooks_dir, u.dry_run)?);
    }
    if all || u.systemd {
        let removed = systemd::uninstall(&u.unit_dir, u.dry_run)?;
        if !u.dry_run {
            reload_systemd(removed.len());
        }
        out.extend(removed.into_iter().map(install::Change::Removed));
    }
    out.push(install::remove_selection(&u.socket, u.dry_run)?);
    Ok(out)
}

/// Every hook at its default location, for `portguard uninstall`.
pub fn default_locations(dry_run: bool) -> UninstallHooksArgs {
    UninstallHooksArgs {
        containerd: false,
        containerd_base_spec: Path::new(install::CONTAINERD_BASE_SPEC).to_owned(),
        crio: false,
        crio_hooks_dir: Path::new(install::CRIO_HOOKS_DIR).to_owned(),
        systemd: false,
        unit_dir: Path::new(systemd::DEFAULT_UNIT_DIR).to_owned(),
        socket: Path::new(crate::observe::status::DEFAULT_SOCKET).to_owned(),
        dry_run,
    }
}
