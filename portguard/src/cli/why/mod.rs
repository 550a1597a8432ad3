//! `portguard why`: why an operation of a workload is (or would be) denied,
//! and what would allow it.
//!
//! The target (a pid, a cgroup, a pod, a unit) is resolved to its cgroup
//! here; the running agent says which policy governs it (the status
//! socket's `explain` request: the kernel maps' answer, the policy text as
//! applied, the workload's last events). Where no agent answers and
//! `--policy` is given, the policy file is resolved offline against the
//! cgroup tree and the CRI runtime, as the agent would resolve it. The
//! verdict is [`crate::policy::why::judge`]'s, the kernel's decision
//! restated; `render` prints it.

mod render;
mod target;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use serde_json::{Value, json};

use crate::{
    hook::protocol::{Explanation, Selecting},
    policy::{
        PolicyFile, parse_policy_str,
        why::{Candidate, Query, Ranked, precedence},
    },
    workload::cgroupfs::{Hierarchy, ancestors},
};

pub use crate::policy::why::{Fix, Judgement, Verdict, judge};
pub use target::Target;

/// Why was this denied, and what would allow it?
///
/// Judges one operation (OP PROTO ADDR:PORT: `bind tcp 0.0.0.0:8080`,
/// `connect udp 10.0.0.53:53`, `listen tcp [::]:443`) of one workload (give
/// exactly one of --pid, --cgroup, --pod, --unit) as the kernel does, and
/// prints:
///
///   verdict   allowed, denied, or audit (allowed, reported as a denial)
///   policy    the policy that governs the workload and why it was chosen
///             over the others that select it or an ancestor (the nearest
///             governed cgroup wins; on one cgroup the most specific
///             selector: a cgroup path, then a unit, then pods)
///   rule      the rule that allows it, with its line; or, for a denial,
///             that no rule does (or one does on loopback only, or for IPv6
///             only where a dual-stack [::] bind needs IPv4 too), and a
///             reserved-port hit
///   fix       the smallest rule that would allow it, checked by compiling
///             it; or why none can (a reserved port)
///   history   the last events for that workload and port
///
/// The running agent answers on its status socket (--socket) which policy
/// governs the workload, from the kernel's maps. Where no agent answers,
/// give --policy FILE: the cgroup tree and the CRI runtime are read as the
/// agent would read them. A bind to [::] is judged dual-stack (Linux's
/// default) unless --v6only; port 0 means the port the kernel picks
/// (`ephemeral`). listen() is judged on its bound port, as a bind.
///
/// Exit status: 0 allowed (and audit), 1 denied, 2 a usage or lookup
/// error (an unknown pid, a cgroup no policy governs, no agent and no
/// --policy).
#[derive(Debug, Args)]
#[command(
    verbatim_doc_comment,
    group(clap::ArgGroup::new("target").required(true).args(["pid", "cgroup", "pod", "unit"]))
)]
pub struct WhyArgs {
    /// The workload of this process (its cgroup, from /proc/PID/cgroup).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// A cgroup path under the cgroup2 mount (`/kubepods/...`).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// A Kubernetes pod on this node, by the CRI runtime (its pod cgroup,
    /// or with --container that container's).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// With --pod: one container of it.
    #[arg(long, value_name = "NAME", requires = "pod")]
    pub container: Option<String>,
    /// A systemd unit (its cgroup).
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Policy file to judge by where no agent answers (or with --offline).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Judge by --policy even if an agent answers.
    #[arg(long, requires = "policy")]
    pub offline: bool,
    /// Read the history from this event log instead of the agent's memory.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// How many events of history to show.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub history: usize,
    /// The agent's status socket.
    #[arg(long, value_name = "PATH", default_value = crate::observe::status::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The CRI runtime's socket (--pod, and `pods:` policies offline).
    #[arg(long, value_name = "PATH", default_value = crate::workload::cri::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,
    /// The IPv6 socket has IPV6_V6ONLY (a bind to [::] is IPv6 only).
    #[arg(long)]
    pub v6only: bool,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// bind, connect or listen.
    #[arg(value_name = "OP")]
    pub op: String,
    /// tcp or udp.
    #[arg(value_name = "PROTO")]
    pub proto: String,
    /// ADDRESS:PORT (`0.0.0.0:8080`, `[::1]:53`).
    #[arg(value_name = "ADDR:PORT")]
    pub addr: String,
}

/// Everything `why` found, for the renderers.
#[derive(Debug)]
pub struct Answer {
    pub query: Query,
    pub target: Target,
    /// `agent` or `offline`.
    pub source: &'static str,
    pub policy_file: String,
    pub policy_text: String,
    pub policy_cgroup: String,
    pub judgement: Judgement,
    pub ranked: Vec<Ranked>,
    pub identity: Value,
    pub warning: Option<String>,
    /// The workload's last events on that port (oldest first).
    pub events: Vec<Value>,
}

