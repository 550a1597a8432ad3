//! `portguard status`: what the running agent enforces, from its unix
//! socket (`--status-socket`, default /run/portguard/status.sock, mode 0600:
//! root only). Each connection carries one request and one JSON answer
//! (`hook::protocol`): the status document, which `portguard status`
//! prints as tables or, with `--json`, as is; or a hook's "govern this
//! cgroup now", handed to the agent's loop. A client that sends nothing
//! gets the status document.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};

pub use super::socket::{bind, serve};
use crate::observe::{
    snapshot::{KernelReading, Snapshot, VERDICTS},
    text::escape,
};

pub const DEFAULT_SOCKET: &str = "/run/portguard/status.sock";

/// Kernel decision counts by verdict name.
fn decisions_json(d: &crate::kernel::Decisions) -> serde_json::Map<String, Value> {
    VERDICTS
        .iter()
        .zip(d)
        .map(|(v, n)| ((*v).to_owned(), json!(n)))
        .collect()
}

/// A policy's events the kernel held back (over its event budget) or could
/// not queue.
fn policy_events_json(d: &crate::kernel::Decisions) -> Value {
    json!({
        "suppressed": d[portguard_common::POLICY_EVENTS_SUPPRESSED as usize],
        "lost": d[portguard_common::POLICY_EVENTS_LOST as usize],
    })
}

/// The status document for the agent's current facts and counters, built
/// off the agent's loop ([`Snapshot::off_loop`]), as one line of text.
pub async fn document_text(shared: &std::sync::Arc<Snapshot>) -> String {
    shared
        .off_loop(|facts, kernel| document_of(facts, kernel).to_string())
        .await
        .unwrap_or_else(|e| json!({"ok": false, "error": e}).to_string())
}

