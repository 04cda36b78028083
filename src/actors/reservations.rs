//! The reservation book: every live and remembered reservation, the expiry deadlines, the
//! idempotency keys (remembered and in flight) and the counters, as plain data.
//!
//! No actor, log or clock in here: the supervisor owns one `Reservations`, calls it one
//! message at a time (so a confirm racing an expiry is decided by mailbox order and
//! exactly one wins), and carries out what it returns. A status change returns a
//! `Transition`: its record, to be queued to the log, and then the stock effect to send to
//! the products of its lines. The supervisor queues the record *before* it sends the
//! effect, so a record that frees units is in the log before any product can hand them
//! out again (invariant 3 in docs/ARCHITECTURE.md).
//!
//! Every operation on one reservation first expires it if its deadline has passed
//! (invariant 5 in docs/ARCHITECTURE.md: the deadline is authoritative), and that
//! expiry's transition comes first in the list the caller gets back.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{KeyId, Line, LineSet, Reservation, Status};
use crate::error::Error;
use crate::limits::FORGET_EVERY_MS;
use crate::storage::fold::{self, IdempotencyEntry};
use crate::storage::record::{IdempotencyKey, Record};

/// An `Idempotency-Key` with the fingerprint of the request that carries it.
pub type Idempotency = (IdempotencyKey, Vec<u8>);

/// What a status change does to the stock of each of its lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StockEffect {
    /// A registered reservation: units held for it become reserved.
    Settle,
    /// Cancelled or expired: reserved units return to stock.
    Release,
    /// Confirmed: reserved units are sold.
    Commit,
}

/// A change the book made: queue `record` to the log, then apply `stock` to every line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub record: Record,
    /// `None` for a change with no stock side (an extension).
    pub stock: Option<StockEffect>,
    pub lines: Vec<Line>,
    pub at: Millis,
    /// For a release: the customer whose purchase-limit counts get back the units of
    /// these lines (the ones counted when held).
    pub uncount: Option<(String, LineSet)>,
}

/// How to acknowledge an answer about a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// The change is the last transition returned: answer once its record is durable.
    Record,
    /// Nothing changed (a repeated confirm or cancel): answer once everything queued so
    /// far is durable, since the original change may still be in flight.
    Barrier,
}

/// What an idempotency key says about a new reservation request.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// No key, or a new one: go ahead (then `begin` it).
    Proceed,
    /// The key already created this reservation: answer it again.
    Replay(Reservation),
}

/// How many reservations were created, and ended each way, since the server started
/// (start-up expiries included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReservationEvents {
    pub created: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    pub expired: u64,
}

/// What retention forgot (see `Reservations::forget_if_due`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forgotten {
    /// To be queued to the log (nobody waits on it: if a crash loses it, the next one
    /// forgets the same and more).
    pub record: Record,
    pub reservations: usize,
    pub idempotency_keys: usize,
}

pub struct Reservations {
    /// Ordered maps, for the reasons given on `fold::State`.
    reservations: BTreeMap<Uuid, Reservation>,
    /// Deadlines of pending reservations. Extending pushes a new entry; a popped entry
    /// whose reservation is no longer pending, or whose deadline moved, is skipped.
    deadlines: BinaryHeap<Reverse<(Millis, Uuid)>>,
    idempotency: BTreeMap<IdempotencyKey, IdempotencyEntry>,
    /// Keys whose first request is still being served.
    in_flight: HashMap<IdempotencyKey, Vec<u8>>,
    pending: usize,
    events: ReservationEvents,
    /// How long ended reservations (after their deadline) and idempotency keys (after
    /// their reservation's creation) are remembered.
    retention_ms: i64,
    /// When ended reservations and old idempotency keys were last forgotten.
    forgotten_at: Millis,
}

