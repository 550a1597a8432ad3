//! Facts about the running kernel read from its BTF (/sys/kernel/btf/vmlinux).

use std::path::Path;

use portguard_common::SOCK_PREFIX_BYTES;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfLookupError {
    #[error("cannot read kernel BTF {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("kernel BTF has no struct sock_common member skc_ipv6only as a 1-bit field")]
    NotFound,
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
    }
}
