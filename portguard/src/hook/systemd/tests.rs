//! Unit tests of the drop-ins: which units get one, their text and quoting,
//! and install/uninstall in temporary unit directories (hostile names and
//! planted symlinks included). `systemd-analyze verify` and systemd's own
//! parse of the text are in the integration test `unit_hook`.

use std::{
    ffi::CString,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    time::Duration,
};

use super::*;
use crate::policy::{PodSelector, Selector};

fn opts() -> DropinOptions {
    DropinOptions::new(PathBuf::from("/usr/local/bin/portguard"))
}

fn units(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// Undo systemd's quoting of one word, the way systemd.syntax(7) describes
/// it for the characters [`command_word`] produces (enough to round-trip).
fn systemd_unquote(word: &str) -> String {
    let w = word.replace("%%", "%");
    let inner = w
        .strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .unwrap_or(&w);
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().unwrap()),
            '$' => {
                assert_eq!(chars.next(), Some('$'), "a lone $ in {word}");
                out.push('$');
            }
            c => out.push(c),
        }
    }
    out
}

#[test]
fn service_units_splits_services_from_what_cannot_have_a_dropin() {
    let sel = [
        Selector::Unit("nginx.service".into()),
        Selector::Cgroup("/app.slice".into()),
        Selector::Unit("backup.scope".into()),
        Selector::Unit("api.service".into()),
        Selector::Unit("nginx.service".into()),
        Selector::Pods(PodSelector::default()),
        Selector::Unit("getty@.service".into()),
        Selector::Unit("getty@tty1.service".into()),
        Selector::Unit("web.socket".into()),
        Selector::Unit("app-.service".into()),
        Selector::Unit("nginx.foo".into()),
        Selector::Unit("..".into()),
    ];
    let (services, others) = service_units(&sel);
    assert_eq!(
        services,
        units(&["api.service", "getty@tty1.service", "nginx.service"])
    );
    assert_eq!(
        others,
        units(&[
            "..",
            "app-.service",
            "backup.scope",
            "getty@.service",
            "nginx.foo",
            "web.socket"
        ])
    );
}

#[test]
fn reasons_follow_systemds_unit_name_rules() {
    for ok in [
        "nginx.service",
        "a.service",
        "..service",
        "foo\\x2dbar.service",
        "getty@tty1.service",
        "a@b@c.service",
        "x:y_z-1.service",
        "foo-bar.service",
    ] {
        assert_eq!(no_dropin_reason(ok), None, "{ok}");
    }
    let long = format!("{}.service", "a".repeat(UNIT_NAME_MAX));
    for (unit, why) in [
        ("backup.scope", "a .scope unit"),
        ("web.socket", "a .socket unit"),
        ("getty@.service", "a template"),
        ("foo-.service", "every unit named foo-*.service"),
        ("a@b-.service", "every unit named a@b-*.service"),
        ("nginx", "no unit type suffix"),
        (".service", "nothing before the type suffix"),
        ("..", "`.` is not a systemd unit type"),
        ("nginx.foo", "`.foo` is not a systemd unit type"),
        ("@x.service", "nothing before `@`"),
        ("a/b.service", "'/' is not allowed"),
        ("a b.service", "' ' is not allowed"),
        ("a\nb.service", "'\\n' is not allowed"),
        ("ü.service", "'ü' is not allowed"),
        (long.as_str(), "longer than 255 bytes"),
    ] {
        let reason = no_dropin_reason(unit).unwrap_or_else(|| panic!("{unit:?} accepted"));
        assert!(reason.contains(why), "{unit:?}: {reason}");
    }
}

#[test]
fn dropin_text_with_the_defaults() {
    assert_eq!(
        dropin_text("nginx.service", &opts()).unwrap(),
        "# Written by portguard; `portguard hook uninstall` removes it. Do not edit.\n\
         # Asks the portguard agent to govern this unit's cgroup (`unit: nginx.service`)\n\
         # before ExecStart= runs (after any ExecStartPre= of the unit file itself).\n\
         # The agent answers the hook: at boot, start it first.\n\
         [Unit]\n\
         Wants=portguard.service\n\
         After=portguard.service\n\
         [Service]\n\
         ExecStartPre=+/usr/local/bin/portguard hook unit --socket /run/portguard/status.sock \
         --timeout 1s --on-failure closed %n\n"
    );
    let unordered = DropinOptions {
        agent_unit: None,
        ..opts()
    };
    assert!(
        !dropin_text("nginx.service", &unordered)
            .unwrap()
            .contains("[Unit]")
    );
    // The agent's own unit never waits for itself.
    let e = dropin_text("portguard.service", &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("the agent's own unit"), "{e}");
}

