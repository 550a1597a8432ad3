//! Attaching the host-wide programs to `--attach-cgroup` (the root): the
//! fence keeper and the listen checks, which are selected by the cgroup a
//! socket was made in and so must see sockets made anywhere
//! ([`Loaded::attach`] owns its links; [`Loaded::attach_pinned`] adopts,
//! repairs or creates pinned ones), and the packet guard the agent attaches
//! on demand. The decision programs run only on the attach points
//! (`points`).

use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::Path,
};

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt,
    LsmCgroup, ProgramError, SockOps,
    links::{FdLink, LinkError},
};
use log::{info, warn};
use portguard_common::{
    FENCE_PROGRAM, GUARD_PROGRAM, Hook, LSM_PROGRAMS, PROGRAMS, SOCK_OPS_PROGRAM,
};

use crate::{
    kernel::bpfsys::{self, attach_type},
    kernel::pins::{PinDir, program_names},
};

use super::*;

/// How each program came to be attached (see [`Loaded::attach_pinned`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Pinned links switched to the new program in place (`BPF_LINK_UPDATE`).
    pub updated: Vec<&'static str>,
    /// New links (nothing was pinned for them).
    pub created: Vec<&'static str>,
    /// Pinned links that were attached elsewhere or defunct, replaced.
    pub repaired: Vec<(&'static str, String)>,
    /// Pinned links of programs this agent does not attach, removed.
    pub removed: Vec<String>,
}

/// The expected `bpf_attach_type` of each program.
pub(super) fn expected_attach_type(name: &str) -> u32 {
    match name {
        "portguard_bind4" => attach_type::INET4_BIND,
        "portguard_bind6" => attach_type::INET6_BIND,
        "portguard_post_bind4" => attach_type::INET4_POST_BIND,
        "portguard_post_bind6" => attach_type::INET6_POST_BIND,
        "portguard_connect4" => attach_type::INET4_CONNECT,
        "portguard_connect6" => attach_type::INET6_CONNECT,
        "portguard_sendmsg4" => attach_type::UDP4_SENDMSG,
        "portguard_sendmsg6" => attach_type::UDP6_SENDMSG,
        "portguard_sock_create" => attach_type::INET_SOCK_CREATE,
        SOCK_OPS_PROGRAM => attach_type::SOCK_OPS,
        GUARD_PROGRAM => attach_type::INET_INGRESS,
        FENCE_PROGRAM => attach_type::SETSOCKOPT,
        _ => attach_type::LSM_CGROUP,
    }
}

/// A program's link to a cgroup: it detaches when dropped, unless pinned.
#[derive(Debug)]
pub enum ProgLink {
    Aya(FdLink),
    /// Made with [`bpfsys::link_create`].
    Own(std::os::fd::OwnedFd),
}

impl ProgLink {
    /// Pin the link at `path`: it stays attached after the agent exits.
    pub(super) fn pin(self, path: &Path) -> Result<(), String> {
        match self {
            Self::Aya(l) => l.pin(path).map(drop).map_err(|e| e.to_string()),
            Self::Own(fd) => bpfsys::obj_pin(fd.as_fd(), path).map_err(|e| e.to_string()),
        }
    }
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Sock,
    SockAddr,
    SockOps,
    Lsm,
    Skb,
    Sockopt,
}

impl Kind {
    pub(super) fn hook_name(self, name: &str) -> &'static str {
        match self {
            Self::SockOps => "sock_ops",
            Self::Skb => "cgroup_skb/ingress",
            Self::Sockopt => "cgroup/setsockopt",
            Self::Lsm => LSM_PROGRAMS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or("lsm_cgroup", |(_, h, _)| h),
            _ => PROGRAMS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("cgroup", |(_, h)| h.name()),
        }
    }
}