/// A usage or lookup error: exit status 2, with this message.
#[derive(Debug)]
pub struct Lookup(pub String);

impl<T: Into<String>> From<T> for Lookup {
    fn from(s: T) -> Self {
        Self(s.into())
    }
}

/// Carry out the verb.
pub fn execute(a: WhyArgs) -> anyhow::Result<ExitCode> {
    match answer(&a) {
        Ok(ans) => {
            if a.json {
                println!("{}", render::json(&ans));
            } else {
                print!("{}", render::human(&ans));
            }
            Ok(match ans.judgement.verdict {
                Verdict::Allow | Verdict::Audit => ExitCode::SUCCESS,
                Verdict::Deny => ExitCode::from(1),
            })
        }
        Err(Lookup(msg)) => {
            if a.json {
                println!("{}", json!({"ok": false, "error": msg}));
            }
            eprintln!("portguard why: {}", crate::observe::text::escape(&msg));
            Ok(ExitCode::from(2))
        }
    }
}

/// Resolve, ask, judge.
pub fn answer(a: &WhyArgs) -> Result<Answer, Lookup> {
    let mut query = Query::parse(&a.op, &a.proto, &a.addr)?;
    query.v6only = a.v6only;
    let hierarchy = Hierarchy::discover().map_err(|e| format!("{e}"))?;
    let target = target::resolve(a, &hierarchy)?;
    let asked = if a.offline {
        None
    } else {
        match ask_agent(&a.socket, target.cgroup_id) {
            Ok(x) => Some(x),
            Err(e) if a.policy.is_some() => {
                log::debug!("why: {e}; judging offline");
                None
            }
            Err(e) => {
                return Err(format!(
                    "{e}; give --policy FILE to judge by a policy file without the agent"
                )
                .into());
            }
        }
    };
    let mut ans = match asked {
        Some(x) => from_agent(query, target, x)?,
        None => {
            let path = a.policy.as_deref().ok_or("no --policy given")?;
            offline(query, target, path, &hierarchy, &a.cri_socket)?
        }
    };
    if let Some(log) = &a.log {
        let text =
            std::fs::read_to_string(log).map_err(|e| format!("--log {}: {e}", log.display()))?;
        ans.events = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| under(e, &ans.target.cgroup))
            .collect();
    }
    ans.events
        .retain(|e| e["port"].as_u64() == Some(u64::from(ans.query.port)));
    let skip = ans.events.len().saturating_sub(a.history);
    ans.events.drain(..skip);
    Ok(ans)
}

/// An event line about `cgroup` or a cgroup below it.
fn under(e: &Value, cgroup: &str) -> bool {
    e.get("verdict").is_some()
        && e["cgroup"].as_str().is_some_and(|c| {
            c == cgroup
                || cgroup == "/"
                || c.strip_prefix(cgroup).is_some_and(|r| r.starts_with('/'))
        })
}

/// Ask the agent at `socket` to explain cgroup `cgroup_id`.
pub fn ask_agent(socket: &Path, cgroup_id: u64) -> Result<Explanation, String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "no agent answers at {} ({e}): is `portguard run` running with this \
             --status-socket? The socket is root's only",
            socket.display()
        )
    })?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(40)));
    let line = format!("{{\"request\":\"explain\",\"cgroup_id\":{cgroup_id}}}\n");
    s.write_all(line.as_bytes())
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .map_err(|e| format!("writing to {}: {e}", socket.display()))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("reading {}: {e}", socket.display()))?;
    let x: Explanation = serde_json::from_str(&text).map_err(|_| {
        format!(
            "the agent at {} does not answer `explain` requests (an older agent?)",
            socket.display()
        )
    })?;
    // An agent from before `explain` answers with its status document.
    if !x.ok && x.error.is_none() {
        return Err(format!(
            "the agent at {} does not answer `explain` requests (an older agent?)",
            socket.display()
        ));
    }
    Ok(x)
}

fn not_governed(target: &Target, by: &str, ranked: &[Ranked]) -> Lookup {
    let mut msg = format!(
        "cgroup {} is not governed: no policy of {by} governs it or an ancestor, so portguard \
         denies nothing there (a `connection refused` there is not portguard's)",
        target.cgroup
    );
    for r in ranked {
        msg += &format!("\n  `{}`: {}", r.policy, r.reason);
    }
    Lookup(msg)
}

fn parse_text(text: &str, file: &str) -> Result<PolicyFile, Lookup> {
    parse_policy_str(text).map_err(|d| {
        let lines: Vec<String> = d.iter().map(|d| format!("  {file}:{d}")).collect();
        Lookup(format!("invalid policy file {file}:\n{}", lines.join("\n")))
    })
}

/// The ancestors chain of `path`, deepest first.
fn chain_of(path: &str) -> Vec<String> {
    ancestors(path).map(str::to_owned).collect()
}

