//! What older builds wrote, kept readable: record format version 1 and snapshot format
//! version 1, both from before sale rules and API keys; record format version 2 and
//! snapshot formats 2 and 3, from before the low-stock threshold. Each is decoded into its
//! own types here (bincode is positional: the old bytes only decode into the old shapes)
//! and turned into today's: with no sale rules, no counted lines and no key (the first
//! formats), and no low-stock threshold (all of them).
//!
//! Nothing here is ever written again. Never change these types: they are the old formats.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{
    ApiKey, Buyers, KeyId, Line, LineSet, Price, Product, Reservation, RulesPatch, SaleRules,
    Status,
};
use crate::storage::fold::{IdempotencyEntry, Products, State};
use crate::storage::record::{IdempotencyKey, Record};

/// The record format version of `RecordV1`.
pub const RECORD_V1: u8 = 1;

/// The snapshot format version of `StateV1`.
pub const SNAPSHOT_V1: u8 = 1;

/// The record format version of `RecordV2`.
pub const RECORD_V2: u8 = 2;

/// The snapshot format version of `StateV2` alone (a single node's).
pub const SNAPSHOT_V2: u8 = 2;

/// The snapshot format version of `StateV2` followed by the state's Raft metadata
/// (`storage::entry::RaftMeta`): a replicated node's, before format 4. Defined and read,
/// never written by a release (replication was dormant while it was current).
pub const SNAPSHOT_V3: u8 = 3;

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
                low_stock_threshold: None,
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
                low_stock_threshold: None,
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
            webhooks: Default::default(),
            raft: None,
            skus: Default::default(),
        }
    }
}

/// A record as format version 2 encoded it: today's `Record` without the low-stock
/// threshold (in `ProductCreated` and `ProductPatched`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordV2 {
    ProductCreated {
        sku: String,
        name: String,
        price: Option<Price>,
        on_hand: u64,
        rules: SaleRules,
        at: Millis,
        by: Option<KeyId>,
    },
    ProductPatched {
        sku: String,
        name: Option<String>,
        price: Option<Option<Price>>,
        rules: RulesPatch,
        at: Millis,
        by: Option<KeyId>,
    },
    Replenished {
        sku: String,
        quantity: u64,
        at: Millis,
        by: Option<KeyId>,
    },
    Adjusted {
        sku: String,
        delta: i64,
        reason: Option<String>,
        at: Millis,
        by: Option<KeyId>,
    },
    ProductDeleted {
        sku: String,
        at: Millis,
        by: Option<KeyId>,
    },
    ReservationCreated {
        id: Uuid,
        customer_id: String,
        items: Vec<Line>,
        counted: LineSet,
        created_at: Millis,
        expires_at: Millis,
        idempotency: Option<(IdempotencyKey, Vec<u8>)>,
        by: Option<KeyId>,
    },
    ReservationConfirmed {
        id: Uuid,
        order_id: Option<String>,
        at: Millis,
        by: Option<KeyId>,
    },
    ReservationCancelled {
        id: Uuid,
        at: Millis,
        by: Option<KeyId>,
    },
    ReservationExpired {
        id: Uuid,
        at: Millis,
    },
    ReservationExtended {
        id: Uuid,
        expires_at: Millis,
        at: Millis,
        by: Option<KeyId>,
    },
    Forgotten {
        before: Millis,
        at: Millis,
    },
    KeyCreated {
        key: ApiKey,
        by: Option<KeyId>,
    },
    KeyRevoked {
        id: KeyId,
        at: Millis,
        by: Option<KeyId>,
    },
}

