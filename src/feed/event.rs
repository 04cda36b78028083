//! The change feed's events: what one log record means to a shop, in public terms.
//!
//! `events_of` is a pure function of a record, the figures of the products it touches
//! before it was applied (`Before`), and the state after it was applied with the one fold
//! (`storage::fold::apply`: invariant 4 in docs/ARCHITECTURE.md). It never interprets a
//! record a second way: every figure it reports is read from the folded state.
//!
//! A record gives zero or more events: its own (`product.created`, `reservation.confirmed`
//! ...), then the derived ones for each product it touched, in the order of the products
//! in the record: `stock.sold_out` when the product's `available` became 0,
//! `stock.back_in_stock` when it left 0, `stock.low` when the product became low (it has a
//! low-stock threshold and `available` is at or below it: `Product::is_low`) and
//! `stock.low_cleared` when it stopped being low (stock came back above the threshold, or
//! the threshold was raised past `available`, lowered below it or cleared). For one
//! product they come in the order the stock passed the levels: falling, `stock.low` then
//! `stock.sold_out`; rising, `stock.back_in_stock` then `stock.low_cleared` (no change
//! both raises and lowers `available`, and a change of threshold moves no stock). A
//! product created low gives `stock.low` (it had no level before); one created with
//! nothing gives no `stock.sold_out` (it never had any), and a deleted product gives no
//! derived event. Events share
//! their record's sequence number `seq`; `index` numbers them within it, so that
//! `(seq, index)` is an event's position in the feed and its `id` is `"<seq>"` for the first
//! event of a record and `"<seq>.<index>"` for the others. Records that are not changes a
//! shop cares about (`Forgotten`, `KeyCreated`, `KeyRevoked`) give none.
//!
//! The JSON uses CloudEvents 1.0 attribute names (`specversion`, `id`, `source`, `type`,
//! `time`, `subject`, `data`), plus `seq`.

use serde::Serialize;

use crate::clock::{rfc3339, Millis};
use crate::domain::{KeyId, Line, Price, Product, Reservation};
use crate::storage::fold::State;
use crate::storage::record::Record;

/// The event types, as they appear in `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    ProductCreated,
    ProductUpdated,
    ProductDeleted,
    StockReplenished,
    StockAdjusted,
    ReservationCreated,
    ReservationConfirmed,
    ReservationCancelled,
    ReservationExpired,
    ReservationExtended,
    StockSoldOut,
    StockBackInStock,
    StockLow,
    StockLowCleared,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::ProductCreated,
        Kind::ProductUpdated,
        Kind::ProductDeleted,
        Kind::StockReplenished,
        Kind::StockAdjusted,
        Kind::ReservationCreated,
        Kind::ReservationConfirmed,
        Kind::ReservationCancelled,
        Kind::ReservationExpired,
        Kind::ReservationExtended,
        Kind::StockSoldOut,
        Kind::StockBackInStock,
        Kind::StockLow,
        Kind::StockLowCleared,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ProductCreated => "product.created",
            Kind::ProductUpdated => "product.updated",
            Kind::ProductDeleted => "product.deleted",
            Kind::StockReplenished => "stock.replenished",
            Kind::StockAdjusted => "stock.adjusted",
            Kind::ReservationCreated => "reservation.created",
            Kind::ReservationConfirmed => "reservation.confirmed",
            Kind::ReservationCancelled => "reservation.cancelled",
            Kind::ReservationExpired => "reservation.expired",
            Kind::ReservationExtended => "reservation.extended",
            Kind::StockSoldOut => "stock.sold_out",
            Kind::StockBackInStock => "stock.back_in_stock",
            Kind::StockLow => "stock.low",
            Kind::StockLowCleared => "stock.low_cleared",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// An event's place in the feed: its record's sequence number, then its index among that
/// record's events. Ordered as the feed is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub seq: u64,
    pub index: u32,
}

impl Position {
    /// The event's `id`: `"<seq>"` for a record's first event, `"<seq>.<index>"` after.
    pub fn id(self) -> String {
        if self.index == 0 {
            self.seq.to_string()
        } else {
            format!("{}.{}", self.seq, self.index)
        }
    }

    /// Past every event of record `seq`: where a reader that has seen that record's events
    /// (or that starts after the record) stands.
    pub fn after_record(seq: u64) -> Position {
        Position {
            seq,
            index: u32::MAX,
        }
    }

