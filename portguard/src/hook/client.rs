//! Asking the agent over its status socket, never for longer than a
//! deadline.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Instant,
};

use super::protocol::{Govern, Reply, Request};

/// Connect to `socket` by `deadline`: a stalled agent whose accept queue
/// is full would block `connect()` itself.
fn connect(socket: &Path, deadline: Instant) -> anyhow::Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = socket.to_owned();
    // The thread is left behind if it blocks; the hook exits soon after.
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&path));
    });
    let left = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(left) {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot reach the agent at {}: {e} (is `portguard run` running with this \
             --status-socket?)",
            socket.display()
        )),
        Err(_) => Err(anyhow::anyhow!(
            "the agent at {} did not accept the connection in time (stopped, or starved of CPU?)",
            socket.display()
        )),
    }
}

/// Send `req` to the agent at `socket` and read its reply, giving up at
/// `deadline`.
pub fn govern(socket: &Path, req: &Govern, deadline: Instant) -> anyhow::Result<Reply> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("timed out"))
    };
    let s = connect(socket, deadline)?;
    s.set_write_timeout(Some(left()?))?;
    let mut line = serde_json::to_vec(&Request::Govern(req.clone()))?;
    line.push(b'\n');
    (&s).write_all(&line)
        .map_err(|e| anyhow::anyhow!("sending the request to {}: {e}", socket.display()))?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut text = Vec::new();
    loop {
        s.set_read_timeout(Some(left().map_err(|_| {
            anyhow::anyhow!(
                "the agent at {} did not answer in time (stopped, or starved of CPU?)",
                socket.display()
            )
        })?))?;
        let mut buf = [0u8; 4096];
        match (&s).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => anyhow::bail!("reading the answer from {}: {e}", socket.display()),
        }
        if text.len() > super::protocol::MAX_REQUEST_BYTES {
            anyhow::bail!("the agent at {} answered too much", socket.display());
        }
    }
    serde_json::from_slice(&text).map_err(|e| {
        anyhow::anyhow!(
            "the agent at {} answered {:?}: {e} (an agent older than the hook?)",
            socket.display(),
            String::from_utf8_lossy(&text)
        )
    })
}
