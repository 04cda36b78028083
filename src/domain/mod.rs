//! The business rules of stock and reservations, as plain data and pure functions.
//!
//! Nothing here knows about actors, the log or HTTP. Product actors, the supervisor and the
//! fold (`crate::storage::fold::apply`) all change state through these methods, so a rule lives in
//! exactly one place.

pub mod key;
pub mod product;
pub mod reservation;
pub mod sale;
pub mod sku_index;
pub mod webhook;

pub use key::{ApiKey, KeyId, Scope};
pub use product::{HoldError, NewProduct, Price, Product, StockError};
pub use reservation::{Line, Reservation, Status};
pub use sale::{Buyers, LineSet, Rules, RulesError, RulesPatch, SaleRules};
pub use sku_index::SkuIndex;
pub use webhook::{Registration, WebhookBook};
