//! `portguard uninstall`: remove what portguard pinned.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

/// Remove everything portguard pinned: links first (enforcement stops),
/// then programs and maps, then the directory if nothing else is in it;
/// then the runtime hooks `portguard hook install` wrote at their default
/// places (a hook left behind would wait for an agent that is gone).
///
/// Touches only the names portguard creates in --pin-dir; anything else
/// there is listed and left alone. Refuses while an agent runs on that
/// directory (stop it first). Exits 1 on error.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The agent's --pin-dir.
    #[arg(long, value_name = "DIR", default_value = crate::kernel::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// List what would be removed (with kernel ids) and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Leave the runtime hooks in place (`portguard hook uninstall`
    /// removes them, also from places other than the defaults).
    #[arg(long)]
    pub keep_hooks: bool,
}

/// Carry out the verb.
pub fn execute(a: UninstallArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let (ours, foreign) = crate::kernel::pins::uninstall(&a.pin_dir, a.dry_run)?;
    let verb = if a.dry_run { "would remove" } else { "removed" };
    // A closed pipe (`| head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    for p in &ours {
        let id = p.id.map_or(String::new(), |i| format!(" id {i}"));
        let detail = if p.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.detail)
        };
        let _ = writeln!(out, "{verb} {}{id}{detail}: {}", p.kind, p.path.display());
    }
    for f in &foreign {
        let _ = writeln!(out, "left alone (not portguard's): {}", f.display());
    }
    let _ = writeln!(
        out,
        "{verb} {} pinned objects from {}",
        ours.len(),
        a.pin_dir.display()
    );
    if !a.keep_hooks {
        let hooks = super::hook::uninstall_hooks(&super::hook::default_locations(a.dry_run))?;
        for c in hooks {
            if let crate::hook::install::Change::Removed(p) = c {
                let _ = writeln!(out, "{verb} hook: {}", p.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
