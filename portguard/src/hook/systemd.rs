//! systemd drop-ins that close the start window of `unit:` policies
//! (issue 17).
//!
//! On its own the agent governs a unit only once it sees the unit's new
//! cgroup, 11-27 ms after systemd made it, so a service's first
//! instructions after a (re)start run ungoverned. A drop-in
//! `<unit_dir>/<unit>.d/50-portguard.conf` adds an `ExecStartPre=` running
//! `portguard hook unit`, which asks the agent (over its status socket) to
//! govern the cgroup the hook runs in, the unit's own, and makes the start
//! fail when it cannot (unless told to fail open).
//!
//! Owns: which units named by `unit:` selectors can carry the hook
//! ([`service_units`]), the drop-in's text and how paths are written on a
//! systemd command line ([`dropin_text`]), writing and removing drop-ins
//! ([`install`], [`uninstall`]), and whether systemd manages this host
//! ([`systemd_running`]). It never talks to systemd (the CLI runs
//! `systemctl daemon-reload`) nor to the agent, and imports no aya.
//!
//! Unit names come from the policy file and name directories written as
//! root: each is checked against systemd's rules for unit names before it is
//! used (no `/`, nothing but a `<name>.service`), and every file operation
//! below `unit_dir` is made relative to a directory descriptor opened with
//! `O_NOFOLLOW`, so a symlinked `<unit>.d` (or drop-in) is an error naming
//! it, never a way out of `unit_dir`. A drop-in is portguard's when its
//! first line is [`MARKER`]; nothing else is ever replaced or removed.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::policy::Selector;

mod dirfd;
mod files;
#[cfg(test)]
mod tests;

pub use files::{Report, install, uninstall};

/// File name of portguard's drop-in inside `<unit>.d/`.
pub const DROPIN_NAME: &str = "50-portguard.conf";

/// First line of every drop-in portguard writes; how [`install`] and
/// [`uninstall`] recognise theirs.
pub const MARKER: &str =
    "# Written by portguard; `portguard hook uninstall` removes it. Do not edit.";

/// Where administrators' unit files and drop-ins live (systemd.unit(5)).
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";

/// Unit types systemd knows (`unit_type_from_string`).
const UNIT_TYPES: [&str; 11] = [
    "service",
    "socket",
    "target",
    "device",
    "mount",
    "automount",
    "swap",
    "timer",
    "path",
    "slice",
    "scope",
];

/// systemd's `UNIT_NAME_MAX` (256) counts the terminating NUL.
const UNIT_NAME_MAX: usize = 255;
/// Longest file name (`NAME_MAX`): `<unit>.d` must fit.
const NAME_MAX: usize = 255;
/// `sun_path` of a unix socket address: 108 bytes with the NUL.
const SOCKET_PATH_MAX: usize = 107;
/// `PATH_MAX` without the NUL.
const PATH_MAX: usize = 4095;
/// Drop-ins are read at most this far (ours are a few hundred bytes).
const MAX_DROPIN_BYTES: u64 = 64 * 1024;

/// What `portguard hook unit` does when it cannot confirm the unit's cgroup
/// is governed (agent down, timeout, refusal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum OnFailure {
    /// Exit non-zero: systemd fails the start.
    #[default]
    Closed,
    /// Exit 0: the unit starts, governed only once the agent sees it.
    Open,
}

impl OnFailure {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// The agent's unit as `deploy/systemd/portguard.service` names it.
pub const AGENT_UNIT: &str = "portguard.service";

/// The `portguard hook unit` command line a drop-in runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropinOptions {
    /// Absolute path of the portguard binary.
    pub bin: PathBuf,
    /// The agent's status socket (`--socket`).
    pub socket: PathBuf,
    /// How long the hook waits for the agent (`--timeout`).
    pub timeout: Duration,
    /// `--on-failure`.
    pub on_failure: OnFailure,
    /// The agent's own unit: the drop-in orders the service after it and
    /// wants it (at boot the hook would otherwise find no agent and fail
    /// closed), and that unit never gets a drop-in (its start would wait
    /// for itself). `None`: no ordering (an agent not run by systemd).
    pub agent_unit: Option<String>,
}

