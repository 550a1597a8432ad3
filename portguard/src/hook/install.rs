//! Putting `portguard hook oci` where runtimes look for hooks, and taking
//! it out again: containerd's base runtime spec (`base_runtime_spec`, a
//! whole OCI spec containerd starts every container from; 1.6 and 1.7)
//! and CRI-O's `hooks.d` directory. Files are replaced atomically and
//! never through a symlink; uninstalling containerd's leaves a valid spec
//! without the hook (containerd keeps reading the file its configuration
//! names).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::OnFailure;

/// containerd's default OCI spec (`ctr oci spec`, containerd 1.6.20),
/// the start of a base spec when none exists yet.
pub const CONTAINERD_DEFAULT_SPEC: &str = include_str!("containerd-default-spec.json");

/// Where the base spec goes by default.
pub const CONTAINERD_BASE_SPEC: &str = "/etc/containerd/portguard-base-spec.json";
/// CRI-O's hooks directory.
pub const CRIO_HOOKS_DIR: &str = "/etc/containers/oci/hooks.d";
/// The hook's file in it.
pub const CRIO_HOOK_FILE: &str = "portguard.json";

/// The hook's command line, as the runtime will run it.
#[derive(Clone, Debug)]
pub struct HookLine {
    /// The portguard binary on the node (absolute).
    pub bin: PathBuf,
    pub socket: PathBuf,
    pub timeout: Duration,
    pub on_failure: OnFailure,
    /// `--fail-open-namespace` of the hook.
    pub fail_open_namespaces: Vec<String>,
    /// `--runtime` of the hook (whose annotations to trust).
    pub runtime: Option<&'static str>,
}

impl HookLine {
    fn check(&self) -> anyhow::Result<()> {
        for (what, p) in [("--bin", &self.bin), ("--socket", &self.socket)] {
            if !p.is_absolute() {
                anyhow::bail!("{what} {}: must be an absolute path", p.display());
            }
            if p.to_str().is_none() {
                anyhow::bail!("{what} {}: must be valid UTF-8", p.display());
            }
        }
        Ok(())
    }

    /// `argv` of the hook (argv[0] first).
    pub fn args(&self) -> Vec<String> {
        let on_failure = match self.on_failure {
            OnFailure::Auto => "auto",
            OnFailure::Closed => "closed",
            OnFailure::Open => "open",
        };
        let mut args: Vec<String> = vec![
            "portguard".into(),
            "hook".into(),
            "oci".into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--timeout".into(),
            format!("{}ms", self.timeout.as_millis()),
            "--on-failure".into(),
            on_failure.into(),
        ];
        for ns in &self.fail_open_namespaces {
            args.extend(["--fail-open-namespace".into(), ns.clone()]);
        }
        if let Some(r) = self.runtime {
            args.extend(["--runtime".into(), r.into()]);
        }
        args
    }

    /// The OCI `timeout` (whole seconds): the runtime kills a hook that
    /// outlives it, and fails the start. A little past the hook's own.
    pub fn oci_timeout(&self) -> u64 {
        self.timeout.as_secs() + 2
    }

    fn entry(&self) -> Value {
        json!({
            "path": self.bin.display().to_string(),
            "args": self.args(),
            "timeout": self.oci_timeout(),
        })
    }
}

/// A hook entry this module wrote (`<...>/portguard hook oci ...`).
pub fn is_ours(hook: &Value) -> bool {
    let args: Vec<&str> = hook["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let bin_is_portguard = hook["path"]
        .as_str()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("portguard"));
    bin_is_portguard && args.get(1..3) == Some(&["hook", "oci"][..])
}

/// `spec` with `line` as its (only) portguard createRuntime hook, after
/// any other createRuntime hooks it has.
pub fn with_hook(mut spec: Value, line: &HookLine) -> anyhow::Result<Value> {
    for key in ["ociVersion", "process", "root", "linux"] {
        if spec.get(key).is_none() {
            anyhow::bail!(
                "not a whole OCI runtime spec (no `{key}`): containerd starts every container \
                 from its base spec, so it must be complete (`ctr oci spec` prints one)"
            );
        }
    }
    let (without, _) = without_hook(spec);
    spec = without;
    let hooks = spec
        .as_object_mut()
        .context("the spec is not a JSON object")?
        .entry("hooks")
        .or_insert_with(|| json!({}));
    let list = hooks
        .as_object_mut()
        .context("`hooks` is not an object")?
        .entry("createRuntime")
        .or_insert_with(|| json!([]));
    list.as_array_mut()
        .context("`hooks.createRuntime` is not a list")?
        .push(line.entry());
    Ok(spec)
}

