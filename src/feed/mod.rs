//! The change feed: every change is one numbered record in the log, and the feed is that
//! log told in public terms.
//!
//! - `event`: what a record means as events (`events_of`, pure), and their JSON.

pub mod event;

pub use event::{Kind, Position};
