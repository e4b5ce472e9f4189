//! The xenstore wire format, as in Xen's `xen/include/public/io/xs_wire.h`.
//!
//! Every message is a header of four native-endian `u32` (type, request id,
//! transaction id, payload length) followed by at most 4096 payload bytes.
//! Errors come back as type `XS_ERROR` with an errno name ("ENOENT\0").

use std::io::{self, Read, Write};

pub const XS_DIRECTORY: u32 = 1;
pub const XS_READ: u32 = 2;
pub const XS_WATCH: u32 = 4;
pub const XS_UNWATCH: u32 = 5;
pub const XS_TRANSACTION_START: u32 = 6;
pub const XS_TRANSACTION_END: u32 = 7;
pub const XS_GET_DOMAIN_PATH: u32 = 10;
pub const XS_WRITE: u32 = 11;
pub const XS_MKDIR: u32 = 12;
pub const XS_RM: u32 = 13;
pub const XS_WATCH_EVENT: u32 = 15;
pub const XS_ERROR: u32 = 16;

/// Largest payload the protocol allows.
pub const PAYLOAD_MAX: usize = 4096;

/// One message, either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Msg {
    pub fn new(ty: u32, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Self {
        Self {
            ty,
            req_id,
            tx_id,
            payload,
        }
    }

    /// Reads one message; `UnexpectedEof` when the peer closed between messages.
    pub fn read_from(r: &mut impl Read) -> io::Result<Self> {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let len = word(12) as usize;
        if len > PAYLOAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("xenstore payload of {len} bytes is over {PAYLOAD_MAX}"),
            ));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Self::new(word(0), word(4), word(8), payload))
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "xenstore payload over 4096 bytes",
            ));
        }
        let mut buf = Vec::with_capacity(16 + self.payload.len());
        for v in [self.ty, self.req_id, self.tx_id, self.payload.len() as u32] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        buf.extend_from_slice(&self.payload);
        w.write_all(&buf)
    }

    /// The payload split at NULs (a trailing NUL ends the last string).
    pub fn strings(&self) -> Vec<String> {
        let mut p: &[u8] = &self.payload;
        if p.last() == Some(&0) {
            p = &p[..p.len() - 1];
        }
        if p.is_empty() {
            return Vec::new();
        }
        p.split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }
}

/// `a\0b\0...` (every string NUL-terminated).
pub fn nul_list<S: AsRef<str>>(items: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in items {
        out.extend_from_slice(s.as_ref().as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_through_bytes() {
        let m = Msg::new(XS_WRITE, 7, 0, b"/a/b\0value".to_vec());
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        assert_eq!(buf.len(), 16 + 10);
        assert_eq!(Msg::read_from(&mut buf.as_slice()).unwrap(), m);
        assert_eq!(m.strings(), vec!["/a/b", "value"]);
    }

    #[test]
    fn oversized_payload_is_refused() {
        let mut h = Vec::new();
        for v in [XS_READ, 1, 0, 5000] {
            h.extend_from_slice(&u32::to_ne_bytes(v));
        }
        assert!(Msg::read_from(&mut h.as_slice()).is_err());
    }
}
