//! Which form an event line takes ([`Format`]): portguard's own JSON (the
//! default, docs/events.md), an OCSF event (`ocsf`) or an ECS document
//! (`ecs`); and [`EventLine`], what every kind of line can be written as.

use serde::Serialize;

use super::{EventRecord, LostRecord, SuppressedRecord};

/// The form of each event line (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// portguard's own JSON lines (docs/events.md, docs/event.schema.json).
    #[default]
    Json,
    /// OCSF 1.3.0 events: decisions as Network Activity (4001), loss and
    /// suppression reports as Event Log Activity (1008), hook failures as
    /// Application Lifecycle (6002); see docs/ocsf.md.
    Ocsf,
    /// Elastic Common Schema documents, the portguard line under
    /// `portguard`; see docs/ocsf.md.
    Ecs,
}

/// A kind of event line: a decision, a loss or suppression report, a hook
/// failure. Written as itself ([`Format::Json`]) or mapped.
pub trait EventLine: Serialize {
    /// This line as an OCSF event.
    fn ocsf(&self) -> impl Serialize + '_;
    /// This line as an ECS document.
    fn ecs(&self) -> serde_json::Value;
    /// journald priority: Warning (true) or Notice.
    fn journal_warning(&self) -> bool;
}

impl EventLine for EventRecord {
    fn ocsf(&self) -> impl Serialize + '_ {
        EventRecord::ocsf(self)
    }
    fn ecs(&self) -> serde_json::Value {
        EventRecord::ecs(self)
    }
    fn journal_warning(&self) -> bool {
        self.verdict == super::Verdict::Deny
    }
}

impl EventLine for LostRecord {
    fn ocsf(&self) -> impl Serialize + '_ {
        LostRecord::ocsf(self)
    }
    fn ecs(&self) -> serde_json::Value {
        LostRecord::ecs(self)
    }
    fn journal_warning(&self) -> bool {
        true
    }
}

impl EventLine for SuppressedRecord {
    fn ocsf(&self) -> impl Serialize + '_ {
        SuppressedRecord::ocsf(self)
    }
    fn ecs(&self) -> serde_json::Value {
        SuppressedRecord::ecs(self)
    }
    fn journal_warning(&self) -> bool {
        true
    }
}
