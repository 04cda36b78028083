//! The change feed: every change is one numbered record in the log, and the feed is that
//! log told in public terms.
//!
//! - `event`: what a record means as events (`events_of`, pure), and their JSON.
//! - `store`: the feed's own segment files under `<data>/events/`, with retention.

pub mod event;
pub mod store;

pub use event::{Kind, Position};
pub use store::{Gone, Retention, Stored};
