//! Which Linux capabilities the agent has, checked before anything is
//! loaded so that a container started with too few gets one clear message
//! instead of a verifier error.
//!
//! Required: CAP_NET_ADMIN (attach cgroup programs) and either CAP_SYS_ADMIN
//! or both CAP_BPF and CAP_PERFMON (load programs that read kernel memory).
//! Wanted: CAP_SYS_ADMIN (enter other network namespaces to list sockets
//! bound before the agent started), CAP_SYS_PTRACE (reach those namespaces
//! through other users' processes), CAP_DAC_READ_SEARCH (turn a cgroup id
//! from an event into its path).

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A capability set (bit N = capability N), as in /proc/self/status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps(pub u64);

impl Caps {
    fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }

    /// The effective set of this process.
    pub fn effective() -> std::io::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        parse_cap_eff(&status)
            .ok_or_else(|| std::io::Error::other("no CapEff line in /proc/self/status"))
    }
}

/// The `CapEff:` line of a /proc/<pid>/status text.
pub fn parse_cap_eff(status: &str) -> Option<Caps> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok().map(Caps)
}

/// What is wrong with `caps`: missing capabilities without which nothing
/// can be enforced (errors), and ones whose absence loses a feature
/// (warnings).
pub fn assess(caps: Caps) -> (Vec<String>, Vec<String>) {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    if !caps.has(CAP_NET_ADMIN) {
        errors.push("CAP_NET_ADMIN (to attach cgroup programs)".to_owned());
    }
    if !caps.has(CAP_SYS_ADMIN) {
        let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|(c, _)| !caps.has(*c))
            .map(|(_, n)| n)
            .collect();
        if !missing.is_empty() {
            errors.push(format!(
                "{} (to load the programs; or CAP_SYS_ADMIN, which implies both)",
                missing.join(" and ")
            ));
        }
        warnings.push(
            "CAP_SYS_ADMIN: sockets bound before the agent started are listed only in its own \
             network namespace"
                .to_owned(),
        );
    }
    if !caps.has(CAP_SYS_PTRACE) {
        warnings.push(
            "CAP_SYS_PTRACE: sockets held by other users' processes in other network namespaces \
             are not listed"
                .to_owned(),
        );
    }
    if !caps.has(CAP_DAC_READ_SEARCH) {
        warnings.push(
            "CAP_DAC_READ_SEARCH: events from cgroups created after the agent started may lack \
             their cgroup path"
                .to_owned(),
        );
    }
    (errors, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << 41) - 1;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tportguard\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(Caps(0x1ff_ffff_ffff)));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn root_and_the_minimal_set_pass() {
        assert_eq!(assess(Caps(ALL)), (vec![], vec![]));
        let minimal = [
            CAP_BPF,
            CAP_PERFMON,
            CAP_NET_ADMIN,
            CAP_SYS_ADMIN,
            CAP_SYS_PTRACE,
            CAP_DAC_READ_SEARCH,
        ]
        .iter()
        .fold(0, |m, c| m | 1 << c);
        assert_eq!(assess(Caps(minimal)), (vec![], vec![]));
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon() {
        let caps = Caps(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN);
        let (errors, warnings) = assess(caps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn missing_capabilities_are_named() {
        let (errors, _) = assess(Caps(1 << CAP_BPF | 1 << CAP_NET_ADMIN));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("CAP_PERFMON "), "{errors:?}");
        let (errors, _) = assess(Caps(0));
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("CAP_NET_ADMIN"));
        assert!(errors[1].contains("CAP_BPF and CAP_PERFMON"));
    }
}