/// The status document for `facts` and the kernel's counters read for them.
fn document_of(
    facts: &crate::observe::snapshot::Facts,
    kernel: Result<KernelReading, String>,
) -> Value {
    let (kernel, kernel_error) = match kernel {
        Ok(k) => (k, None),
        Err(e) => (KernelReading::default(), Some(e)),
    };
    let policies: Vec<Value> = facts
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let d = kernel.by_policy.get(i).copied().unwrap_or_default();
            json!({
                "name": p.name,
                "mode": p.mode,
                "selector": p.selector,
                "decisions": decisions_json(&d),
                "events": policy_events_json(&d),
                "cgroups": p.cgroups.iter().map(|(path, id)| {
                    let mut v = serde_json::to_value(id).unwrap_or_else(|_| json!({}));
                    v["path"] = json!(path);
                    v
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "host": facts.host,
        "pid": std::process::id(),
        "started": facts.started,
        "status": facts.status,
        "degraded": facts.degraded,
        "attach_cgroup": facts.attach_cgroup,
        "attach_points": facts.attach_points,
        "hooks": facts.hooks,
        "listen": facts.listen_mode,
        "events": {
            "written": facts.events_written,
            "aggregated": facts.events_aggregated,
            "lost": kernel.events_lost,
        },
        "reloads": {"ok": facts.reloads_ok, "failed": facts.reloads_failed},
        "governed_cgroups": facts.governed_cgroups,
        "delegated": {
            "skipped": facts.left_out.skipped,
            "unfit": facts.left_out.unfit,
            "unfit_subtrees": facts.left_out.unfit_subtrees,
            "held_subtrees": facts.left_out.held_subtrees,
        },
        "maps": facts.maps.iter().map(|m| json!({
            "name": m.name, "entries": m.entries, "capacity": m.capacity,
        })).collect::<Vec<_>>(),
        "policies": policies,
        "kernel_error": kernel_error,
        "cri": facts.cri.as_ref().map(|c| json!({
            "up": c.up, "errors": c.errors, "failing_since": c.failing_since,
        })),
        "runtime_hooks": {
            "requests": facts.runtime_hooks.requests,
            "refused": facts.runtime_hooks.refused,
            "mean_seconds": if facts.runtime_hooks.requests > 0 {
                facts.runtime_hooks.seconds / facts.runtime_hooks.requests as f64
            } else { 0.0 },
            "slowest_seconds": facts.runtime_hooks.slowest,
            "failures": facts.runtime_hooks.failures.iter().map(|((hook, action), n)| {
                json!({"hook": hook, "action": action, "count": n})
            }).collect::<Vec<_>>(),
        },
        "inventory": {
            "passes": facts.inventory.passes,
            "checked": facts.inventory.checked,
            "violations": facts.inventory.violations,
            "ended": facts.inventory.ended,
            "last_seconds": facts.inventory.last_seconds,
        },
        "program_stats": super::cost::json(kernel.programs.as_deref()),
    })
}

/// Ask the agent at `socket` for its status.
pub fn fetch(socket: &Path) -> anyhow::Result<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent at {}: is `portguard run` running (with this \
             --status-socket)? The socket is root's only.",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Agents from before requests existed ignore it and answer anyway.
    let _ = s.write_all(b"{\"request\":\"status\"}\n");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading {}", socket.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("the agent at {} answered {text:?}", socket.display()))
}

fn tw() -> tabwriter::TabWriter<Vec<u8>> {
    tabwriter::TabWriter::new(Vec::new()).padding(2)
}

fn finish(w: tabwriter::TabWriter<Vec<u8>>) -> String {
    String::from_utf8_lossy(&w.into_inner().unwrap_or_default()).into_owned()
}

/// Who a governed cgroup is, in a few words.
fn workload(c: &Value) -> String {
    if let Some(pod) = c["k8s_pod"].as_str() {
        let ns = c["k8s_namespace"].as_str().unwrap_or("?");
        return match c["container_name"].as_str() {
            Some(ctr) => format!("{ns}/{pod} ({ctr})"),
            None => format!("{ns}/{pod}"),
        };
    }
    if let Some(uid) = c["k8s_pod_uid"].as_str() {
        return format!("pod {uid}");
    }
    if let Some(u) = c["unit"].as_str() {
        return u.to_owned();
    }
    if let Some(id) = c["container_id"].as_str() {
        return format!("container {}", &id[..id.len().min(12)]);
    }
    "-".into()
}

/// A status document from pinned state alone (no agent answers): what the
/// kernel still enforces.
pub fn pinned_document(pins: &Path) -> anyhow::Result<Value> {
    let view = crate::kernel::read_pinned(pins)
        .map_err(|e| anyhow::anyhow!("reading the pinned state in {}: {e}", pins.display()))?;
    let mut hierarchy = crate::workload::cgroupfs::Hierarchy::discover().ok();
    let mut path_of = |id: u64| -> String {
        hierarchy
            .as_mut()
            .and_then(|h| h.path_of(id))
            .unwrap_or_else(|| format!("cgroup id {id}"))
    };
    let attach: Vec<String> = {
        let mut ids: Vec<u64> = view.links.iter().map(|l| l.3).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                if id == 0 {
                    "(defunct)".to_owned()
                } else {
                    path_of(id)
                }
            })
            .collect()
    };
    let alive = view.stamp.map_or("-".to_owned(), |s| {
        crate::events::format_time(std::time::UNIX_EPOCH + Duration::from_millis(s.alive_unix_ms))
    });
    let policies: Vec<Value> = view
        .policies
        .iter()
        .map(|(id, name, mode, _slot, d)| {
            json!({
                "name": name,
                "mode": if *mode == portguard_common::MODE_AUDIT { "audit" } else { "enforce" },
                "selector": "-",
                "decisions": decisions_json(d),
                "events": policy_events_json(d),
                "cgroups": view.cgroups.iter().filter(|(_, p)| p == id)
                    .map(|(c, _)| json!({"path": path_of(*c), "cgroup_id": c}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    // Each hook once (the decision programs have a link per attach point).
    let mut hooks: Vec<String> = Vec::new();
    for l in &view.links {
        let h = l.0.trim_start_matches("portguard_").to_owned();
        if !hooks.contains(&h) {
            hooks.push(h);
        }
    }
    Ok(json!({
        "version": "-",
        "host": crate::events::host_name(),
        "pid": view.stamp.map_or(0, |s| s.pid),
        "started": "-",
        "status": format!(
            "NO AGENT ANSWERS; the pinned programs in {} enforce the last policy applied \
             (the agent was last alive at {alive})",
            pins.display()
        ),
        "attach_cgroup": attach.join(", "),
        "hooks": hooks,
        "listen": "-",
        "events": {"written": 0, "aggregated": 0, "lost": view.events_lost},
        "reloads": {"ok": 0, "failed": 0},
        "governed_cgroups": view.cgroups.len(),
        "maps": [],
        "policies": policies,
        "kernel_error": null,
        "agent_running": false,
    }))
}

/// The human view of a status document.
pub fn render(doc: &Value) -> String {
    // Every string is escaped: cgroup and unit names are the tenants' choice.
    let s = |v: &Value| escape(v.as_str().unwrap_or("-")).into_owned();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mut out = format!(
        "portguard {} on {}, pid {}, since {}: {}\n",
        s(&doc["version"]),
        s(&doc["host"]),
        n(&doc["pid"]),
        s(&doc["started"]),
        s(&doc["status"]),
    );
    let hooks: Vec<String> = doc["hooks"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let points: Vec<String> = doc["attach_points"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    out += &format!(
        "programs: {} attached at {}{}\nlisten(): {}\n",
        hooks.join(", "),
        s(&doc["attach_cgroup"]),
        if doc["attach_points"].is_array() {
            format!(
                " (host-wide ones; the decision programs on {})",
                if points.is_empty() {
                    "no cgroup: nothing is governed".to_owned()
                } else {
                    points.join(", ")
                }
            )
        } else {
            String::new()
        },
        s(&doc["listen"])
    );
    out += &format!(
        "events: {} written, {} aggregated, {} lost in the kernel; reloads: {} ok, {} failed\n",
        n(&doc["events"]["written"]),
        n(&doc["events"]["aggregated"]),
        n(&doc["events"]["lost"]),
        n(&doc["reloads"]["ok"]),
        n(&doc["reloads"]["failed"]),
    );
    let maps: Vec<String> = doc["maps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    format!(
                        "{} {}/{}",
                        s(&m["name"]),
                        n(&m["entries"]),
                        n(&m["capacity"])
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out += &format!("maps: {}\n", maps.join(", "));
    let inv = &doc["inventory"];
    if n(&inv["passes"]) > 0 {
        out += &format!(
            "inventory: {} passes; the last checked {} sockets in {:.1} ms, {} break their \
             policy; {} ended in all\n",
            n(&inv["passes"]),
            n(&inv["checked"]),
            inv["last_seconds"].as_f64().unwrap_or(0.0) * 1e3,
            n(&inv["violations"]),
            n(&inv["ended"]),
        );
    }
    let delegated = &doc["delegated"];
    if n(&delegated["skipped"]) != 0 || n(&delegated["unfit"]) != 0 {
        out += &format!(
            "delegated subtrees: {} cgroups selected by name left out (policy says `delegated: skip`), \
             {} over the bounds",
            n(&delegated["skipped"]),
            n(&delegated["unfit"]),
        );
        let subtrees: Vec<String> = delegated["unfit_subtrees"]
            .as_array()
            .map(|a| a.iter().map(&s).collect())
            .unwrap_or_default();
        if !subtrees.is_empty() {
            out += &format!(" (in {})", subtrees.join(", "));
        }
        let held = delegated["held_subtrees"].as_array().map_or(0, Vec::len);
        if held > 0 {
            out += &format!("; {held} subtrees held fail-closed");
        }
        out += "\n";
    }
    for d in doc["degraded"].as_array().into_iter().flatten() {
        out += &format!("WARNING: {}\n", s(d));
    }
    match doc["cri"]["up"].as_bool() {
        Some(true) => {
            out += &format!(
                "CRI runtime: answers ({} failed calls)\n",
                n(&doc["cri"]["errors"])
            )
        }
        Some(false) => {
            out += &format!(
                "WARNING: the CRI runtime is NOT ANSWERING since {} ({} failed calls): pods keep \
                 the policies of its last answer; new pod cgroups are held by \
                 `portguard:identifying`\n",
                s(&doc["cri"]["failing_since"]),
                n(&doc["cri"]["errors"])
            );
        }
        None => {}
    }
    if let Some(e) = doc["kernel_error"].as_str() {
        out += &format!("WARNING: reading the kernel counters failed: {e}\n");
    }
    let hooks = &doc["runtime_hooks"];
    if hooks["requests"].as_u64().unwrap_or(0) > 0 {
        out += &format!(
            "runtime hooks: {} requests ({} refused), {:.2} ms mean, {:.2} ms slowest\n",
            n(&hooks["requests"]),
            n(&hooks["refused"]),
            hooks["mean_seconds"].as_f64().unwrap_or(0.0) * 1e3,
            hooks["slowest_seconds"].as_f64().unwrap_or(0.0) * 1e3
        );
    }
    for f in hooks["failures"].as_array().into_iter().flatten() {
        out += &format!(
            "WARNING: {} {} hook(s) could not reach the agent ({})\n",
            n(&f["count"]),
            s(&f["hook"]),
            s(&f["action"])
        );
    }
    out += &super::cost::render(&doc["program_stats"]);
    let empty = Vec::new();
    let policies = doc["policies"].as_array().unwrap_or(&empty);
    let mut w = tw();
    let _ = writeln!(
        w,
        "\nPOLICY\tMODE\tSELECTOR\tCGROUPS\tALLOWED\tDENIED\tAUDITED\tREPORTED\tSUPPRESSED\tLOST"
    );
    for p in policies {
        let d = &p["decisions"];
        let _ = writeln!(
            w,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            s(&p["name"]),
            s(&p["mode"]),
            s(&p["selector"]),
            p["cgroups"].as_array().map_or(0, Vec::len),
            n(&d["allow"]),
            n(&d["deny"]),
            n(&d["audit"]),
            n(&d["reported"]),
            n(&p["events"]["suppressed"]),
            n(&p["events"]["lost"]),
        );
    }
    out += &finish(w);
    let mut w = tw();
    let _ = writeln!(w, "\nGOVERNED CGROUP\tPOLICY\tWORKLOAD");
    let mut any = false;
    for p in policies {
        for c in p["cgroups"].as_array().unwrap_or(&empty) {
            any = true;
            let _ = writeln!(
                w,
                "{}\t{}\t{}",
                s(&c["path"]),
                s(&p["name"]),
                escape(&workload(c))
            );
        }
    }
    if any {
        out += &finish(w);
    } else {
        out += "\n(no cgroup is governed right now)\n";
    }
    out
}

/// `--status-socket`: a path, or `off`.
#[derive(Clone, Debug)]
pub struct SocketArg(pub Option<PathBuf>);

pub fn parse_socket_arg(s: &str) -> Result<SocketArg, String> {
    Ok(SocketArg((s != "off").then(|| PathBuf::from(s))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tables_from_a_document() {
        let doc = json!({
            "version": "0.1.0", "host": "node-1", "pid": 42, "started": "t0",
            "status": "enforcing 1 policies", "attach_cgroup": "/",
            "hooks": ["bind4", "bind6"], "listen": "denied (BPF LSM)",
            "events": {"written": 5, "aggregated": 100, "lost": 0},
            "reloads": {"ok": 2, "failed": 1}, "governed_cgroups": 1,
            "maps": [{"name": "policies", "entries": 1, "capacity": 16384}],
            "inventory": {"passes": 4, "checked": 12, "violations": 1, "ended": 2,
                          "last_seconds": 0.0031},
            "program_stats": {"runs": 10, "run_ns": 850, "ns_per_run": 85.0, "programs": [
                {"program": "bind4", "id": 7, "runs": 10, "run_ns": 850, "ns_per_run": 85.0},
            ]},
            "policies": [{
                "name": "payments-web", "mode": "enforce",
                "selector": "pods with namespace payments, app=web",
                "decisions": {"allow": 10, "deny": 3, "audit": 0, "reported": 0},
                "cgroups": [{"path": "/kubepods/besteffort/podX", "k8s_namespace": "payments",
                             "k8s_pod": "web-0", "k8s_pod_uid": "X"}],
            }],
        });
        let text = render(&doc);
        assert!(
            text.starts_with("portguard 0.1.0 on node-1, pid 42"),
            "{text}"
        );
        assert!(text.contains("reloads: 2 ok, 1 failed"), "{text}");
        assert!(text.contains("maps: policies 1/16384"), "{text}");
        assert!(
            text.contains(
                "inventory: 4 passes; the last checked 12 sockets in 3.1 ms, 1 break their \
                 policy; 2 ended in all"
            ),
            "{text}"
        );
        assert!(
            text.contains("program cost (--program-stats): 10 runs, 850 ns in all, 85 ns per run"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("payments-web"))
            .unwrap_or_else(|| panic!("{text}"));
        let cols: Vec<&str> = row.split("  ").filter(|c| !c.trim().is_empty()).collect();
        assert_eq!(cols.last().map(|c| c.trim()), Some("0"), "{row}");
        assert!(row.contains(" 10 ") && row.contains(" 3 "), "{row}");
        assert!(
            text.lines().any(
                |l| l.starts_with("/kubepods/besteffort/podX") && l.ends_with("payments/web-0")
            ),
            "{text}"
        );
    }

    #[test]
    fn hostile_names_are_escaped() {
        let doc = json!({
            "status": "enforcing 1 policies", "hooks": [], "maps": [],
            "policies": [{
                "name": "tenants", "mode": "enforce", "selector": "cgroup /tenants",
                "decisions": {},
                "cgroups": [{"path": "/tenants/x\u{1b}[2J\ny", "unit": "u\u{1b}]0;t\u{7}.service"}],
            }],
        });
        let text = render(&doc);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains(r"/tenants/x\x1b[2J\ny"), "{text}");
        assert!(text.contains(r"u\x1b]0;t\x07.service"), "{text}");
        assert!(
            !text.lines().any(|l| l.starts_with('y')),
            "a forged line: {text}"
        );
    }

    #[test]
    fn off_disables_the_socket() {
        assert!(parse_socket_arg("off").unwrap().0.is_none());
        assert_eq!(
            parse_socket_arg("/tmp/x.sock").unwrap().0,
            Some(PathBuf::from("/tmp/x.sock"))
        );
    }
}
