//! stockd: an in-memory, actor-based inventory reservation server for flash-sale traffic.
//!
//! Map of the crate, from the inside out:
//!
//! - `domain`: products and reservations as plain data with their rules (pure functions).
//! - `record`: the log record type and its versioned, checksummed bincode codec.
//! - `fold`: `apply(state, record)`, the one function that turns records into state.
//! - `log`: the write-ahead log over sled, one writer thread with group commit.
//! - `snapshot`: snapshot files (the state after log record S): write, verify, read, prune.
//! - `recovery`: the newest verifying snapshot plus the log after it, folded.
//! - `snapshotter`: the background thread that takes snapshots and truncates the log.
//! - `snapshot_worker`: the child process (`stockd snapshot-worker`) that builds a snapshot
//!   for a running server, and the server's side of that exchange.
//! - `actors::product`: one actor per product, the only place its stock changes.
//! - `actors::supervisor`: routes by SKU, owns reservations and expiry deadlines, and
//!   supervises the product actors.
//! - `service`: the operations offered to HTTP, as async functions over the actors.
//! - `http`: warp, routing, validation, problem+json.
//! - `server`: start-up and graceful shutdown; `config`, `clock`, `limits`, `error`,
//!   `memory`.
//! - `logging`: the `tracing` subscriber, writing to stderr off the request path, so that
//!   a stderr that fails or blocks never fails or stalls a request.
//!
//! The invariants these modules keep are listed in `docs/ARCHITECTURE.md`.

pub mod actors;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod server;
pub mod service;
pub mod storage;

#[cfg(test)]
mod testing;

pub use config::{Config, Durability};
pub use server::{start, Server, StartError};
