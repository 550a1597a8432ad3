//! Builds the kernel programs (portguard-ebpf) for the BPF target with the
//! nightly toolchain and drops the object in OUT_DIR, where loader.rs embeds it.
//! Needs bpf-linker and the nightly rust-src component: run ./scripts/setup.sh.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // AYA_BUILD_SKIP=1 (the fuzz build, which never loads programs): an
    // empty object keeps the crate compiling; loading it would fail.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("portguard"), b"").context("writing the placeholder object")?;
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "portguard-ebpf")
        .ok_or_else(|| anyhow!("portguard-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the kernel programs failed; run ./scripts/setup.sh to install bpf-linker and \
         the nightly rust-src component",
    )
}
