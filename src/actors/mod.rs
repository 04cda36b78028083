//! The actors: one per product (`product`), and the supervisor that owns the routes, the
//! reservations and the expiry deadlines (`supervisor`).

pub mod product;
pub mod supervisor;
