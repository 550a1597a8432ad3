//! Policies the agent makes itself, and where a policy can apply at all:
//! - [`IDENTIFYING`] holds pod cgroups the CRI runtime has not identified
//!   yet: every bind and connect denied until their own policy applies;
//! - [`fail_closed`] stand-ins (`--fail-closed`): same selectors, every bind
//!   denied, for when the real policies cannot be applied; and [`UNFIT`],
//!   which holds a delegated subtree whose selected cgroups do not fit;
//! - [`outside_scope`]: policies on cgroups the programs are not attached
//!   above, which could never be enforced.
//!
//! Pure: imports nothing outside `crate::policy`.

use super::{CompiledPolicy, Mode, Policy, Selector, compile};

/// Prefix of the stand-in policies `--fail-closed` applies.
pub const FAIL_CLOSED: &str = "portguard:fail-closed";

/// Name of the built-in policy holding pod cgroups the runtime has not
/// identified yet.
pub const IDENTIFYING: &str = "portguard:identifying";

/// The built-in `portguard:identifying` policy: every bind and connect
/// denied.
pub fn identifying() -> CompiledPolicy {
    compile(&Policy {
        name: IDENTIFYING.to_owned(),
        selector: Selector::Cgroup("/".to_owned()),
        mode: Mode::Enforce,
        bind: Some(Vec::new()),
        connect: Some(Vec::new()),
        allow_sockets: Vec::new(),
        delegated: super::Delegated::Skip,
        line: 0,
    })
}

/// Name of the built-in policy `--fail-closed` puts on a delegated subtree
/// whose cgroups a policy selects by name but which are over the bounds
/// (`--max-delegated-cgroups`, the map's room).
pub const UNFIT: &str = "portguard:fail-closed:unfit";

/// The built-in `portguard:fail-closed:unfit` policy: every bind denied,
/// connects unrestricted (as the `--fail-closed` stand-ins).
pub fn unfit() -> CompiledPolicy {
    CompiledPolicy {
        name: UNFIT.to_owned(),
        connect: None,
        ..identifying()
    }
}

/// `--fail-closed` stand-ins for `policies`: same selectors, every bind
/// denied, connects as the policy says. They need no port sets, so they
/// fit where the real ones did not (unless the cgroups themselves do not).
pub fn fail_closed(policies: &[CompiledPolicy]) -> Vec<CompiledPolicy> {
    let deny = identifying();
    policies
        .iter()
        .map(|p| CompiledPolicy {
            name: format!("{FAIL_CLOSED}:{}", p.name),
            selector: p.selector.clone(),
            mode: Mode::Enforce,
            bind: deny.bind.clone(),
            connect: None,
            allow_sockets: 0,
            delegated: p.delegated,
        })
        .collect()
}

/// True when `cgroup` is `scope` or below it.
pub fn within(cgroup: &str, scope: &str) -> bool {
    scope == "/"
        || cgroup == scope
        || cgroup
            .strip_prefix(scope)
            .is_some_and(|r| r.starts_with('/'))
}

/// Policies whose cgroup lies outside `scope` (where the programs are
/// attached), named with their path: they could never be enforced.
pub fn outside_scope(policies: &[CompiledPolicy], scope: &str) -> Vec<String> {
    policies
        .iter()
        .filter_map(|p| {
            let path = p.selector.cgroup_path()?;
            (!within(path, scope)).then(|| format!("`{}` ({path})", p.name))
        })
        .collect()
}

#[cfg(test)]
mod scope_tests {
    use super::within;

    #[test]
    fn scope() {
        assert!(within("/a/b", "/"));
        assert!(within("/a/b", "/a"));
        assert!(within("/a", "/a"));
        assert!(!within("/ab", "/a"));
        assert!(!within("/", "/a"));
    }
}
