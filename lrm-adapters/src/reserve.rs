//! Advance reservations in the batch system: the capability a guaranteed
//! lease (a reservation at a start time, or an immediate lease) rests on.
//!
//! An adapter that has them returns itself from [`crate::Lrm::reservations`].
//! Four calls: create (start, duration, nodes) or be refused with the reason
//! and the earliest start the batch system could give; query; delete (a
//! deleted or vanished reservation is not an error); submit a pilot job into
//! one. This module knows nothing of leases; the coordinator's
//! `engine::reserve` decides what to reserve and when.

use crate::{JobId, LrmError, SlotJob};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What to reserve: `nodes` whole nodes of at least this size from
/// `start_ms` (ms since the epoch, UTC) for `duration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationRequest {
    /// `wsp-<workspace id>`: how the coordinator's reservations are recognised.
    pub name: String,
    pub start_ms: u64,
    pub duration: Duration,
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
}

/// A reservation as the batch system holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The batch system's name or id for it (Slurm's name, Grid Engine's AR id, ...).
    pub id: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Node names, when the batch system has chosen them.
    pub nodes: Vec<String>,
}

/// Why a reservation was not made.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The batch system cannot guarantee these nodes at this time.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        /// The earliest start (ms) at which the same request would be
        /// granted, when the adapter could find one.
        earliest_ms: Option<u64>,
    },
    #[error(transparent)]
    Lrm(#[from] LrmError),
}

/// A batch system's advance reservations.
#[async_trait]
pub trait Reservations: Send + Sync {
    /// Makes the reservation, or says why not and the earliest start it could offer.
    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError>;
    /// The reservation as the batch system has it now; `None` once it is gone.
    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError>;
    /// Deletes it; its queued jobs are the caller's to cancel. Deleting a
    /// reservation that is already gone is not an error.
    async fn delete(&self, id: &str) -> Result<(), LrmError>;
    /// Submits a pilot job that runs only inside reservation `id`, from its start.
    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError>;
}
