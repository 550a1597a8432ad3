//! The drop-ins `portguard::hook::systemd::install` writes (issue 17), read
//! by systemd itself. The test machines have no systemd as PID 1, so:
//!
//! - `systemd-analyze verify --man=no UNITS/demo.service` loads the unit
//!   and its drop-ins from `UNITS` (verify adds the directory of every unit
//!   file it is given to the unit search path, `UNITS/demo.service.d/`
//!   included) and checks that each command's executable exists. The
//!   drop-in naming the real portguard binary passes; the same drop-in
//!   naming a missing binary fails, naming it, which proves verify read it.
//! - `systemd --test --system --unit=demo.service`, run as nobody (it
//!   refuses to run as root), dumps the units as systemd parsed them: the
//!   drop-in is listed (`DropIn Path:`) and the `ExecStartPre=` command line
//!   is, word for word, the portguard binary, `hook unit`, the options and
//!   `demo.service` for `%n`, with paths full of characters systemd treats
//!   specially (spaces, `%`, `$`, `\`, quotes, `;`).
//! - `uninstall` removes the drop-in and leaves a foreign drop-in in the same
//!   directory, and the directory, alone.
//!
//! These need no agent and no root (`systemd-analyze` runs as any user).

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use portguard::hook::systemd::{
    DROPIN_NAME, DropinOptions, OnFailure, dropin_text, install, uninstall,
};
use portguard_tests::agent_bin;

const UNIT: &str = "demo.service";

/// The portguard binary, absolute (the drop-in must name it so).
fn portguard_bin() -> PathBuf {
    std::fs::canonicalize(agent_bin()).unwrap()
}

/// A unit directory holding `demo.service`, a real service whose own
/// commands are the portguard binary (so verify finds every executable).
fn unit_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("units");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join(UNIT),
        format!(
            "[Unit]\nDescription=portguard hook test\n\n[Service]\nDynamicUser=yes\n\
             ProtectSystem=strict\nExecStart={} status\n",
            portguard_bin().display()
        ),
    )
    .unwrap();
    dir
}

fn verify(dir: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join(UNIT))
        .output()
        .expect("systemd-analyze (the systemd package)")
}

fn assert_verified(dir: &Path) {
    let out = verify(dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{stderr}");
    assert!(
        !stderr.contains(UNIT) && !stderr.contains(DROPIN_NAME),
        "systemd-analyze complains about the unit or its drop-in:\n{stderr}"
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_installed_dropin_and_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unit_dir(tmp.path());
    let dropin = dir.join("demo.service.d").join(DROPIN_NAME);
    let foreign = dir.join("demo.service.d/10-foreign.conf");
    let opts = DropinOptions::new(portguard_bin());

    let report = install(&[UNIT.to_owned()], &dir, &opts).unwrap();
    assert_eq!(report.written, vec![dropin.clone()]);
    std::fs::write(&foreign, "[Service]\nEnvironment=FOREIGN=1\n").unwrap();
    assert_verified(&dir);

    // The same drop-in naming a binary that does not exist: verify fails
    // and names it, so it did load the drop-in.
    let missing = tmp.path().join("missing/portguard");
    let broken = DropinOptions {
        bin: missing.clone(),
        ..opts.clone()
    };
    std::fs::write(&dropin, dropin_text(UNIT, &broken).unwrap()).unwrap();
    let out = verify(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "verify passed a missing ExecStartPre= binary:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("Command {} is not executable", missing.display())),
        "{stderr}"
    );
    // install puts its own drop-in back.
    let report = install(&[UNIT.to_owned()], &dir, &opts).unwrap();
    assert_eq!(report.written, vec![dropin.clone()]);
    assert_verified(&dir);

    // uninstall: ours goes, the foreign drop-in and its directory stay.
    assert_eq!(uninstall(&dir, false).unwrap(), vec![dropin.clone()]);
    assert!(!dropin.exists());
    assert_eq!(
        std::fs::read_to_string(&foreign).unwrap(),
        "[Service]\nEnvironment=FOREIGN=1\n"
    );
    assert_verified(&dir);
}

/// systemd's dump of a command line (`quote_command_line`): words separated
/// by spaces, a word with special characters double-quoted with `\`
/// escapes.
fn dumped_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', _) => {
                quoted = !quoted;
                started = true;
            }
            ('\\', true) => word.push(chars.next().unwrap()),
            (' ', false) => {
                if started {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            (c, _) => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

fn systemd_binary() -> Option<PathBuf> {
    ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn systemd_parses_the_hook_command_line_word_for_word() {
    let tmp = tempfile::tempdir().unwrap();
    // systemd --test runs as nobody: it must read the unit directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = unit_dir(tmp.path());
    let bin_dir = tmp.path().join("bin dir 100%;x");
    std::fs::create_dir(&bin_dir).unwrap();
    let bin = bin_dir.join("portguard");
    std::os::unix::fs::symlink(portguard_bin(), &bin).unwrap();
    let socket = tmp.path().join("s o\\c\"k%n$HOME'.sock");
    let opts = DropinOptions {
        bin: bin.clone(),
        socket: socket.clone(),
        timeout: Duration::from_millis(1500),
        on_failure: OnFailure::Open,
        agent_unit: Some("portguard.service".into()),
    };
    install(&[UNIT.to_owned()], &dir, &opts).unwrap();
    // verify finds the binary through the quoted, %-escaped path.
    assert_verified(&dir);

    let Some(systemd) = systemd_binary() else {
        eprintln!("skipping systemd's own parse: no systemd binary in /lib/systemd");
        return;
    };
    let mut cmd = Command::new(&systemd);
    cmd.args(["--test", "--system", "--no-pager"])
        .arg(format!("--unit={UNIT}"))
        // The trailing colon appends the built-in unit paths (basic.target...).
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .env("HOME", "/");
    if portguard_tests::is_root() {
        // std drops the supplementary groups too when root changes uid.
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!(
            "skipping systemd's own parse: {} --test failed ({}):\n{}",
            systemd.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let unit = stdout
        .split("-> Unit ")
        .find(|block| block.starts_with(&format!("{UNIT}:")))
        .unwrap_or_else(|| panic!("no {UNIT} in systemd's dump:\n{stdout}"));
    let dropin = dir.join("demo.service.d").join(DROPIN_NAME);
    assert!(
        unit.contains(&format!("DropIn Path: {}\n", dropin.display())),
        "{unit}"
    );
    // Started after the agent, which it wants: at boot the hook finds it.
    for dep in ["After", "Wants"] {
        assert!(
            unit.lines()
                .any(|l| l.trim().starts_with(&format!("{dep}: portguard.service "))),
            "no {dep}: portguard.service in:\n{unit}"
        );
    }
    let line = unit
        .split("-> ExecStartPre:")
        .nth(1)
        .and_then(|rest| {
            rest.lines()
                .find_map(|l| l.trim().strip_prefix("Command Line: "))
        })
        .unwrap_or_else(|| panic!("no ExecStartPre= in:\n{unit}"));
    // `$` is doubled on the unit's command line; systemd turns `$$` back into
    // `$` only when it runs the command (systemd.service(5)).
    let socket_word = socket.to_str().unwrap().replace('$', "$$");
    assert_eq!(
        dumped_words(line),
        [
            bin.to_str().unwrap(),
            "hook",
            "unit",
            "--socket",
            &socket_word,
            "--timeout",
            "1500ms",
            "--on-failure",
            "open",
            UNIT,
        ],
        "{line}"
    );
}
