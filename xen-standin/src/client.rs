//! A blocking xenstore client on a unix socket, for the fake `xl` and tests.
//!
//! Every call has a socket timeout; a watch event that arrives while a reply
//! is awaited is queued, not mistaken for the reply.

use crate::wire::{self, Msg};
use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of the client; they name the socket and the path.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    #[error("xenstore socket {socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("xenstore {op} {path}: {errno}")]
    Errno {
        op: &'static str,
        path: String,
        errno: String,
    },
}

impl XsError {
    pub fn is_enoent(&self) -> bool {
        matches!(self, XsError::Errno { errno, .. } if errno == "ENOENT")
    }
}

pub struct XsClient {
    socket: PathBuf,
    stream: UnixStream,
    next_req: u32,
    /// The transaction the next requests belong to (0: none).
    pub tx_id: u32,
    events: VecDeque<(String, String)>,
}

impl XsClient {
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, XsError> {
        let io_err = |source| XsError::Io {
            socket: socket.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(io_err)?;
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        Ok(Self {
            socket: socket.to_path_buf(),
            stream,
            next_req: 1,
            tx_id: 0,
            events: VecDeque::new(),
        })
    }

    /// Connects to `$XENSTORED_PATH` (else `/run/xenstored/socket`), as xenstore-rs does.
    pub fn from_env(timeout: Duration) -> Result<Self, XsError> {
        let p = std::env::var_os("XENSTORED_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/xenstored/socket"));
        Self::connect(&p, timeout)
    }

    fn request(
        &mut self,
        op: &'static str,
        ty: u32,
        path: &str,
        payload: Vec<u8>,
    ) -> Result<Msg, XsError> {
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        let io_err = |source| XsError::Io {
            socket: self.socket.clone(),
            source,
        };
        Msg::new(ty, req_id, self.tx_id, payload)
            .write_to(&mut self.stream)
            .map_err(io_err)?;
        loop {
            let m = Msg::read_from(&mut self.stream).map_err(|source| XsError::Io {
                socket: self.socket.clone(),
                source,
            })?;
            if m.ty == wire::XS_WATCH_EVENT {
                let s = m.strings();
                self.events.push_back((
                    s.first().cloned().unwrap_or_default(),
                    s.get(1).cloned().unwrap_or_default(),
                ));
                continue;
            }
            if m.ty == wire::XS_ERROR {
                return Err(XsError::Errno {
                    op,
                    path: path.to_string(),
                    errno: m.strings().into_iter().next().unwrap_or_default(),
                });
            }
            return Ok(m);
        }
    }

    pub fn read(&mut self, path: &str) -> Result<String, XsError> {
        let m = self.request("read", wire::XS_READ, path, wire::nul_list(&[path]))?;
        Ok(String::from_utf8_lossy(&m.payload)
            .trim_end_matches('\0')
            .to_string())
    }

    /// Reads `path`, `None` if it does not exist.
    pub fn read_opt(&mut self, path: &str) -> Result<Option<String>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&mut self, path: &str, value: &str) -> Result<(), XsError> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(value.as_bytes());
        self.request("write", wire::XS_WRITE, path, p).map(|_| ())
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        let m = self.request(
            "directory",
            wire::XS_DIRECTORY,
            path,
            wire::nul_list(&[path]),
        )?;
        Ok(m.strings())
    }

    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        self.request("rm", wire::XS_RM, path, wire::nul_list(&[path]))
            .map(|_| ())
    }

    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(
            "watch",
            wire::XS_WATCH,
            path,
            wire::nul_list(&[path, token]),
        )
        .map(|_| ())
    }

    /// The next watch event (path, token), waiting at most the socket timeout.
    pub fn next_event(&mut self) -> Result<(String, String), XsError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let m = Msg::read_from(&mut self.stream).map_err(|source| XsError::Io {
            socket: self.socket.clone(),
            source,
        })?;
        let s = m.strings();
        Ok((
            s.first().cloned().unwrap_or_default(),
            s.get(1).cloned().unwrap_or_default(),
        ))
    }

    /// Starts a transaction; later requests carry its id until [`Self::transaction_end`].
    pub fn transaction_start(&mut self) -> Result<u32, XsError> {
        let m = self.request("transaction_start", wire::XS_TRANSACTION_START, "", vec![0])?;
        let id = m.strings().into_iter().next().unwrap_or_default();
        self.tx_id = id.parse().map_err(|_| XsError::Errno {
            op: "transaction_start",
            path: String::new(),
            errno: format!("bad transaction id {id:?}"),
        })?;
        Ok(self.tx_id)
    }

    pub fn transaction_end(&mut self, commit: bool) -> Result<(), XsError> {
        let r = self.request(
            "transaction_end",
            wire::XS_TRANSACTION_END,
            "",
            wire::nul_list(&[if commit { "T" } else { "F" }]),
        );
        self.tx_id = 0;
        r.map(|_| ())
    }
}
