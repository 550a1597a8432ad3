//! Capabilities that let a governed container answer on ports its policy
//! does not allow, around portguard's hooks:
//! - `NET_RAW`: an `AF_PACKET` socket sees every frame of the pod's network
//!   namespace and can answer a UDP datagram (or forge a TCP handshake) on
//!   any port without binding it; no bind, listen or socket-create hook
//!   judges that.
//! - `NET_ADMIN` (in the pod's own network namespace): an iptables
//!   `REDIRECT`/`TPROXY` rule or `route_localnet` sends traffic for any
//!   port to a port the policy allows only on loopback, exposing it.
//! - `privileged: true`: both, and more.
//!
//! Adding one of them to a governed container is a `net-capability`
//! warning. Keeping the `NET_RAW` that containerd and Docker grant by
//! default (not dropping it) is only counted into a note: nearly every
//! container keeps it, so a finding per container would drown the real
//! ones; the fix is cluster-wide (Pod Security `restricted`).
//!
//! Owns those two checks. May import the manifest model (`super::super`).

use super::super::{Check, Finding, Origin, Unit};

/// What each capability allows around portguard, for messages.
fn why(cap: &str) -> &'static str {
    match cap {
        "NET_RAW" => {
            "an AF_PACKET socket can answer UDP (and forge TCP) on any port without binding it, \
             which no portguard hook sees"
        }
        _ => {
            "in its own network namespace, an iptables REDIRECT/TPROXY rule or route_localnet can \
             expose a port the policy allows only on loopback"
        }
    }
}

const FIX: &str = "drop it (`securityContext.capabilities.drop: [ALL]`, compose `cap_drop: \
                   [ALL]`); the Pod Security `restricted` profile enforces that";

/// Warnings for the `governed` units that add `NET_RAW`/`NET_ADMIN` or are
/// privileged; and the governed units that keep the runtime's default
/// `NET_RAW`, described with where they are.
pub(super) fn capabilities(
    units: &[Unit],
    governed: &[bool],
    out: &mut Vec<Finding>,
) -> Vec<String> {
    let mut keep_net_raw = Vec::new();
    for (u, _) in units.iter().zip(governed).filter(|&(_, g)| *g) {
        if u.origin == Origin::Dockerfile {
            continue;
        }
        let who = super::capitalize(&u.describe());
        if let Some(loc) = &u.net.privileged {
            out.push(Finding::new(
                Check::NetCapability,
                loc.clone(),
                format!(
                    "{who} is privileged (every capability): with NET_RAW {}; with NET_ADMIN {}. \
                     Run it unprivileged and {FIX}",
                    why("NET_RAW"),
                    why("NET_ADMIN")
                ),
            ));
        }
        for (cap, loc) in &u.net.added {
            out.push(Finding::new(
                Check::NetCapability,
                loc.clone(),
                format!(
                    "{who} adds capability {cap}, which portguard does not judge: {}. Unless it \
                     needs it, {FIX}",
                    why(cap)
                ),
            ));
        }
        if u.net.privileged.is_none()
            && !u.net.added.iter().any(|(c, _)| *c == "NET_RAW")
            && !u.net.drops_net_raw
        {
            keep_net_raw.push(format!("{} ({})", u.loc, u.describe()));
        }
    }
    keep_net_raw
}