    /// Parses an `id` as `id` writes it (a bare `<seq>` is that record's first event).
    pub fn parse(id: &str) -> Option<Position> {
        let (seq, index) = match id.split_once('.') {
            Some((seq, index)) => (seq, index.parse().ok()?),
            None => (id, 0),
        };
        Some(Position {
            seq: seq.parse().ok()?,
            index,
        })
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub position: Position,
    pub kind: Kind,
    pub time: Millis,
    /// The SKU (product and stock events) or the reservation id.
    pub subject: String,
    pub data: Data,
}

/// An event's `data`: what its type tells (`detail`), then the key that made the change
/// (`by`) and the figures of the products it touched (`products`). Typed, and written
/// straight to JSON: building `serde_json::Value` trees and dropping them again was most
/// of the projector's CPU (perf).
#[derive(Clone, Debug, PartialEq)]
pub struct Data {
    pub detail: Detail,
    pub by: Option<KeyId>,
    pub products: Vec<Figures>,
}

/// The fields of `data` that depend on the event's type.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    /// `product.created`.
    Created {
        name: String,
        price: Option<Price>,
        low_stock_threshold: Option<u64>,
    },
    /// `product.updated`: the product's fields after the change.
    Updated {
        name: String,
        price: Option<Price>,
        max_per_customer: Option<u64>,
        sale_starts_at: Option<Millis>,
        sale_ends_at: Option<Millis>,
        low_stock_threshold: Option<u64>,
    },
    Replenished {
        quantity: u64,
    },
    Adjusted {
        delta: i64,
        reason: Option<String>,
    },
    Deleted {
        sku: String,
    },
    /// `reservation.*`: the reservation after the change.
    Reservation {
        id: uuid::Uuid,
        customer_id: String,
        lines: Vec<Line>,
        order_id: Option<String>,
        status: &'static str,
        expires_at: Millis,
    },
    /// A record about something the state no longer holds (not reached by a log that
    /// folds; kept so that `events_of` never fails): only its id.
    Unknown {
        reservation_id: Option<uuid::Uuid>,
    },
    /// Derived events `stock.sold_out`, `stock.back_in_stock`: nothing but the figures.
    None,
    /// Derived events `stock.low`, `stock.low_cleared`: the product's threshold after the
    /// change (`None` once a change cleared it), beside the figures.
    Threshold {
        low_stock_threshold: Option<u64>,
    },
}

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        match &self.detail {
            Detail::Created {
                name,
                price,
                low_stock_threshold,
            } => {
                map.serialize_entry("name", name)?;
                map.serialize_entry("price", price)?;
                map.serialize_entry("low_stock_threshold", low_stock_threshold)?;
            }
            Detail::Updated {
                name,
                price,
                max_per_customer,
                sale_starts_at,
                sale_ends_at,
                low_stock_threshold,
            } => {
                map.serialize_entry("name", name)?;
                map.serialize_entry("price", price)?;
                map.serialize_entry("max_per_customer", max_per_customer)?;
                map.serialize_entry("sale_starts_at", &sale_starts_at.map(rfc3339))?;
                map.serialize_entry("sale_ends_at", &sale_ends_at.map(rfc3339))?;
                map.serialize_entry("low_stock_threshold", low_stock_threshold)?;
            }
            Detail::Replenished { quantity } => map.serialize_entry("quantity", quantity)?,
            Detail::Adjusted { delta, reason } => {
                map.serialize_entry("delta", delta)?;
                map.serialize_entry("reason", reason)?;
            }
            Detail::Deleted { sku } => map.serialize_entry("sku", sku)?,
            Detail::Reservation {
                id,
                customer_id,
                lines,
                order_id,
                status,
                expires_at,
            } => {
                map.serialize_entry("reservation_id", id)?;
                map.serialize_entry("customer_id", customer_id)?;
                map.serialize_entry("lines", lines)?;
                map.serialize_entry("order_id", order_id)?;
                map.serialize_entry("status", status)?;
                map.serialize_entry("expires_at", &rfc3339(*expires_at))?;
            }
            Detail::Unknown { reservation_id } => {
                if let Some(id) = reservation_id {
                    map.serialize_entry("reservation_id", id)?;
                }
            }
            Detail::None => {}
            Detail::Threshold {
                low_stock_threshold,
            } => map.serialize_entry("low_stock_threshold", low_stock_threshold)?,
        }
        map.serialize_entry("by", &self.by)?;
        map.serialize_entry("products", &self.products)?;
        map.end()
    }
}

/// A product's figures after a change, as events carry them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Figures {
    pub sku: String,
    pub on_hand: u64,
    pub reserved: u64,
    pub available: u64,
    pub sold: u64,
    pub version: u64,
}

