//! Event lines as Elastic Common Schema documents (`--format ecs`;
//! docs/ocsf.md has the table). ECS fields where ECS has them (`@timestamp`,
//! `event.*`, `process.*`, `user.id`, `container.*`, `orchestrator.*`,
//! `source`/`destination`, `network.*`, `rule.*`, `host.*`); the whole
//! portguard line, unchanged, under `portguard`, so nothing is lost.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{EventRecord, LostRecord, SuppressedRecord, Verdict, ocsf};

/// The ECS version the documents follow (`ecs.version`).
pub const ECS_VERSION: &str = "8.11.0";

/// The fields every document has, and the portguard line under `portguard`.
fn base<T: Serialize>(time: &str, host: &str, line: &T) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("@timestamp".into(), json!(time));
    m.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    m.insert("host".into(), json!({ "name": host, "hostname": host }));
    m.insert(
        "agent".into(),
        json!({ "type": "portguard", "version": env!("CARGO_PKG_VERSION") }),
    );
    m.insert(
        "portguard".into(),
        serde_json::to_value(line).unwrap_or(Value::Null),
    );
    m
}

impl EventRecord {
    /// This decision as an ECS document.
    pub fn ecs(&self) -> Value {
        let (class, direction_id) = ocsf::activity(self.hook);
        let outcome = ocsf::outcome(self.verdict, self.action);
        let mut m = base(&self.time, &self.host, self);
        let mut event = json!({
            "kind": if self.verdict == Verdict::Audit { "alert" } else { "event" },
            "category": ["network"],
            "type": ["connection", if outcome.action_id == 1 { "allowed" } else { "denied" }],
            "action": self.hook.name(),
            "outcome": match outcome.status_id { 1 => "success", 2 => "failure", _ => "unknown" },
            "module": "portguard",
            "dataset": "portguard.events",
            "provider": "portguard",
            "severity": outcome.severity_id,
            "created": self.time,
        });
        if let (Some(first), Some(last)) = (&self.first_seen, &self.last_seen) {
            event["start"] = json!(first);
            event["end"] = json!(last);
        }
        if let Some(rule) = &self.rule {
            event["reason"] = json!(rule);
        }
        m.insert("event".into(), event);
        m.insert("message".into(), json!(ocsf::message(self)));
        if self.pid != 0 {
            m.insert(
                "process".into(),
                json!({ "pid": self.pid, "name": self.comm, "thread": { "id": self.tid } }),
            );
            m.insert("user".into(), json!({ "id": self.uid.to_string() }));
            m.insert("group".into(), json!({ "id": self.gid.to_string() }));
        }
        let id = &self.identity;
        if id.container_id.is_some() || id.container_name.is_some() {
            let mut c = Map::new();
            if let Some(v) = &id.container_id {
                c.insert("id".into(), json!(v));
            }
            if let Some(v) = &id.container_name {
                c.insert("name".into(), json!(v));
            }
            m.insert("container".into(), Value::Object(c));
        }
        if id.k8s_pod_uid.is_some() || id.k8s_pod.is_some() {
            let mut o = json!({ "type": "kubernetes", "resource": { "type": "pod" } });
            if let Some(ns) = &id.k8s_namespace {
                o["namespace"] = json!(ns);
            }
            if let Some(p) = &id.k8s_pod {
                o["resource"]["name"] = json!(p);
            }
            if let Some(u) = &id.k8s_pod_uid {
                o["resource"]["id"] = json!(u);
            }
            m.insert("orchestrator".into(), o);
        }
        if let Some(unit) = &id.unit {
            m.insert("service".into(), json!({ "name": unit, "type": "systemd" }));
        }
        let mut network = json!({ "type": self.family, "direction": match direction_id {
            1 => "ingress", 2 => "egress", _ => "unknown" } });
        if !self.protocol.is_empty() {
            network["transport"] = json!(self.protocol);
        }
        m.insert("network".into(), network);
        if self.address.parse::<std::net::IpAddr>().is_ok() {
            // Bind, listen, inventory: the caller's own end; connect and
            // sendmsg: where it was going.
            let side = if direction_id == 2 {
                "destination"
            } else {
                "source"
            };
            m.insert(
                side.into(),
                json!({ "ip": self.address, "address": self.address, "port": self.port }),
            );
        }
        if let Some(p) = &self.policy {
            let mut rule =
                json!({ "name": p, "ruleset": "portguard", "category": class.activity_name });
            if let Some(r) = &self.rule {
                rule["id"] = json!(format!("{p}/{r}"));
            }
            m.insert("rule".into(), rule);
        }
        Value::Object(m)
    }
}

impl LostRecord {
    /// This report as an ECS document (`event.kind: metric`).
    pub fn ecs(&self) -> Value {
        let mut m = base(&self.time, &self.host, self);
        let mut event = json!({
            "kind": "metric", "category": ["host"], "type": ["info"],
            "action": "events_lost", "outcome": "failure",
            "module": "portguard", "dataset": "portguard.events", "provider": "portguard",
            "severity": 3, "created": self.time,
        });
        if let (Some(s), Some(u)) = (&self.since, &self.until) {
            event["start"] = json!(s);
            event["end"] = json!(u);
        }
        m.insert("event".into(), event);
        m.insert(
            "message".into(),
            json!(format!(
                "portguard: the kernel could not queue {} event(s)",
                self.lost
            )),
        );
        Value::Object(m)
    }
}

impl SuppressedRecord {
    /// This report as an ECS document (`event.kind: metric`).
    pub fn ecs(&self) -> Value {
        let mut m = base(&self.time, &self.host, self);
        m.insert(
            "event".into(),
            json!({
                "kind": "metric", "category": ["host"], "type": ["info"],
                "action": "events_suppressed", "outcome": "success",
                "module": "portguard", "dataset": "portguard.events", "provider": "portguard",
                "severity": 2, "created": self.time,
            }),
        );
        m.insert(
            "rule".into(),
            json!({ "name": self.policy, "ruleset": "portguard" }),
        );
        m.insert(
            "message".into(),
            json!(format!(
                "portguard: policy {} made {} decision(s) beyond its event budget",
                self.policy, self.suppressed
            )),
        );
        Value::Object(m)
    }
}

/// A runtime hook failure as an ECS document (`line`: the hook's line).
pub fn hook_failed<T: Serialize>(
    time: &str,
    host: &str,
    refused: bool,
    reason: &str,
    container_id: Option<&str>,
    line: &T,
) -> Value {
    let mut m = base(time, host, line);
    m.insert(
        "event".into(),
        json!({
            "kind": "event", "category": ["process"],
            "type": ["start", if refused { "denied" } else { "allowed" }],
            "action": "hook_failed", "outcome": "failure",
            "module": "portguard", "dataset": "portguard.events", "provider": "portguard",
            "severity": if refused { 3 } else { 4 }, "created": time,
        }),
    );
    m.insert("error".into(), json!({ "message": reason }));
    m.insert("message".into(), json!(reason));
    if let Some(id) = container_id {
        m.insert("container".into(), json!({ "id": id }));
    }
    Value::Object(m)
}
