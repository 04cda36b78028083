//! stockd: an in-memory, actor-based inventory reservation server for flash-sale traffic.
//!
//! Map of the crate, from the bottom layer up (a module imports only from its own layer
//! or those below; docs/ARCHITECTURE.md "The parts" says what each file owns):
//!
//! - base: `clock`, `limits` (every limit and default), `logging` (lines to stderr that
//!   can never stop the server), `memory` (huge pages, returning freed memory), `sync` (a
//!   lock that a panic elsewhere does not poison).
//! - `domain`: products and reservations as plain data with their rules (pure functions).
//! - `storage`: the record codec, the one fold, the write-ahead log, snapshots, recovery,
//!   the snapshotter and the snapshot worker.
//! - `feed`: the change feed (`GET /v1/events`): events derived from the log by a
//!   projector thread, their store under `<data>/events/`, live readers.
//! - `cluster`: the seams of replication (docs/REPLICATION.md): the `Journal` every change
//!   is appended through (today the local log), the node's `Role` and `GET /v1/cluster`'s
//!   status.
//! - `actors` (and `error`): one actor per product, the supervisor that routes by SKU, the
//!   reservation book it keeps (plain data), and the reservation being assembled.
//! - `service`: the operations offered to HTTP, as async functions over the actors;
//!   `keyring`: the API keys every request is checked against, created and revoked
//!   through the log; `webhooks`: the feed's events pushed to registered HTTP endpoints,
//!   signed, one delivery task per endpoint, their registrations and positions under
//!   `<data>/webhooks/`.
//! - `leadership`: a cluster node's epochs of serving while it leads (a supervisor built
//!   from the committed state, proposing through the replicated log).
//! - `http`: warp, routing, validation, problem+json, metrics.
//! - `server`, `config`: start-up and graceful shutdown.
//! - `cli`: the `stockd` command line.
//!
//! The invariants these modules keep are numbered in `docs/ARCHITECTURE.md`.

pub mod actors;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod feed;
pub mod http;
pub mod keyring;
pub mod leadership;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod server;
pub mod service;
pub mod storage;
pub mod sync;
pub mod webhooks;

pub use config::{Config, Durability};
pub use server::{start, Server, StartError};
