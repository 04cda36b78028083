//! The error type shared by the service layer; `crate::http::problem` maps each variant to
//! its RFC 9457 answer in one place.

use uuid::Uuid;

use crate::storage::log::LogError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("product {sku} does not exist")]
    ProductNotFound { sku: String },
    #[error("reservation {id} does not exist")]
    ReservationNotFound { id: String },
    #[error("product {sku} already exists")]
    SkuExists { sku: String },
    #[error("only {available} of {sku} available, {requested} requested")]
    InsufficientStock {
        sku: String,
        requested: u64,
        available: u64,
    },
    /// A valid request whose result would take a stock figure past 2^53 − 1.
    #[error("{detail}")]
    StockOverflow { field: String, detail: String },
    #[error("product {sku} is held by pending reservations")]
    ProductHasReservations { sku: String },
    #[error("reservation {id} has expired")]
    ReservationExpired { id: Uuid },
    #[error("reservation {id} was cancelled")]
    ReservationCancelled { id: Uuid },
    #[error("reservation {id} was confirmed")]
    ReservationConfirmed { id: Uuid },
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still in flight")]
    IdempotencyKeyInFlight,
    #[error("product {sku} is at version {current}, which If-Match does not name")]
    VersionMismatch { sku: String, current: u64 },
    #[error("API key {id} does not exist")]
    KeyNotFound { id: String },
    /// A hold that would take a customer past the product's purchase limit.
    #[error("customer may hold at most {limit} of {sku}; holds {held}, asked for {requested}")]
    CustomerLimitExceeded {
        sku: String,
        limit: u64,
        held: u64,
        requested: u64,
    },
    /// A hold before the product's sale window opens (`wait_ms` until it does).
    #[error("the sale of {sku} has not started")]
    SaleNotStarted {
        sku: String,
        starts_at: crate::clock::Millis,
        wait_ms: i64,
    },
    #[error("the sale of {sku} has ended")]
    SaleEnded {
        sku: String,
        ended_at: crate::clock::Millis,
    },
    /// Sale rules that would not be valid once a change is applied.
    #[error("{detail}")]
    InvalidRules { field: String, detail: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<LogError> for Error {
    fn from(err: LogError) -> Self {
        Error::Unavailable(err.to_string())
    }
}

impl<T> From<ractor::RactorErr<T>> for Error {
    fn from(err: ractor::RactorErr<T>) -> Self {
        match err {
            ractor::RactorErr::Timeout => Error::Unavailable("the server is overloaded".into()),
            // The actor stopped (or failed) before answering.
            _ => Error::Internal("an actor stopped before answering".into()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
