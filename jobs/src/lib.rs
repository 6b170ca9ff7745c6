//! Hangar's domain: typed ids, the capsule state machine, the Postgres store, the job
//! transport on Redis, and the enqueue path. `api` and `worker` depend on this crate;
//! it knows neither HTTP nor gRPC.

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
