//! Lines that are not decisions, as OCSF events: loss and suppression
//! reports (Event Log Activity, 1008) and runtime hook failures
//! (Application Lifecycle, 6002).

use serde::Serialize;

use super::{
    Classification, Device, FAILURE, Feature, HIGH, LOW, MEDIUM, Metadata, Product,
    REPORT_PROFILES, SUCCESS, millis,
};
use crate::events::{LostRecord, PolicyLost, SuppressedRecord};

/// Event Log Activity (1008), in the System Activity category (1): a
/// report about the event log itself.
const fn event_log(activity_name: &'static str) -> Classification {
    Classification {
        class_uid: 1008,
        class_name: "Event Log Activity",
        category_uid: 1,
        category_name: "System Activity",
        activity_id: 99,
        activity_name,
        type_uid: 100_899,
        type_name: "Event Log Activity: Other",
    }
}

/// A report of decisions written as no line of their own, as an OCSF
/// Event Log Activity event.
#[derive(Serialize)]
pub struct EventLog<'a, U: Serialize> {
    #[serde(flatten)]
    pub class: Classification,
    pub time: i64,
    pub time_dt: &'a str,
    pub severity_id: u32,
    pub severity: &'static str,
    pub status_id: u32,
    pub status: &'static str,
    pub status_detail: &'static str,
    pub message: String,
    /// The decisions the report stands for.
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time_dt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time_dt: Option<&'a str>,
    pub log_name: &'static str,
    pub log_provider: &'static str,
    pub metadata: Metadata<'a>,
    pub device: Device<'a>,
    pub unmapped: U,
}

/// [`LostRecord`]'s fields under `unmapped`.
#[derive(Serialize)]
pub struct LostUnmapped<'a> {
    pub schema_version: u32,
    pub lost: u64,
    pub lost_total: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub agent_restarted: bool,
    #[serde(skip_serializing_if = "<[PolicyLost]>::is_empty")]
    pub policies: &'a [PolicyLost],
}

/// [`SuppressedRecord`]'s fields under `unmapped`.
#[derive(Serialize)]
pub struct SuppressedUnmapped<'a> {
    pub schema_version: u32,
    pub policy: &'a str,
    pub suppressed: u64,
    pub suppressed_total: u64,
}

impl LostRecord {
    /// This report as an OCSF Event Log Activity event (`Events Lost`).
    pub fn ocsf(&self) -> EventLog<'_, LostUnmapped<'_>> {
        let mut message = format!(
            "portguard: the kernel could not queue {} event(s) ({} since the programs were installed)",
            self.lost, self.lost_total
        );
        if self.agent_restarted {
            message.push_str(" while no agent was reading");
        }
        EventLog {
            class: event_log("Events Lost"),
            time: millis(&self.time),
            time_dt: &self.time,
            severity_id: MEDIUM.0,
            severity: MEDIUM.1,
            status_id: FAILURE.0,
            status: FAILURE.1,
            status_detail: "ring buffer full",
            message,
            count: self.lost,
            start_time: self.since.as_deref().map(millis),
            start_time_dt: self.since.as_deref(),
            end_time: self.until.as_deref().map(millis),
            end_time_dt: self.until.as_deref(),
            log_name: "portguard events",
            log_provider: "portguard",
            metadata: Metadata::new(REPORT_PROFILES, &self.time),
            device: Device::of(&self.host),
            unmapped: LostUnmapped {
                schema_version: self.schema_version,
                lost: self.lost,
                lost_total: self.lost_total,
                agent_restarted: self.agent_restarted,
                policies: &self.policies,
            },
        }
    }
}

impl SuppressedRecord {
    /// This report as an OCSF Event Log Activity event (`Events
    /// Suppressed`).
    pub fn ocsf(&self) -> EventLog<'_, SuppressedUnmapped<'_>> {
        EventLog {
            class: event_log("Events Suppressed"),
            time: millis(&self.time),
            time_dt: &self.time,
            severity_id: LOW.0,
            severity: LOW.1,
            status_id: SUCCESS.0,
            status: SUCCESS.1,
            status_detail: "policy event budget (--event-rate, --event-burst) spent",
            message: format!(
                "portguard: policy {} made {} decision(s) beyond its event budget, enforced but written as no event ({} in all)",
                self.policy, self.suppressed, self.suppressed_total
            ),
            count: self.suppressed,
            start_time: None,
            start_time_dt: None,
            end_time: None,
            end_time_dt: None,
            log_name: "portguard events",
            log_provider: "portguard",
            metadata: Metadata::new(REPORT_PROFILES, &self.time),
            device: Device::of(&self.host),
            unmapped: SuppressedUnmapped {
                schema_version: self.schema_version,
                policy: &self.policy,
                suppressed: self.suppressed,
                suppressed_total: self.suppressed_total,
            },
        }
    }
}

/// A runtime hook failure as an OCSF Application Lifecycle event.
#[derive(Serialize)]
pub struct AppLifecycle<'a, U: Serialize> {
    #[serde(flatten)]
    pub class: Classification,
    pub time: i64,
    pub time_dt: &'a str,
    pub severity_id: u32,
    pub severity: &'static str,
    pub status_id: u32,
    pub status: &'static str,
    pub status_detail: &'a str,
    pub message: String,
    pub app: Product,
    pub metadata: Metadata<'a>,
    pub device: Device<'a>,
    pub unmapped: U,
}

/// A runtime hook (`hook`: `oci`, `unit`) could not confirm its workload
/// was governed before it started; `refused`: it failed closed (the
/// workload did not start). As an Application Lifecycle event (class 6002)
/// of portguard's hook, activity Other (`Hook Failed`): High when the
/// workload started anyway (it may have run ungoverned), Medium when it was
/// refused. `unmapped`: the hook's line.
pub fn hook_failed<'a, U: Serialize>(
    time: &'a str,
    host: &'a str,
    hook: &str,
    refused: bool,
    reason: &'a str,
    workload: &str,
    unmapped: U,
) -> AppLifecycle<'a, U> {
    let severity = if refused { MEDIUM } else { HIGH };
    AppLifecycle {
        class: Classification {
            class_uid: 6002,
            class_name: "Application Lifecycle",
            category_uid: 6,
            category_name: "Application Activity",
            activity_id: 99,
            activity_name: "Hook Failed",
            type_uid: 600_299,
            type_name: "Application Lifecycle: Other",
        },
        time: millis(time),
        time_dt: time,
        severity_id: severity.0,
        severity: severity.1,
        status_id: FAILURE.0,
        status: FAILURE.1,
        status_detail: reason,
        message: format!(
            "portguard hook {hook} could not confirm {workload} was governed; {}: {reason}",
            if refused {
                "its start was refused"
            } else {
                "it started anyway"
            }
        ),
        app: Product {
            feature: Some(Feature {
                name: format!("hook {hook}"),
            }),
            ..Product::PORTGUARD
        },
        metadata: Metadata::new(REPORT_PROFILES, time),
        device: Device::of(host),
        unmapped,
    }
}