impl Loaded {
    /// The host-wide programs to attach, in order: the fence keeper, then
    /// the LSM checks or (without the BPF LSM) the sock_ops listen
    /// reporter.
    pub(super) fn wanted(&self) -> Vec<(&'static str, Kind, Hook)> {
        let mut v: Vec<(&'static str, Kind, Hook)> = Vec::new();
        // The fence's keeper: a socket a hook that cannot deny cut off (UDP
        // autobinds everywhere, listeners without the LSM) stays fenced.
        v.push((FENCE_PROGRAM, Kind::Sockopt, Hook::Setsockopt));
        if self.lsm_unavailable.is_none() {
            v.extend(LSM_PROGRAMS.iter().map(|&(n, _, h)| (n, Kind::Lsm, h)));
        } else if self.sock_ops_loaded {
            v.push((SOCK_OPS_PROGRAM, Kind::SockOps, Hook::Listen));
        }
        v
    }

    /// Attach one program to `file` with a new link.
    pub(super) fn attach_new(
        &mut self,
        name: &'static str,
        kind: Kind,
        file: &File,
        cgroup: &Path,
    ) -> Result<ProgLink, LoaderError> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingProgram { name })?;
        let err = |source: ProgramError| LoaderError::Attach {
            name,
            hook: kind.hook_name(name),
            cgroup: cgroup.display().to_string(),
            source: Box::new(source),
        };
        let link_err = |source: LinkError| LoaderError::Link { name, source };
        // `Single` through bpf_link_create coexists with other programs on
        // the same cgroup (the kernel treats links as multi-attach).
        match kind {
            Kind::Sock => {
                let p: &mut CgroupSock = prog.try_into().map_err(err)?;
                let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::SockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::SockOps => {
                let p: &mut SockOps = prog.try_into().map_err(err)?;
                let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::Skb => {
                let p: &mut CgroupSkb = prog.try_into().map_err(err)?;
                let id = p
                    .attach(file, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                    .map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?)
                    .map(ProgLink::Aya)
                    .map_err(link_err)
            }
            Kind::Sockopt => {
                // aya 0.14 cannot turn a cgroup sockopt link into an FdLink
                // (to pin it): the link is made here.
                let p: &mut CgroupSockopt = prog.try_into().map_err(err)?;
                let fd = p.fd().map_err(err)?;
                bpfsys::link_create(fd.as_fd(), file.as_fd(), expected_attach_type(name))
                    .map(ProgLink::Own)
                    .map_err(|e| {
                        err(ProgramError::SyscallError(aya::sys::SyscallError {
                            call: "bpf_link_create",
                            io_error: e,
                        }))
                    })
            }
            Kind::Lsm => {
                let p: &mut LsmCgroup = prog.try_into().map_err(err)?;
                let id = p.attach(file).map_err(err)?;
                Ok(ProgLink::Aya(p.take_link(id).map_err(err)?.into()))
            }
        }
    }

    /// Attach every program to `cgroup` (the cgroup2 root), owned by this
    /// process: they detach when it exits. All or nothing: on error, the
    /// programs attached so far are detached again.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoaderError> {
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        for (name, kind, hook) in self.wanted() {
            match self.attach_new(name, kind, &file, cgroup) {
                Ok(link) => {
                    self.links.push(link);
                    self.attached.push(hook);
                }
                Err(e) if kind == Kind::Lsm || kind == Kind::SockOps => {
                    self.note_listen_failure(kind, &e);
                }
                Err(e) => {
                    self.links.clear();
                    self.attached.clear();
                    return Err(e);
                }
            }
        }
        info!(
            "loader: attached {} host-wide programs to {}",
            self.attached.len(),
            cgroup.display()
        );
        self.note_decision_hooks();
        Ok(())
    }

    /// Attach the packet guard ([`GUARD_PROGRAM`]) to `cgroup` (the cgroup2
    /// root). It stays attached while the returned link lives, and is
    /// never pinned: it is only needed while this agent tracks a cut-off
    /// socket the fence and `SOCK_DESTROY` could not end.
    pub fn attach_packet_guard(&mut self, cgroup: &Path) -> Result<ProgLink, LoaderError> {
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        self.attach_new(GUARD_PROGRAM, Kind::Skb, &file, cgroup)
    }

    pub(super) fn note_listen_failure(&mut self, kind: Kind, e: &LoaderError) {
        if kind == Kind::Lsm {
            // The other LSM program may be attached: listen() checks are
            // all or nothing, so say they are unavailable.
            self.attached
                .retain(|h| !matches!(h, Hook::Listen | Hook::Accept));
            self.lsm_unavailable = Some(e.to_string());
        } else {
            warn!("loader: {e}");
        }
    }

