//! Starting a process inside a cgroup as a service manager does, timed
//! (section 5's hook starts).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

/// Run `cmd` inside the cgroup at `cg`, started there by
/// `clone3(CLONE_INTO_CGROUP)` as systemd 255 and later start a unit's
/// processes (`posix_spawn` with a cgroup); wall time from spawn to exit,
/// in ms. Not joined after the fork (`cgroup.procs`, as older systemd
/// does): on this VM that migration waits for an RCU grace period
/// (10-25 ms) when no other migration came shortly before, so in each
/// pair of starts it landed on whichever went first, the hook or
/// `/bin/true`, and the difference measured that instead of the hook.
pub(crate) fn run_in(cg: &Path, mut cmd: Command) -> f64 {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let c = |b: &[u8]| CString::new(b).expect("no NUL in an argument");
    let program = c(cmd.get_program().as_bytes());
    let args: Vec<CString> = std::iter::once(program.clone())
        .chain(cmd.get_args().map(|a| c(a.as_bytes())))
        .collect();
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|s| s.as_ptr())
            .chain([std::ptr::null()])
            .collect()
    };
    let (argv, envp) = (ptrs(&args), ptrs(&env));
    let dir = std::fs::File::open(cg).expect("opening the unit's cgroup");
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    /// `struct clone_args` (linux/sched.h), up to `cgroup`.
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let clone_args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: std::os::fd::AsRawFd::as_raw_fd(&dir) as u64,
        ..CloneArgs::default()
    };
    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    let t0 = Instant::now();
    // SAFETY: clone3 without a stack is a fork; the child makes only
    // async-signal-safe calls (dup2, execve, _exit) on memory prepared
    // before it.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const clone_args,
            size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            for fd in 0..3 {
                libc::dup2(null_fd, fd);
            }
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    assert!(pid > 0, "clone3: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let waited = unsafe { libc::waitpid(pid as libc::pid_t, &raw mut status, 0) };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(waited, pid as libc::pid_t, "waitpid");
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        // Again, joined the old way, for what it says.
        portguard_tests::join_before_exec(&mut cmd, cg, None);
        let out = cmd.stdin(Stdio::null()).output();
        panic!(
            "{cmd:?} in {}: wait status {status:#x}; run again: {out:?}",
            cg.display()
        );
    }
    ms
}
