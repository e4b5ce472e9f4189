//! A Xen node without Xen, for tests and benchmarks of the `xen` driver.
//!
//! [`wire`] encodes the xenstore socket protocol (Xen's `xs_wire.h`: a
//! 16-byte header `type, req_id, tx_id, len` then NUL-separated strings);
//! [`server`] is a small xenstored on a unix socket with a simulated dom0
//! balloon; [`client`] is a blocking client the fake `xl` and the tests use.
//! Not a Xen emulator: no event channels, permissions or real guests.

pub mod client;
pub mod harness;
pub mod server;
pub mod wire;

/// Where the stand-in keeps what only the fake `xl` needs (never read by the driver).
pub const TOOL_ROOT: &str = "/tool/standin";
