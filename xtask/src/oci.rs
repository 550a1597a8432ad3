//! OCI image archives written directly (tar + sha256), with no container
//! engine: `cargo xtask image` packages the agent this way, and the CRI
//! end-to-end tests build their images with it. The archive imports with
//! `ctr images import`, `podman load` or `skopeo copy oci-archive:...`.

use std::path::Path;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// A single-layer image being assembled.
pub struct Image {
    layer: tar::Builder<Vec<u8>>,
    config: serde_json::Value,
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

impl Image {
    /// An empty linux/amd64 image whose container runs `entrypoint` +
    /// `cmd` with `env` (`KEY=value`).
    pub fn new(entrypoint: &[&str], cmd: &[&str], env: &[&str]) -> Self {
        Self {
            layer: tar::Builder::new(Vec::new()),
            config: serde_json::json!({
                "Entrypoint": entrypoint, "Cmd": cmd, "Env": env,
            }),
        }
    }

    /// Add the file at `src` as `path` (relative to `/`) with `mode`.
    pub fn file(&mut self, path: &str, src: &Path, mode: u32) -> anyhow::Result<&mut Self> {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        self.layer
            .append_data(&mut h, path.trim_start_matches('/'), data.as_slice())?;
        Ok(self)
    }

    /// Add the shared libraries a dynamically linked glibc program needs on
    /// x86_64 (taken from this host).
    pub fn glibc(&mut self) -> anyhow::Result<&mut Self> {
        for lib in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libgcc_s.so.1",
            "/lib64/ld-linux-x86-64.so.2",
        ] {
            self.file(lib, Path::new(lib), 0o755)?;
        }
        Ok(self)
    }

    /// Add a symlink `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<&mut Self> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        self.layer
            .append_link(&mut h, path.trim_start_matches('/'), target)?;
        Ok(self)
    }

    /// Write the OCI archive for image `name` (e.g.
    /// `docker.io/library/portguard:0.1.0`) to `out`.
    pub fn write(self, name: &str, out: &Path) -> anyhow::Result<()> {
        let layer = self.layer.into_inner()?;
        let layer_digest = digest(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
        }))?;
        let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest(&manifest), "size": manifest.len(),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }],
        }))?;
        let file =
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut archive = tar::Builder::new(file);
        let mut add = |path: String, data: &[u8]| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            archive.append_data(&mut h, path, data)
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json".into(), &index)?;
        for blob in [&layer, &config, &manifest] {
            add(
                format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]),
                blob,
            )?;
        }
        archive.finish()?;
        Ok(())
    }
}

/// The agent's image: the portguard binary at /usr/local/bin/portguard, the
/// C libraries it links, and by default `run --policy
/// /etc/portguard/policy.yaml` (the DaemonSet passes its own arguments).
pub fn agent_image(binary: &Path, name: &str, out: &Path) -> anyhow::Result<()> {
    let mut img = Image::new(
        &["/usr/local/bin/portguard"],
        &["run", "--policy", "/etc/portguard/policy.yaml"],
        &["RUST_LOG=info"],
    );
    img.file("/usr/local/bin/portguard", binary, 0o755)?
        .glibc()?;
    img.write(name, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_has_an_oci_layout_whose_digests_match() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("hello");
        std::fs::write(&src, "hi").unwrap();
        let out = dir.path().join("img.tar");
        let mut img = Image::new(&["/hello"], &[], &[]);
        img.file("/hello", &src, 0o755).unwrap();
        img.symlink("/bin/hi", "/hello").unwrap();
        img.write("docker.io/library/x:1", &out).unwrap();
        let mut blobs = std::collections::HashMap::new();
        let mut ar = tar::Archive::new(std::fs::File::open(&out).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            blobs.insert(path, data);
        }
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "docker.io/library/x:1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1");
        let blob = |d: &serde_json::Value| {
            let d = d.as_str().unwrap();
            let data = &blobs[&format!("blobs/sha256/{}", &d[7..])];
            assert_eq!(digest(data), d, "content matches its digest");
            data.clone()
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&m["digest"])).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/hello");
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(config["rootfs"]["diff_ids"][0], digest(&layer));
        let names: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["hello", "bin/hi"]);
    }
}