impl Reservations {
    /// The book as recovery left it (`now`: the clock at start-up).
    pub fn new(
        reservations: BTreeMap<Uuid, Reservation>,
        idempotency: BTreeMap<IdempotencyKey, IdempotencyEntry>,
        retention_ms: i64,
        now: Millis,
    ) -> Reservations {
        let mut deadlines = BinaryHeap::new();
        let mut pending = 0;
        for r in reservations.values() {
            if r.status == Status::Pending {
                deadlines.push(Reverse((r.expires_at, r.id)));
                pending += 1;
            }
        }
        Reservations {
            reservations,
            deadlines,
            idempotency,
            in_flight: HashMap::new(),
            pending,
            events: ReservationEvents::default(),
            retention_ms,
            forgotten_at: now,
        }
    }

    /// Reservations remembered (pending and ended).
    pub fn len(&self) -> usize {
        self.reservations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn events(&self) -> ReservationEvents {
        self.events
    }

    /// What a new request's idempotency key allows: a key that created a reservation
    /// replays it (with the same body) or is refused (with another); a key whose first
    /// request is still being served is refused either way.
    pub fn check_key(&self, idempotency: Option<&Idempotency>) -> Result<KeyCheck, Error> {
        let Some((key, fingerprint)) = idempotency else {
            return Ok(KeyCheck::Proceed);
        };
        if let Some(entry) = self.idempotency.get(key) {
            if entry.fingerprint != *fingerprint {
                return Err(Error::IdempotencyKeyReused);
            }
            // Remembered (retention forgets a key no earlier than its reservation).
            let original = self
                .reservations
                .get(&entry.reservation_id)
                .ok_or_else(|| Error::Internal("remembered reservation is missing".into()))?;
            return Ok(KeyCheck::Replay(original.clone()));
        }
        match self.in_flight.get(key) {
            Some(f) if f == fingerprint => Err(Error::IdempotencyKeyInFlight),
            Some(_) => Err(Error::IdempotencyKeyReused),
            None => Ok(KeyCheck::Proceed),
        }
    }

    /// The request with this key is being served: a second one waits for its outcome.
    pub fn begin(&mut self, idempotency: Option<&Idempotency>) {
        if let Some((key, fingerprint)) = idempotency {
            self.in_flight.insert(key.clone(), fingerprint.clone());
        }
    }

    /// The request with this key failed: the key is free again.
    pub fn abort(&mut self, key: &IdempotencyKey) {
        self.in_flight.remove(key);
    }

    /// Keeps a reservation whose lines are all held: it is pending from `now` for `ttl_ms`
    /// (stamped here, once held, so the time its holds took neither shortens its TTL nor
    /// lets it be registered already expired). The transition settles the holds.
    /// `counted`: the lines whose holds were counted toward a purchase limit.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        id: Uuid,
        customer_id: String,
        items: Vec<Line>,
        counted: LineSet,
        ttl_ms: i64,
        idempotency: Option<Idempotency>,
        now: Millis,
        by: Option<KeyId>,
    ) -> (Reservation, Transition) {
        debug_assert!(!self.reservations.contains_key(&id), "a UUIDv7 is new");
        let mut reservation = Reservation::new(id, customer_id, items, now, now + ttl_ms);
        reservation.counted = counted;
        if let Some((key, fingerprint)) = &idempotency {
            self.in_flight.remove(key);
            self.idempotency.insert(
                key.clone(),
                IdempotencyEntry {
                    reservation_id: id,
                    fingerprint: fingerprint.clone(),
                    created_at: now,
                },
            );
        }
        // A take: it may be queued after the holds it records (invariant 3 allows it).
        let transition = Transition {
            record: Record::ReservationCreated {
                id,
                customer_id: reservation.customer_id.clone(),
                items: reservation.items.clone(),
                counted,
                created_at: now,
                expires_at: reservation.expires_at,
                idempotency,
                by,
            },
            stock: Some(StockEffect::Settle),
            lines: reservation.items.clone(),
            at: now,
            uncount: None,
        };
        self.deadlines.push(Reverse((reservation.expires_at, id)));
        self.pending += 1;
        self.events.created += 1;
        self.reservations.insert(id, reservation.clone());
        (reservation, transition)
    }

