//! A reservation: which units a customer holds, until when, and how it ended.
//!
//! Status moves only from `Pending` (to `Confirmed`, `Cancelled` or `Expired`), and only
//! through the methods here. The supervisor is the one owner of live reservations, so
//! a confirm racing an expiry is decided by the order of two messages in one mailbox.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::sale::LineSet;

/// One line of a reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pending,
    Confirmed,
    Cancelled,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Confirmed => "confirmed",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: Uuid,
    pub customer_id: String,
    pub items: Vec<Line>,
    pub status: Status,
    pub created_at: Millis,
    pub expires_at: Millis,
    /// `expires_at` as first answered: an idempotent replay answers the original body.
    pub original_expires_at: Millis,
    pub confirmed_at: Option<Millis>,
    pub order_id: Option<String>,
    /// The lines whose units were counted toward their product's purchase limit when
    /// held: a cancel or expiry gives back exactly those.
    pub counted: LineSet,
}

impl Reservation {
    pub fn new(
        id: Uuid,
        customer_id: String,
        items: Vec<Line>,
        created_at: Millis,
        expires_at: Millis,
    ) -> Reservation {
        debug_assert!(expires_at > created_at);
        debug_assert!(!items.is_empty());
        Reservation {
            id,
            customer_id,
            items,
            status: Status::Pending,
            created_at,
            expires_at,
            original_expires_at: expires_at,
            confirmed_at: None,
            order_id: None,
            counted: LineSet::EMPTY,
        }
    }

    /// Pending, and its deadline has passed: expired for every purpose (invariant 5
    /// in docs/ARCHITECTURE.md), even if the expiry has not been processed yet.
    pub fn is_due(&self, now: Millis) -> bool {
        self.status == Status::Pending && now >= self.expires_at
    }

    pub fn confirm(&mut self, order_id: Option<String>, at: Millis) {
        debug_assert_eq!(self.status, Status::Pending);
        self.status = Status::Confirmed;
        self.confirmed_at = Some(at);
        self.order_id = order_id;
    }

    pub fn cancel(&mut self) {
        debug_assert_eq!(self.status, Status::Pending);
        self.status = Status::Cancelled;
    }

    pub fn expire(&mut self) {
        debug_assert_eq!(self.status, Status::Pending);
        self.status = Status::Expired;
    }

    pub fn extend(&mut self, expires_at: Millis) {
        debug_assert_eq!(self.status, Status::Pending);
        self.expires_at = expires_at;
    }
}
