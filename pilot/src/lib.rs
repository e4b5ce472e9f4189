//! The workspace pilot: one process per node per slot, started by the batch system.
//!
//! It adapts the node for VMs (balloons dom0 memory down), reports to the
//! coordinator over signed HTTP, starts and destroys the slot's VMs on command,
//! and on release, deadline or preemption destroys them and restores memory.
//! It is not the coordinator (no scheduling, no database) and not an LRM client.
//!
//! Exit codes of `workspace-pilot run` (see [`exit`]): 0 released cleanly,
//! 1 internal error after best-effort cleanup, 2 bad arguments or node not
//! usable (nothing touched), 3 reservation failed (nothing left reserved),
//! 4 cleanup incomplete (run `workspace-kill-all`), 5 coordinator unreachable
//! at start (memory given back).

pub mod checkpoint;
pub mod files;
pub mod grace;
pub mod hypervisor;
pub mod images;
pub mod manpages;
pub mod node;
pub mod notify;
pub mod outbox;
pub mod run;
pub mod state;
pub mod tools;

/// Exit codes of `workspace-pilot run`; `workspace-kill-all` uses 0, 1 and 2.
pub mod exit {
    /// The slot was released cleanly (command, deadline or preemption).
    pub const RELEASED: i32 = 0;
    /// Internal error, after best-effort cleanup (memory restored).
    pub const INTERNAL: i32 = 1;
    /// Bad arguments or node not usable; nothing was touched.
    pub const USAGE: i32 = 2;
    /// Reservation failed; nothing is left reserved.
    pub const RESERVE_FAILED: i32 = 3;
    /// Cleanup incomplete: VMs or memory left behind, run workspace-kill-all.
    pub const CLEANUP_INCOMPLETE: i32 = 4;
    /// The coordinator could not be reached at start; memory was given back.
    pub const COORDINATOR_UNREACHABLE: i32 = 5;

    /// The text for `--help`.
    pub const HELP: &str = "Exit codes (run):
  0  slot released cleanly (release command, deadline or preemption)
  1  internal error, after best-effort cleanup
  2  bad arguments or node not usable; nothing touched
  3  reservation failed; nothing left reserved
  4  cleanup incomplete; run workspace-kill-all on this node
  5  coordinator unreachable at start; memory given back";
}
