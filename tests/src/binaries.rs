//! Where the binaries under test are: the agent (`$PORTGUARD_BIN` or the
//! cargo target directory) and the tests crate's own `pgbench` and `pgprobe`.

use std::path::{Path, PathBuf};

fn target_dir_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps");
    profile_dir.join(name)
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTGUARD_BIN") {
        return PathBuf::from(p);
    }
    let p = target_dir_binary("portguard");
    assert!(
        p.exists(),
        "agent binary {} not found: build it first (cargo build -p portguard), or run \
         `cargo xtask integration-test`, or set PORTGUARD_BIN",
        p.display()
    );
    p
}

/// The storm/benchmark loop binary (`pgbench`).
pub fn pgbench_bin() -> PathBuf {
    let p = target_dir_binary("pgbench");
    assert!(
        p.exists(),
        "{} not found: build the tests crate's binaries",
        p.display()
    );
    p
}

/// The probe binary (built by cargo next to the integration test binary).
pub fn probe_bin() -> PathBuf {
    let p = target_dir_binary("pgprobe");
    assert!(
        p.exists(),
        "{} not found: build the tests crate's binaries",
        p.display()
    );
    p
}
