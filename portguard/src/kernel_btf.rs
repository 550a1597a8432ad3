//! Facts about the running kernel read from its BTF (/sys/kernel/btf/vmlinux).

use std::path::Path;

use portguard_common::{SOCK_PREFIX_BYTES, SockOffsets};

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
    let read_err = |e: btf_rs::Error| BtfLookupError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let btf = btf_rs::Btf::from_file(path).map_err(read_err)?;
    for ty in btf.resolve_types_by_name("sock_common").map_err(read_err)? {
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
    let btf = btf_rs::Btf::from_file(path).map_err(|e| BtfLookupError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
