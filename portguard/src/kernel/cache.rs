//! Which kernel object the agent loads: `portguard-cached`, whose decisions
//! keep the answer of the ancestor walk in each cgroup's own storage
//! (`BPF_MAP_TYPE_CGRP_STORAGE`) until a policy changes, where this kernel
//! accepts it, else `portguard`, which walks on every decision. Both enforce
//! the same policies; the cache only saves the walk (a helper call and a
//! hash lookup per governed level) on the hot path.
//!
//! The cached object needs: x86-64 (the epoch protocol in
//! portguard-ebpf/src/cache.rs leans on its load and store ordering), the
//! kernel's BTF for two offsets, kernel 6.2+ for the map type, and a
//! verifier that lets cgroup socket programs call
//! `bpf_get_current_task_btf` and `bpf_cgrp_storage_get`. Rather than guess
//! from the release, [`choose`] loads the cached object's bind4 program
//! once, unattached, and keeps the answer. Should the kernel still refuse
//! another of the cached programs when the object is loaded for real (a
//! verifier limit bind4 stays under), the loader loads the plain object
//! instead ([`Choice::plain`]) and says why.

use std::path::Path;

use aya::{
    EbpfLoader,
    programs::{CgroupSockAddr, ProgramError},
};
use portguard_common::{CACHE_MAX_INDEXES, CacheOffsets, GLOBAL_CACHE_OFFSETS};

use crate::kernel::btf::{VMLINUX_BTF, cache_offsets};

/// The kernel object with the per-cgroup policy cache, built by build.rs.
static OBJECT_CACHED: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portguard-cached"));

/// The object to load and what was decided about the cache.
pub(super) struct Choice {
    pub object: &'static [u8],
    /// The offsets to patch into the cached object (None: the plain one).
    pub offsets: Option<CacheOffsets>,
    /// Why the cache is off, when it is.
    pub off: Option<String>,
}

impl Choice {
    /// The object without the cache, and why.
    pub(super) fn plain(object: &'static [u8], why: String) -> Self {
        Self {
            object,
            offsets: None,
            off: Some(why),
        }
    }
}

/// Choose between the cached object and `plain`. `wanted` false
/// (`--no-cgroup-cache`, or `--kernel-object` given, which is loaded as it
/// is): the plain one, without trying.
pub(super) fn choose(plain: &'static [u8], wanted: bool, max_policies: u32) -> Choice {
    let off = |reason: String| Choice::plain(plain, reason);
    if !wanted {
        return off("--no-cgroup-cache or --kernel-object".to_owned());
    }
    // Both generations' records: twice --max-policies (in u64: no wrap).
    let policy_entries = 2 * u64::from(max_policies);
    if policy_entries > CACHE_MAX_INDEXES {
        return off(format!(
            "the policy map's {policy_entries} entries (twice --max-policies) do not fit a cache \
             word ({CACHE_MAX_INDEXES} at most)"
        ));
    }
    if !cfg!(target_arch = "x86_64") {
        return off(format!(
            "the cache is loaded on x86-64 only (this is {}): its epoch check relies on x86-64's \
             ordering of loads and stores",
            std::env::consts::ARCH
        ));
    }
    let offsets = match cache_offsets(Path::new(VMLINUX_BTF)) {
        Ok(o) => o,
        Err(e) => return off(e.to_string()),
    };
    match probe(&offsets) {
        Ok(()) => Choice {
            object: OBJECT_CACHED,
            offsets: Some(offsets),
            off: None,
        },
        Err(e) => off(format!(
            "the kernel refused the cached programs (kernel 6.2+ with \
             bpf_get_current_task_btf and bpf_cgrp_storage_get for cgroup socket programs): {e}"
        )),
    }
}

/// Load the cached object's bind4 program, unattached, with its own small
/// maps, and drop it: whether this kernel has the map type and lets a cgroup
/// socket program call the two helpers. (The other programs decide through
/// the same code; loading all of them here would double the agent's
/// start-up.) Globals the cache does not read keep their defaults.
fn probe(offsets: &CacheOffsets) -> Result<(), String> {
    let mut loader = EbpfLoader::new();
    loader.override_global(GLOBAL_CACHE_OFFSETS, offsets, true);
    let mut ebpf = loader.load(OBJECT_CACHED).map_err(|e| e.to_string())?;
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut("portguard_bind4")
        .ok_or("the cached object has no portguard_bind4")?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    prog.load().map_err(|e| verifier_tail(&e))
}

/// A program load's error, short: the verifier's log is long, and its last
/// lines say why.
pub(super) fn verifier_tail(e: &ProgramError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
}

/// Debug builds: `PORTGUARD_TEST_REFUSE_CACHED=<program>` in the agent's
/// environment makes the loader take that program of the cached object
/// (`cached`) as refused by the kernel, as a verifier limit another kernel
/// hits would, for the integration test of the fallback;
/// `PORTGUARD_TEST_REFUSE=<program>`, that program of either object, for
/// the test of a start that fails. Release builds: never.
pub(super) fn refused_for_test(name: &str, cached: bool) -> Option<ProgramError> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let named = |var: &str| std::env::var(var).is_ok_and(|v| v == name);
    let var = if cached && named("PORTGUARD_TEST_REFUSE_CACHED") {
        "PORTGUARD_TEST_REFUSE_CACHED"
    } else if named("PORTGUARD_TEST_REFUSE") {
        "PORTGUARD_TEST_REFUSE"
    } else {
        return None;
    };
    Some(ProgramError::SyscallError(aya::sys::SyscallError {
        call: "bpf_prog_load",
        io_error: std::io::Error::other(format!("refused for the test ({var})")),
    }))
}
