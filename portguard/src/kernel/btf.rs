//! Facts about the running kernel: struct layouts read from its BTF
//! (/sys/kernel/btf/vmlinux), and its release.

use std::path::Path;

use portguard_common::{CacheOffsets, SOCK_PREFIX_BYTES, SockOffsets};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfLookupError {
    #[error("cannot read kernel BTF {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("kernel BTF has no struct sock_common member skc_ipv6only as a 1-bit field")]
    NotFound,
    #[error("kernel BTF: socket member `{member}` not found where expected")]
    Member { member: String },
    #[error(
        "skc_ipv6only is at bit {bit} of struct sock, beyond the {SOCK_PREFIX_BYTES} bytes the \
         kernel programs read"
    )]
    OutOfRange { bit: u32 },
}

/// Bit offset of `skc_ipv6only` in `struct sock` (whose first member is
/// `struct sock_common __sk_common`, so offsets in sock_common are offsets in
/// sock).
pub fn ipv6only_bit_offset(path: &Path) -> Result<u32, BtfLookupError> {
    let btf = read_btf(path)?;
    let types = btf
        .resolve_types_by_name("sock_common")
        .map_err(|e| read_error(path, &e))?;
    for ty in types {
        let btf_rs::Type::Struct(s) = ty else {
            continue;
        };
        for m in &s.members {
            if btf.resolve_name(m).ok().as_deref() != Some("skc_ipv6only") {
                continue;
            }
            if m.bitfield_size() != Some(1) {
                return Err(BtfLookupError::NotFound);
            }
            let bit = m.bit_offset();
            if bit >= SOCK_PREFIX_BYTES * 8 {
                return Err(BtfLookupError::OutOfRange { bit });
            }
            return Ok(bit);
        }
    }
    Err(BtfLookupError::NotFound)
}

fn read_error(path: &Path, e: &btf_rs::Error) -> BtfLookupError {
    BtfLookupError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The kernel BTF at `path`.
fn read_btf(path: &Path) -> Result<btf_rs::Btf, BtfLookupError> {
    btf_rs::Btf::from_file(path).map_err(|e| read_error(path, &e))
}

/// Bit offset (and bitfield size) of `name` in the struct or union `ty`,
/// looking inside anonymous members.
fn member_bits(btf: &btf_rs::Btf, ty: &btf_rs::Type, name: &str) -> Option<(u32, Option<u32>)> {
    let members = match ty {
        btf_rs::Type::Struct(s) | btf_rs::Type::Union(s) => &s.members,
        _ => return None,
    };
    for m in members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == name {
            return Some((m.bit_offset(), m.bitfield_size()));
        }
        if mname.is_empty() {
            let mut inner = btf.resolve_chained_type(m).ok()?;
            // Skip typedefs/qualifiers down to the struct or union.
            for _ in 0..8 {
                match inner {
                    btf_rs::Type::Struct(_) | btf_rs::Type::Union(_) => break,
                    ref other => match other.as_btf_type() {
                        Some(t) => inner = btf.resolve_chained_type(t).ok()?,
                        None => return None,
                    },
                }
            }
            if let Some((bits, size)) = member_bits(btf, &inner, name) {
                return Some((m.bit_offset() + bits, size));
            }
        }
    }
    None
}

fn struct_named(btf: &btf_rs::Btf, name: &str) -> Option<btf_rs::Type> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find(|t| matches!(t, btf_rs::Type::Struct(_)))
}

/// Offsets of the socket fields the LSM programs read, from kernel BTF.
pub fn sock_offsets(path: &Path) -> Result<SockOffsets, BtfLookupError> {
    let btf = read_btf(path)?;
    let socket = struct_named(&btf, "socket").ok_or(BtfLookupError::NotFound)?;
    let common = struct_named(&btf, "sock_common").ok_or(BtfLookupError::NotFound)?;
    let sock = struct_named(&btf, "sock").ok_or(BtfLookupError::NotFound)?;
    let bytes = |ty: &btf_rs::Type, name: &str| -> Result<u32, BtfLookupError> {
        match member_bits(&btf, ty, name) {
            Some((bits, None | Some(0))) if bits % 8 == 0 => Ok(bits / 8),
            _ => Err(BtfLookupError::Member {
                member: name.to_owned(),
            }),
        }
    };
    // struct sock begins with `struct sock_common __sk_common`.
    if member_bits(&btf, &sock, "__sk_common").map(|m| m.0) != Some(0) {
        return Err(BtfLookupError::Member {
            member: "__sk_common".to_owned(),
        });
    }
    let ipv6only_bit = match member_bits(&btf, &common, "skc_ipv6only") {
        Some((bit, Some(1))) => bit,
        _ => {
            return Err(BtfLookupError::Member {
                member: "skc_ipv6only".to_owned(),
            });
        }
    };
    Ok(SockOffsets {
        valid: 1,
        socket_sk: bytes(&socket, "sk")?,
        skc_family: bytes(&common, "skc_family")?,
        skc_num: bytes(&common, "skc_num")?,
        skc_rcv_saddr: bytes(&common, "skc_rcv_saddr")?,
        skc_v6_rcv_saddr: bytes(&common, "skc_v6_rcv_saddr")?,
        sk_protocol: bytes(&sock, "sk_protocol")?,
        ipv6only_bit,
    })
}