/// Rank `candidates` (by policy name) against the file's policies.
fn rank(
    file: &PolicyFile,
    path: &str,
    candidates: &[Selecting],
    governing: Option<(&str, &str)>,
) -> Vec<Ranked> {
    let index = |name: &str| file.policies.iter().position(|p| p.name == name);
    let cands: Vec<Candidate> = candidates
        .iter()
        .filter_map(|s| {
            Some(Candidate {
                index: index(&s.policy)?,
                cgroup: s.cgroup.clone(),
            })
        })
        .collect();
    let gov = governing.and_then(|(n, at)| Some((index(n)?, at)));
    precedence(&file.policies, &chain_of(path), &cands, gov)
}

fn from_agent(query: Query, mut target: Target, x: Explanation) -> Result<Answer, Lookup> {
    if !x.ok {
        return Err(x.error.unwrap_or_else(|| "the agent refused".into()).into());
    }
    target.cgroup = x.cgroup.clone();
    let text = x.policy_text.clone().unwrap_or_default();
    let file = parse_text(&text, &x.policy_file)?;
    let (Some(name), Some(at)) = (x.policy.as_deref(), x.policy_cgroup.as_deref()) else {
        let ranked = rank(&file, &target.cgroup, &x.candidates, None);
        return Err(not_governed(
            &target,
            &format!("the running agent ({})", x.policy_file),
            &ranked,
        ));
    };
    let judgement = judge(&file, name, &query)?;
    let ranked = rank(&file, &target.cgroup, &x.candidates, Some((name, at)));
    Ok(Answer {
        query,
        target,
        source: "agent",
        policy_file: x.policy_file,
        policy_text: text,
        policy_cgroup: at.to_owned(),
        judgement,
        ranked,
        identity: x.identity,
        warning: x.warning,
        events: x.events,
    })
}

/// Judge by a policy file: resolve it against the cgroup tree and the CRI
/// runtime as the agent does ([`crate::workload::resolve`]).
fn offline(
    query: Query,
    target: Target,
    path: &Path,
    hierarchy: &Hierarchy,
    cri_socket: &Path,
) -> Result<Answer, Lookup> {
    use crate::{
        policy::{Selector, compile_all},
        workload::{identity::KUBEPODS_ROOTS, resolve},
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("--policy {shown}: {e}"))?;
    let file = parse_text(&text, &shown)?;
    let policies = compile_all(&file.policies);
    let units = policies
        .iter()
        .any(|p| matches!(p.selector, Selector::Unit(_)));
    let mut tree = if units {
        resolve::TreeIndex::scan(hierarchy.root(), &["/"], 16)
    } else {
        resolve::TreeIndex::scan(hierarchy.root(), &KUBEPODS_ROOTS, 4)
    };
    let chain = chain_of(&target.cgroup);
    tree.add_paths(chain.iter().map(String::as_str));
    let needs_cri = policies
        .iter()
        .any(|p| matches!(p.selector, Selector::Pods(_)));
    let mut warning = None;
    let cri = if needs_cri {
        match target::cri_snapshot(cri_socket) {
            Ok(s) => Some(s),
            Err(e) => {
                warning = Some(format!(
                    "{e}: `pods:` policies were matched against no pod (the agent would hold \
                     unidentified pod cgroups with `portguard:identifying`)"
                ));
                None
            }
        }
    } else {
        None
    };
    let mut writable = std::collections::HashMap::new();
    let outcome = resolve::resolve(
        &policies,
        &tree,
        cri.as_ref(),
        &mut |p: &str| hierarchy.resolve(p).ok().flatten(),
        &mut |p: &str| hierarchy.delegated_subtree(p, &mut writable),
        resolve::Limits::UNBOUNDED,
    );
    let governing = chain.iter().find_map(|c| {
        outcome
            .resolution
            .iter()
            .position(|govs| govs.iter().any(|g| &g.path == c))
            .map(|i| (file.policies[i].name.clone(), c.clone()))
    });
    let candidates: Vec<Selecting> = policies
        .iter()
        .flat_map(|p| {
            resolve::candidates(p, &tree, cri.as_ref())
                .into_iter()
                .filter(|c| chain.contains(c))
                .map(|c| Selecting {
                    policy: p.name.clone(),
                    cgroup: c,
                })
        })
        .collect();
    let gov = governing.as_ref().map(|(n, c)| (n.as_str(), c.as_str()));
    let ranked = rank(&file, &target.cgroup, &candidates, gov);
    let Some((name, at)) = governing else {
        return Err(not_governed(&target, &shown, &ranked));
    };
    let judgement = judge(&file, &name, &query)?;
    let identity = serde_json::to_value(crate::events::WorkloadIdentity::of(
        &target.cgroup,
        cri.as_ref(),
    ))
    .unwrap_or_default();
    Ok(Answer {
        query,
        target,
        source: "offline",
        policy_file: shown,
        policy_text: text,
        policy_cgroup: at,
        judgement,
        ranked,
        identity,
        warning,
        events: Vec::new(),
    })
}
