//! The bpf(2) commands aya 0.14 does not expose publicly: getting a pinned
//! object, pinning a raw fd, a link's cgroup and attach type
//! (`BPF_OBJ_GET_INFO_BY_FD` on a link), a program's run statistics (the
//! same command on a program fd aya holds), `BPF_LINK_UPDATE`, reading many
//! array entries in one call (`BPF_MAP_LOOKUP_BATCH`), and loading a
//! program from raw instructions (`BPF_PROG_LOAD`: the benchmark's empty
//! programs, not an ELF object). Everything else goes through aya. Layouts
//! are the kernel's stable uapi (`include/uapi/linux/bpf.h`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

/// `enum bpf_prog_type` values of portguard's cgroup socket programs.
pub mod prog_type {
    pub const CGROUP_SOCK: u32 = 9;
    pub const CGROUP_SOCK_ADDR: u32 = 18;
}

/// `enum bpf_attach_type` values portguard uses.
pub mod attach_type {
    pub const INET_INGRESS: u32 = 0;
    pub const INET_SOCK_CREATE: u32 = 2;
    pub const SOCK_OPS: u32 = 3;
    pub const INET4_BIND: u32 = 8;
    pub const INET6_BIND: u32 = 9;
    pub const INET4_CONNECT: u32 = 10;
    pub const INET6_CONNECT: u32 = 11;
    pub const INET4_POST_BIND: u32 = 12;
    pub const INET6_POST_BIND: u32 = 13;
    pub const UDP4_SENDMSG: u32 = 14;
    pub const UDP6_SENDMSG: u32 = 15;
    pub const SETSOCKOPT: u32 = 22;
    pub const LSM_CGROUP: u32 = 43;
}

/// The zero-filled `union bpf_attr` every command takes (128 bytes covers
/// every member used here; the kernel accepts a shorter attr when the tail
/// it does not know is zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    const fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `BPF_PROG_LOAD` of raw instructions (8 bytes each, as the kernel reads
/// them): a GPL program of `prog_type` for `expected_attach`, named `name`
/// (its first 15 bytes).
pub fn prog_load(
    prog_type: u32,
    expected_attach: u32,
    name: &str,
    insns: &[u64],
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let count = u32::try_from(insns.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many instructions"))?;
    // uapi: prog_type 0, insn_cnt 4, insns 8, license 16, prog_name 48 (16
    // bytes, NUL-terminated), expected_attach_type 68.
    let mut attr = Attr::new();
    attr.put_u32(0, prog_type);
    attr.put_u32(4, count);
    attr.put_u64(8, insns.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    let n = name.len().min(15);
    attr.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    attr.put_u32(68, expected_attach);
    // The pointers in `attr` stay alive for the call.
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: BPF_PROG_LOAD returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET`: open the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, p.as_ptr() as u64);
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pin `fd` at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, p.as_ptr() as u64);
    attr.put_u32(8, fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// What the kernel says about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For cgroup links: the cgroup it is attached to, 0 once that cgroup is
    /// gone (the link is then defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union
    // whose `cgroup` member is { u64 cgroup_id; u32 attach_type; }.
    #[repr(C, align(8))]
    struct Info([u8; 64]);
    let mut info = Info([0; 64]);
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u32(4, size_of::<Info>() as u32);
    attr.put_u64(8, info.0.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info.0[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_ne_bytes(info.0[o..o + 8].try_into().unwrap_or([0; 8]));
    Ok(LinkInfo {
        link_type: u32_at(0),
        id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id: u64_at(16),
        attach_type: u32_at(24),
    })
}

/// A program's run statistics (`struct bpf_prog_info`): counted by the
/// kernel only while run-time statistics are enabled (`BPF_ENABLE_STATS`
/// held by someone, or `sysctl kernel.bpf_stats_enabled=1`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgRunStats {
    pub id: u32,
    /// Runs counted (`run_cnt`).
    pub runs: u64,
    /// Nanoseconds spent in those runs (`run_time_ns`).
    pub run_ns: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a program: its id and run statistics.
///
/// # Minimum kernel version
///
/// 5.1 (`run_time_ns`, `run_cnt`); before, both read 0.
pub fn prog_run_stats(fd: BorrowedFd<'_>) -> io::Result<ProgRunStats> {
    // struct bpf_prog_info: id at 4, run_time_ns at 192, run_cnt at 200
    // (uapi; checked with offsetof against linux/bpf.h). The kernel fills
    // the first min(info_len, its size) bytes.
    const RUN_TIME_NS: usize = 192;
    const RUN_CNT: usize = 200;
    #[repr(C, align(8))]
    struct Info([u8; 208]);
    let mut info = Info([0; 208]);
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u32(4, size_of::<Info>() as u32);
    attr.put_u64(8, info.0.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u64_at = |o: usize| u64::from_ne_bytes(info.0[o..o + 8].try_into().unwrap_or([0; 8]));
    Ok(ProgRunStats {
        id: u32::from_ne_bytes(info.0[4..8].try_into().unwrap_or([0; 4])),
        runs: u64_at(RUN_CNT),
        run_ns: u64_at(RUN_TIME_NS),
    })
}

/// `BPF_LINK_CREATE`: attach `prog` to the cgroup open as `cgroup` with
/// `attach_type`, through a new link (multi-attach: it coexists with other
/// programs on the cgroup). The link lives as long as the fd, or its pin.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, cgroup.as_raw_fd() as u32);
    attr.put_u32(8, attach_type);
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: make `link` run `new_prog` from the next hook
/// invocation on, atomically (the kernel swaps one pointer; every call runs
/// either the old or the new program).
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_prog.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_MAP_LOOKUP_BATCH` on an array map: the values of its entries from
/// index `first` on, `value_size` bytes each (for a per-CPU map, one
/// 8-byte-aligned value per possible CPU), as many as fit in `values`.
/// Returns how many were read: fewer than asked once the map ends.
///
/// # Minimum kernel version
///
/// 5.6 (array maps); before, the kernel answers `EINVAL`.
pub fn array_lookup_batch(
    map: BorrowedFd<'_>,
    first: u32,
    values: &mut [u8],
    value_size: usize,
) -> io::Result<usize> {
    let count = values.len() / value_size.max(1);
    if count == 0 {
        return Ok(0);
    }
    let mut keys = vec![0u32; count];
    // The batch token is the key before the first one to read (none: from
    // the first entry); the kernel writes the last key read to `out_batch`.
    let mut before = first.wrapping_sub(1);
    let mut out_batch = 0u32;
    let mut attr = Attr::new();
    // struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; ... }
    if first > 0 {
        attr.put_u64(0, &raw mut before as u64);
    }
    attr.put_u64(8, &raw mut out_batch as u64);
    attr.put_u64(16, keys.as_mut_ptr() as u64);
    attr.put_u64(24, values.as_mut_ptr() as u64);
    attr.put_u32(32, count as u32);
    attr.put_u32(36, map.as_raw_fd() as u32);
    let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
    let read = u32::from_ne_bytes(attr.0[32..36].try_into().unwrap_or([0; 4])) as usize;
    match r {
        Ok(_) => Ok(read),
        // The map ended before `count` entries.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(read),
        Err(e) => Err(e),
    }
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let p = c_path(path)?;
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(p.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}
