//! Whether the BPF LSM can deny `listen()` here ([`ListenCheck`]), read
//! from securityfs.

use log::debug;

/// How `listen()` is checked on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenCheck {
    /// BPF LSM `socket_listen`/`socket_accept`: violations are denied.
    Denied,
    /// `sock_ops` right after listen(): a violating listener is cut off
    /// (fenced, SOCK_DESTROY), not denied.
    Reported { why: String },
    /// Not checked at all.
    Unchecked { why: String },
}

pub const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether the BPF LSM is active (listed in /sys/kernel/security/lsm).
/// Mounts securityfs if it is not mounted yet.
pub fn bpf_lsm_active() -> Result<(), String> {
    let read = || std::fs::read_to_string(LSM_LIST);
    let list = match read() {
        Ok(l) => l,
        Err(_) => {
            // SAFETY: mount(2) with static, NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    c"securityfs".as_ptr(),
                    c"/sys/kernel/security".as_ptr(),
                    c"securityfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                debug!(
                    "loader: mounting securityfs: {}",
                    std::io::Error::last_os_error()
                );
            }
            read().map_err(|e| {
                format!("cannot read {LSM_LIST} ({e}), so the BPF LSM cannot be confirmed")
            })?
        }
    };
    if list.trim().split(',').any(|l| l == "bpf") {
        Ok(())
    } else {
        Err(format!(
            "the BPF LSM is not active (active LSMs: {}); boot with `lsm={},bpf` to enable it",
            list.trim(),
            list.trim()
        ))
    }
}
