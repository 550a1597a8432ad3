//! A directory held open by descriptor: every operation on its entries
//! (`openat`, `mkdirat`, `renameat`, `unlinkat`) is relative to the
//! descriptor and follows no symlink at the entry (`O_NOFOLLOW`), so a
//! link planted below the unit directory is seen as a link, never walked.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    path::{Path, PathBuf},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Missing,
    Dir,
    File,
    Symlink,
    Other,
}

/// A directory; every operation on its entries is relative to its open
/// descriptor and follows no symlink at the entry.
pub(super) struct Dir {
    pub(super) file: File,
    pub(super) path: PathBuf,
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl Dir {
    /// The unit directory itself (a symlink to it is followed: the
    /// administrator named it).
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    pub(super) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `openat` with `O_NOFOLLOW | O_CLOEXEC` added.
    fn openat(&self, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
        let c = c_name(name)?;
        // SAFETY: a directory descriptor we own and a NUL-terminated name;
        // the descriptor returned is owned by nothing else.
        let fd = check(unsafe {
            libc::openat(
                self.file.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode,
            )
        })?;
        // SAFETY: `fd` was just opened and is not owned elsewhere.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(super) fn sub(&self, name: &str) -> io::Result<Self> {
        Ok(Self {
            file: self.openat(name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?,
            path: self.join(name),
        })
    }

    /// The entry's type, the entry itself (a symlink is `Symlink`).
    pub(super) fn kind(&self, name: &str) -> io::Result<Kind> {
        let f = match self.openat(name, libc::O_PATH, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Kind::Missing),
            Err(e) => return Err(e),
        };
        let t = f.metadata()?.file_type();
        Ok(if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_file() {
            Kind::File
        } else {
            Kind::Other
        })
    }

    /// Opened non-blocking, so a FIFO planted meanwhile cannot stall us.
    pub(super) fn open_read(&self, name: &str) -> io::Result<File> {
        let f = self.openat(name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(f)
    }

    pub(super) fn create(&self, name: &str) -> io::Result<File> {
        self.openat(name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
    }

    pub(super) fn mkdir(&self, name: &str, mode: libc::mode_t) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: a directory descriptor we own and a NUL-terminated name.
        check(unsafe { libc::mkdirat(self.file.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
    }

    pub(super) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (c_name(from)?, c_name(to)?);
        let fd = self.file.as_raw_fd();
        // SAFETY: directory descriptors we own and NUL-terminated names.
        check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) }).map(drop)
    }

    /// `unlinkat`: removes a symlink itself, never what it points to; with
    /// `dir`, only an empty directory.
    pub(super) fn remove(&self, name: &str, dir: bool) -> io::Result<()> {
        let c = c_name(name)?;
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a directory descriptor we own and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.file.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
    }

    /// Entry names, sorted; names that are not UTF-8 are skipped (portguard
    /// writes none, and no unit has one).
    pub(super) fn names(&self) -> io::Result<Vec<String>> {
        // Through the descriptor (not the path, which may have changed).
        let mut names = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", self.file.as_raw_fd()))? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}
