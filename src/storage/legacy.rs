//! What older builds wrote, kept readable: record format version 1 and snapshot format
//! version 1, both from before sale rules and API keys. Each is decoded into its own
//! types here (bincode is positional: the old bytes only decode into the old shapes) and
//! turned into today's, with no sale rules, no counted lines and no key.
//!
//! Nothing here is ever written again. Never change these types: they are the old formats.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{Buyers, Line, LineSet, Price, Product, Reservation, SaleRules, Status};
use crate::storage::fold::{IdempotencyEntry, State};
use crate::storage::record::{IdempotencyKey, Record};

/// The record format version of `RecordV1`.
pub const RECORD_V1: u8 = 1;

/// The snapshot format version of `StateV1`.
pub const SNAPSHOT_V1: u8 = 1;

/// A record as format version 1 encoded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordV1 {
    ProductCreated {
        sku: String,
        name: String,
        price: Option<Price>,
        on_hand: u64,
        at: Millis,
    },
    ProductPatched {
        sku: String,
        name: Option<String>,
        price: Option<Option<Price>>,
        at: Millis,
    },
    Replenished {
        sku: String,
        quantity: u64,
        at: Millis,
    },
    Adjusted {
        sku: String,
        delta: i64,
        reason: Option<String>,
        at: Millis,
    },
    ProductDeleted {
        sku: String,
        at: Millis,
    },
    ReservationCreated {
        id: Uuid,
        customer_id: String,
        items: Vec<Line>,
        created_at: Millis,
        expires_at: Millis,
        idempotency: Option<(IdempotencyKey, Vec<u8>)>,
    },
    ReservationConfirmed {
        id: Uuid,
        order_id: Option<String>,
        at: Millis,
    },
    ReservationCancelled {
        id: Uuid,
        at: Millis,
    },
    ReservationExpired {
        id: Uuid,
        at: Millis,
    },
    ReservationExtended {
        id: Uuid,
        expires_at: Millis,
        at: Millis,
    },
    Forgotten {
        before: Millis,
        at: Millis,
    },
}

impl From<RecordV1> for Record {
    fn from(old: RecordV1) -> Record {
        match old {
            RecordV1::ProductCreated {
                sku,
                name,
                price,
                on_hand,
                at,
            } => Record::ProductCreated {
                sku,
                name,
                price,
                on_hand,
                rules: SaleRules::default(),
                at,
                by: None,
            },
            RecordV1::ProductPatched {
                sku,
                name,
                price,
                at,
            } => Record::ProductPatched {
                sku,
                name,
                price,
                rules: Default::default(),
                at,
                by: None,
            },
            RecordV1::Replenished { sku, quantity, at } => Record::Replenished {
                sku,
                quantity,
                at,
                by: None,
            },
            RecordV1::Adjusted {
                sku,
                delta,
                reason,
                at,
            } => Record::Adjusted {
                sku,
                delta,
                reason,
                at,
                by: None,
            },
            RecordV1::ProductDeleted { sku, at } => Record::ProductDeleted { sku, at, by: None },
            RecordV1::ReservationCreated {
                id,
                customer_id,
                items,
                created_at,
                expires_at,
                idempotency,
            } => Record::ReservationCreated {
                id,
                customer_id,
                items,
                counted: LineSet::EMPTY,
                created_at,
                expires_at,
                idempotency,
                by: None,
            },
            RecordV1::ReservationConfirmed { id, order_id, at } => Record::ReservationConfirmed {
                id,
                order_id,
                at,
                by: None,
            },
            RecordV1::ReservationCancelled { id, at } => {
                Record::ReservationCancelled { id, at, by: None }
            }
            RecordV1::ReservationExpired { id, at } => Record::ReservationExpired { id, at },
            RecordV1::ReservationExtended { id, expires_at, at } => Record::ReservationExtended {
                id,
                expires_at,
                at,
                by: None,
            },
            RecordV1::Forgotten { before, at } => Record::Forgotten { before, at },
        }
    }
}

/// A product as snapshot format version 1 encoded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductV1 {
    pub sku: String,
    pub name: String,
    pub price: Option<Price>,
    pub on_hand: u64,
    pub reserved: u64,
    pub holding: u64,
    pub sold: u64,
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A reservation as snapshot format version 1 encoded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationV1 {
    pub id: Uuid,
    pub customer_id: String,
    pub items: Vec<Line>,
    pub status: Status,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub original_expires_at: Millis,
    pub confirmed_at: Option<Millis>,
    pub order_id: Option<String>,
}

/// The state as snapshot format version 1 encoded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateV1 {
    pub products: HashMap<String, ProductV1>,
    pub reservations: BTreeMap<Uuid, ReservationV1>,
    pub idempotency: BTreeMap<IdempotencyKey, IdempotencyEntry>,
}

impl From<StateV1> for State {
    fn from(old: StateV1) -> State {
        let products = old
            .products
            .into_iter()
            .map(|(sku, p)| {
                let product = Product {
                    sku: p.sku,
                    name: p.name,
                    price: p.price,
                    on_hand: p.on_hand,
                    reserved: p.reserved,
                    holding: p.holding,
                    sold: p.sold,
                    version: p.version,
                    created_at: p.created_at,
                    updated_at: p.updated_at,
                    rules: Default::default(),
                    buyers: Buyers::default(),
                };
                (sku, product)
            })
            .collect();
        let reservations = old
            .reservations
            .into_iter()
            .map(|(id, r)| {
                let reservation = Reservation {
                    id: r.id,
                    customer_id: r.customer_id,
                    items: r.items,
                    status: r.status,
                    created_at: r.created_at,
                    expires_at: r.expires_at,
                    original_expires_at: r.original_expires_at,
                    confirmed_at: r.confirmed_at,
                    order_id: r.order_id,
                    counted: LineSet::EMPTY,
                };
                (id, reservation)
            })
            .collect();
        State {
            products,
            reservations,
            idempotency: old.idempotency,
            keys: BTreeMap::new(),
            raft: None,
        }
    }
}