    /// The reservation as of `now` (expired first if its deadline has passed).
    pub fn get(
        &mut self,
        id: Uuid,
        now: Millis,
        out: &mut Vec<Transition>,
    ) -> Result<Reservation, Error> {
        self.expire_if_due(id, now, out);
        self.reservations
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// Sells a pending reservation's units. Confirming a confirmed one again answers it
    /// as it is.
    pub fn confirm(
        &mut self,
        id: Uuid,
        order_id: Option<String>,
        now: Millis,
        by: Option<KeyId>,
        out: &mut Vec<Transition>,
    ) -> Result<(Reservation, Ack), Error> {
        self.expire_if_due(id, now, out);
        let r = self
            .reservations
            .get_mut(&id)
            .ok_or_else(|| not_found(id))?;
        match r.status {
            Status::Pending => {}
            Status::Confirmed => return Ok((r.clone(), Ack::Barrier)),
            _ => return Err(ended(r)),
        }
        r.confirm(order_id.clone(), now);
        let view = r.clone();
        self.pending -= 1;
        self.events.confirmed += 1;
        out.push(Transition {
            record: Record::ReservationConfirmed {
                id,
                order_id,
                at: now,
                by,
            },
            stock: Some(StockEffect::Commit),
            lines: view.items.clone(),
            at: now,
            uncount: None,
        });
        Ok((view, Ack::Record))
    }

    /// Releases a pending reservation's units. Cancelling a cancelled one again answers it
    /// as it is.
    pub fn cancel(
        &mut self,
        id: Uuid,
        now: Millis,
        by: Option<KeyId>,
        out: &mut Vec<Transition>,
    ) -> Result<(Reservation, Ack), Error> {
        self.expire_if_due(id, now, out);
        let r = self.reservations.get(&id).ok_or_else(|| not_found(id))?;
        match r.status {
            Status::Pending => {
                out.push(self.end_pending(id, Some(by), now));
                Ok((self.reservations[&id].clone(), Ack::Record))
            }
            Status::Cancelled => Ok((r.clone(), Ack::Barrier)),
            _ => Err(ended(r)),
        }
    }

    /// Moves a pending reservation's deadline to `now + ttl_ms`.
    pub fn extend(
        &mut self,
        id: Uuid,
        ttl_ms: i64,
        now: Millis,
        by: Option<KeyId>,
        out: &mut Vec<Transition>,
    ) -> Result<(Reservation, Ack), Error> {
        self.expire_if_due(id, now, out);
        let r = self
            .reservations
            .get_mut(&id)
            .ok_or_else(|| not_found(id))?;
        if r.status != Status::Pending {
            return Err(ended(r));
        }
        let expires_at = now + ttl_ms;
        r.extend(expires_at);
        let view = r.clone();
        self.deadlines.push(Reverse((expires_at, id)));
        out.push(Transition {
            record: Record::ReservationExtended {
                id,
                expires_at,
                at: now,
                by,
            },
            stock: None,
            lines: Vec::new(),
            at: now,
            uncount: None,
        });
        Ok((view, Ack::Record))
    }

    /// Expires up to `max` reservations whose deadline is at or before `now`, oldest
    /// deadline first; returns true if more are due (the caller comes back for them, so
    /// that a restart after a long outage never holds its mailbox for one long message).
    pub fn expire_due(&mut self, now: Millis, max: usize, out: &mut Vec<Transition>) -> bool {
        let mut expired = 0;
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                return false;
            }
            if expired == max {
                return true;
            }
            self.deadlines.pop();
            // Nobody waits on these records: a crash before they are flushed is repaired
            // by the start-up expiry, since the deadline has passed either way.
            if self.expire_if_due(id, now, out) {
                expired += 1;
            }
        }
        false
    }

    /// Retention: once an hour (or ten times per retention period if that is shorter),
    /// forgets the same reservations and keys the fold will (`fold::forget`), so memory,
    /// snapshots and recovery agree.
    pub fn forget_if_due(&mut self, now: Millis) -> Option<Forgotten> {
        if now - self.forgotten_at < FORGET_EVERY_MS.min(self.retention_ms / 10) {
            return None;
        }
        self.forgotten_at = now;
        let before = now - self.retention_ms;
        let (reservations, keys) = (self.reservations.len(), self.idempotency.len());
        fold::forget(&mut self.reservations, &mut self.idempotency, before);
        Some(Forgotten {
            record: Record::Forgotten { before, at: now },
            reservations: reservations - self.reservations.len(),
            idempotency_keys: keys - self.idempotency.len(),
        })
    }

    /// Expires `id` if it is pending and its deadline has passed; true if it did.
    fn expire_if_due(&mut self, id: Uuid, now: Millis, out: &mut Vec<Transition>) -> bool {
        if !self.reservations.get(&id).is_some_and(|r| r.is_due(now)) {
            return false;
        }
        out.push(self.end_pending(id, None, now));
        true
    }

    /// Ends a pending reservation without a sale: cancelled by `cancelled_by` (the key, if
    /// any), or expired when that is `None`.
    fn end_pending(
        &mut self,
        id: Uuid,
        cancelled_by: Option<Option<KeyId>>,
        at: Millis,
    ) -> Transition {
        let r = self
            .reservations
            .get_mut(&id)
            .expect("ending a reservation that is kept");
        debug_assert_eq!(r.status, Status::Pending);
        let record = match cancelled_by {
            None => {
                r.expire();
                self.events.expired += 1;
                Record::ReservationExpired { id, at }
            }
            Some(by) => {
                r.cancel();
                self.events.cancelled += 1;
                Record::ReservationCancelled { id, at, by }
            }
        };
        self.pending -= 1;
        Transition {
            record,
            stock: Some(StockEffect::Release),
            lines: r.items.clone(),
            at,
            uncount: (!r.counted.is_empty()).then(|| (r.customer_id.clone(), r.counted)),
        }
    }
}