impl DropinOptions {
    /// `bin` with the hook's defaults: the agent's default status socket,
    /// a 1 s timeout, failing closed.
    pub fn new(bin: PathBuf) -> Self {
        Self {
            bin,
            socket: PathBuf::from(crate::observe::status::DEFAULT_SOCKET),
            timeout: Duration::from_secs(1),
            on_failure: OnFailure::Closed,
            agent_unit: Some(AGENT_UNIT.to_owned()),
        }
    }
}

/// A drop-in that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum DropinError {
    /// The unit cannot carry the hook (not a service, a template, not a
    /// valid unit name).
    #[error("no drop-in for `{unit}`: {reason}")]
    Unit { unit: String, reason: String },
    /// A path systemd cannot take on a command line, or the hook could not
    /// use.
    #[error("the {what} {path:?} cannot be written in a drop-in: {reason}")]
    Path {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// `--timeout 0` would fail every start.
    #[error("the hook's timeout must be longer than zero")]
    ZeroTimeout,
}

enum UnitKind {
    Service,
    Template,
    /// A service whose name ends in `-` before `.service`: its drop-in
    /// directory is also every `<prefix>-*.service`'s.
    DashPrefix,
    /// A valid unit of another type (the suffix).
    Other(String),
    /// Why systemd would not take it as a unit name.
    Invalid(String),
}

/// systemd's `unit_name_is_valid`: `<prefix>[@<instance>].<type>`, at most
/// 255 bytes, the prefix made of `[A-Za-z0-9:_.\-]` (and `@`), not empty,
/// nor empty before the `@`.
fn unit_kind(unit: &str) -> UnitKind {
    if unit.len() > UNIT_NAME_MAX {
        return UnitKind::Invalid(format!("longer than {UNIT_NAME_MAX} bytes"));
    }
    let Some((prefix, suffix)) = unit.rsplit_once('.') else {
        return UnitKind::Invalid("no unit type suffix (such as .service)".to_owned());
    };
    if prefix.is_empty() {
        return UnitKind::Invalid("nothing before the type suffix".to_owned());
    }
    if !UNIT_TYPES.contains(&suffix) {
        return UnitKind::Invalid(format!("`.{suffix}` is not a systemd unit type"));
    }
    let valid =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.' | '\\' | '@');
    if let Some(c) = prefix.chars().find(|c| !valid(*c)) {
        return UnitKind::Invalid(format!("{c:?} is not allowed in a unit name"));
    }
    match prefix.find('@') {
        Some(0) => UnitKind::Invalid("nothing before `@`".to_owned()),
        Some(at) if at + 1 == prefix.len() => UnitKind::Template,
        _ if suffix == "service" && prefix.ends_with('-') => UnitKind::DashPrefix,
        _ if suffix == "service" => UnitKind::Service,
        _ => UnitKind::Other(suffix.to_owned()),
    }
}

/// Why `unit` gets no drop-in, for the CLI to warn with; `None` for a
/// service unit, which does.
pub fn no_dropin_reason(unit: &str) -> Option<String> {
    match unit_kind(unit) {
        UnitKind::Service => None,
        UnitKind::Template => Some(
            "a template: what runs are its instances (name@instance.service); a `unit:` \
             selector names one instance"
                .to_owned(),
        ),
        UnitKind::DashPrefix => Some(format!(
            "systemd also reads the drop-ins of `{unit}.d` for every unit named {}*.service \
             (systemd.unit(5)), whose starts the hook would fail",
            unit.trim_end_matches(".service")
        )),
        UnitKind::Other(t) => Some(format!(
            "only a .service runs ExecStartPre= in its own cgroup before its processes; a .{t} \
             unit is governed once its cgroup appears (select its slice with `cgroup:` to \
             cover it from its start)"
        )),
        UnitKind::Invalid(why) => Some(format!("not a valid systemd unit name: {why}")),
    }
}