#[test]
fn timeouts_and_failure_modes_are_written_exactly() {
    for (d, word) in [
        (Duration::from_secs(1), "1s"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_micros(250), "250us"),
        (Duration::from_nanos(1_000_000_007), "1000000007ns"),
    ] {
        let o = DropinOptions {
            timeout: d,
            on_failure: OnFailure::Open,
            ..opts()
        };
        let text = dropin_text("a.service", &o).unwrap();
        assert!(
            text.contains(&format!(" --timeout {word} --on-failure open %n\n")),
            "{text}"
        );
        assert_eq!(humantime::parse_duration(word).unwrap(), d, "{word}");
    }
    let zero = DropinOptions {
        timeout: Duration::ZERO,
        ..opts()
    };
    assert!(matches!(
        dropin_text("a.service", &zero),
        Err(DropinError::ZeroTimeout)
    ));
}

#[test]
fn paths_are_quoted_and_escaped_for_systemd() {
    for (bin, word) in [
        ("/usr/bin/portguard", "/usr/bin/portguard"),
        ("/opt/port guard/bin", "\"/opt/port guard/bin\""),
        ("/opt/100%/portguard", "\"/opt/100%%/portguard\""),
        ("/opt/a;b/portguard", "\"/opt/a;b/portguard\""),
        ("/opt/ü/portguard", "\"/opt/ü/portguard\""),
    ] {
        let got = command_word("bin", Path::new(bin), true).unwrap();
        assert_eq!(got, word, "{bin}");
        assert_eq!(systemd_unquote(&got), bin);
    }
    for socket in [
        "/run/portguard/status.sock",
        "/run/a b/s",
        "/run/%n$HOME${X}/s",
        "/run/back\\slash\"quote'single;/s",
    ] {
        let got = command_word("socket", Path::new(socket), false).unwrap();
        assert!(!got.contains("%n") || got.contains("%%n"), "{got}");
        assert_eq!(systemd_unquote(&got), socket, "{got}");
    }
    let o = DropinOptions {
        bin: "/opt/my tools/portguard".into(),
        socket: "/run/pg 100%/s.sock".into(),
        ..opts()
    };
    assert!(dropin_text("a.service", &o).unwrap().contains(
        "ExecStartPre=+\"/opt/my tools/portguard\" hook unit --socket \"/run/pg 100%%/s.sock\" "
    ));
}

#[test]
fn paths_systemd_cannot_take_are_refused() {
    use std::os::unix::ffi::OsStrExt as _;
    let non_utf8 = PathBuf::from(std::ffi::OsStr::from_bytes(b"/opt/\xff/portguard"));
    for (bin, why) in [
        (PathBuf::from("portguard"), "not an absolute path"),
        (PathBuf::from("./portguard"), "not an absolute path"),
        (PathBuf::from("/opt/a$b/portguard"), "'$'"),
        (PathBuf::from("/opt/a\\b/portguard"), "'\\\\'"),
        (PathBuf::from("/opt/a\"b/portguard"), "'\"'"),
        (PathBuf::from("/opt/a'b/portguard"), "'\\''"),
        (
            PathBuf::from("/opt/a\nExecStart=/bin/sh"),
            "control character '\\n'",
        ),
        (PathBuf::from("/opt/a\tb"), "control character '\\t'"),
        (PathBuf::from("/opt/bin/"), "names a directory"),
        (
            PathBuf::from(format!("/{}", "a".repeat(PATH_MAX))),
            "longer than 4095",
        ),
        (non_utf8.clone(), "not UTF-8"),
    ] {
        let o = DropinOptions {
            bin: bin.clone(),
            ..opts()
        };
        let err = dropin_text("a.service", &o).unwrap_err();
        assert!(
            matches!(
                &err,
                DropinError::Path {
                    what: "portguard binary",
                    ..
                }
            ),
            "{bin:?}: {err}"
        );
        assert!(err.to_string().contains(why), "{bin:?}: {err}");
    }
    for (socket, why) in [
        (PathBuf::from("status.sock"), "not an absolute path"),
        (PathBuf::from("/run/a\nb"), "control character"),
        (
            PathBuf::from(format!("/{}", "s".repeat(SOCKET_PATH_MAX))),
            "longer than 107",
        ),
        (non_utf8, "not UTF-8"),
    ] {
        let o = DropinOptions {
            socket: socket.clone(),
            ..opts()
        };
        let err = dropin_text("a.service", &o).unwrap_err();
        assert!(err.to_string().contains("status socket"), "{err}");
        assert!(err.to_string().contains(why), "{socket:?}: {err}");
    }
    // The longest socket path that fits sun_path is fine.
    let o = DropinOptions {
        socket: PathBuf::from(format!("/{}", "s".repeat(SOCKET_PATH_MAX - 1))),
        ..opts()
    };
    dropin_text("a.service", &o).unwrap();
}

