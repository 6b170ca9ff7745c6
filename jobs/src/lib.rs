//! Hangar's domain: typed ids, the capsule state machine, the Postgres store, the job
//! transport on Redis, the enqueue path, and the client pool of the host agents' gRPC API.
//! `api` and `worker` depend on this crate; it serves neither HTTP nor gRPC.

pub mod agents;
pub mod backend;
pub mod enqueue;
pub mod ids;
pub mod intents;
pub mod keys;
pub mod queue;
pub mod state;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use ids::{CapsuleId, HostId, IdError, KeyId, OperationId, TeamId, TemplateId};
pub use state::{CapsuleStatus, OperationKind, OperationStatus};
