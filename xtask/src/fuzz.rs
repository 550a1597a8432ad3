//! Fuzzing with cargo-fuzz (libFuzzer, nightly): the deterministic pass the
//! test suite runs, the exploratory runs a developer starts before a release
//! or after changing a parser, and folding what those find into the
//! committed corpus.
//!
//! - [`ci`]: for each target, replay every committed corpus input, then a
//!   mutation pass from a fixed seed for a fixed number of runs, starting
//!   from a fresh scratch directory. Nothing is timed: the same commit
//!   replays the same inputs and runs the same number of mutants from the
//!   same seed every time (see [`CI_PASS`] for what still varies).
//! - [`explore`]: a random seed, a time box, optionally several jobs; new
//!   inputs go to a scratch corpus (`fuzz/target/corpus-scratch/TARGET`).
//! - [`cmin`]: merge the scratch corpus into the committed one and minimise
//!   it (libFuzzer `-merge=1`, what `cargo fuzz cmin` runs), keeping every
//!   hand-named regression input (a name that is not a SHA-1) verbatim.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The cargo-fuzz targets: the policy pipeline, and what `check
/// --manifests` does with a file.
pub const TARGETS: [&str; 2] = ["policy", "manifest"];

/// The fixed-seed mutation pass of each target: its seed and its number of
/// runs (loading the committed corpus counts), sized to about 60 s on the
/// 2-core CI machine from the committed corpora (measured with
/// `-print_final_stats=1`: policy about 3,900 exec/s, manifest about 820).
/// Change the seed only on purpose: a new seed explores different inputs,
/// so it is a new test; after `fuzz-cmin`, re-measure the counts.
///
/// The pass executes the same number of inputs from the same seed on every
/// run, but it is not bit-for-bit reproducible: which mutants count as new
/// coverage (and so seed later mutations) varies by a few percent between
/// runs of one binary, with fixed hash seeds, ASLR off, CMP tracing off or
/// without ASan alike (measured on the CI machine). The corpus replay is
/// exact.
const CI_PASS: [(&str, u64, u64); 2] = [("policy", 1, 240_000), ("manifest", 1, 50_000)];

/// Flags every run shares: inputs up to 8 KiB, 2 GiB of memory.
const COMMON: [&str; 2] = ["-rss_limit_mb=2048", "-print_final_stats=1"];
const MAX_LEN: &str = "-max_len=8192";

fn fuzz_dir(root: &Path) -> PathBuf {
    root.join("fuzz")
}

fn corpus(root: &Path, target: &str) -> PathBuf {
    fuzz_dir(root).join("corpus").join(target)
}

fn scratch(root: &Path, target: &str) -> PathBuf {
    fuzz_dir(root).join("target/corpus-scratch").join(target)
}

fn selected(only: Option<&str>) -> anyhow::Result<Vec<&'static str>> {
    let t: Vec<_> = TARGETS
        .into_iter()
        .filter(|t| only.is_none_or(|o| o == *t))
        .collect();
    if t.is_empty() {
        bail!(
            "no fuzz target named {:?}; the targets are {}",
            only.unwrap_or_default(),
            TARGETS.join(", ")
        );
    }
    Ok(t)
}

/// `cargo fuzz run TARGET DIRS... -- FLAGS...`, in fuzz/, built as the
/// test suite and the exploratory runs both build it.
fn cargo_fuzz(root: &Path, target: &str, dirs: &[&Path], flags: &[String]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
        .args(dirs)
        .arg("--")
        .args(flags)
        // The fuzz build never loads kernel programs (see portguard/build.rs).
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(fuzz_dir(root));
    cmd
}

/// What libFuzzer's `-print_final_stats=1` reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub executions: u64,
    pub new_units: u64,
}