/// The offsets the cached programs follow from the current task to its
/// cgroup2 cgroup (`task_struct.cgroups`, `css_set.dfl_cgrp`) and up its
/// ancestry (`cgroup.level`, `cgroup.kn`, `kernfs_node.id`,
/// `cgroup.self.parent`, `cgroup_subsys_state.cgroup`), each on a byte
/// boundary.
pub fn cache_offsets(path: &Path) -> Result<CacheOffsets, BtfLookupError> {
    let btf = read_btf(path)?;
    let at = |ty: &str, name: &str| -> Result<u32, BtfLookupError> {
        let missing = || BtfLookupError::Member {
            member: format!("{ty}.{name}"),
        };
        let st = struct_named(&btf, ty).ok_or_else(missing)?;
        match member_bits(&btf, &st, name) {
            Some((bits, None | Some(0))) if bits % 8 == 0 => Ok(bits / 8),
            _ => Err(missing()),
        }
    };
    Ok(CacheOffsets {
        task_cgroups: at("task_struct", "cgroups")?,
        css_set_dfl_cgrp: at("css_set", "dfl_cgrp")?,
        cgroup_level: at("cgroup", "level")?,
        cgroup_kn: at("cgroup", "kn")?,
        kernfs_node_id: at("kernfs_node", "id")?,
        cgroup_parent_css: at("cgroup", "self")? + at("cgroup_subsys_state", "parent")?,
        css_cgroup: at("cgroup_subsys_state", "cgroup")?,
        _pad: 0,
    })
}

/// Byte offset of `sk_userlocks` (a `u8`) in `struct sock`: its
/// `SOCK_BINDPORT_LOCK` bit tells a port a bind() named from one the kernel
/// chose.
pub fn userlocks_offset(path: &Path) -> Result<u32, BtfLookupError> {
    let btf = read_btf(path)?;
    let sock = struct_named(&btf, "sock").ok_or(BtfLookupError::NotFound)?;
    match member_bits(&btf, &sock, "sk_userlocks") {
        // A byte of its own (kernels since 5.x), or a bitfield starting on
        // a byte (older ones keep it in a 4-bit field at the byte's start).
        Some((bits, None | Some(0 | 4 | 8))) if bits % 8 == 0 => Ok(bits / 8),
        _ => Err(BtfLookupError::Member {
            member: "sk_userlocks".to_owned(),
        }),
    }
}

/// `(major, minor)` of a kernel release string (`6.18.44-fc-v782`).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-', '+']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The running kernel's `(major, minor)`.
pub fn running_release() -> Option<(u32, u32)> {
    parse_release(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

/// Why a bind to port 0 is not enforced on this kernel, if it is not:
/// before 5.17 ("bpf: handle return value of post_bind{4,6}") a denial from
/// post_bind4/post_bind6 fails the bind() call but leaves the socket bound
/// to the port the kernel chose.
pub fn port0_unenforced(release: Option<(u32, u32)>) -> Option<String> {
    match release {
        Some(r) if r >= (5, 17) => None,
        Some((major, minor)) => Some(format!(
            "kernel {major}.{minor} is older than 5.17: a denied bind(port 0) fails with EPERM but \
             leaves the socket bound to the port the kernel chose (fixed upstream by \"bpf: handle \
             return value of post_bind{{4,6}}\"); listen() on it is still cut off, a UDP socket \
             keeps receiving on it. Upgrade the kernel for port-0 enforcement"
        )),
        None => Some(
            "the kernel release is unreadable: port-0 enforcement (kernel 5.17+) is not claimed"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_read_and_port0_is_claimed_from_5_17() {
        assert_eq!(parse_release("6.18.44-fc-v782\n"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("5.17+"), Some((5, 17)));
        assert_eq!(parse_release("garbage"), None);
        assert!(port0_unenforced(Some((5, 17))).is_none());
        assert!(port0_unenforced(Some((6, 1))).is_none());
        let why = port0_unenforced(Some((5, 15))).unwrap();
        assert!(why.contains("5.15") && why.contains("5.17"), "{why}");
        assert!(port0_unenforced(None).is_some());
        assert!(running_release().is_some());
    }

    /// Runs against this machine's kernel when it exposes BTF.
    #[test]
    fn finds_ipv6only_in_this_kernel() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipping: {VMLINUX_BTF} not present (kernel built without BTF)");
            return;
        }
        let bit = ipv6only_bit_offset(path).unwrap();
        // After skc_addrpair(8) + skc_hash(4) + skc_portpair(4) +
        // skc_family(2) + skc_state(1), in the bitfield byte.
        assert_eq!(bit / 8, 19, "bit {bit}");
        let o = sock_offsets(path).unwrap();
        assert_eq!(o.ipv6only_bit, bit);
        // The sock_common layout every kernel since 5.x shares.
        assert_eq!(o.skc_rcv_saddr, 4, "{o:?}");
        assert_eq!(o.skc_num, 14, "{o:?}");
        assert_eq!(o.skc_family, 16, "{o:?}");
        assert!(o.socket_sk > 0 && o.socket_sk < 56, "{o:?}");
        assert!(o.sk_protocol > 100, "{o:?}");
        let locks = userlocks_offset(path).unwrap();
        assert!(locks > 100 && locks < 4096, "sk_userlocks at {locks}");
        // task_struct is large and config-dependent; css_set begins with
        // its subsystem states, then the default hierarchy's cgroup.
        let c = cache_offsets(path).unwrap();
        assert!(
            c.task_cgroups > 512 && c.task_cgroups.is_multiple_of(8),
            "{c:?}"
        );
        assert!(
            c.css_set_dfl_cgrp > 0 && c.css_set_dfl_cgrp.is_multiple_of(8),
            "{c:?}"
        );
        // struct cgroup begins with its own css, whose `cgroup` comes first.
        assert_eq!(c.css_cgroup, 0, "{c:?}");
        assert!(
            c.cgroup_parent_css > 0 && c.cgroup_parent_css < c.cgroup_kn,
            "{c:?}"
        );
        assert!(c.cgroup_level > 0 && c.kernfs_node_id > 0, "{c:?}");
    }
}