#[test]
fn units_without_a_dropin_are_refused_by_name() {
    let long = format!("{}.service", "a".repeat(NAME_MAX - ".service.d".len() + 1));
    assert!(no_dropin_reason(&long).is_none(), "a valid unit name");
    for unit in [
        "backup.scope",
        "getty@.service",
        "foo-.service",
        "../../etc.service",
        "x",
        long.as_str(),
    ] {
        let err = dropin_text(unit, &opts()).unwrap_err();
        assert!(
            matches!(&err, DropinError::Unit { unit: u, .. } if u == unit),
            "{unit}: {err}"
        );
    }
}

#[test]
fn install_writes_then_leaves_identical_dropins_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = install(&units(&["b.service", "a.service"]), dir, &opts()).unwrap();
    let a = dir.join("a.service.d").join(DROPIN_NAME);
    let b = dir.join("b.service.d").join(DROPIN_NAME);
    assert_eq!(r.written, vec![a.clone(), b.clone()]);
    assert!(r.unchanged.is_empty() && r.removed.is_empty(), "{r:?}");
    assert_eq!(read(&a), dropin_text("a.service", &opts()).unwrap());
    assert_eq!(
        std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&a);

    let r = install(&units(&["a.service", "b.service"]), dir, &opts()).unwrap();
    assert_eq!(r.unchanged, vec![a.clone(), b.clone()]);
    assert!(r.written.is_empty() && r.removed.is_empty(), "{r:?}");
    assert_eq!(inode(&a), before, "an identical drop-in is not rewritten");

    // New options: rewritten in place (a new file renamed over the old).
    let open = DropinOptions {
        on_failure: OnFailure::Open,
        ..opts()
    };
    let r = install(&units(&["a.service", "b.service"]), dir, &open).unwrap();
    assert_eq!(r.written, vec![a.clone(), b]);
    assert!(read(&a).contains("--on-failure open"));
    assert_ne!(inode(&a), before);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.join("a.service.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![DROPIN_NAME]);
}

#[test]
fn install_removes_its_dropins_for_units_no_longer_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    install(
        &units(&["a.service", "b.service", "c.service"]),
        dir,
        &opts(),
    )
    .unwrap();
    // c.service.d also holds the administrator's own drop-in.
    std::fs::write(
        dir.join("c.service.d/10-limits.conf"),
        "[Service]\nMemoryMax=1G\n",
    )
    .unwrap();
    // A drop-in of portguard's under another name (an older layout) goes too.
    std::fs::write(
        dir.join("a.service.d/40-old.conf"),
        format!("{MARKER}\n[Service]\n"),
    )
    .unwrap();

    let r = install(&units(&["a.service"]), dir, &opts()).unwrap();
    assert_eq!(r.unchanged, vec![dir.join("a.service.d").join(DROPIN_NAME)]);
    assert_eq!(
        r.removed,
        vec![
            dir.join("a.service.d/40-old.conf"),
            dir.join("b.service.d").join(DROPIN_NAME),
            dir.join("b.service.d"),
            dir.join("c.service.d").join(DROPIN_NAME),
        ]
    );
    assert!(!dir.join("b.service.d").exists());
    assert_eq!(
        read(dir.join("c.service.d/10-limits.conf")),
        "[Service]\nMemoryMax=1G\n"
    );
    assert!(!dir.join("c.service.d").join(DROPIN_NAME).exists());

    // No units at all: every drop-in of portguard's goes.
    let r = install(&[], dir, &opts()).unwrap();
    assert_eq!(
        r.removed,
        vec![
            dir.join("a.service.d").join(DROPIN_NAME),
            dir.join("a.service.d")
        ]
    );
}

#[test]
fn install_refuses_a_dropin_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("a.service.d")).unwrap();
    let theirs = dir.join("a.service.d").join(DROPIN_NAME);
    std::fs::write(&theirs, "[Service]\nExecStartPre=/bin/true\n").unwrap();
    let err = format!(
        "{:#}",
        install(&units(&["a.service"]), dir, &opts()).unwrap_err()
    );
    assert!(err.contains(&theirs.display().to_string()), "{err}");
    assert!(err.contains("not written by portguard"), "{err}");
    assert_eq!(read(&theirs), "[Service]\nExecStartPre=/bin/true\n");
    // uninstall leaves it alone too.
    assert!(uninstall(dir, false).unwrap().is_empty());
    assert!(theirs.exists());
}