    /// Attach every program to `cgroup` through links pinned in `pins`, so
    /// they stay attached after the agent exits. A pinned link that is
    /// attached to `cgroup` with the right hook is switched to the newly
    /// loaded program in place (`BPF_LINK_UPDATE`: each call runs either the
    /// old or the new program, never neither); one attached elsewhere or
    /// defunct (its cgroup removed) is replaced; a missing one is created.
    /// Programs are pinned beside their links.
    pub fn attach_pinned(
        &mut self,
        cgroup: &Path,
        pins: &PinDir,
    ) -> Result<AttachReport, LoaderError> {
        let pin_err = |what: String| {
            let dir = pins.root().display().to_string();
            move |source: std::io::Error| LoaderError::Pin { dir, what, source }
        };
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let cgroup_id = file
            .metadata()
            .map_err(|source| LoaderError::OpenCgroup {
                path: cgroup.display().to_string(),
                source,
            })?
            .ino();
        let mut report = AttachReport::default();
        let wanted = self.wanted();
        for &(name, kind, hook) in &wanted {
            let path = pins.link(name);
            let pinned = match bpfsys::obj_get(&path) {
                Ok(fd) => Some(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                Err(e) => return Err(pin_err(format!("opening {}", path.display()))(e)),
            };
            let mismatch = match &pinned {
                None => None,
                Some(fd) => match bpfsys::link_info(fd.as_fd()) {
                    Ok(i)
                        if i.link_type == bpfsys::LINK_TYPE_CGROUP
                            && i.cgroup_id == cgroup_id
                            && i.attach_type == expected_attach_type(name) =>
                    {
                        None
                    }
                    Ok(i) if i.cgroup_id == 0 => {
                        Some("defunct (the cgroup it was attached to is gone)".to_owned())
                    }
                    Ok(i) => Some(format!(
                        "attached to cgroup id {} with attach type {} (expected cgroup id {}                          ({}) and attach type {})",
                        i.cgroup_id,
                        i.attach_type,
                        cgroup_id,
                        cgroup.display(),
                        expected_attach_type(name)
                    )),
                    Err(e) => Some(format!("unreadable ({e})")),
                },
            };
            match (pinned, mismatch) {
                (Some(link), None) => {
                    self.switch_link(name, kind, &link, cgroup, &path, pins.root())?;
                    report.updated.push(name);
                }
                (old, why) => {
                    let link = match self.attach_new(name, kind, &file, cgroup) {
                        Ok(l) => l,
                        Err(e) if kind == Kind::Lsm || kind == Kind::SockOps => {
                            self.note_listen_failure(kind, &e);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if old.is_some() {
                        // Pin the replacement first, then swap the names:
                        // the wrong link is detached only once the right one
                        // runs.
                        let staged = pins.new_link(name);
                        let _ = std::fs::remove_file(&staged);
                        link.pin(&staged).map_err(|e| {
                            pin_err(format!("pinning {}", staged.display()))(std::io::Error::other(
                                e,
                            ))
                        })?;
                        pins::move_pin(&staged, &path)
                            .map_err(pin_err(format!("replacing {}", path.display())))?;
                        let why = why.unwrap_or_default();
                        warn!(
                            "loader: pinned link {} was {why}; replaced by a new link on {}",
                            path.display(),
                            cgroup.display()
                        );
                        report.repaired.push((name, why));
                    } else {
                        link.pin(&path).map_err(|e| {
                            pin_err(format!("pinning {}", path.display()))(std::io::Error::other(e))
                        })?;
                        report.created.push(name);
                    }
                }
            }
            self.attached.push(hook);
            // The program pin follows the link.
            let prog_path = pins.prog(name);
            let _ = std::fs::remove_file(&prog_path);
            if let Some(p) = self.ebpf.program_mut(name)
                && let Err(e) = p.pin(&prog_path)
            {
                warn!("loader: pinning {}: {e}", prog_path.display());
            }
        }
        // Links of programs this agent does not attach here (the sock_ops
        // reporter once the BPF LSM works; the decision programs, which an
        // earlier version attached to the root and now run on the attach
        // points, already attached by the first apply): removing the pin
        // detaches them.
        for name in program_names() {
            if self.attached_name(name, &wanted) {
                continue;
            }
            let decision = PROGRAMS.iter().any(|(n, _)| *n == name);
            let paths = if decision {
                vec![pins.link(name)]
            } else {
                vec![pins.link(name), pins.prog(name)]
            };
            for path in paths {
                if path.exists() {
                    std::fs::remove_file(&path)
                        .map_err(pin_err(format!("removing {}", path.display())))?;
                    report.removed.push(path.display().to_string());
                }
            }
        }
        info!(
            "loader: {} host-wide programs attached to {} through links pinned in {} ({} \
             switched in place, {} new, {} repaired)",
            self.attached.len(),
            cgroup.display(),
            pins.root().display(),
            report.updated.len(),
            report.created.len(),
            report.repaired.len()
        );
        self.note_decision_hooks();
        Ok(report)
    }

    /// The decision hooks are in force wherever a policy governs (on the
    /// attach points).
    fn note_decision_hooks(&mut self) {
        for (_, hook) in PROGRAMS {
            if !self.attached.contains(&hook) {
                self.attached.insert(0, hook);
            }
        }
        self.attached.sort_by_key(|h| {
            PROGRAMS
                .iter()
                .position(|(_, p)| p == h)
                .unwrap_or(PROGRAMS.len())
        });
    }

    /// Switch the pinned `link` (at `pin`, in the pin directory `dir`) of
    /// program `name` on `cgroup` to this agent's program, in place
    /// (`BPF_LINK_UPDATE`: each call runs the old or the new program, never
    /// neither).
    pub(super) fn switch_link(
        &self,
        name: &'static str,
        kind: Kind,
        link: &std::os::fd::OwnedFd,
        cgroup: &Path,
        pin: &Path,
        dir: &Path,
    ) -> Result<(), LoaderError> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or(LoaderError::MissingProgram { name })?;
        let prog_fd = prog.fd().map_err(|source| LoaderError::Attach {
            name,
            hook: kind.hook_name(name),
            cgroup: cgroup.display().to_string(),
            source: Box::new(source),
        })?;
        bpfsys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|source| LoaderError::Pin {
            dir: dir.display().to_string(),
            what: format!("switching {} to the new program", pin.display()),
            source,
        })
    }

    pub(super) fn attached_name(&self, name: &str, wanted: &[(&'static str, Kind, Hook)]) -> bool {
        wanted
            .iter()
            .find(|(n, _, _)| *n == name)
            .is_some_and(|(_, _, h)| self.attached.contains(h))
    }
}
