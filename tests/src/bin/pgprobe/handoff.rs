//! `handoff`: a socket created outside the cgroup and passed over a unix
//! socket (SCM_RIGHTS) to a child inside it, which binds or listens.

use std::sync::atomic::Ordering;

use crate::{
    SERVE,
    serve::serve_check,
    setup::join_cgroup,
    sock::{die, emit, errno, errno_name, gettid, local_port, parse_addr, sockaddr, socket},
};

/// `handoff bind|listen tcp ADDR PORT CGROUP`: see the module docs.
pub(crate) fn handoff(op: &[String]) -> String {
    let arg = |i: usize| {
        op.get(i)
            .map(String::as_str)
            .unwrap_or_else(|| die("handoff args"))
    };
    let (action, proto, cgroup) = (arg(1), arg(2), arg(5));
    let addr = parse_addr(arg(3), arg(4));
    let mut sv = [0i32; 2];
    // SAFETY: plain syscalls; the child only uses async-signal-safe calls
    // plus our own helpers before printing and exiting.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) != 0 {
            die("socketpair");
        }
        let pid = libc::fork();
        if pid == 0 {
            libc::close(sv[0]);
            join_cgroup(cgroup);
            // Receive the socket.
            let mut byte = [0u8; 1];
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut cbuf = [0u8; 64];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = cbuf.len();
            if libc::recvmsg(sv[1], &mut msg, 0) < 0 {
                die("recvmsg");
            }
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                die("no SCM_RIGHTS");
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
            let (rc, e) = if action == "bind" {
                let (ss, len) = sockaddr(&addr);
                let rc = libc::bind(fd, std::ptr::from_ref(&ss).cast(), len);
                (rc, errno())
            } else {
                let rc = libc::listen(fd, 8);
                (rc, errno())
            };
            let (pid, tid) = (libc::getpid(), gettid());
            let line = if rc == 0 {
                let served = if action == "listen" && SERVE.load(Ordering::Relaxed) {
                    let (served, client) = serve_check(fd);
                    format!(r#","served":{served},"client":"{client}""#)
                } else {
                    String::new()
                };
                format!(
                    r#"{{"op":"handoff","ok":true,"port":{},"pid":{pid},"tid":{tid}{served}}}"#,
                    local_port(fd)
                )
            } else {
                format!(
                    r#"{{"op":"handoff","ok":false,"errno":{e},"error":"{}","pid":{pid},"tid":{tid}}}"#,
                    errno_name(e)
                )
            };
            emit(&line);
            libc::_exit(0);
        }
        libc::close(sv[1]);
        let fd = socket(proto, &addr);
        if action == "listen" {
            let (ss, len) = sockaddr(&addr);
            if libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) != 0 {
                die(&format!(
                    "handoff: the sender's bind failed: errno {}",
                    errno()
                ));
            }
        }
        // Send it with SCM_RIGHTS.
        let mut byte = [b'x'];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u8; 64];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(sv[0], &msg, 0) < 0 {
            die("sendmsg");
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    String::new()
}