impl Figures {
    pub fn of(p: &Product) -> Figures {
        Figures {
            sku: p.sku.clone(),
            on_hand: p.on_hand,
            reserved: p.reserved,
            available: p.available(),
            sold: p.sold,
            version: p.version,
        }
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    specversion: &'static str,
    id: &'a str,
    seq: u64,
    source: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    time: &'a str,
    subject: &'a str,
    datacontenttype: &'static str,
    data: &'a Data,
}

impl Event {
    /// The event as JSON, on one line (what the store keeps and the API sends).
    pub fn to_json(&self) -> String {
        let wire = Wire {
            specversion: "1.0",
            id: &self.position.id(),
            seq: self.position.seq,
            source: "stockd",
            kind: self.kind.as_str(),
            time: &rfc3339(self.time),
            subject: &self.subject,
            datacontenttype: "application/json",
            data: &self.data,
        };
        let mut json = Vec::with_capacity(512);
        serde_json::to_writer(&mut json, &wire).expect("an event is plain JSON");
        // serde_json writes UTF-8 only.
        String::from_utf8(json).expect("serde_json writes UTF-8")
    }
}

/// `available` of each product a record touches, and whether it was low, before the
/// record was applied (`None`: the product did not exist). Taken by `Before::of` on the
/// state the record applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Before {
    levels: Vec<(String, Option<Level>)>,
}

/// A product's stock level as the derived events see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Level {
    available: u64,
    low: bool,
}

impl Level {
    fn of(p: &Product) -> Level {
        Level {
            available: p.available(),
            low: p.is_low(),
        }
    }
}

/// The SKUs a record touches, in order, each once (`state`: before or after the record,
/// for the lines of the reservation it names).
pub(crate) fn touched(record: &Record, state: &State) -> Vec<String> {
    let mut skus: Vec<String> = Vec::new();
    let mut add = |sku: &str| {
        if !skus.iter().any(|s| s == sku) {
            skus.push(sku.to_string());
        }
    };
    match record {
        Record::ProductCreated { sku, .. }
        | Record::ProductPatched { sku, .. }
        | Record::Replenished { sku, .. }
        | Record::Adjusted { sku, .. }
        | Record::ProductDeleted { sku, .. } => add(sku),
        Record::ReservationCreated { items, .. } => items.iter().for_each(|l| add(&l.sku)),
        Record::ReservationConfirmed { id, .. }
        | Record::ReservationCancelled { id, .. }
        | Record::ReservationExpired { id, .. }
        | Record::ReservationExtended { id, .. } => {
            if let Some(r) = state.reservations.get(id) {
                r.items.iter().for_each(|l| add(&l.sku));
            }
        }
        Record::Forgotten { .. }
        | Record::KeyCreated { .. }
        | Record::KeyRevoked { .. }
        | Record::WebhookSaved { .. }
        | Record::WebhookRemoved { .. }
        | Record::WebhookPositions { .. } => {}
    }
    skus
}

impl Before {
    /// The figures `events_of` needs from the state `record` is about to be applied to.
    pub fn of(record: &Record, state: &State) -> Before {
        let levels = touched(record, state)
            .into_iter()
            .map(|sku| {
                let level = state.products.get(&sku).map(Level::of);
                (sku, level)
            })
            .collect();
        Before { levels }
    }
}

fn reservation_detail(r: &Reservation) -> Detail {
    Detail::Reservation {
        id: r.id,
        customer_id: r.customer_id.clone(),
        lines: r.items.clone(),
        order_id: r.order_id.clone(),
        status: r.status.as_str(),
        expires_at: r.expires_at,
    }
}

