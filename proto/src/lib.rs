//! The gRPC contract between workers and host agents (`proto/hostagent.proto`), and the
//! trace context that travels with it.

/// Generated types and the `HostAgent` client and server.
pub mod hostagent {
    tonic::include_proto!("hangar.hostagent.v1");
}

pub use hostagent::*;

pub mod trace_context;
