//! Build and test orchestration for portguard (not builds of the kernel
//! object: portguard/build.rs does that). Run `cargo xtask --help`.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "portguard build and test orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The whole suite, as CI runs it: formatting, clippy (userspace and
    /// kernel crates), unit tests, the privileged integration tests, then
    /// the deterministic fuzzing pass of each fuzz target: every committed
    /// corpus input replayed, and a fixed-seed, fixed-count mutation pass
    /// (about 60 s each). The same commit does the same work every time.
    Test {
        /// Skip the privileged integration tests (for non-root development
        /// machines; CI runs as root and must not use this).
        #[arg(long)]
        skip_privileged: bool,
    },
    /// Lints: rustfmt --check, the crate's shape, the documentation (as
    /// `docs`), and clippy -D warnings on every crate.
    Lint,
    /// Check the documentation offline (README.md, docs/**/*.md): every
    /// relative link and #anchor resolves, and every code block that shows
    /// a command or a policy is exercised by a test (```yaml policy, ```sh
    /// cli, ...) or marked ```sh illustrative. The tests behind those words
    /// are unit tests (portguard/src/cli/doc_blocks.rs), run by `unit`.
    Docs,
    /// Unit tests of the default members (no root needed).
    Unit,
    /// Benchmarks (needs root): builds in release mode, measures overhead
    /// against a baseline from the same run, and regenerates
    /// docs/benchmarks.md.
    Bench {
        /// Fewer rounds and a shorter storm (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Where to write the report (default: docs/benchmarks.md; with
        /// --only, target/bench-<sections>.md).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run only these sections (comma-separated: overhead, packet,
        /// storm, scale, hook).
        #[arg(long, value_name = "SECTIONS")]
        only: Option<String>,
    },
    /// Build the agent (release) and package it as an OCI image archive for
    /// the DaemonSet: import it on a node with `ctr -n k8s.io images import
    /// FILE`, or push it with `skopeo copy oci-archive:FILE docker://REPO`.
    Image {
        /// Image name; the DaemonSet's `portguard:0.1.0` is this one after
        /// the runtime's normalisation.
        #[arg(long, default_value = concat!("docker.io/library/portguard:", env!("CARGO_PKG_VERSION")))]
        name: String,
        /// Where to write the archive.
        #[arg(long, default_value = "target/portguard-image.tar")]
        out: PathBuf,
    },
    /// Exploratory fuzzing (cargo-fuzz, nightly) of the policy parser,
    /// compiler and map writer (`policy`), and of the manifest readers and
    /// analysis of `check --manifests` (`manifest`): a random seed, a time
    /// box, starting from the committed corpus (fuzz/corpus/TARGET). Run it
    /// before a release and after changing a parser. New inputs go to
    /// fuzz/target/corpus-scratch/TARGET (fold them in with `cargo xtask
    /// fuzz-cmin`); a crash fails the run and leaves its input in
    /// fuzz/artifacts/TARGET: fix it, and commit the input to the corpus
    /// with a unit test. The test suite's pass is `cargo xtask fuzz-ci`.
    Fuzz {
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Only this target (`policy` or `manifest`).
        #[arg(long)]
        target: Option<String>,
        /// Fuzzing processes per target (libFuzzer's -fork=N when above 1).
        #[arg(long, default_value_t = 1)]
        jobs: u32,
    },
    /// The test suite's deterministic fuzzing on its own: each target's
    /// committed corpus replayed, then its fixed-seed, fixed-count
    /// mutation pass.
    FuzzCi,
    /// Merge the exploratory runs' new inputs into the committed corpus and
    /// minimise it (libFuzzer -merge=1, as `cargo fuzz cmin`). Hand-named
    /// regression inputs (e.g. issue-13-past-the-end) are kept as they are.
    FuzzCmin {
        /// Only this target (`policy` or `manifest`).
        #[arg(long)]
        target: Option<String>,
    },
    /// Differential testing (needs root): random policy files and
    /// operations, each performed through real syscalls under the real
    /// agent and compared with the policy model's prediction (syscall
    /// answer and events). Disagreements are shrunk and printed as
    /// regression tests; the coverage table goes to
    /// target/difftest-coverage.md. `cargo xtask test` runs the fixed-seed
    /// CI slice (20,000 cases) as the integration test
    /// `difftest::the_kernel_and_the_model_agree_on_every_case`.
    Difftest {
        /// How many cases (operations) to run.
        #[arg(long, default_value_t = 20_000)]
        cases: usize,
        /// Generator seed (default: the CI slice's; pass another to explore).
        #[arg(long)]
        seed: Option<u64>,
        /// Operations per policy generation (one reload each).
        #[arg(long, default_value_t = 200)]
        batch: usize,
        /// Stop after the first batch with a disagreement.
        #[arg(long)]
        stop_early: bool,
    },
    /// Build the agent and run the privileged integration tests (needs root).
    IntegrationTest {
        /// Arguments passed to the test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Run a command in the workspace root; error if it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(root_dir());
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn docs() -> anyhow::Result<()> {
    let root = root_dir();
    let problems = xtask::docs::check(&root);
    if !problems.is_empty() {
        bail!(
            "the documentation (xtask/src/docs.rs):\n{}",
            problems.join("\n")
        );
    }
    eprintln!(
        "xtask: docs: {} Markdown files, links, anchors and code blocks ok",
        xtask::docs::files(&root).len()
    );
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    docs()?;
    let shape = xtask::shape::violations(&root_dir());
    if !shape.is_empty() {
        anyhow::bail!(
            "the crate's shape (xtask/src/shape.rs):\n{}",
            shape.join("\n")
        );
    }
    // Userspace crates. The kernel crate is excluded here: built for the host
    // it trips on a duplicate panic_impl; it is linted for its real target.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "portguard-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-p",
        "portguard-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-lint",
        "--",
        "-D",
        "warnings",
    ]))
}

