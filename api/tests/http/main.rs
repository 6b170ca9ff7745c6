//! HTTP tests of the whole API against a real Postgres and Redis (one fresh database and
//! Redis prefix per test).

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod bad_input;
mod capsules;
mod dashboard;
mod events;
mod hosts;
mod idempotency;
mod openapi;
mod operations;
mod operator;
mod ops;
