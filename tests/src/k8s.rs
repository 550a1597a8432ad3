//! Kubernetes stand-ins: [`ConfigMapVolume`], a policy file laid out and
//! updated the way the kubelet updates a ConfigMap volume.

use std::path::PathBuf;

/// A Kubernetes ConfigMap volume, laid out and updated the way the kubelet's
/// AtomicWriter does it: `policy.yaml -> ..data/policy.yaml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory
/// and renames a `..data_tmp` symlink over `..data`. The file the agent was
/// given never changes itself; the swap must still reload it.
pub struct ConfigMapVolume {
    pub dir: tempfile::TempDir,
    version: u32,
}

impl ConfigMapVolume {
    /// A volume holding `policy.yaml`.
    pub fn new(policy: &str) -> Self {
        let mut v = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        v.update(policy);
        std::os::unix::fs::symlink("..data/policy.yaml", v.dir.path().join("policy.yaml")).unwrap();
        v
    }

    /// Replace `policy.yaml` the way the kubelet does.
    pub fn update(&mut self, policy: &str) {
        let root = self.dir.path();
        self.version += 1;
        let ts = format!(
            "..2026_11_22_00_00_0{}.{}",
            self.version,
            std::process::id()
        );
        std::fs::create_dir(root.join(&ts)).unwrap();
        std::fs::write(root.join(&ts).join("policy.yaml"), policy).unwrap();
        let old = std::fs::read_link(root.join("..data")).ok();
        std::os::unix::fs::symlink(&ts, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }
}
