//! The OCSF objects portguard's events use (`metadata`, `device`,
//! `actor`, endpoints, `connection_info`, `firewall_rule`), borrowed from
//! the records they describe.

use serde::Serialize;

use super::OCSF_VERSION;

/// `metadata`.
#[derive(Serialize)]
pub struct Metadata<'a> {
    pub version: &'static str,
    pub product: Product,
    pub profiles: &'static [&'static str],
    pub log_name: &'static str,
    /// The time as portguard wrote it (nanoseconds).
    pub original_time: &'a str,
}

impl<'a> Metadata<'a> {
    pub(super) fn new(profiles: &'static [&'static str], original_time: &'a str) -> Self {
        Self {
            version: OCSF_VERSION,
            product: Product::PORTGUARD,
            profiles,
            log_name: "portguard events",
            original_time,
        }
    }
}

/// `metadata.product` (and an Application Lifecycle's `app`).
#[derive(Serialize)]
pub struct Product {
    pub name: &'static str,
    pub vendor_name: &'static str,
    pub version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<Feature>,
}

/// `product.feature`.
#[derive(Serialize)]
pub struct Feature {
    pub name: String,
}

impl Product {
    pub(super) const PORTGUARD: Self = Self {
        name: "portguard",
        vendor_name: "portguard",
        version: env!("CARGO_PKG_VERSION"),
        feature: None,
    };
}

/// `device`: the node or host the agent runs on.
#[derive(Serialize)]
pub struct Device<'a> {
    pub hostname: &'a str,
    pub name: &'a str,
    /// 0: Unknown (a server, a laptop: portguard cannot tell).
    pub type_id: u32,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl<'a> Device<'a> {
    pub(super) fn of(host: &'a str) -> Self {
        Self {
            hostname: host,
            name: host,
            type_id: 0,
            kind: "Unknown",
        }
    }
}

/// `actor`.
#[derive(Serialize)]
pub struct Actor<'a> {
    pub process: Process<'a>,
    pub user: User,
}

/// `actor.process`.
#[derive(Serialize)]
pub struct Process<'a> {
    pub pid: u32,
    pub tid: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
    pub user: User,
    /// Linux Users profile: the task's group.
    pub group: Group,
    /// Container profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container<'a>>,
}

/// `user`: only the numeric id is known (names are the host's and the
/// container's business, and differ between them).
#[derive(Serialize)]
pub struct User {
    pub uid: String,
}

/// `group`.
#[derive(Serialize)]
pub struct Group {
    pub uid: String,
}

/// `container`: the caller's container, and its pod's uid.
#[derive(Clone, Copy, Serialize)]
pub struct Container<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestrator: Option<&'static str>,
}

/// `src_endpoint`, `dst_endpoint`.
#[derive(Serialize)]
pub struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container<'a>>,
}

/// `connection_info`.
#[derive(Serialize)]
pub struct ConnectionInfo<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_num: Option<u8>,
    pub protocol_ver_id: u32,
    pub protocol_ver: &'static str,
    pub direction_id: u32,
    pub direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boundary_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boundary: Option<&'static str>,
}

/// `firewall_rule`: the policy that decided, and which part of it.
#[derive(Serialize)]
pub struct FirewallRule<'a> {
    pub name: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<&'a str>,
}