fn unit() -> anyhow::Result<()> {
    run(cargo().args(["test"]))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn integration(args: &[String]) -> anyhow::Result<()> {
    integration_with(args, &[])
}

/// [`integration`] with extra environment variables for the tests.
fn integration_with(args: &[String], env: &[(&str, String)]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the integration tests load BPF programs and create cgroups: run them as root \
             (CI runs as root), or pass --skip-privileged to `cargo xtask test`"
        );
    }
    run(cargo().args(["build", "-p", "portguard"]))?;
    let bin = root_dir().join("target/debug/portguard");
    // Held (shared) until the tests end; released by the kernel if this
    // process is killed.
    let _running = sweep_unless_a_run_is_active(&bin)?;
    let variant = build_variant_object()?;
    // Tests share the host's cgroup tree but use unique cgroups and their own
    // network namespaces, so two at a time is safe on a 2-core machine.
    let mut cmd = cargo();
    // --show-output: a test that skips part of its work says why, and CI
    // logs should show it.
    cmd.args([
        "test",
        "-p",
        "portguard-tests",
        "--",
        "--test-threads=2",
        "--show-output",
    ])
    .args(args)
    .env("PORTGUARD_BIN", bin)
    .env("PORTGUARD_VARIANT_OBJECT", variant)
    .envs(env.iter().map(|(k, v)| (*k, v)));
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "debug");
    }
    run(&mut cmd)
}

/// `cargo xtask difftest`: the CI slice's test with another size and seed
/// (the environment variables it reads).
fn difftest(cases: usize, seed: Option<u64>, batch: usize, stop_early: bool) -> anyhow::Result<()> {
    let mut env = vec![
        ("PORTGUARD_DIFFTEST_CASES", cases.to_string()),
        ("PORTGUARD_DIFFTEST_BATCH", batch.to_string()),
    ];
    if let Some(seed) = seed {
        env.push(("PORTGUARD_DIFFTEST_SEED", seed.to_string()));
    }
    if stop_early {
        env.push(("PORTGUARD_DIFFTEST_STOP_EARLY", "1".to_owned()));
    }
    integration_with(
        &[
            "difftest::the_kernel_and_the_model_agree_on_every_case".to_owned(),
            "--exact".to_owned(),
            "--nocapture".to_owned(),
        ],
        &env,
    )
}

/// Where the test harness pins each agent (`portguard_tests::TEST_PIN_ROOT`).
const TEST_PIN_ROOT: &str = "/sys/fs/bpf/portguard-tests";

/// Every `integration-test` run holds this file locked (shared) while its
/// tests run.
const RUN_LOCK: &str = "/run/portguard-integration-tests.lock";

/// Sweep what killed runs left ([`sweep_leftovers`]) when no other
/// integration-test run is active (another run's agents and pins are alive,
/// not left over): the exclusive lock says so. Returns the lock, held
/// shared, for the caller to keep while its tests run.
fn sweep_unless_a_run_is_active(bin: &Path) -> anyhow::Result<std::fs::File> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(RUN_LOCK)
        .with_context(|| format!("opening {RUN_LOCK}"))?;
    match lock.try_lock() {
        Ok(()) => sweep_leftovers(bin),
        Err(std::fs::TryLockError::WouldBlock) => eprintln!(
            "xtask: another integration-test run is active ({RUN_LOCK} is locked):              not sweeping leftovers"
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {RUN_LOCK}"));
        }
    }
    // flock converts the exclusive lock in place.
    lock.lock_shared()
        .with_context(|| format!("locking {RUN_LOCK} shared"))?;
    Ok(lock)
}

