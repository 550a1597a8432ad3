//! Where event lines go ([`EventWriter`]): standard output, a rotated file,
//! journald (native fields), or memory for tests; in the writer's
//! [`Format`] (portguard's JSON by default, or OCSF or ECS).

use std::io::{self, Write};

use serde::Serialize;
use serde_json::Value;

use super::{EventLine, Format};

/// Size-based rotation of an event log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the file reaches this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` newest .. `FILE.N`).
    pub keep: u32,
}

pub(super) enum Sink {
    Stream(Box<dyn Write + Send>),
    File {
        path: std::path::PathBuf,
        out: io::BufWriter<std::fs::File>,
        size: u64,
        rotation: Rotation,
    },
    /// systemd's journal, natively: one entry per line, the JSON as
    /// MESSAGE, and each top-level field as PORTGUARD_<FIELD>.
    Journald,
}

/// Where event lines go: stdout, an append-only file (rotated by size), or
/// the journal. Exactly one line (or journal entry) per record.
pub struct EventWriter {
    sink: Sink,
    /// The form of each line.
    format: Format,
    /// Lines that could not be written since the last successful write.
    pub failed: u64,
    /// The line being built, kept between lines: a storm writes hundreds
    /// of thousands a second, and a fresh buffer for each grew twice.
    text: Vec<u8>,
}

/// Bytes buffered before a write to the stream or file: a storm's lines go
/// out in few large writes. The agent flushes after each batch it reads
/// (and after each report), so no line waits longer than before.
const BUFFER_BYTES: usize = 64 << 10;

pub(super) fn open_log(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `FILE.n`.
pub(super) fn rotated(path: &std::path::Path, n: u32) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    p.into()
}

/// journald field name for a JSON key: `k8s_pod` -> `PORTGUARD_K8S_POD`.
pub fn journal_field(key: &str) -> String {
    format!("PORTGUARD_{}", key.to_ascii_uppercase())
}

impl EventWriter {
    fn new(sink: Sink) -> Self {
        Self {
            sink,
            format: Format::Json,
            failed: 0,
            text: Vec::with_capacity(1024),
        }
    }

    pub fn stdout() -> Self {
        Self::new(Sink::Stream(Box::new(io::BufWriter::with_capacity(
            BUFFER_BYTES,
            io::stdout(),
        ))))
    }

    pub fn file(path: &std::path::Path, rotation: Rotation) -> io::Result<Self> {
        let f = open_log(path)?;
        let size = f.metadata()?.len();
        Ok(Self::new(Sink::File {
            path: path.to_owned(),
            out: io::BufWriter::with_capacity(BUFFER_BYTES, f),
            size,
            rotation,
        }))
    }

    pub fn journald() -> Self {
        Self::new(Sink::Journald)
    }

    /// Write each line in `format` instead of portguard's JSON.
    #[must_use]
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// True when systemd connected standard output to the journal (so
    /// native journal entries are the better way to write there).
    pub fn stdout_is_journal() -> bool {
        use libsystemd::logging::JournalStream;
        JournalStream::from_env()
            .is_ok_and(|env| JournalStream::from_fd(io::stdout()).is_ok_and(|o| o == env))
    }

    #[cfg(test)]
    pub fn memory(buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> Self {
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        Self::new(Sink::Stream(Box::new(Shared(buf))))
    }

    /// Write one line, in the writer's format. Errors are counted and
    /// returned.
    pub fn line<T: EventLine>(&mut self, record: &T) -> io::Result<()> {
        let warning = record.journal_warning();
        let res = match self.format {
            Format::Json => self.write_line(record, warning),
            Format::Ocsf => self.write_line(&record.ocsf(), warning),
            Format::Ecs => self.write_line(&record.ecs(), warning),
        };
        if res.is_err() {
            self.failed += 1;
        }
        res
    }

    /// `warning`: the journal priority (Warning, else Notice).
    fn write_line<T: Serialize>(&mut self, record: &T, warning: bool) -> io::Result<()> {
        let text = &mut self.text;
        text.clear();
        serde_json::to_writer(&mut *text, record).map_err(io::Error::other)?;
        match &mut self.sink {
            Sink::Stream(out) => {
                text.push(b'\n');
                out.write_all(text)
            }
            Sink::File {
                path,
                out,
                size,
                rotation,
            } => {
                text.push(b'\n');
                out.write_all(text)?;
                *size += text.len() as u64;
                if rotation.max_bytes > 0 && *size >= rotation.max_bytes {
                    out.flush()?;
                    for n in (1..rotation.keep).rev() {
                        let from = rotated(path, n);
                        if from.exists() {
                            std::fs::rename(&from, rotated(path, n + 1))?;
                        }
                    }
                    if rotation.keep > 0 {
                        std::fs::rename(&*path, rotated(path, 1))?;
                    } else {
                        std::fs::remove_file(&*path)?;
                    }
                    *out = io::BufWriter::with_capacity(BUFFER_BYTES, open_log(path)?);
                    *size = 0;
                }
                Ok(())
            }
            Sink::Journald => {
                use libsystemd::logging::{Priority, journal_send};
                let value = serde_json::to_value(record).map_err(io::Error::other)?;
                let msg = String::from_utf8_lossy(text).into_owned();
                let priority = if warning {
                    Priority::Warning
                } else {
                    Priority::Notice
                };
                let mut vars: Vec<(String, String)> =
                    vec![("SYSLOG_IDENTIFIER".into(), "portguard".into())];
                if let Some(obj) = value.as_object() {
                    for (k, v) in obj {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            Value::Null => continue,
                            other => other.to_string(),
                        };
                        vars.push((journal_field(k), v));
                    }
                }
                journal_send(priority, &msg, vars.into_iter()).map_err(io::Error::other)
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stream(out) => out.flush(),
            Sink::File { out, .. } => out.flush(),
            Sink::Journald => Ok(()),
        }
    }
}