/// Read libFuzzer's final statistics from its output.
pub fn parse_stats(output: &str) -> Stats {
    let mut s = Stats::default();
    for line in output.lines() {
        let mut kv = line.split(':').map(str::trim);
        if let (Some("stat"), Some(""), Some(key), Some(value)) =
            (kv.next(), kv.next(), kv.next(), kv.next())
        {
            match key {
                "number_of_executed_units" => s.executions = value.parse().unwrap_or(0),
                "new_units_added" => s.new_units = value.parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    s
}

/// Run a libFuzzer command, showing its output as it comes and returning
/// its final statistics; fail naming `what` if it fails.
fn run_reporting(mut cmd: Command, what: &str, target: &str) -> anyhow::Result<Stats> {
    eprintln!("xtask: {what}: running {cmd:?}");
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz (run ./scripts/setup.sh)")?;
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line.context("reading libFuzzer's output")?;
        eprintln!("{line}");
        if line.starts_with("stat::") {
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{what} of the {target} fuzz target failed ({status}); the crashing input is in \
             fuzz/artifacts/{target}: fix the bug, then add the input to fuzz/corpus/{target} \
             with a unit test"
        );
    }
    Ok(parse_stats(&seen))
}

/// The test suite's fuzzing: deterministic, the same work on every run.
pub fn ci(root: &Path) -> anyhow::Result<()> {
    let mut summary = Vec::new();
    for (target, seed, runs) in CI_PASS {
        let committed = corpus(root, target);
        let inputs = std::fs::read_dir(&committed)
            .with_context(|| format!("reading {}", committed.display()))?
            .count();
        // 1. Every committed input, whole (no -max_len: nothing is cut).
        //    -runs=0 runs the corpus once and stops before any mutation.
        let replay = run_reporting(
            cargo_fuzz(
                root,
                target,
                &[&committed],
                &["-runs=0".into(), COMMON[1].into()],
            ),
            "corpus replay",
            target,
        )?;
        // 2. The mutation pass. New inputs go to a scratch directory made
        //    empty first, so every run starts from the committed corpus alone.
        let out = fuzz_dir(root).join("target/corpus-ci").join(target);
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        std::fs::create_dir_all(&out)?;
        let mut flags: Vec<String> = vec![
            format!("-seed={seed}"),
            format!("-runs={runs}"),
            MAX_LEN.into(),
        ];
        flags.extend(COMMON.map(String::from));
        let pass = run_reporting(
            cargo_fuzz(root, target, &[&out, &committed], &flags),
            "fixed-seed mutation pass",
            target,
        )?;
        summary.push(format!(
            "xtask: fuzz {target}: {inputs} corpus inputs replayed ({} executions); \
             seed {seed}: {} executions, {} new inputs, no failure",
            replay.executions, pass.executions, pass.new_units
        ));
    }
    for line in summary {
        eprintln!("{line}");
    }
    Ok(())
}

/// Exploratory fuzzing: a random seed, `seconds` per target, `jobs`
/// processes (libFuzzer's fork mode when more than one).
pub fn explore(root: &Path, seconds: u64, only: Option<&str>, jobs: u32) -> anyhow::Result<()> {
    for target in selected(only)? {
        let scratch = scratch(root, target);
        std::fs::create_dir_all(&scratch)?;
        let mut flags = vec![format!("-max_total_time={seconds}"), MAX_LEN.into()];
        flags.extend(COMMON.map(String::from));
        if jobs > 1 {
            flags.push(format!("-fork={jobs}"));
            // In fork mode a crash ends the run like it does without.
            flags.push("-ignore_crashes=0".into());
        }
        let stats = run_reporting(
            cargo_fuzz(root, target, &[&scratch, &corpus(root, target)], &flags),
            "exploratory run",
            target,
        )?;
        eprintln!(
            "xtask: fuzz {target}: {} executions in {seconds} s, {} new inputs in {}; \
             `cargo xtask fuzz-cmin` folds them into the committed corpus",
            stats.executions,
            stats.new_units,
            scratch.display()
        );
    }
    Ok(())
}

/// A corpus file named by hand (a regression input), not by libFuzzer.
fn hand_named(name: &str) -> bool {
    !(name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Merge the scratch corpus into the committed one and minimise it.
pub fn cmin(root: &Path, only: Option<&str>) -> anyhow::Result<()> {
    for target in selected(only)? {
        let committed = corpus(root, target);
        let scratch = scratch(root, target);
        std::fs::create_dir_all(&scratch)?;
        let merged = fuzz_dir(root).join("target/corpus-merged").join(target);
        if merged.exists() {
            std::fs::remove_dir_all(&merged)?;
        }
        std::fs::create_dir_all(&merged)?;
        let mut flags = vec!["-merge=1".to_owned(), MAX_LEN.into()];
        flags.extend(COMMON.map(String::from));
        run_reporting(
            cargo_fuzz(root, target, &[&merged, &committed, &scratch], &flags),
            "corpus merge",
            target,
        )?;
        let before = std::fs::read_dir(&committed)?.count();
        let mut kept = std::collections::HashSet::new();
        for e in std::fs::read_dir(&committed)? {
            let e = e?;
            if hand_named(&e.file_name().to_string_lossy()) {
                kept.insert(std::fs::read(e.path())?);
            } else {
                std::fs::remove_file(e.path())?;
            }
        }
        for e in std::fs::read_dir(&merged)? {
            let e = e?;
            // A hand-named input is kept under its name; its SHA-1 copy
            // would only repeat it.
            if !kept.contains(&std::fs::read(e.path())?) {
                std::fs::copy(e.path(), committed.join(e.file_name()))?;
            }
        }
        let after = std::fs::read_dir(&committed)?.count();
        eprintln!(
            "xtask: fuzz-cmin {target}: {before} -> {after} inputs in {} (hand-named ones kept); \
             commit them",
            committed.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read_from_libfuzzer_output() {
        let out = "#2 INITED cov: 1\nstat::number_of_executed_units: 330000\n\
                   stat::average_exec_per_sec:     5500\nstat::new_units_added:          17\n";
        assert_eq!(
            parse_stats(out),
            Stats {
                executions: 330_000,
                new_units: 17
            }
        );
    }

    #[test]
    fn regression_inputs_keep_their_names() {
        assert!(hand_named("issue-13-past-the-end"));
        assert!(hand_named("seed-01"));
        assert!(!hand_named("0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"));
    }

    #[test]
    fn every_target_has_a_deterministic_pass() {
        let mut in_ci: Vec<_> = CI_PASS.iter().map(|(t, ..)| *t).collect();
        in_ci.sort_unstable();
        let mut all = TARGETS.to_vec();
        all.sort_unstable();
        assert_eq!(in_ci, all);
        assert!(selected(Some("nope")).is_err());
    }
}
