//! Writing and removing drop-ins below the unit directory ([`install`],
//! [`uninstall`]), through [`Dir`] descriptors that follow no symlink.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use super::{
    DROPIN_NAME, DropinOptions, MARKER, MAX_DROPIN_BYTES,
    dirfd::{Dir, Kind},
    dropin_text,
};

/// What [`install`] did, each a path below `unit_dir`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Drop-ins written (new or changed).
    pub written: Vec<PathBuf>,
    /// Drop-ins already as they should be, left untouched.
    pub unchanged: Vec<PathBuf>,
    /// portguard's drop-ins for units no longer named, each followed by its
    /// `<unit>.d` directory when that became empty and was removed too.
    pub removed: Vec<PathBuf>,
}

/// Write `<unit_dir>/<unit>.d/50-portguard.conf` for each of `units`
/// (service names, see [`super::service_units`]) and remove portguard's
/// drop-ins (first line [`MARKER`]) for every unit not named; with no units,
/// removes them all. Every unit and path is checked before anything is
/// written. Each file is written to a temporary name (not ending in `.conf`,
/// so a concurrent `daemon-reload` never reads it) and renamed into place;
/// an identical file is left untouched. Refuses, naming it, a `<unit>.d`
/// that is a symlink or not a directory, and a drop-in of that name
/// portguard did not write. `unit_dir` must exist (the CLI uses
/// [`super::DEFAULT_UNIT_DIR`]); a symlink there is followed, below it none.
pub fn install(units: &[String], unit_dir: &Path, opts: &DropinOptions) -> anyhow::Result<Report> {
    let mut wanted = BTreeMap::new();
    for unit in units {
        wanted.insert(format!("{unit}.d"), dropin_text(unit, opts)?);
    }
    let root = Dir::open(unit_dir)
        .with_context(|| format!("opening the unit directory {}", unit_dir.display()))?;
    let mut report = Report::default();
    for (dir_name, text) in &wanted {
        let dir = unit_subdir(&root, dir_name)?;
        let path = dir.join(DROPIN_NAME);
        match read_dropin(&dir, DROPIN_NAME)? {
            Some(old) if old == *text => report.unchanged.push(path),
            Some(old) if !is_ours(&old) => bail!(
                "{} was not written by portguard (its first line is not portguard's marker); \
                 refusing to replace it: move it away, or drop the unit's `unit:` policy",
                path.display()
            ),
            _ => {
                write_atomically(&dir, DROPIN_NAME, text)?;
                report.written.push(path);
            }
        }
    }
    report.removed = remove_ours(
        &root,
        |dir, file| file == DROPIN_NAME && wanted.contains_key(dir),
        false,
    )?;
    Ok(report)
}

/// Remove every drop-in portguard wrote (first line [`MARKER`]) from
/// `unit_dir/*.d/`, and each such directory it leaves empty; other files
/// stay. Symlinked `*.d` entries are not followed. With `dry_run`, only
/// lists what would go. Returns the paths removed (files, then the
/// directory when it goes too). A missing `unit_dir` holds nothing.
pub fn uninstall(unit_dir: &Path, dry_run: bool) -> anyhow::Result<Vec<PathBuf>> {
    let root = match Dir::open(unit_dir) {
        Ok(root) => root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the unit directory {}", unit_dir.display()));
        }
    };
    remove_ours(&root, |_, _| false, dry_run)
}

fn is_ours(text: &str) -> bool {
    text.split('\n').next() == Some(MARKER)
}

fn symlink_refusal(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is a symbolic link, and portguard follows none below the unit directory: remove \
         it (and find out who made it)",
        path.display()
    )
}

/// `<unit>.d` below `root`, made (0755) when missing.
fn unit_subdir(root: &Dir, name: &str) -> anyhow::Result<Dir> {
    let path = root.join(name);
    match root
        .kind(name)
        .with_context(|| format!("inspecting {}", path.display()))?
    {
        Kind::Missing => match root.mkdir(name, 0o755) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        },
        Kind::Dir => {}
        Kind::Symlink => return Err(symlink_refusal(&path)),
        Kind::File | Kind::Other => bail!(
            "{} exists and is not a directory; systemd reads a unit's drop-ins from a directory \
             of that name",
            path.display()
        ),
    }
    root.sub(name).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            symlink_refusal(&path)
        } else {
            anyhow::Error::new(e).context(format!("opening {}", path.display()))
        }
    })
}