/// Why a reservation that has ended cannot change.
fn ended(r: &Reservation) -> Error {
    let id = r.id;
    match r.status {
        Status::Confirmed => Error::ReservationConfirmed { id },
        Status::Cancelled => Error::ReservationCancelled { id },
        Status::Expired => Error::ReservationExpired { id },
        Status::Pending => Error::Internal(format!("reservation {id} has not ended")),
    }
}

fn not_found(id: Uuid) -> Error {
    Error::ReservationNotFound { id: id.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 10_000;
    const RETENTION: i64 = 24 * 60 * 60 * 1000;

    fn book() -> Reservations {
        Reservations::new(BTreeMap::new(), BTreeMap::new(), RETENTION, 0)
    }

    fn lines() -> Vec<Line> {
        vec![
            Line {
                sku: "A".into(),
                quantity: 2,
            },
            Line {
                sku: "B".into(),
                quantity: 1,
            },
        ]
    }

    fn key(k: &str, fingerprint: &[u8]) -> Idempotency {
        (
            IdempotencyKey {
                customer_id: "c".into(),
                key: k.into(),
            },
            fingerprint.to_vec(),
        )
    }

    /// Registers a reservation at `now` with `TTL`; returns its id.
    fn reserve(book: &mut Reservations, now: Millis, idempotency: Option<Idempotency>) -> Uuid {
        let id = Uuid::now_v7();
        let (r, created) = book.register(
            id,
            "c".into(),
            lines(),
            LineSet::EMPTY,
            TTL,
            idempotency,
            now,
            None,
        );
        assert_eq!(r.status, Status::Pending);
        assert_eq!(created.stock, Some(StockEffect::Settle));
        assert_eq!(created.lines, lines());
        assert!(matches!(created.record, Record::ReservationCreated { .. }));
        id
    }

    fn kinds(out: &[Transition]) -> Vec<(&'static str, Option<StockEffect>)> {
        out.iter().map(|t| (t.record.kind(), t.stock)).collect()
    }

    #[test]
    fn a_reservation_is_pending_until_its_deadline() {
        let mut book = book();
        let id = reserve(&mut book, 1_000, None);
        let mut out = Vec::new();
        let r = book.get(id, 1_000 + TTL - 1, &mut out).unwrap();
        assert_eq!((r.status, r.expires_at), (Status::Pending, 1_000 + TTL));
        assert!(out.is_empty());
        assert_eq!(
            (book.len(), book.pending(), book.events().created),
            (1, 1, 1)
        );
        // At the deadline it is expired for every purpose, a read included.
        let r = book.get(id, 1_000 + TTL, &mut out).unwrap();
        assert_eq!(r.status, Status::Expired);
        assert_eq!(
            kinds(&out),
            [("ReservationExpired", Some(StockEffect::Release))]
        );
        assert_eq!(out[0].lines, lines());
        assert_eq!((book.pending(), book.events().expired), (0, 1));
    }

    #[test]
    fn confirm_sells_once_and_repeats_answer_as_it_is() {
        let mut book = book();
        let id = reserve(&mut book, 0, None);
        let mut out = Vec::new();
        let (r, ack) = book
            .confirm(id, Some("o-1".into()), 5, None, &mut out)
            .unwrap();
        assert_eq!((r.status, ack), (Status::Confirmed, Ack::Record));
        assert_eq!(r.order_id.as_deref(), Some("o-1"));
        assert_eq!(
            kinds(&out),
            [("ReservationConfirmed", Some(StockEffect::Commit))]
        );
        out.clear();
        let (r, ack) = book
            .confirm(id, Some("o-2".into()), 6, None, &mut out)
            .unwrap();
        assert_eq!((r.order_id.as_deref(), ack), (Some("o-1"), Ack::Barrier));
        assert!(out.is_empty(), "a repeated confirm changes nothing");
        // Past the deadline, a confirmed reservation stays confirmed.
        assert_eq!(
            book.cancel(id, TTL * 2, None, &mut out),
            Err(Error::ReservationConfirmed { id })
        );
        assert_eq!(
            book.extend(id, TTL, TTL * 2, None, &mut out),
            Err(Error::ReservationConfirmed { id })
        );
        assert!(out.is_empty());
        assert!(!book.expire_due(TTL * 3, usize::MAX, &mut out));
        assert!(out.is_empty(), "a confirmed reservation never expires");
        assert_eq!(book.events().confirmed, 1);
        assert_eq!(book.pending(), 0);
    }

    #[test]
    fn a_confirm_that_arrives_after_the_deadline_loses_to_the_expiry() {
        let mut book = book();
        let id = reserve(&mut book, 0, None);
        let mut out = Vec::new();
        // The deadline has passed but its tick has not run yet: the confirm expires it.
        assert_eq!(
            book.confirm(id, None, TTL, None, &mut out),
            Err(Error::ReservationExpired { id })
        );
        assert_eq!(
            kinds(&out),
            [("ReservationExpired", Some(StockEffect::Release))]
        );
        // The units return exactly once: neither a second confirm nor the tick frees
        // them again.
        out.clear();
        assert_eq!(
            book.confirm(id, None, TTL + 1, None, &mut out),
            Err(Error::ReservationExpired { id })
        );
        assert!(!book.expire_due(TTL + 2, usize::MAX, &mut out));
        assert_eq!(
            book.cancel(id, TTL + 3, None, &mut out),
            Err(Error::ReservationExpired { id })
        );
        assert!(out.is_empty());
        assert_eq!((book.events().expired, book.events().confirmed), (1, 0));
    }

    #[test]
    fn a_cancelled_reservation_is_released_once_and_never_expires() {
        let mut book = book();
        let id = reserve(&mut book, 0, None);
        let mut out = Vec::new();
        let (r, ack) = book.cancel(id, 1, None, &mut out).unwrap();
        assert_eq!((r.status, ack), (Status::Cancelled, Ack::Record));
        assert_eq!(
            kinds(&out),
            [("ReservationCancelled", Some(StockEffect::Release))]
        );
        out.clear();
        let (_, ack) = book.cancel(id, 2, None, &mut out).unwrap();
        assert_eq!(ack, Ack::Barrier);
        assert_eq!(
            book.confirm(id, None, 3, None, &mut out),
            Err(Error::ReservationCancelled { id })
        );
        assert!(!book.expire_due(TTL * 2, usize::MAX, &mut out));
        assert!(out.is_empty());
        assert_eq!((book.events().cancelled, book.events().expired), (1, 0));
    }

    #[test]
    fn an_extended_reservation_expires_at_its_new_deadline_only() {
        let mut book = book();
        let id = reserve(&mut book, 0, None);
        let mut out = Vec::new();
        let (r, ack) = book.extend(id, 3 * TTL, TTL - 1, None, &mut out).unwrap();
        assert_eq!((r.expires_at, r.original_expires_at), (4 * TTL - 1, TTL));
        assert_eq!(ack, Ack::Record);
        assert_eq!(kinds(&out), [("ReservationExtended", None)]);
        out.clear();
        // The old deadline's heap entry is skipped.
        assert!(!book.expire_due(TTL, usize::MAX, &mut out));
        assert!(out.is_empty());
        assert!(!book.expire_due(4 * TTL - 1, usize::MAX, &mut out));
        assert_eq!(
            kinds(&out),
            [("ReservationExpired", Some(StockEffect::Release))]
        );
        // Extending after the deadline is too late.
        out.clear();
        let late = reserve(&mut book, 0, None);
        assert_eq!(
            book.extend(late, TTL, TTL, None, &mut out),
            Err(Error::ReservationExpired { id: late })
        );
        assert_eq!(
            kinds(&out),
            [("ReservationExpired", Some(StockEffect::Release))]
        );
    }

    #[test]
    fn expiries_per_call_are_bounded_and_every_due_one_expires_exactly_once() {
        let mut book = book();
        let ids: Vec<Uuid> = (0..2_500).map(|i| reserve(&mut book, i, None)).collect();
        let not_due = reserve(&mut book, 10 * TTL, None);
        let mut out = Vec::new();
        let mut calls = 0;
        loop {
            calls += 1;
            let before = out.len();
            let more = book.expire_due(5 * TTL, 1_000, &mut out);
            assert!(out.len() - before <= 1_000);
            if !more {
                break;
            }
        }
        assert_eq!(calls, 3);
        let mut expired: Vec<Uuid> = out
            .iter()
            .map(|t| match t.record {
                Record::ReservationExpired { id, .. } => id,
                ref other => panic!("unexpected {other:?}"),
            })
            .collect();
        // Oldest deadline first.
        assert_eq!(expired, ids);
        expired.sort();
        expired.dedup();
        assert_eq!(expired.len(), ids.len());
        assert_eq!(book.pending(), 1);
        let mut rest = Vec::new();
        assert_eq!(
            book.get(not_due, 5 * TTL, &mut rest).unwrap().status,
            Status::Pending
        );
    }

    #[test]
    fn an_idempotency_key_replays_its_reservation_and_refuses_another_body() {
        let mut book = book();
        let first = key("k", b"body-1");
        assert_eq!(book.check_key(None), Ok(KeyCheck::Proceed));
        assert_eq!(book.check_key(Some(&first)), Ok(KeyCheck::Proceed));
        book.begin(Some(&first));
        // While the first request is being served.
        assert_eq!(
            book.check_key(Some(&first)),
            Err(Error::IdempotencyKeyInFlight)
        );
        assert_eq!(
            book.check_key(Some(&key("k", b"body-2"))),
            Err(Error::IdempotencyKeyReused)
        );
        let id = reserve(&mut book, 0, Some(first.clone()));
        match book.check_key(Some(&first)) {
            Ok(KeyCheck::Replay(original)) => assert_eq!(original.id, id),
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(
            book.check_key(Some(&key("k", b"body-2"))),
            Err(Error::IdempotencyKeyReused)
        );
        // A replay after the reservation ended still answers the original.
        let mut out = Vec::new();
        book.cancel(id, 1, None, &mut out).unwrap();
        assert!(matches!(book.check_key(Some(&first)), Ok(KeyCheck::Replay(r)) if r.id == id));
    }

    #[test]
    fn an_aborted_key_is_free_again() {
        let mut book = book();
        let k = key("k", b"body");
        book.begin(Some(&k));
        book.abort(&k.0);
        assert_eq!(book.check_key(Some(&k)), Ok(KeyCheck::Proceed));
        assert_eq!(
            book.check_key(Some(&key("k", b"other"))),
            Ok(KeyCheck::Proceed)
        );
    }

    #[test]
    fn retention_forgets_ended_reservations_and_their_keys_but_never_pending_ones() {
        let retention = 100 * TTL;
        let mut book = Reservations::new(BTreeMap::new(), BTreeMap::new(), retention, 0);
        let k = key("k", b"body");
        let ended = reserve(&mut book, 0, Some(k.clone()));
        let mut out = Vec::new();
        book.cancel(ended, 1, None, &mut out).unwrap();
        // A reservation extended far past the retention period stays, key and all.
        let long = reserve(&mut book, 0, Some(key("long", b"body")));
        book.extend(long, 1_000 * TTL, 1, None, &mut out).unwrap();
        // Not before a tenth of the retention period (it is shorter than an hour).
        assert_eq!(book.forget_if_due(retention / 10 - 1), None);
        assert_eq!(book.len(), 2);
        // Just past retention after the deadline.
        let now = TTL + retention + 1;
        let forgotten = book.forget_if_due(now).unwrap();
        assert_eq!(
            forgotten.record,
            Record::Forgotten {
                before: now - retention,
                at: now
            }
        );
        assert_eq!((forgotten.reservations, forgotten.idempotency_keys), (1, 1));
        assert!(matches!(
            book.get(ended, now, &mut out),
            Err(Error::ReservationNotFound { .. })
        ));
        assert_eq!(
            book.get(long, now, &mut out).unwrap().status,
            Status::Pending
        );
        assert_eq!(book.check_key(Some(&k)), Ok(KeyCheck::Proceed));
        assert!(matches!(
            book.check_key(Some(&key("long", b"body"))),
            Ok(KeyCheck::Replay(r)) if r.id == long
        ));
        // And not again until the interval has passed once more.
        assert_eq!(book.forget_if_due(now + retention / 10 - 1), None);
    }

    #[test]
    fn recovered_pending_reservations_get_their_deadlines_back() {
        let mut reservations = BTreeMap::new();
        let pending = Reservation::new(Uuid::now_v7(), "c".into(), lines(), 0, TTL);
        let mut confirmed = Reservation::new(Uuid::now_v7(), "c".into(), lines(), 0, TTL);
        confirmed.confirm(None, 1);
        for r in [&pending, &confirmed] {
            reservations.insert(r.id, r.clone());
        }
        let mut book = Reservations::new(reservations, BTreeMap::new(), RETENTION, 0);
        assert_eq!((book.len(), book.pending()), (2, 1));
        let mut out = Vec::new();
        assert!(!book.expire_due(TTL, usize::MAX, &mut out));
        assert_eq!(
            out.iter().map(|t| t.record.clone()).collect::<Vec<_>>(),
            [Record::ReservationExpired {
                id: pending.id,
                at: TTL
            }]
        );
    }
}