/// The events of record `seq`, given the figures before it (`before`, from
/// `Before::of`) and the state after it was applied (`after`).
pub fn events_of(before: &Before, seq: u64, record: &Record, after: &State) -> Vec<Event> {
    let products: Vec<Figures> = before
        .levels
        .iter()
        .filter_map(|(sku, _)| after.products.get(sku).map(Figures::of))
        .collect();
    let reservation = |id: &uuid::Uuid| match after.reservations.get(id) {
        Some(r) => reservation_detail(r),
        None => Detail::Unknown {
            reservation_id: Some(*id),
        },
    };
    let (kind, time, subject, detail, by) = match record {
        Record::ProductCreated { sku, at, by, .. } => {
            let detail = match after.products.get(sku) {
                Some(p) => Detail::Created {
                    name: p.name.clone(),
                    price: p.price.clone(),
                    low_stock_threshold: p.low_stock_threshold(),
                },
                None => Detail::Unknown {
                    reservation_id: None,
                },
            };
            (Kind::ProductCreated, *at, sku.clone(), detail, *by)
        }
        Record::ProductPatched { sku, at, by, .. } => {
            let detail = match after.products.get(sku) {
                Some(p) => Detail::Updated {
                    name: p.name.clone(),
                    price: p.price.clone(),
                    max_per_customer: p.rules.max_per_customer,
                    sale_starts_at: p.rules.starts_at,
                    sale_ends_at: p.rules.ends_at,
                    low_stock_threshold: p.low_stock_threshold(),
                },
                None => Detail::Unknown {
                    reservation_id: None,
                },
            };
            (Kind::ProductUpdated, *at, sku.clone(), detail, *by)
        }
        Record::Replenished {
            sku,
            quantity,
            at,
            by,
        } => {
            let detail = Detail::Replenished {
                quantity: *quantity,
            };
            (Kind::StockReplenished, *at, sku.clone(), detail, *by)
        }
        Record::Adjusted {
            sku,
            delta,
            reason,
            at,
            by,
        } => {
            let detail = Detail::Adjusted {
                delta: *delta,
                reason: reason.clone(),
            };
            (Kind::StockAdjusted, *at, sku.clone(), detail, *by)
        }
        Record::ProductDeleted { sku, at, by } => {
            let detail = Detail::Deleted { sku: sku.clone() };
            (Kind::ProductDeleted, *at, sku.clone(), detail, *by)
        }
        Record::ReservationCreated {
            id, created_at, by, ..
        } => (
            Kind::ReservationCreated,
            *created_at,
            id.to_string(),
            reservation(id),
            *by,
        ),
        Record::ReservationConfirmed { id, at, by, .. } => (
            Kind::ReservationConfirmed,
            *at,
            id.to_string(),
            reservation(id),
            *by,
        ),
        Record::ReservationCancelled { id, at, by } => (
            Kind::ReservationCancelled,
            *at,
            id.to_string(),
            reservation(id),
            *by,
        ),
        Record::ReservationExpired { id, at } => (
            Kind::ReservationExpired,
            *at,
            id.to_string(),
            reservation(id),
            None,
        ),
        Record::ReservationExtended { id, at, by, .. } => (
            Kind::ReservationExtended,
            *at,
            id.to_string(),
            reservation(id),
            *by,
        ),
        Record::Forgotten { .. }
        | Record::KeyCreated { .. }
        | Record::KeyRevoked { .. }
        | Record::WebhookSaved { .. }
        | Record::WebhookRemoved { .. }
        | Record::WebhookPositions { .. } => return Vec::new(),
    };
    let mut events = vec![Event {
        position: Position { seq, index: 0 },
        kind,
        time,
        subject,
        data: Data {
            detail,
            by,
            products,
        },
    }];
    for (sku, was) in &before.levels {
        let Some(p) = after.products.get(sku) else {
            continue; // deleted by this record: no crossing to report
        };
        let now = Level::of(p);
        for derived in crossings(*was, now) {
            let detail = match derived {
                Kind::StockLow | Kind::StockLowCleared => Detail::Threshold {
                    low_stock_threshold: p.low_stock_threshold(),
                },
                _ => Detail::None,
            };
            let index = events.len() as u32;
            events.push(Event {
                position: Position { seq, index },
                kind: derived,
                time,
                subject: sku.clone(),
                data: Data {
                    detail,
                    by,
                    products: vec![Figures::of(p)],
                },
            });
        }
    }
    events
}

/// The derived events of one product whose level went from `was` (`None`: it did not
/// exist) to `now`, in their fixed order: the levels a falling stock passes (`stock.low`,
/// then `stock.sold_out`), or those a rising one passes (`stock.back_in_stock`, then
/// `stock.low_cleared`). A product that did not exist counts as not low (created low, it
/// gives `stock.low`), and as never available (created empty, no `stock.sold_out`).
fn crossings(was: Option<Level>, now: Level) -> impl Iterator<Item = Kind> {
    let was_low = was.is_some_and(|w| w.low);
    let low = !was_low && now.low;
    let low_cleared = was_low && !now.low;
    let sold_out = was.is_some_and(|w| w.available > 0) && now.available == 0;
    let back_in_stock = was.is_some_and(|w| w.available == 0) && now.available > 0;
    [
        (low, Kind::StockLow),
        (sold_out, Kind::StockSoldOut),
        (back_in_stock, Kind::StockBackInStock),
        (low_cleared, Kind::StockLowCleared),
    ]
    .into_iter()
    .filter_map(|(crossed, kind)| crossed.then_some(kind))
}

/// Applies `record` (number `seq`) to `state` with the one fold and returns its events.
pub fn project(
    state: &mut State,
    seq: u64,
    record: &Record,
) -> Result<Vec<Event>, crate::storage::fold::FoldError> {
    let before = Before::of(record, state);
    crate::storage::fold::apply(state, record)?;
    Ok(events_of(&before, seq, record, state))
}

