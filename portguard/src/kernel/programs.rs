//! Loading the object's programs into the kernel, once its maps exist: the
//! decision programs ([`PROGRAMS`]), the packet guard, the fence's keeper,
//! and the listen checks (the BPF LSM ones where it works, else the
//! sock_ops reporter). Nothing is attached here.
//!
//! From the object with the per-cgroup policy cache, every refusal is a
//! [`LoaderError::CachedProgramLoad`], the loader's cue to load the object
//! without the cache instead (`cache.rs`): its programs decide through the
//! cache, so one the kernel refuses says nothing of the other object. That
//! includes the sock_ops reporter, which the plain object merely warns
//! about: the cache must not cost a check the plain object would keep.

use aya::{
    Ebpf,
    programs::{
        CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, Program, ProgramError, SockOps,
    },
};
use log::{debug, warn};
use portguard_common::{FENCE_PROGRAM, GUARD_PROGRAM, Hook, PROGRAMS, SOCK_OPS_PROGRAM};

use super::{Loaded, LoaderError, bpf_lsm_active, cache};

/// The error for program `name` on `hook` the kernel refused.
fn refused(cached: bool, name: &'static str, hook: &'static str, e: ProgramError) -> LoaderError {
    let source = Box::new(e);
    if cached {
        LoaderError::CachedProgramLoad { name, hook, source }
    } else {
        LoaderError::ProgramLoad { name, hook, source }
    }
}

/// Load every program of `ebpf` (`cached`: the object with the cache).
/// `socket_layout`: the kernel's BTF gave the socket offsets the listen
/// checks read. Returns why the BPF LSM checks are not loaded, if they are
/// not, and whether the sock_ops reporter is.
pub(super) fn load_programs(
    ebpf: &mut Ebpf,
    cached: bool,
    socket_layout: bool,
) -> Result<(Option<String>, bool), LoaderError> {
    for (name, hook) in PROGRAMS {
        match hook {
            Hook::PostBind4 | Hook::PostBind6 | Hook::SockCreate => {
                load_one(ebpf, cached, name, hook.name(), CgroupSock::load)?;
            }
            _ => load_one(ebpf, cached, name, hook.name(), CgroupSockAddr::load)?,
        }
    }
    load_one(
        ebpf,
        cached,
        GUARD_PROGRAM,
        "cgroup_skb/ingress",
        CgroupSkb::load,
    )?;
    load_one(
        ebpf,
        cached,
        FENCE_PROGRAM,
        "cgroup/setsockopt",
        CgroupSockopt::load,
    )?;
    let lsm_unavailable = if socket_layout {
        bpf_lsm_active().and_then(|()| Loaded::load_lsm(ebpf)).err()
    } else {
        Some("kernel BTF lacks the socket layout the checks read".to_owned())
    };
    let mut sock_ops_loaded = false;
    if let Some(why) = &lsm_unavailable {
        debug!("loader: BPF LSM unusable ({why}); loading the sock_ops listen reporter");
        match load_one(ebpf, cached, SOCK_OPS_PROGRAM, "sock_ops", SockOps::load) {
            Ok(()) => sock_ops_loaded = true,
            Err(e @ LoaderError::CachedProgramLoad { .. }) => return Err(e),
            Err(e) => warn!("loader: {e}"),
        }
    }
    Ok((lsm_unavailable, sock_ops_loaded))
}

/// Load program `name` (hook `hook`) of `ebpf` as a `T` with `load`; debug
/// builds first ask [`cache::refused_for_test`] whether to take it as
/// refused.
fn load_one<'a, T: 'a>(
    ebpf: &'a mut Ebpf,
    cached: bool,
    name: &'static str,
    hook: &'static str,
    load: fn(&mut T) -> Result<(), ProgramError>,
) -> Result<(), LoaderError>
where
    &'a mut Program: TryInto<&'a mut T, Error = ProgramError>,
{
    let err = |e| refused(cached, name, hook, e);
    if let Some(e) = cache::refused_for_test(name, cached) {
        return Err(err(e));
    }
    let p: &mut T = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram { name })?
        .try_into()
        .map_err(err)?;
    load(p).map_err(err)?;
    debug!("loader: loaded {name}");
    Ok(())
}
