//! Every stateful thing is a table: workspaces, slots (and their batch
//! jobs), pilots and VMs each have named states and one `next(state,
//! input)` that says where an input leads, or `None` when it changes
//! nothing (late, repeated or impossible). Terminal states never move.
//!
//! The store writes a state only through these functions (`store::advance_*`),
//! so reading one `match` shows every way a thing can change. Side effects
//! (commands, cancels, timeline entries) are the engine's, around them.

pub mod pilot;
pub mod slot;
pub mod vm;
pub mod workspace;

pub use workspace::{in_suspension, next, wants_slots, Input};