/// The text of drop-in `name` in `dir`, `None` when there is none. Anything
/// but a regular file is an error naming it.
fn read_dropin(dir: &Dir, name: &str) -> anyhow::Result<Option<String>> {
    let path = dir.join(name);
    match dir
        .kind(name)
        .with_context(|| format!("inspecting {}", path.display()))?
    {
        Kind::Missing => return Ok(None),
        Kind::File => {}
        Kind::Symlink => return Err(symlink_refusal(&path)),
        Kind::Dir | Kind::Other => bail!("{} exists and is not a regular file", path.display()),
    }
    let mut bytes = Vec::new();
    dir.open_read(name)
        .and_then(|f| f.take(MAX_DROPIN_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    // Not UTF-8 or oversized: not ours, and never equal to what we write.
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn write_atomically(dir: &Dir, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    // A leftover of an interrupted run that had the same pid.
    let _ = dir.remove(&tmp, false);
    let result = dir.create(&tmp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        // 0644 whatever the umask: systemd and `systemctl cat` read it.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        dir.rename(&tmp, name)?;
        dir.file.sync_all()
    });
    if let Err(e) = result {
        let _ = dir.remove(&tmp, false);
        return Err(e).with_context(|| format!("writing {}", dir.join(name).display()));
    }
    Ok(())
}

/// Remove portguard's drop-ins from every `*.d` directory of `root` except
/// those `keep(dir, file)` names, and each directory left empty.
fn remove_ours(
    root: &Dir,
    keep: impl Fn(&str, &str) -> bool,
    dry_run: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for scanned in scan(root)? {
        let (kept, gone): (Vec<_>, Vec<_>) =
            scanned.ours.iter().partition(|f| keep(&scanned.name, f));
        if gone.is_empty() {
            continue;
        }
        let dir = &scanned.dir;
        for file in gone {
            let path = dir.join(file);
            if !dry_run {
                dir.remove(file, false)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            removed.push(path);
        }
        if kept.is_empty() && scanned.others == 0 {
            let path = root.join(&scanned.name);
            if dry_run {
                removed.push(path);
                continue;
            }
            match root.remove(&scanned.name, true) {
                Ok(()) => removed.push(path),
                // Something appeared meanwhile: it stays, and so does its directory.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        } else if !dry_run {
            dir.file
                .sync_all()
                .with_context(|| format!("syncing {}", dir.path.display()))?;
        }
    }
    Ok(removed)
}

/// One `*.d` directory of the unit directory.
struct Scanned {
    name: String,
    dir: Dir,
    /// portguard's drop-ins in it.
    ours: Vec<String>,
    /// How many other entries it holds.
    others: usize,
}

/// Every real `*.d` directory of `root` (symlinks skipped) with portguard's
/// drop-ins in it: regular `*.conf` files whose first line is [`MARKER`].
fn scan(root: &Dir) -> anyhow::Result<Vec<Scanned>> {
    let mut out = Vec::new();
    let names = root
        .names()
        .with_context(|| format!("listing {}", root.path.display()))?;
    for name in names {
        if name.len() <= ".d".len() || !name.ends_with(".d") {
            continue;
        }
        let path = root.join(&name);
        if root
            .kind(&name)
            .with_context(|| format!("inspecting {}", path.display()))?
            != Kind::Dir
        {
            continue;
        }
        let dir = root
            .sub(&name)
            .with_context(|| format!("opening {}", path.display()))?;
        let (mut ours, mut others) = (Vec::new(), 0);
        for file in dir
            .names()
            .with_context(|| format!("listing {}", path.display()))?
        {
            if file.ends_with(".conf") && has_marker(&dir, &file)? {
                ours.push(file);
            } else {
                others += 1;
            }
        }
        out.push(Scanned {
            name,
            dir,
            ours,
            others,
        });
    }
    Ok(out)
}

fn has_marker(dir: &Dir, name: &str) -> anyhow::Result<bool> {
    let path = dir.join(name);
    if dir
        .kind(name)
        .with_context(|| format!("inspecting {}", path.display()))?
        != Kind::File
    {
        return Ok(false);
    }
    let mut head = Vec::new();
    dir.open_read(name)
        .and_then(|f| f.take(MARKER.len() as u64 + 1).read_to_end(&mut head))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(head.starts_with(MARKER.as_bytes()) && matches!(head.get(MARKER.len()), None | Some(b'\n')))
}