/// The units `unit:` selectors name, split in two, each sorted and
/// deduplicated: `.service` units, which get a drop-in, and every other name
/// (other unit types, templates, `<prefix>-.service` names whose drop-in
/// directory systemd shares with other units, names systemd would refuse),
/// which cannot; [`no_dropin_reason`] says why, for a warning. Other selectors are
/// skipped. Takes the selectors of a parsed or compiled policy file:
/// `service_units(file.policies.iter().map(|p| &p.selector))`.
pub fn service_units<'a>(
    selectors: impl IntoIterator<Item = &'a Selector>,
) -> (Vec<String>, Vec<String>) {
    let mut services = BTreeSet::new();
    let mut others = BTreeSet::new();
    for selector in selectors {
        if let Selector::Unit(unit) = selector {
            if matches!(unit_kind(unit), UnitKind::Service) {
                services.insert(unit.clone());
            } else {
                others.insert(unit.clone());
            }
        }
    }
    (services.into_iter().collect(), others.into_iter().collect())
}

/// `path` as one word of a systemd command line (systemd.service(5)
/// "COMMAND LINES", systemd.syntax(7) "Quoting"), or why it cannot be one.
///
/// Specifiers are expanded on the whole line, so `%` becomes `%%`. Words are
/// unquoted with C escapes, so a word with anything but `[A-Za-z0-9/._+@:,=-]`
/// is put in double quotes, `\` and `"` escaped. In arguments `$` starts an
/// environment variable (`$$` is a literal one). The executable is stricter:
/// systemd ignores the whole line ("Executable name contains special
/// characters") when it has `\`, `"` or `'`, and would expand `$` in the
/// `argv[0]` it passes; those are refused. Control characters are refused
/// everywhere.
fn command_word(what: &'static str, path: &Path, executable: bool) -> Result<String, DropinError> {
    let err = |reason: String| DropinError::Path {
        what,
        path: path.to_owned(),
        reason,
    };
    let s = path
        .to_str()
        .ok_or_else(|| err("not UTF-8 (unit files are UTF-8 text)".to_owned()))?;
    if !s.starts_with('/') {
        return Err(err("not an absolute path".to_owned()));
    }
    let max = if executable {
        PATH_MAX
    } else {
        SOCKET_PATH_MAX
    };
    if s.len() > max {
        return Err(err(format!("longer than {max} bytes")));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(err(format!("contains the control character {c:?}")));
    }
    if executable {
        if s.ends_with('/') {
            return Err(err("names a directory".to_owned()));
        }
        if let Some(c) = s.chars().find(|c| matches!(c, '\\' | '"' | '\'' | '$')) {
            return Err(err(format!(
                "contains {c:?}, which systemd does not take in the path of an executable"
            )));
        }
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._+@:,=-".contains(c);
    let mut word = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '%' => word.push_str("%%"),
            '$' => word.push_str("$$"),
            '\\' => word.push_str("\\\\"),
            '"' => word.push_str("\\\""),
            c => word.push(c),
        }
    }
    Ok(if s.chars().all(plain) {
        word
    } else {
        format!("\"{word}\"")
    })
}