/// `spec` without portguard's hooks, and how many there were.
pub fn without_hook(mut spec: Value) -> (Value, usize) {
    let mut removed = 0;
    if let Some(hooks) = spec.get_mut("hooks").and_then(Value::as_object_mut) {
        for (_, list) in hooks.iter_mut() {
            if let Some(a) = list.as_array_mut() {
                let before = a.len();
                a.retain(|h| !is_ours(h));
                removed += before - a.len();
            }
        }
        hooks.retain(|_, l| l.as_array().is_none_or(|a| !a.is_empty()));
        if hooks.is_empty()
            && let Some(o) = spec.as_object_mut()
        {
            o.remove("hooks");
        }
    }
    (spec, removed)
}

/// What an install or uninstall did to one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Written(PathBuf),
    Unchanged(PathBuf),
    Removed(PathBuf),
    Absent(PathBuf),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Written(p) => write!(f, "wrote {}", p.display()),
            Self::Unchanged(p) => write!(f, "unchanged {}", p.display()),
            Self::Removed(p) => write!(f, "removed {}", p.display()),
            Self::Absent(p) => write!(f, "nothing to remove at {}", p.display()),
        }
    }
}

/// Read a file that must not be a symlink (`None`: it does not exist).
fn read_plain(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() || !m.is_file() => anyhow::bail!(
            "{}: not a regular file (a symlink?); refusing to touch it",
            path.display()
        ),
        Ok(_) => Ok(Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

/// Replace `path` with `text` atomically (mode 0644: runtimes read it).
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    super::replace_file(path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Copy the binary `from` to `to` (mode 0755), atomically.
pub fn copy_binary(from: &Path, to: &Path) -> anyhow::Result<Change> {
    let new = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if let Ok(m) = std::fs::symlink_metadata(to)
        && !m.is_file()
    {
        anyhow::bail!(
            "{}: not a regular file; refusing to replace it",
            to.display()
        );
    }
    if std::fs::read(to).is_ok_and(|old| old == new) {
        return Ok(Change::Unchanged(to.to_owned()));
    }
    super::replace_file(to, &new, 0o755).with_context(|| format!("installing {}", to.display()))?;
    Ok(Change::Written(to.to_owned()))
}

/// Write containerd's base spec at `path` with the hook: from `from` (a
/// whole spec) if given, else from what is at `path`, else containerd's
/// default spec.
pub fn install_containerd(
    path: &Path,
    from: Option<&Path>,
    line: &HookLine,
) -> anyhow::Result<Change> {
    line.check()?;
    let current = read_plain(path)?;
    let (base, source) = match (from, &current) {
        (Some(f), _) => (
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            f.display().to_string(),
        ),
        (None, Some(text)) => (text.clone(), path.display().to_string()),
        (None, None) => (
            CONTAINERD_DEFAULT_SPEC.to_owned(),
            "containerd's default spec".into(),
        ),
    };
    let spec: Value = serde_json::from_str(&base).with_context(|| format!("{source}: not JSON"))?;
    let spec = with_hook(spec, line).with_context(|| source.clone())?;
    let text = pretty(&spec);
    if current.as_deref() == Some(text.as_str()) {
        return Ok(Change::Unchanged(path.to_owned()));
    }
    write_atomic(path, &text)?;
    Ok(Change::Written(path.to_owned()))
}

/// Take the hook out of containerd's base spec at `path`, leaving the rest
/// (containerd's configuration still names the file).
pub fn uninstall_containerd(path: &Path, dry_run: bool) -> anyhow::Result<Change> {
    let Some(text) = read_plain(path)? else {
        return Ok(Change::Absent(path.to_owned()));
    };
    let spec: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let (spec, removed) = without_hook(spec);
    if removed == 0 {
        return Ok(Change::Absent(path.to_owned()));
    }
    if !dry_run {
        write_atomic(path, &pretty(&spec))?;
    }
    Ok(Change::Removed(path.to_owned()))
}

/// Remove the agent's published selection next to its status socket
/// `socket`: without an agent, a hook must not fail closed on it.
pub fn remove_selection(socket: &Path, dry_run: bool) -> anyhow::Result<Change> {
    let path = super::spool::dir_of(socket).join(super::spool::SELECTION_FILE);
    if read_plain(&path)?.is_none() {
        return Ok(Change::Absent(path));
    }
    if !dry_run {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(Change::Removed(path))
}

/// CRI-O's hook file (hooks.d schema 1.0.0).
pub fn crio_hook(line: &HookLine) -> Value {
    json!({
        "version": "1.0.0",
        "hook": line.entry(),
        "when": {"always": true},
        "stages": ["createRuntime"],
    })
}

/// Write the hook into CRI-O's hooks directory `dir`.
pub fn install_crio(dir: &Path, line: &HookLine) -> anyhow::Result<Change> {
    line.check()?;
    let path = dir.join(CRIO_HOOK_FILE);
    let text = pretty(&crio_hook(line));
    if read_plain(&path)?.as_deref() == Some(text.as_str()) {
        return Ok(Change::Unchanged(path));
    }
    write_atomic(&path, &text)?;
    Ok(Change::Written(path))
}

/// Remove the hook from CRI-O's hooks directory `dir` (only if it is
/// portguard's).
pub fn uninstall_crio(dir: &Path, dry_run: bool) -> anyhow::Result<Change> {
    let path = dir.join(CRIO_HOOK_FILE);
    let Some(text) = read_plain(&path)? else {
        return Ok(Change::Absent(path));
    };
    let ours = serde_json::from_str::<Value>(&text).is_ok_and(|v| is_ours(&v["hook"]));
    if !ours {
        anyhow::bail!(
            "{}: not a hook portguard wrote; leaving it alone",
            path.display()
        );
    }
    if !dry_run {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(Change::Removed(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> HookLine {
        HookLine {
            bin: "/opt/portguard/bin/portguard".into(),
            socket: "/run/portguard/status.sock".into(),
            timeout: Duration::from_secs(1),
            on_failure: OnFailure::Auto,
            fail_open_namespaces: vec!["portguard-system".into()],
            runtime: Some("containerd"),
        }
    }

    #[test]
    fn the_base_spec_gets_one_hook_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("base.json");
        assert!(matches!(
            install_containerd(&p, None, &line()),
            Ok(Change::Written(_))
        ));
        let spec: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let hooks = spec["hooks"]["createRuntime"].as_array().unwrap();
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0]["path"], "/opt/portguard/bin/portguard");
        assert_eq!(hooks[0]["timeout"], 3);
        assert_eq!(hooks[0]["args"][1], "hook");
        assert_eq!(hooks[0]["args"][10], "portguard-system");
        assert!(
            spec["linux"]["namespaces"].is_array(),
            "the default spec stays whole"
        );
        // Again: unchanged; a foreign hook added by hand survives both ways.
        assert!(matches!(
            install_containerd(&p, None, &line()),
            Ok(Change::Unchanged(_))
        ));
        let mut with_foreign = spec.clone();
        with_foreign["hooks"]["createRuntime"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"path": "/usr/bin/other-hook"}));
        std::fs::write(&p, pretty(&with_foreign)).unwrap();
        let mut l = line();
        l.timeout = Duration::from_millis(500);
        assert!(matches!(
            install_containerd(&p, None, &l),
            Ok(Change::Written(_))
        ));
        let spec: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let hooks = spec["hooks"]["createRuntime"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[1]["args"][6], "500ms");
        assert!(matches!(
            uninstall_containerd(&p, false),
            Ok(Change::Removed(_))
        ));
        let spec: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(
            spec["hooks"]["createRuntime"],
            json!([{"path": "/usr/bin/other-hook"}])
        );
        assert!(spec["process"].is_object());
        assert!(matches!(
            uninstall_containerd(&p, false),
            Ok(Change::Absent(_))
        ));
    }

    #[test]
    fn a_partial_spec_or_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let partial = d.path().join("partial.json");
        std::fs::write(&partial, r#"{"hooks": {}}"#).unwrap();
        let e = install_containerd(&d.path().join("b.json"), Some(&partial), &line()).unwrap_err();
        assert!(
            format!("{e:#}").contains("not a whole OCI runtime spec"),
            "{e:#}"
        );
        let link = d.path().join("link.json");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let e = install_containerd(&link, None, &line()).unwrap_err();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        let mut rel = line();
        rel.bin = "portguard".into();
        assert!(install_containerd(&d.path().join("c.json"), None, &rel).is_err());
    }

    #[test]
    fn crio_gets_a_hooks_d_file_that_only_portguard_removes() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            install_crio(d.path(), &line()),
            Ok(Change::Written(_))
        ));
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join(CRIO_HOOK_FILE)).unwrap())
                .unwrap();
        assert_eq!(v["stages"], json!(["createRuntime"]));
        assert!(matches!(
            install_crio(d.path(), &line()),
            Ok(Change::Unchanged(_))
        ));
        assert!(matches!(
            uninstall_crio(d.path(), false),
            Ok(Change::Removed(_))
        ));
        std::fs::write(d.path().join(CRIO_HOOK_FILE), r#"{"hook":{"path":"/x"}}"#).unwrap();
        assert!(uninstall_crio(d.path(), false).is_err());
        assert!(d.path().join(CRIO_HOOK_FILE).exists());
    }
}
