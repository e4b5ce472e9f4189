//! The workspace coordinator: the head-node server that turns client requests
//! for VM clusters into pilot jobs, follows the pilots' signed events, and
//! tells them which VMs to run; plus the client library behind `workspace`.
//!
//! Not here: batch system specifics (`lrm-adapters`), anything that runs on a
//! node (`pilot`). Start reading at [`engine`]; the state tables of
//! workspaces, slots, pilots and VMs are in [`lifecycle`], sizing and mapping
//! in [`policy`], time in [`clock`]; [`sim`] runs the same engine on a
//! workload trace in virtual time.

pub mod api;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod engine;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod lrm_meter;
pub mod manpages;
pub mod metrics;
pub mod network;
pub mod policy;
pub mod report;
pub mod server;
pub mod sim;
pub mod status_page;
pub mod store;
pub mod timeline;
pub mod writer;
