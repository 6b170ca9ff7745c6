//! `hangar-guest`: the agent that runs inside every capsule's VM, and the protocol the host
//! agent speaks to it over the virtio-serial port `agent0`.
//!
//! The library half is only the protocol ([`protocol`]), so the host agent can depend on it
//! without pulling in the guest's process handling.

pub mod protocol;