/// `--timeout` in the largest unit that keeps it exact, without spaces
/// (`1s`, `1500ms`, `250us`).
fn duration_word(d: Duration) -> String {
    let ns = d.as_nanos();
    for (unit, per) in [("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)] {
        if ns.is_multiple_of(per) {
            return format!("{}{unit}", ns / per);
        }
    }
    format!("{ns}ns")
}

/// The drop-in for `unit`: [`MARKER`], a comment, and
///
/// ```text
/// [Service]
/// ExecStartPre=+<bin> hook unit --socket <socket> --timeout <t> --on-failure <f> %n
/// ```
///
/// Refuses a unit that is not a service (see [`no_dropin_reason`]) and a
/// path systemd cannot express (see `command_word`) rather than write a
/// line systemd would drop or misread.
pub fn dropin_text(unit: &str, opts: &DropinOptions) -> Result<String, DropinError> {
    if let Some(reason) = no_dropin_reason(unit) {
        return Err(DropinError::Unit {
            unit: unit.to_owned(),
            reason,
        });
    }
    if unit.len() + ".d".len() > NAME_MAX {
        return Err(DropinError::Unit {
            unit: unit.to_owned(),
            reason: format!("`{unit}.d` is longer than a file name may be ({NAME_MAX} bytes)"),
        });
    }
    if opts.agent_unit.as_deref() == Some(unit) {
        return Err(DropinError::Unit {
            unit: unit.to_owned(),
            reason: "it is the agent's own unit: its start would wait for itself".to_owned(),
        });
    }
    if opts.timeout.is_zero() {
        return Err(DropinError::ZeroTimeout);
    }
    let bin = command_word("portguard binary", &opts.bin, true)?;
    let socket = command_word("status socket", &opts.socket, false)?;
    // `+`: systemd.service(5), "Special executable prefixes": "If the
    // executable path is prefixed with "+" then the process is executed with
    // full privileges. In this mode privilege restrictions configured with
    // User=, Group=, CapabilityBoundingSet= or the various file system
    // namespacing options (such as PrivateDevices=, PrivateTmp=) are not
    // applied to the invoked command line (but still affect any other
    // ExecStart=, ExecStop=, ... lines)." The hook needs root for the 0600
    // status socket, whatever User= or sandboxing the unit has.
    //
    // The cgroup is not among what `+` lifts. The man pages do not say so in
    // one sentence; what they say: the list above (credentials,
    // capabilities, namespacing), and of ExecStartPre= that "All processes
    // forked off by processes invoked via ExecStartPre= will be killed before
    // the next service process is run", which systemd does through the
    // unit's cgroup. systemd's source is explicit: every command is spawned
    // into the path exec_parameters_get_cgroup_path() (src/core/execute.c)
    // returns, whatever its prefix, the unit's own cgroup for ExecStartPre=
    // ("For ExecStartPre= this is not necessary, the cgroup is still
    // empty"). One exception, from systemd 254: with Delegate=yes and
    // DelegateSubgroup=, control processes, ExecStartPre= included, run in
    // `<unit cgroup>/.control`, a child of the unit's cgroup.
    //
    // Drop-ins are parsed after the unit file and ExecStartPre= is a list,
    // so this command runs after the unit file's own ExecStartPre= lines
    // (systemd.unit(5)). `%n` is the unit's full name (systemd.unit(5),
    // "Specifiers").
    let order = match &opts.agent_unit {
        Some(agent) => {
            if let UnitKind::Invalid(why) = unit_kind(agent) {
                return Err(DropinError::Unit {
                    unit: agent.clone(),
                    reason: format!("the agent's unit is not a valid unit name: {why}"),
                });
            }
            format!(
                "# The agent answers the hook: at boot, start it first.\n\
                 [Unit]\nWants={agent}\nAfter={agent}\n"
            )
        }
        None => String::new(),
    };
    Ok(format!(
        "{MARKER}\n\
         # Asks the portguard agent to govern this unit's cgroup (`unit: {unit}`)\n\
         # before ExecStart= runs (after any ExecStartPre= of the unit file itself).\n\
         {order}\
         [Service]\n\
         ExecStartPre=+{bin} hook unit --socket {socket} --timeout {timeout} --on-failure {on_failure} %n\n",
        timeout = duration_word(opts.timeout),
        on_failure = opts.on_failure.as_str(),
    ))
}

/// Whether systemd manages this host: `/run/systemd/system` is a directory,
/// the test of sd_booted(3). When it is not, the CLI says to run
/// `systemctl daemon-reload` once systemd runs, rather than run it.
pub fn systemd_running() -> bool {
    systemd_running_at(Path::new("/"))
}

fn systemd_running_at(root: &Path) -> bool {
    std::fs::symlink_metadata(root.join("run/systemd/system")).is_ok_and(|m| m.is_dir())
}