/// Remove what an earlier run that was killed before its Drop guards ran
/// (SIGKILL, a machine stopped mid-run) left behind: its test agents' pins
/// (their programs stay attached while pinned, and a test counting what
/// runs on a cgroup would see them) and its empty `pgtest-*` cgroups. Each
/// is named; a pin directory an agent still holds is left alone (`portguard
/// uninstall` refuses it). Nothing here fails the run.
fn sweep_leftovers(bin: &Path) {
    if let Ok(entries) = std::fs::read_dir(TEST_PIN_ROOT) {
        for e in entries.flatten() {
            let path = e.path();
            eprintln!(
                "xtask: {} was left by an earlier run that did not clean up; uninstalling it",
                path.display()
            );
            let out = Command::new(bin)
                .args(["uninstall", "--pin-dir"])
                .arg(&path)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "xtask: leaving {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(err) => eprintln!("xtask: running {}: {err}", bin.display()),
            }
            // A directory of directories (a test's stand-in bpffs).
            if path.exists()
                && let Ok(inner) = std::fs::read_dir(&path)
            {
                for i in inner.flatten() {
                    let _ = Command::new(bin)
                        .args(["uninstall", "--pin-dir"])
                        .arg(i.path())
                        .output();
                }
                let _ = std::fs::remove_dir(&path);
            }
        }
    }
    let Some(cgroup2) = std::fs::read_to_string("/proc/mounts").ok().and_then(|m| {
        m.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
    }) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&cgroup2) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("pgtest-") {
            let path = e.path();
            eprintln!(
                "xtask: cgroup {} was left by an earlier run; removing it if it is empty",
                path.display()
            );
            if let Err(err) = remove_cgroup_tree(&path) {
                eprintln!("xtask: leaving {}: {err}", path.display());
            }
        }
    }
}

/// rmdir a cgroup and its descendants, deepest first (fails on one that
/// still has processes).
fn remove_cgroup_tree(path: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(path)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(path)
}

/// The kernel programs built with the `upgrade-test-variant` feature (same
/// decisions, different instructions), for the tests that upgrade pinned
/// programs in place. Built the way portguard/build.rs builds the real
/// object (aya-build's command).
fn build_variant_object() -> anyhow::Result<PathBuf> {
    let target_dir = root_dir().join("target/ebpf-variant");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "-p",
        "portguard-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--features",
        "upgrade-test-variant",
        "--target-dir",
    ])
    .arg(&target_dir)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!(
            "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
            std::env::consts::ARCH
        ),
    )
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(&mut cmd)?;
    Ok(target_dir.join("bpfel-unknown-none/release/portguard"))
}

fn bench(quick: bool, out: Option<&Path>, only: Option<&str>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads BPF programs and creates cgroups: run it as root");
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "portguard",
        "-p",
        "portguard-tests",
        "--bins",
    ]))?;
    let release = root_dir().join("target/release");
    let mut cmd = Command::new(release.join("portguard-bench"));
    let out = match (out, only) {
        (Some(out), _) => out.to_owned(),
        (None, None) => PathBuf::from("docs/benchmarks.md"),
        (None, Some(only)) => PathBuf::from(format!("target/bench-{}.md", only.replace(',', "-"))),
    };
    cmd.arg("--out").arg(root_dir().join(out));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(only) = only {
        cmd.arg("--only").arg(only);
    }
    cmd.env("PORTGUARD_BIN", release.join("portguard"))
        .env("RUST_LOG", "info");
    run(&mut cmd)
}

fn image(name: &str, out: &Path) -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "-p", "portguard"]))?;
    let out = root_dir().join(out);
    xtask::oci::agent_image(&root_dir().join("target/release/portguard"), name, &out)?;
    eprintln!(
        "xtask: wrote {} ({name}, {:.1} MiB)",
        out.display(),
        std::fs::metadata(&out)?.len() as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Test { skip_privileged } => lint()
            .and_then(|()| unit())
            .and_then(|()| {
                if skip_privileged {
                    eprintln!("xtask: --skip-privileged: NOT running the integration tests");
                    Ok(())
                } else {
                    integration(&[])
                }
            })
            .and_then(|()| xtask::fuzz::ci(&root_dir())),
        Cmd::Lint => lint(),
        Cmd::Docs => docs(),
        Cmd::Unit => unit(),
        Cmd::Bench { quick, out, only } => bench(quick, out.as_deref(), only.as_deref()),
        Cmd::Image { name, out } => image(&name, &out),
        Cmd::IntegrationTest { args } => integration(&args),
        Cmd::Difftest {
            cases,
            seed,
            batch,
            stop_early,
        } => difftest(cases, seed, batch, stop_early),
        Cmd::Fuzz {
            seconds,
            target,
            jobs,
        } => xtask::fuzz::explore(&root_dir(), seconds, target.as_deref(), jobs),
        Cmd::FuzzCi => xtask::fuzz::ci(&root_dir()),
        Cmd::FuzzCmin { target } => xtask::fuzz::cmin(&root_dir(), target.as_deref()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