#[test]
fn install_never_follows_a_planted_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("units");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&outside).unwrap();

    // A symlinked <unit>.d pointing out of the unit directory.
    let planted = dir.join("a.service.d");
    symlink(&outside, &planted).unwrap();
    let err = format!(
        "{:#}",
        install(&units(&["a.service"]), &dir, &opts()).unwrap_err()
    );
    assert!(err.contains(&planted.display().to_string()), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A symlinked drop-in inside a real directory.
    std::fs::remove_file(&planted).unwrap();
    std::fs::create_dir(&planted).unwrap();
    let target = outside.join("victim");
    std::fs::write(&target, "precious\n").unwrap();
    symlink(&target, planted.join(DROPIN_NAME)).unwrap();
    let err = format!(
        "{:#}",
        install(&units(&["a.service"]), &dir, &opts()).unwrap_err()
    );
    assert!(
        err.contains(&planted.join(DROPIN_NAME).display().to_string()),
        "{err}"
    );
    assert_eq!(read(&target), "precious\n");

    // A regular file where the directory should be.
    std::fs::remove_dir_all(&planted).unwrap();
    std::fs::write(&planted, "").unwrap();
    let err = format!(
        "{:#}",
        install(&units(&["a.service"]), &dir, &opts()).unwrap_err()
    );
    assert!(err.contains("is not a directory"), "{err}");
}

#[test]
fn install_checks_every_unit_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for bad in ["../escape.service", "a/b.service", "..", "x.scope"] {
        let err = install(&units(&["a.service", bad]), dir, &opts()).unwrap_err();
        assert!(format!("{err:#}").contains(bad), "{bad}: {err:#}");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "{bad}");
    }
    assert!(install(&units(&["a.service"]), &dir.join("missing"), &opts()).is_err());
}

#[test]
fn uninstall_removes_only_portguards_dropins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("units");
    std::fs::create_dir(&dir).unwrap();
    install(&units(&["a.service", "b.service"]), &dir, &opts()).unwrap();
    let foreign = dir.join("b.service.d/override.conf");
    std::fs::write(&foreign, "[Service]\nNice=5\n").unwrap();
    // Not drop-ins of ours: a marker line that is not the first, our marker
    // in a file systemd does not read, a FIFO (must not block the scan).
    std::fs::write(
        dir.join("b.service.d/20-x.conf"),
        format!("# x\n{MARKER}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("b.service.d/notes.txt"), format!("{MARKER}\n")).unwrap();
    let fifo = CString::new(dir.join("b.service.d/30-fifo.conf").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // Ours, but behind a symlinked *.d: not followed.
    let outside = tmp.path().join("outside.d");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join(DROPIN_NAME), format!("{MARKER}\n")).unwrap();
    symlink(&outside, dir.join("c.service.d")).unwrap();
    // Unrelated entries of a unit directory.
    std::fs::create_dir(dir.join("multi-user.target.wants")).unwrap();
    std::fs::write(dir.join("x.service"), "[Service]\nExecStart=/bin/true\n").unwrap();

    let a = dir.join("a.service.d").join(DROPIN_NAME);
    let b = dir.join("b.service.d").join(DROPIN_NAME);
    let planned = uninstall(&dir, true).unwrap();
    assert_eq!(planned, vec![a.clone(), dir.join("a.service.d"), b.clone()]);
    assert!(a.exists() && b.exists(), "a dry run removes nothing");

    assert_eq!(uninstall(&dir, false).unwrap(), planned);
    assert!(!dir.join("a.service.d").exists());
    assert!(!b.exists());
    assert_eq!(read(&foreign), "[Service]\nNice=5\n");
    for kept in ["20-x.conf", "notes.txt", "30-fifo.conf"] {
        assert!(
            dir.join("b.service.d")
                .join(kept)
                .symlink_metadata()
                .is_ok(),
            "{kept}"
        );
    }
    assert!(outside.join(DROPIN_NAME).exists());
    assert!(
        dir.join("c.service.d")
            .symlink_metadata()
            .unwrap()
            .is_symlink()
    );
    assert!(dir.join("multi-user.target.wants").is_dir() && dir.join("x.service").exists());
    assert!(uninstall(&dir, false).unwrap().is_empty(), "nothing left");
}

#[test]
fn uninstall_of_a_missing_unit_directory_removes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(
        uninstall(&tmp.path().join("none"), false)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn systemd_runs_when_its_runtime_directory_exists() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!systemd_running_at(tmp.path()));
    std::fs::create_dir_all(tmp.path().join("run/systemd")).unwrap();
    std::fs::write(tmp.path().join("run/systemd/system"), "").unwrap();
    assert!(
        !systemd_running_at(tmp.path()),
        "a file is not the directory"
    );
    std::fs::remove_file(tmp.path().join("run/systemd/system")).unwrap();
    std::fs::create_dir(tmp.path().join("run/systemd/system")).unwrap();
    assert!(systemd_running_at(tmp.path()));
}
