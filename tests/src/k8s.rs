//! Kubernetes stand-ins: [`ConfigMapVolume`], a policy file laid out and
//! updated the way the kubelet updates a ConfigMap volume; [`FakeApiServer`],
//! which records what a client sends the API server.

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

/// One request a [`FakeApiServer`] received.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub content_type: String,
    pub body: serde_json::Value,
}

/// A stand-in for the Kubernetes API server (none can run here): plain
/// HTTP/1.1 on loopback, recording every request and answering each with
/// `200 OK` and the request's own body (what an API server answers to a
/// server-side apply: the object). It knows nothing of Kubernetes; it lets
/// a real agent's client run end to end, and the test judge what it sent.
pub struct FakeApiServer {
    pub port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<ApiRequest>>>,
    /// A kubeconfig naming this server.
    pub kubeconfig: tempfile::NamedTempFile,
}

impl FakeApiServer {
    pub fn start() -> Self {
        use std::{
            io::{BufRead as _, BufReader, Read as _, Write as _},
            sync::{Arc, Mutex},
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<ApiRequest>>> = Arc::default();
        let seen = requests.clone();
        // Serves until the test process exits.
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut out = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let method = parts.next().unwrap_or_default().to_owned();
                        let target = parts.next().unwrap_or_default().to_owned();
                        let (mut length, mut content_type) = (0usize, String::new());
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            let (k, v) = h.split_once(':').unwrap();
                            match k.to_ascii_lowercase().as_str() {
                                "content-length" => length = v.trim().parse().unwrap(),
                                "content-type" => v.trim().clone_into(&mut content_type),
                                "transfer-encoding" => panic!("chunked request: {v}"),
                                _ => {}
                            }
                        }
                        let mut body = vec![0; length];
                        r.read_exact(&mut body).unwrap();
                        seen.lock().unwrap().push(ApiRequest {
                            method,
                            target,
                            content_type,
                            body: serde_json::from_slice(&body).unwrap_or_default(),
                        });
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        if out.write_all(head.as_bytes()).is_err() || out.write_all(&body).is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        let kubeconfig = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            kubeconfig.path(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n"
            ),
        )
        .unwrap();
        Self {
            port,
            requests,
            kubeconfig,
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.requests.lock().unwrap().clone()
    }
}
