//! The change feed's events: what one log record means to a shop, in public terms.
//!
//! `events_of` is a pure function of a record, the figures of the products it touches
//! before it was applied (`Before`), and the state after it was applied with the one fold
//! (`storage::fold::apply`: invariant 4 in docs/ARCHITECTURE.md). It never interprets a
//! record a second way: every figure it reports is read from the folded state.
//!
//! A record gives zero or more events: its own (`product.created`, `reservation.confirmed`
//! ...), then the derived ones for each product it touched (`stock.sold_out` when the
//! product's `available` became 0, `stock.back_in_stock` when it left 0). Events share
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
}

impl Kind {
    pub const ALL: [Kind; 12] = [
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
    },
    /// `product.updated`: the product's fields after the change.
    Updated {
        name: String,
        price: Option<Price>,
        max_per_customer: Option<u64>,
        sale_starts_at: Option<Millis>,
        sale_ends_at: Option<Millis>,
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
    /// Derived events (`stock.sold_out`, `stock.back_in_stock`): nothing but the figures.
    None,
}

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        match &self.detail {
            Detail::Created { name, price } => {
                map.serialize_entry("name", name)?;
                map.serialize_entry("price", price)?;
            }
            Detail::Updated {
                name,
                price,
                max_per_customer,
                sale_starts_at,
                sale_ends_at,
            } => {
                map.serialize_entry("name", name)?;
                map.serialize_entry("price", price)?;
                map.serialize_entry("max_per_customer", max_per_customer)?;
                map.serialize_entry("sale_starts_at", &sale_starts_at.map(rfc3339))?;
                map.serialize_entry("sale_ends_at", &sale_ends_at.map(rfc3339))?;
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

/// `available` of each product a record touches, before it was applied (`None`: the
/// product did not exist). Taken by `Before::of` on the state the record applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Before {
    available: Vec<(String, Option<u64>)>,
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
        Record::Forgotten { .. } | Record::KeyCreated { .. } | Record::KeyRevoked { .. } => {}
    }
    skus
}

impl Before {
    /// The figures `events_of` needs from the state `record` is about to be applied to.
    pub fn of(record: &Record, state: &State) -> Before {
        let available = touched(record, state)
            .into_iter()
            .map(|sku| {
                let available = state.products.get(&sku).map(Product::available);
                (sku, available)
            })
            .collect();
        Before { available }
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
        .available
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
        Record::Forgotten { .. } | Record::KeyCreated { .. } | Record::KeyRevoked { .. } => {
            return Vec::new()
        }
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
    for (sku, was) in &before.available {
        let (Some(was), Some(p)) = (was, after.products.get(sku)) else {
            continue; // created or deleted by this record: no crossing to report
        };
        let derived = match (*was, p.available()) {
            (w, 0) if w > 0 => Kind::StockSoldOut,
            (0, n) if n > 0 => Kind::StockBackInStock,
            _ => continue,
        };
        let index = events.len() as u32;
        events.push(Event {
            position: Position { seq, index },
            kind: derived,
            time,
            subject: sku.clone(),
            data: Data {
                detail: Detail::None,
                by,
                products: vec![Figures::of(p)],
            },
        });
    }
    events
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
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use uuid::Uuid;

    fn data(event: &Event) -> Value {
        serde_json::to_value(&event.data).unwrap()
    }

    fn created(sku: &str, on_hand: u64) -> Record {
        Record::ProductCreated {
            sku: sku.into(),
            name: format!("n-{sku}"),
            price: None,
            on_hand,
            rules: Default::default(),
            at: 10,
            by: None,
        }
    }

    fn reserve(id: u128, lines: &[(&str, u64)]) -> Record {
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

    #[test]
    fn deleting_and_patching_name_the_product() {
        let (_, events) = run(&[
            created("A", 1),
            Record::ProductPatched {
                sku: "A".into(),
                name: Some("new".into()),
                price: None,
                rules: Default::default(),
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
