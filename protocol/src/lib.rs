//! Wire types shared by the pilot (on each node) and the coordinator (head node).
//!
//! This crate is the contract between the two sides: ids and VM name tags,
//! millisecond UTC timestamps, the events a pilot sends and the commands it
//! receives, workspace specs and the views clients read, and HMAC signing of
//! pilot traffic. It does no I/O; it is not for HTTP routes or storage.

pub mod auth;
pub mod ids;
pub mod lease;
pub mod pilot;
pub mod spec;
pub mod time;
pub mod view;

pub use ids::{PilotId, SlotId, VmId, VmName, WorkspaceId};
pub use time::now_ms;
