//! Builds the kernel programs (portguard-ebpf) for the BPF target with the
//! nightly toolchain and drops the object in OUT_DIR, where loader.rs embeds it.
//! Needs bpf-linker and the nightly rust-src component: run ./scripts/setup.sh.
//!
//! The nested cargo runs here, not through `aya_build::build_ebpf`, with
//! the very command, flags, environment and target directory that
//! aya-build 0.2.0 uses (aya-build/src/lib.rs), so the object is the same
//! byte for byte. What differs is what it prints: aya-build forwards every
//! line the nested cargo writes on stderr as `cargo:warning`, so a cold
//! build showed about 50 `warning: portguard@0.1.0: Compiling ...` lines,
//! and aya-build cannot be told otherwise. Here cargo's progress lines
//! (`Compiling`, `Finished`, ...) become one summary line; the compiler's
//! diagnostics and anything else cargo says (its warnings and errors) are
//! forwarded as they are. `PORTGUARD_EBPF_BUILD_VERBOSE=1` forwards
//! everything, as aya-build did.

use std::{
    ffi::{OsStr, OsString},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

/// The toolchain aya-build's `Toolchain::default()` names.
const TOOLCHAIN: &str = "nightly";

/// Words that open a progress line of cargo's (after the indentation).
const PROGRESS: [&str; 14] = [
    "Compiling",
    "Finished",
    "Fresh",
    "Running",
    "Building",
    "Blocking",
    "Updating",
    "Downloading",
    "Downloaded",
    "Locking",
    "Adding",
    "Checking",
    "Dirty",
    "Packaging",
];

fn is_progress(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .is_some_and(|w| PROGRESS.contains(&w))
}

fn main() -> anyhow::Result<()> {
    // AYA_BUILD_SKIP=1 (the fuzz build, which never loads programs): empty
    // objects (both builds, see kernel/cache.rs) keep the crate compiling;
    // loading them would fail.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PORTGUARD_EBPF_BUILD_VERBOSE");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        for object in ["portguard", "portguard-cached"] {
            std::fs::write(out_dir.join(object), b"").context("writing the placeholder objects")?;
        }
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
    build_ebpf(ebpf.name.as_str(), root_dir.as_std_path(), &out_dir).context(
        "building the kernel programs failed; run ./scripts/setup.sh to install bpf-linker and \
         the nightly rust-src component",
    )
}

/// aya-build 0.2.0's `build_ebpf` for one package with default features,
/// with quieter output (see the module docs).
fn build_ebpf(name: &str, root_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let verbose = std::env::var_os("PORTGUARD_EBPF_BUILD_VERBOSE").is_some_and(|v| v == "1");
    let env = |k: &str| std::env::var(k).with_context(|| format!("{k} not set"));
    let target = match env("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "big" => "bpfeb-unknown-none",
        "little" => "bpfel-unknown-none",
        e => bail!("unsupported endian={e}"),
    };
    let mut bpf_target_arch = env("CARGO_CFG_TARGET_ARCH")?;
    if bpf_target_arch.starts_with("riscv64") {
        bpf_target_arch = "riscv64".to_owned();
    }
    let prefix: Vec<OsString> = match which::which("rustup") {
        Ok(rustup) => vec![rustup.into(), "run".into(), TOOLCHAIN.into()],
        Err(err) => {
            println!("cargo:warning=which(rustup)={err}; proceeding with current toolchain");
            Vec::new()
        }
    };
    let cmd = |program: &str| match prefix.split_first() {
        None => Command::new(program),
        Some((wrapper, args)) => {
            let mut c = Command::new(wrapper);
            c.args(args).arg(program);
            c
        }
    };
    let channel = rustc_version::VersionMeta::for_command(cmd("rustc"))
        .context("failed to get rustc version meta")?
        .channel;
    // As aya-build: RUSTC_BOOTSTRAP decides whether -Z flags may be used.
    let use_build_std = match std::env::var_os("RUSTC_BOOTSTRAP") {
        Some(b) if b == "1" || b == OsStr::new(name) => true,
        Some(b) if b == "-1" => false,
        _ => channel == rustc_version::Channel::Nightly,
    };
    // Rebuild when the kernel crate's files change (the build-dependency
    // only covers its library target).
    println!("cargo:rerun-if-changed={}", root_dir.display());

    let mut c = cmd("cargo");
    c.args([
        "build",
        "--package",
        name,
        "--bins",
        "--message-format=json",
        "--release",
        "--target",
        target,
    ]);
    if use_build_std {
        c.args(["-Z", "build-std=core"]);
    }
    c.args(["--features", ""]);
    c.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{bpf_target_arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    );
    // aya-build's workaround: the outer cargo's RUSTC would pin the nested
    // build to the stable compiler.
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER"] {
        c.env_remove(key);
    }
    // The agent's log filter is not the linker's: bpf-linker logs at
    // RUST_LOG's level on stderr, which rustc relays as ~60 "linker stderr"
    // warnings (`cargo xtask integration-test` runs cargo with
    // RUST_LOG=debug). PORTGUARD_EBPF_BUILD_VERBOSE=1 does not change this.
    c.env_remove("RUST_LOG");
    // Separate from OUT_DIR's artifacts (cargo issue 6412), and where
    // aya-build puts it, so a build tree it made is reused.
    let target_dir = out_dir.join("aya-build").join("target").join(name);
    c.arg("--target-dir").arg(&target_dir);

    let started = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to spawn {c:?}"))?;
    let stderr = BufReader::new(child.stderr.take().context("stderr")?);
    // cargo's own lines: progress is counted, the rest forwarded.
    let stderr = std::thread::spawn(move || {
        let mut compiled = 0usize;
        for line in stderr.lines().map_while(Result::ok) {
            if !verbose && is_progress(&line) {
                compiled += usize::from(line.trim_start().starts_with("Compiling"));
            } else {
                println!("cargo:warning={line}");
            }
        }
        compiled
    });
    let stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut executables = Vec::new();
    for message in cargo_metadata::Message::parse_stream(stdout) {
        match message.context("cargo stdout stream contains invalid JSON")? {
            cargo_metadata::Message::CompilerArtifact(a) => {
                if let Some(exe) = a.executable {
                    executables.push((a.target.name, exe.into_std_path_buf()));
                }
            }
            // The compiler's warnings and errors: always shown.
            cargo_metadata::Message::CompilerMessage(m) => {
                for line in m.message.rendered.unwrap_or_default().lines() {
                    println!("cargo:warning={line}");
                }
            }
            cargo_metadata::Message::TextLine(line) => println!("cargo:warning={line}"),
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for {c:?}"))?;
    let compiled = stderr
        .join()
        .map_err(|_| anyhow!("the thread reading cargo's stderr panicked"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    for (name, binary) in executables {
        let dst = out_dir.join(&name);
        std::fs::copy(&binary, &dst)
            .with_context(|| format!("failed to copy {} to {}", binary.display(), dst.display()))?;
    }
    if compiled > 0 {
        println!(
            "cargo:warning=kernel programs built ({name} for {target} with the {TOOLCHAIN} \
             toolchain: {compiled} crate{} compiled in {:.0} s; \
             PORTGUARD_EBPF_BUILD_VERBOSE=1 shows the nested cargo's progress)",
            if compiled == 1 { "" } else { "s" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
