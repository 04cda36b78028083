//! A webhook endpoint's registration, as plain data: kept in `<data>/webhooks/` by a
//! single server (`webhooks::store`), and in the replicated state by a cluster
//! (`storage::fold::State::webhooks`, folded from `Record::WebhookSaved`,
//! `Record::WebhookRemoved` and `Record::WebhookPositions`), so that a new leader delivers
//! from where the old one stopped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why an endpoint is disabled.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disabled {
    /// Unix milliseconds.
    pub at: i64,
    /// `failing` (gave up after the retry period) or `events_gone` (its position fell
    /// behind the feed's retention).
    pub reason: String,
    pub detail: String,
}

/// One endpoint's registration, as a single server's `endpoints.json` or a cluster's state keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    pub id: Uuid,
    pub url: String,
    /// Event types (`None`: every type).
    pub types: Option<Vec<String>>,
    /// SKUs (`None`: every SKU).
    pub skus: Option<Vec<String>>,
    /// `whsec_` + base64 of the key's bytes.
    pub secret: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The log record the endpoint started after: it gets the events of later records.
    pub started_after_seq: u64,
    /// Unix milliseconds of the first failed attempt of the current streak (`None`: the
    /// last attempt succeeded, or none failed).
    pub failing_since: Option<i64>,
    pub disabled: Option<Disabled>,
}

/// A cluster's webhooks, as its replicated state holds them: every endpoint, and the
/// position each had reached when its leader last recorded it (the feed's `(seq, index)`:
/// the last event acknowledged, or passed over by the filters).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookBook {
    pub endpoints: Vec<Registration>,
    pub positions: BTreeMap<Uuid, (u64, u32)>,
}

impl WebhookBook {
    /// Registers an endpoint, or replaces the one of the same id (in its place: the
    /// endpoints stay in the order they were registered).
    pub fn save(&mut self, registration: Registration) {
        match self.endpoints.iter_mut().find(|e| e.id == registration.id) {
            Some(kept) => *kept = registration,
            None => self.endpoints.push(registration),
        }
    }

    /// Removes an endpoint and its position (nothing if it is not registered).
    pub fn remove(&mut self, id: Uuid) {
        self.endpoints.retain(|e| e.id != id);
        self.positions.remove(&id);
    }

    /// Moves the positions of registered endpoints (others are ignored: an endpoint
    /// deleted after its position was sent).
    pub fn record(&mut self, positions: &[(Uuid, u64, u32)]) {
        for (id, seq, index) in positions {
            if self.endpoints.iter().any(|e| e.id == *id) {
                self.positions.insert(*id, (*seq, *index));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn registration(n: u128) -> Registration {
        Registration {
            id: Uuid::from_u128(n),
            url: format!("https://shop.example/{n}"),
            types: None,
            skus: None,
            secret: "whsec_a2V5".into(),
            created_at: 1,
            started_after_seq: 0,
            failing_since: None,
            disabled: None,
        }
    }

    /// Positions are kept only for registered endpoints, and a removal forgets them.
    #[test]
    fn positions_follow_the_registrations() {
        let mut book = WebhookBook::default();
        book.save(registration(1));
        book.save(registration(2));
        book.record(&[(Uuid::from_u128(1), 5, 0), (Uuid::from_u128(3), 9, 0)]);
        assert_eq!(
            book.positions.keys().copied().collect::<Vec<_>>(),
            vec![Uuid::from_u128(1)],
            "an endpoint that is not registered gets no position"
        );
        book.record(&[(Uuid::from_u128(1), 7, 2)]);
        assert_eq!(book.positions[&Uuid::from_u128(1)], (7, 2));
        let mut failing = registration(1);
        failing.failing_since = Some(9);
        book.save(failing.clone());
        assert_eq!(
            book.endpoints,
            vec![failing, registration(2)],
            "replaced in its place"
        );
        assert_eq!(
            book.positions[&Uuid::from_u128(1)],
            (7, 2),
            "its position kept"
        );
        book.remove(Uuid::from_u128(1));
        assert!(book.positions.is_empty());
        assert_eq!(book.endpoints, vec![registration(2)]);
    }
}