impl From<RecordV2> for Record {
    fn from(old: RecordV2) -> Record {
        match old {
            RecordV2::ProductCreated {
                sku,
                name,
                price,
                on_hand,
                rules,
                at,
                by,
            } => Record::ProductCreated {
                sku,
                name,
                price,
                on_hand,
                rules,
                low_stock_threshold: None,
                at,
                by,
            },
            RecordV2::ProductPatched {
                sku,
                name,
                price,
                rules,
                at,
                by,
            } => Record::ProductPatched {
                sku,
                name,
                price,
                rules,
                low_stock_threshold: None,
                at,
                by,
            },
            RecordV2::Replenished {
                sku,
                quantity,
                at,
                by,
            } => Record::Replenished {
                sku,
                quantity,
                at,
                by,
            },
            RecordV2::Adjusted {
                sku,
                delta,
                reason,
                at,
                by,
            } => Record::Adjusted {
                sku,
                delta,
                reason,
                at,
                by,
            },
            RecordV2::ProductDeleted { sku, at, by } => Record::ProductDeleted { sku, at, by },
            RecordV2::ReservationCreated {
                id,
                customer_id,
                items,
                counted,
                created_at,
                expires_at,
                idempotency,
                by,
            } => Record::ReservationCreated {
                id,
                customer_id,
                items,
                counted,
                created_at,
                expires_at,
                idempotency,
                by,
            },
            RecordV2::ReservationConfirmed {
                id,
                order_id,
                at,
                by,
            } => Record::ReservationConfirmed {
                id,
                order_id,
                at,
                by,
            },
            RecordV2::ReservationCancelled { id, at, by } => {
                Record::ReservationCancelled { id, at, by }
            }
            RecordV2::ReservationExpired { id, at } => Record::ReservationExpired { id, at },
            RecordV2::ReservationExtended {
                id,
                expires_at,
                at,
                by,
            } => Record::ReservationExtended {
                id,
                expires_at,
                at,
                by,
            },
            RecordV2::Forgotten { before, at } => Record::Forgotten { before, at },
            RecordV2::KeyCreated { key, by } => Record::KeyCreated { key, by },
            RecordV2::KeyRevoked { id, at, by } => Record::KeyRevoked { id, at, by },
        }
    }
}

/// A product as snapshot formats 2 and 3 encoded it: the sale rules alone where format 4
/// has the rules and then the low-stock threshold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductV2 {
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
    pub rules: SaleRules,
    pub buyers: Buyers,
}

impl From<ProductV2> for Product {
    fn from(p: ProductV2) -> Product {
        Product {
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
            rules: p.rules.into(),
            buyers: p.buyers,
        }
    }
}

/// The state as snapshot format 4 encodes it: today's, without a cluster's webhooks
/// (format 4 is still written when there are none: `storage::snapshot`).
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateV4<
    P = Products,
    R = BTreeMap<Uuid, Reservation>,
    I = BTreeMap<IdempotencyKey, IdempotencyEntry>,
    K = BTreeMap<KeyId, ApiKey>,
> {
    pub products: P,
    pub reservations: R,
    pub idempotency: I,
    pub keys: K,
}

impl From<StateV4> for State {
    fn from(old: StateV4) -> State {
        State {
            products: old.products,
            reservations: old.reservations,
            idempotency: old.idempotency,
            keys: old.keys,
            webhooks: Default::default(),
            raft: None,
            skus: Default::default(),
        }
    }
}

/// The state as snapshot formats 2 and 3 encoded it (format 3 then the Raft metadata).
/// Only the products differ from today's; they are turned into today's as they are
/// decoded, one at a time, so an old snapshot of a million products never holds a second
/// table of them (`ProductsV2`).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
pub struct StateV2 {
    pub products: ProductsV2,
    pub reservations: BTreeMap<Uuid, Reservation>,
    pub idempotency: BTreeMap<IdempotencyKey, IdempotencyEntry>,
    pub keys: BTreeMap<KeyId, ApiKey>,
}

/// The products of a `StateV2`, decoded as `ProductV2`s and kept as today's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProductsV2(pub Products);

impl<'de> Deserialize<'de> for ProductsV2 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ProductsV2, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ProductsV2;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of SKUs to products (snapshot format 2)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ProductsV2, A::Error> {
                // bincode says how many; capped, since the length is data.
                let hint = map.size_hint().unwrap_or(0).min(1 << 20);
                let mut products = Products::with_capacity_and_hasher(hint, Default::default());
                while let Some((sku, product)) = map.next_entry::<String, ProductV2>()? {
                    products.insert(sku, product.into());
                }
                Ok(ProductsV2(products))
            }
        }
        d.deserialize_map(Visit)
    }
}

impl From<StateV2> for State {
    fn from(old: StateV2) -> State {
        State {
            products: old.products.0,
            reservations: old.reservations,
            idempotency: old.idempotency,
            keys: old.keys,
            webhooks: Default::default(),
            raft: None,
            skus: Default::default(),
        }
    }
}
