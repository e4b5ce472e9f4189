//! A small synchronous QMP client: connect to a QEMU monitor socket, negotiate
//! capabilities, run one command at a time and read its typed answer.
//!
//! Every read and write is bounded by the socket timeout. Asynchronous events
//! QEMU sends between answers are skipped. A command may carry a file
//! descriptor (`getfd`, for migration to and from a pipe the pilot holds).
//! Not a full QAPI binding: only the answers the kvm driver reads are typed
//! (status, migration).

use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {path} within {waited_ms} ms: {source}")]
    Connect {
        path: String,
        waited_ms: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the monitor")]
    Closed,
    #[error("unexpected answer {0:?}")]
    Protocol(String),
    #[error("{command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// `query-status` answer.
#[derive(Debug, Deserialize)]
pub struct StatusInfo {
    pub status: String,
    pub running: bool,
}

/// `query-migrate` answer (the fields the driver reads).
#[derive(Debug, Deserialize)]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// One open monitor connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying every 10 ms for at most `wait`, while QEMU creates
    /// the socket), reads the greeting and enters command mode. Each later
    /// read or write is bounded by `io_timeout`.
    pub fn connect(path: &Path, wait: Duration, io_timeout: Duration) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < wait => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        waited_ms: start.elapsed().as_millis() as u64,
                        source,
                    })
                }
            }
        };
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_string()))
    }

    /// Runs `command` and returns its `return` value (events are skipped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, None)
    }

    /// Runs `command` with `fd` passed along (SCM_RIGHTS), as `getfd` wants.
    /// QEMU keeps its own copy; the caller closes its own.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: RawFd,
    ) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, Some(fd))
    }

    fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<RawFd>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        match fd {
            None => self.writer.write_all(&bytes)?,
            Some(fd) => {
                use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
                let fds = [fd];
                let sent = sendmsg::<UnixAddr>(
                    self.writer.as_raw_fd(),
                    &[std::io::IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)?;
                self.writer.write_all(&bytes[sent..])?;
            }
        }
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Protocol(m.to_string()));
        }
    }

    /// Runs `command` and decodes its answer as `T`.
    pub fn query<T: serde::de::DeserializeOwned>(&mut self, command: &str) -> Result<T, QmpError> {
        let v = self.execute(command, None)?;
        serde_json::from_value(v.clone()).map_err(|_| QmpError::Protocol(v.to_string()))
    }

    pub fn status(&mut self) -> Result<StatusInfo, QmpError> {
        self.query("query-status")
    }

    /// `quit`: QEMU may close the socket before answering, which counts as done.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }
}
