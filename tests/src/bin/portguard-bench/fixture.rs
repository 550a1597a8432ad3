//! The benchmark's fixture: its cgroups (one subtree per setup, 10,000
//! children for the scale setups), the setups and their policies, and
//! starting an agent pinned to CPU 0.

use std::path::PathBuf;

use portguard_tests::{Agent, Cgroup};

fn pin(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU, applied to a child we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set);
    }
}

pub(crate) fn start_agent(policy: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--rescan-interval", "1h"];
    args.extend_from_slice(extra);
    let a = Agent::start_with(policy, &args);
    pin(a.pid(), 0);
    a
}

fn policy_line(name: &str, cgroup: &str, ports: &str) -> String {
    format!(
        "  - {{name: {name}, cgroup: {cgroup}, bind: [{{ports: [{ports}]}}], connect: [{{ports: [{ports}]}}]}}\n"
    )
}

/// `n` policies on `parent/c{i}`, `distinct` different port sets among them.
pub(crate) fn scale_policy(parent: &Cgroup, n: usize, distinct: usize) -> String {
    let mut s = String::from("policies:\n");
    for i in 0..n {
        let extra = 20000 + (i % distinct.max(1));
        s.push_str(&policy_line(
            &format!("p{i}"),
            &format!("{}/c{i}", parent.rel),
            &format!("8080, {extra}"),
        ));
    }
    s
}

pub(crate) fn make_children(parent: &Cgroup, n: usize) {
    for i in 0..n {
        let p = parent.fs.join(format!("c{i}"));
        if !p.exists() {
            std::fs::create_dir(&p).expect("mkdir cgroup");
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setup {
    Baseline = 0,
    OnePolicy,
    Scale10k,
    Ranges1000,
    Ancestor5,
    Landlock,
    Floor,
}

impl Setup {
    pub(crate) const ALL: [Self; 7] = [
        Self::Baseline,
        Self::OnePolicy,
        Self::Scale10k,
        Self::Ranges1000,
        Self::Ancestor5,
        Self::Landlock,
        Self::Floor,
    ];
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Baseline => "no program attached (baseline)",
            Self::OnePolicy => "portguard, 1 policy",
            Self::Scale10k => "portguard, 10,000 governed cgroups / 1,000 distinct policies",
            Self::Ranges1000 => "portguard, 1 policy with 1,000 disjoint port ranges",
            Self::Ancestor5 => "portguard, policy found on the 5th ancestor",
            Self::Landlock => "Landlock (TCP bind restricted to the same port)",
            Self::Floor => "empty programs on the same hooks (the dispatch floor)",
        }
    }
    pub(crate) fn agent(self) -> bool {
        !matches!(self, Self::Baseline | Self::Landlock | Self::Floor)
    }
}

pub(crate) struct Fixture {
    pub(crate) root: Cgroup,
    plain: Cgroup,
    one: Cgroup,
    pub(crate) scale: Cgroup,
    ranges: Cgroup,
    anc: Cgroup,
    anc_leaf: Cgroup,
    floor: Cgroup,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let root = Cgroup::new("bench");
        // Outside the benchmark's cgroup, which is the attach point of the
        // setups' policies: a process here runs no decision program.
        let plain = Cgroup::new("bench-plain");
        let one = root.child("one");
        let scale = root.child("scale");
        make_children(&scale, 10_000);
        let ranges = root.child("ranges");
        let anc = root.child("anc");
        let anc_leaf = anc.child("l1/l2/l3/l4/l5");
        // The dispatch floor's empty programs are attached here only:
        // outside the benchmark's cgroup too, as portguard attaches its
        // programs to a governed cgroup's parent (`bench` for `one`), so a
        // process here never runs portguard's programs besides the empty
        // ones while the 1-policy agent runs for the back-to-back figures.
        let floor = Cgroup::new("bench-floor");
        Self {
            root,
            plain,
            one,
            scale,
            ranges,
            anc,
            anc_leaf,
            floor,
        }
    }

    pub(crate) fn policy(&self, s: Setup) -> String {
        match s {
            Setup::OnePolicy => format!("policies:\n{}", policy_line("one", &self.one.rel, "8080")),
            Setup::Scale10k => scale_policy(&self.scale, 10_000, 1000),
            Setup::Ranges1000 => {
                let ranges: Vec<String> = (0..1000)
                    .map(|i| format!("\"{}-{}\"", 10000 + 4 * i, 10001 + 4 * i))
                    .collect();
                format!(
                    "policies:\n{}",
                    policy_line(
                        "ranges",
                        &self.ranges.rel,
                        &format!("8080, {}", ranges.join(", "))
                    )
                )
            }
            Setup::Ancestor5 => format!("policies:\n{}", policy_line("anc", &self.anc.rel, "8080")),
            Setup::Baseline | Setup::Landlock | Setup::Floor => unreachable!(),
        }
    }

    /// Where the agent attaches its programs for a setup.
    pub(crate) fn attach_point(&self, s: Setup) -> String {
        match s {
            Setup::OnePolicy => self.one.rel.clone(),
            Setup::Scale10k => self.scale.rel.clone(),
            Setup::Ranges1000 => self.ranges.rel.clone(),
            Setup::Ancestor5 => self.anc.rel.clone(),
            Setup::Baseline | Setup::Landlock | Setup::Floor => unreachable!(),
        }
    }

    /// Where pgbench runs for a setup.
    pub(crate) fn cgroup(&self, s: Setup) -> PathBuf {
        match s {
            Setup::Baseline | Setup::Landlock => self.plain.fs.clone(),
            Setup::OnePolicy => self.one.fs.clone(),
            Setup::Scale10k => self.scale.fs.join("c0"),
            Setup::Ranges1000 => self.ranges.fs.clone(),
            Setup::Ancestor5 => self.anc_leaf.fs.clone(),
            Setup::Floor => self.floor.fs.clone(),
        }
    }
}