/// Drops from a projector's shadow state what no later record's fold or event needs:
/// a reservation that `record` ended (confirm, cancel, expiry), and every idempotency key
/// (the fold inserts them and never reads them again). Keeps the shadow to the products
/// and the pending reservations.
pub fn prune(state: &mut State, record: &Record) {
    match record {
        Record::ReservationConfirmed { id, .. }
        | Record::ReservationCancelled { id, .. }
        | Record::ReservationExpired { id, .. } => {
            state.reservations.remove(id);
        }
        Record::ReservationCreated { .. } => state.idempotency.clear(),
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};
    use uuid::Uuid;

    fn data(event: &Event) -> Value {
        serde_json::to_value(&event.data).unwrap()
    }

    pub(crate) fn created(sku: &str, on_hand: u64) -> Record {
        Record::ProductCreated {
            sku: sku.into(),
            name: format!("n-{sku}"),
            price: None,
            on_hand,
            rules: Default::default(),
            low_stock_threshold: None,
            at: 10,
            by: None,
        }
    }

    pub(crate) fn reserve(id: u128, lines: &[(&str, u64)]) -> Record {
        Record::ReservationCreated {
            id: Uuid::from_u128(id),
            customer_id: "c-1".into(),
            items: lines
                .iter()
                .map(|(sku, quantity)| Line {
                    sku: sku.to_string(),
                    quantity: *quantity,
                })
                .collect(),
            counted: Default::default(),
            created_at: 20,
            expires_at: 1_000,
            idempotency: None,
            by: Some(Uuid::from_u128(77)),
        }
    }

    /// Folds `records` from an empty state; the events of each.
    fn run(records: &[Record]) -> (State, Vec<Vec<Event>>) {
        let mut state = State::default();
        let events = records
            .iter()
            .enumerate()
            .map(|(i, r)| project(&mut state, i as u64 + 1, r).unwrap())
            .collect();
        (state, events)
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn each_record_gives_its_event_with_the_figures_after_it() {
        let id = Uuid::from_u128(1);
        let (_, events) = run(&[
            created("A", 5),
            Record::Replenished {
                sku: "A".into(),
                quantity: 3,
                at: 11,
                by: None,
            },
            Record::Adjusted {
                sku: "A".into(),
                delta: -2,
                reason: Some("damaged".into()),
                at: 12,
                by: None,
            },
            reserve(1, &[("A", 2)]),
            Record::ReservationExtended {
                id,
                expires_at: 2_000,
                at: 21,
                by: None,
            },
            Record::ReservationConfirmed {
                id,
                order_id: Some("o-1".into()),
                at: 22,
                by: None,
            },
            Record::Forgotten { before: 0, at: 23 },
        ]);
        let flat: Vec<&Event> = events.iter().flatten().collect();
        assert_eq!(
            kinds(&flat.iter().map(|e| (*e).clone()).collect::<Vec<_>>()),
            vec![
                "product.created",
                "stock.replenished",
                "stock.adjusted",
                "reservation.created",
                "reservation.extended",
                "reservation.confirmed",
            ]
        );
        assert!(events[6].is_empty(), "Forgotten gives no event");
        let adjusted = &events[2][0];
        assert_eq!(data(adjusted)["reason"], "damaged");
        assert_eq!(data(adjusted)["delta"], -2);
        assert_eq!(data(adjusted)["products"][0]["on_hand"], 6);
        let reserved = &events[3][0];
        assert_eq!(reserved.subject, id.to_string());
        assert_eq!(reserved.position, Position { seq: 4, index: 0 });
        assert_eq!(data(reserved)["by"], Uuid::from_u128(77).to_string());
        assert_eq!(data(reserved)["customer_id"], "c-1");
        assert_eq!(data(reserved)["lines"][0]["quantity"], 2);
        let reserved_data = data(reserved);
        let figures = &reserved_data["products"][0];
        assert_eq!(
            (figures["on_hand"].as_u64(), figures["reserved"].as_u64()),
            (Some(6), Some(2))
        );
        assert_eq!(figures["available"], 4);
        let confirmed = &events[5][0];
        assert_eq!(data(confirmed)["order_id"], "o-1");
        assert_eq!(data(confirmed)["products"][0]["sold"], 2);
        assert_eq!(data(confirmed)["products"][0]["on_hand"], 4);
        assert_eq!(data(confirmed)["by"], Value::Null);
    }

    #[test]
    fn crossing_zero_gives_sold_out_and_back_in_stock_per_product() {
        let id = Uuid::from_u128(9);
        let (_, events) = run(&[
            created("A", 2),
            created("B", 5),
            reserve(9, &[("A", 2), ("B", 1)]),
            Record::ReservationCancelled {
                id,
                at: 30,
                by: None,
            },
        ]);
        assert_eq!(
            kinds(&events[2]),
            vec!["reservation.created", "stock.sold_out"]
        );
        let sold_out = &events[2][1];
        assert_eq!(sold_out.subject, "A");
        assert_eq!(sold_out.position, Position { seq: 3, index: 1 });
        assert_eq!(sold_out.position.id(), "3.1");
        assert_eq!(data(sold_out)["products"][0]["available"], 0);
        assert_eq!(
            kinds(&events[3]),
            vec!["reservation.cancelled", "stock.back_in_stock"]
        );
        assert_eq!(data(&events[3][1])["products"][0]["available"], 2);
        // A product created empty was never "available": no sold-out.
        let (_, events) = run(&[created("C", 0)]);
        assert_eq!(kinds(&events[0]), vec!["product.created"]);
    }

    pub(crate) fn created_with_threshold(sku: &str, on_hand: u64, threshold: u64) -> Record {
        match created(sku, on_hand) {
            Record::ProductCreated {
                sku,
                name,
                price,
                on_hand,
                rules,
                at,
                by,
                ..
            } => Record::ProductCreated {
                sku,
                name,
                price,
                on_hand,
                rules,
                low_stock_threshold: Some(threshold),
                at,
                by,
            },
            _ => unreachable!(),
        }
    }

    fn threshold(sku: &str, threshold: Option<u64>) -> Record {
        Record::ProductPatched {
            sku: sku.into(),
            name: None,
            price: None,
            rules: Default::default(),
            low_stock_threshold: Some(threshold),
            at: 15,
            by: None,
        }
    }

    fn cancel(id: u128) -> Record {
        Record::ReservationCancelled {
            id: Uuid::from_u128(id),
            at: 30,
            by: None,
        }
    }

    fn adjust(sku: &str, delta: i64) -> Record {
        Record::Adjusted {
            sku: sku.into(),
            delta,
            reason: None,
            at: 12,
            by: None,
        }
    }

    /// The events of each record after the first `setup` ones, as type names.
    fn kinds_after(setup: usize, records: &[Record]) -> Vec<Vec<&'static str>> {
        let (_, events) = run(records);
        events[setup..].iter().map(|e| kinds(e)).collect()
    }

    /// Falling to the threshold by a hold is low; staying low (or above it) gives nothing
    /// more; a cancel, an expiry, a replenishment or a positive adjustment back above it
    /// clears it; a negative adjustment makes it low again.
    #[test]
    fn stock_crossing_the_threshold_gives_low_and_low_cleared() {
        let records = [
            created_with_threshold("A", 10, 3),
            reserve(1, &[("A", 6)]), // 4 available: not low
            reserve(2, &[("A", 1)]), // 3: low (at the threshold)
            reserve(3, &[("A", 1)]), // 2: still low
            cancel(3),               // 3: still low
            cancel(2),               // 4: cleared
            reserve(4, &[("A", 2)]), // 2: low
            Record::ReservationExpired {
                id: Uuid::from_u128(4),
                at: 2_000,
            }, // 4: cleared
            adjust("A", -1),         // 3: low
            Record::Replenished {
                sku: "A".into(),
                quantity: 1,
                at: 13,
                by: None,
            }, // 4: cleared
            adjust("A", -2),         // 2: low
            adjust("A", 5),          // 7: cleared
            Record::ReservationConfirmed {
                id: Uuid::from_u128(1),
                order_id: None,
                at: 40,
                by: None,
            }, // on_hand and reserved both drop: 7 still
            Record::Replenished {
                sku: "A".into(),
                quantity: 1,
                at: 41,
                by: None,
            }, // 8: not low, nothing
        ];
        assert_eq!(
            kinds_after(1, &records),
            vec![
                vec!["reservation.created"],
                vec!["reservation.created", "stock.low"],
                vec!["reservation.created"],
                vec!["reservation.cancelled"],
                vec!["reservation.cancelled", "stock.low_cleared"],
                vec!["reservation.created", "stock.low"],
                vec!["reservation.expired", "stock.low_cleared"],
                vec!["stock.adjusted", "stock.low"],
                vec!["stock.replenished", "stock.low_cleared"],
                vec!["stock.adjusted", "stock.low"],
                vec!["stock.adjusted", "stock.low_cleared"],
                vec!["reservation.confirmed"],
                vec!["stock.replenished"],
            ]
        );
        let (_, events) = run(&records);
        let low = &events[2][1];
        assert_eq!(low.kind, Kind::StockLow);
        assert_eq!(low.subject, "A");
        assert_eq!(low.position.id(), "3.1");
        let d = data(low);
        assert_eq!(d["low_stock_threshold"], 3);
        assert_eq!(d["by"], Uuid::from_u128(77).to_string());
        assert_eq!(
            d["products"],
            json!([{"sku": "A", "on_hand": 10, "reserved": 7, "available": 3, "sold": 0,
                    "version": 3}])
        );
        let cleared = data(&events[5][1]);
        assert_eq!(cleared["low_stock_threshold"], 3);
        assert_eq!(cleared["products"][0]["available"], 4);
    }

    /// A change of threshold alone: set or raised to `available` or above makes the
    /// product low; lowered below `available`, or cleared, ends it; a change that leaves
    /// it on the same side gives nothing.
    #[test]
    fn changing_the_threshold_gives_low_and_low_cleared() {
        let records = [
            created("A", 5),
            threshold("A", Some(4)), // 5 > 4: not low
            threshold("A", Some(5)), // raised to 5: low
            threshold("A", Some(9)), // raised, still low
            threshold("A", Some(4)), // lowered below 5: cleared
            threshold("A", Some(6)), // low
            threshold("A", None),    // cleared by clearing it
            threshold("A", None),    // nothing to clear
            threshold("A", Some(0)), // 5 > 0
            Record::ProductPatched {
                sku: "A".into(),
                name: Some("renamed".into()),
                price: None,
                rules: Default::default(),
                low_stock_threshold: None,
                at: 16,
                by: None,
            }, // threshold kept
            threshold("A", Some(5)), // low
        ];
        assert_eq!(
            kinds_after(1, &records),
            vec![
                vec!["product.updated"],
                vec!["product.updated", "stock.low"],
                vec!["product.updated"],
                vec!["product.updated", "stock.low_cleared"],
                vec!["product.updated", "stock.low"],
                vec!["product.updated", "stock.low_cleared"],
                vec!["product.updated"],
                vec!["product.updated"],
                vec!["product.updated"],
                vec!["product.updated", "stock.low"],
            ]
        );
        let (state, events) = run(&records);
        assert_eq!(state.products["A"].low_stock_threshold(), Some(5));
        assert_eq!(data(&events[2][0])["low_stock_threshold"], 5);
        assert_eq!(data(&events[2][1])["low_stock_threshold"], 5);
        assert_eq!(
            data(&events[6][1])["low_stock_threshold"],
            Value::Null,
            "cleared by clearing the threshold: null"
        );
        assert_eq!(data(&events[6][0])["low_stock_threshold"], Value::Null);
        assert_eq!(data(&events[9][0])["low_stock_threshold"], 0);
    }

    /// One change that makes a product both low and sold out gives `stock.low` then
    /// `stock.sold_out`; one that takes it out of both, `stock.back_in_stock` then
    /// `stock.low_cleared`; each product's after the record's own event, products in the
    /// record's order.
    #[test]
    fn low_and_sold_out_together_come_in_a_fixed_order() {
        let records = [
            created_with_threshold("A", 5, 2),
            created_with_threshold("B", 3, 0),
            created("C", 1),
            reserve(1, &[("A", 5), ("B", 3), ("C", 1)]),
            cancel(1),
        ];
        let (_, events) = run(&records);
        let described: Vec<(&str, String)> = events[3]
            .iter()
            .map(|e| (e.kind.as_str(), e.subject.clone()))
            .collect();
        assert_eq!(
            described,
            vec![
                ("reservation.created", Uuid::from_u128(1).to_string()),
                ("stock.low", "A".into()),
                ("stock.sold_out", "A".into()),
                ("stock.low", "B".into()),
                ("stock.sold_out", "B".into()),
                ("stock.sold_out", "C".into()),
            ]
        );
        let ids: Vec<String> = events[3].iter().map(|e| e.position.id()).collect();
        assert_eq!(ids, ["4", "4.1", "4.2", "4.3", "4.4", "4.5"]);
        assert_eq!(
            kinds(&events[4]),
            vec![
                "reservation.cancelled",
                "stock.back_in_stock",
                "stock.low_cleared",
                "stock.back_in_stock",
                "stock.low_cleared",
                "stock.back_in_stock",
            ]
        );
    }

    /// A product created low is low from its first event; one created above its threshold
    /// is not; a deleted product gives no derived event.
    #[test]
    fn created_low_gives_low_and_deleted_gives_nothing_derived() {
        let records = [
            created_with_threshold("A", 2, 5),
            created_with_threshold("B", 6, 5),
            created_with_threshold("C", 0, 0),
            Record::ProductDeleted {
                sku: "A".into(),
                at: 50,
                by: None,
            },
        ];
        assert_eq!(
            kinds_after(0, &records),
            vec![
                vec!["product.created", "stock.low"],
                vec!["product.created"],
                vec!["product.created", "stock.low"],
                vec!["product.deleted"],
            ]
        );
        let (_, events) = run(&records);
        assert_eq!(data(&events[0][0])["low_stock_threshold"], 5);
        assert_eq!(data(&events[1][0])["low_stock_threshold"], 5);
        assert_eq!(data(&events[0][1])["products"][0]["available"], 2);
    }

    /// The feed's events of a log are the same whether it was folded in one run or
    /// stopped, its state written to a snapshot and read back, and folded on from there:
    /// the threshold is part of the state, so a restart derives exactly the same events.
    #[test]
    fn a_snapshot_between_two_records_changes_no_low_event() {
        let records = [
            created_with_threshold("A", 5, 2),
            reserve(1, &[("A", 3)]),
            threshold("A", Some(1)),
            threshold("A", Some(2)),
            cancel(1),
        ];
        let (_, whole) = run(&records);
        for cut in 1..records.len() {
            let mut state = State::default();
            for (i, r) in records[..cut].iter().enumerate() {
                project(&mut state, i as u64 + 1, r).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let info = crate::storage::snapshot::write(
                dir.path(),
                cut as u64,
                &state,
                0,
                Default::default(),
            )
            .unwrap();
            let (_, mut state) = crate::storage::snapshot::read(&info.path).unwrap();
            for (i, r) in records.iter().enumerate().skip(cut) {
                let seq = i as u64 + 1;
                assert_eq!(project(&mut state, seq, r).unwrap(), whole[i], "cut {cut}");
            }
        }
        let flat: Vec<&str> = whole.iter().flat_map(|e| kinds(e)).collect();
        assert_eq!(
            flat,
            [
                "product.created",
                "reservation.created",
                "stock.low",
                "product.updated",
                "stock.low_cleared",
                "product.updated",
                "stock.low",
                "reservation.cancelled",
                "stock.low_cleared",
            ]
        );
    }

    #[test]
    fn the_new_types_parse_and_are_listed() {
        for name in ["stock.low", "stock.low_cleared"] {
            let kind = Kind::parse(name).unwrap();
            assert_eq!(kind.as_str(), name);
            assert!(Kind::ALL.contains(&kind));
        }
    }

    #[test]
    fn deleting_and_patching_name_the_product() {
        let (_, events) = run(&[
            created("A", 1),
            Record::ProductPatched {
                sku: "A".into(),
                name: Some("new".into()),
                price: None,
                rules: Default::default(),
                low_stock_threshold: None,
                at: 11,
                by: None,
            },
            Record::ProductDeleted {
                sku: "A".into(),
                at: 12,
                by: None,
            },
        ]);
        assert_eq!(data(&events[1][0])["name"], "new");
        assert_eq!(events[2][0].kind, Kind::ProductDeleted);
        assert_eq!(events[2][0].subject, "A");
        assert_eq!(data(&events[2][0])["products"], json!([]));
    }

    #[test]
    fn pruning_keeps_only_what_later_records_need() {
        let id = Uuid::from_u128(3);
        let mut state = State::default();
        project(&mut state, 1, &created("A", 3)).unwrap();
        let r = reserve(3, &[("A", 1)]);
        project(&mut state, 2, &r).unwrap();
        prune(&mut state, &r);
        assert!(state.reservations.contains_key(&id), "pending is kept");
        let cancel = Record::ReservationCancelled {
            id,
            at: 5,
            by: None,
        };
        let events = project(&mut state, 3, &cancel).unwrap();
        assert_eq!(data(&events[0])["lines"][0]["sku"], "A");
        prune(&mut state, &cancel);
        assert!(state.reservations.is_empty());
    }

    #[test]
    fn ids_round_trip_and_json_has_the_cloudevents_attributes() {
        for id in ["7", "7.2"] {
            assert_eq!(Position::parse(id).unwrap().id(), id);
        }
        assert_eq!(Position::parse("x"), None);
        assert!(Position { seq: 7, index: 0 } < Position { seq: 7, index: 1 });
        let (_, events) = run(&[created("A", 1)]);
        let v: Value = serde_json::from_str(&events[0][0].to_json()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "1");
        assert_eq!(v["seq"], 1);
        assert_eq!(v["source"], "stockd");
        assert_eq!(v["type"], "product.created");
        assert_eq!(v["subject"], "A");
        assert_eq!(v["time"], "1970-01-01T00:00:00.010Z");
    }
}
