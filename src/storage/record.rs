//! Log records, and the one codec that turns them into bytes and back.
//!
//! Layout of a stored record: `[format version: u8][crc32 of payload: u32 LE][payload]`,
//! where the payload is bincode 2 (standard config) of `Record`. The version byte lets
//! formats live side by side: records of version 1 (written before sale rules and API
//! keys) and of version 2 (before the low-stock threshold) are still read, through
//! `storage::legacy`, and become today's records with no rules, no counted lines and no
//! key (version 1), and no threshold (versions 1 and 2). The checksum catches a damaged
//! record on read.
//!
//! Format 3 added the low-stock threshold to `ProductCreated` and `ProductPatched`. It is
//! a new format version, with version 2 copied into `storage::legacy::RecordV2`, rather
//! than two variants appended to this enum (which old version-2 bytes would still decode
//! as, with no copy): appended variants would keep two shapes of the same change in the
//! enum every part of the server matches on (the fold, the feed's events, the log dump,
//! the supervisor), for ever, each match handling an old variant no writer emits. With a
//! new version, the old shapes live only in `legacy`, are turned into today's at decode,
//! and everything past the codec knows one shape per change.
//!
//! Format 4 is format 3 with three kinds appended, `WebhookSaved`, `WebhookRemoved` and
//! `WebhookPositions` (a cluster's webhooks). No shape changed, so format-3 bytes decode as format 4 does.
//! Only those three kinds are written as format 4; every other record is still written as
//! format 3, so that a server taken back to a build before them reads its log unless it
//! holds a cluster's webhook records (which that build refuses by their version, rather
//! than misread).
//! The log stores these bytes unchanged, one record a key or framed in batches
//! (`storage::log`, whose batch values start with a byte of 0x80 or more: record format
//! versions stay below 0x80).
//! `bincode` 3.0.0 on crates.io is a tombstone, so 2.0.1 is pinned and used only here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{ApiKey, KeyId, Line, LineSet, Price, Registration, RulesPatch, SaleRules};
use crate::storage::legacy;

/// The newest record format (below 0x80: the log tells a batch of records from a single
/// one by that bit), written only into the three webhook kinds it added (`WebhookSaved`,
/// `WebhookRemoved`, `WebhookPositions`); every other record is written as format 3
/// (`RECORD_FORMAT_V3`), so an older build reads a log without them. Versions 1 and 2 are
/// still read (`storage::legacy`).
pub const RECORD_FORMAT_VERSION: u8 = 4;
/// The format version of every record but the three kinds format 4 added.
pub const RECORD_FORMAT_V3: u8 = 3;
const HEADER_BYTES: usize = 5;

/// An idempotency key remembered with the reservation it created.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey {
    pub customer_id: String,
    pub key: String,
}

/// One acknowledged change. Every 2xx mutation produces exactly one record.
///
/// `by` names the API key that made a change (`None`: the server ran open, or the record
/// was written before keys existed). Changes the server makes itself (expiries,
/// retention) have no `by`.
///
/// The encoding is positional: never reorder, remove or change a variant or field of a
/// format that has been written. A new shape is a new format version, with the old one
/// kept readable in `storage::legacy` (this is format 3; `legacy::RecordV2` is format 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    ProductCreated {
        sku: String,
        name: String,
        price: Option<Price>,
        on_hand: u64,
        rules: SaleRules,
        /// Format 3.
        low_stock_threshold: Option<u64>,
        at: Millis,
        by: Option<KeyId>,
    },
    ProductPatched {
        sku: String,
        name: Option<String>,
        /// `Some(None)` clears the price.
        price: Option<Option<Price>>,
        rules: RulesPatch,
        /// Format 3. `None` keeps the threshold, `Some(None)` clears it.
        low_stock_threshold: Option<Option<u64>>,
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
        /// The lines counted toward their product's purchase limit.
        counted: LineSet,
        created_at: Millis,
        expires_at: Millis,
        /// The key and the request fingerprint, when the request carried `Idempotency-Key`.
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
    /// Retention: forget ended reservations whose deadline was before `before`, and
    /// idempotency keys created before it (`fold::forget`). Logged by the supervisor from
    /// time to time, so memory, snapshots and recovery agree on what is remembered.
    Forgotten {
        before: Millis,
        at: Millis,
    },
    /// An API key was created (only the hash of its secret is kept).
    KeyCreated {
        key: ApiKey,
        by: Option<KeyId>,
    },
    /// An API key was revoked.
    KeyRevoked {
        id: KeyId,
        at: Millis,
        by: Option<KeyId>,
    },
    /// A cluster's webhook endpoint, registered or with its state changed (failing,
    /// disabled, enabled): it replaces the endpoint of that id, if any. Only a cluster's
    /// leader writes it: a single server keeps its webhooks in files of its own. Format 4.
    WebhookSaved {
        registration: Registration,
        at: Millis,
    },
    /// A cluster's webhook endpoint removed (with its position). Format 4.
    WebhookRemoved {
        id: Uuid,
        at: Millis,
    },
    /// How far a cluster's webhook endpoints had delivered, `(id, seq, index)` (the feed
    /// position of the last event acknowledged, or passed over by the filters): written by
    /// the leader about once a second while it delivers. Format 4.
    WebhookPositions {
        positions: Vec<(Uuid, u64, u32)>,
        at: Millis,
    },
}

impl Record {
    /// When the change was decided (a reservation's `created_at`, a key's `created_at`):
    /// a new leader's clock never runs behind the newest one folded
    /// (`storage::entry::RaftMeta::clock_floor`).
    pub fn at(&self) -> Millis {
        match self {
            Record::ProductCreated { at, .. }
            | Record::ProductPatched { at, .. }
            | Record::Replenished { at, .. }
            | Record::Adjusted { at, .. }
            | Record::ProductDeleted { at, .. }
            | Record::ReservationConfirmed { at, .. }
            | Record::ReservationCancelled { at, .. }
            | Record::ReservationExpired { at, .. }
            | Record::ReservationExtended { at, .. }
            | Record::Forgotten { at, .. }
            | Record::KeyRevoked { at, .. }
            | Record::WebhookSaved { at, .. }
            | Record::WebhookRemoved { at, .. }
            | Record::WebhookPositions { at, .. } => *at,
            Record::ReservationCreated { created_at, .. } => *created_at,
            Record::KeyCreated { key, .. } => key.created_at,
        }
    }

    /// The record's kind, as operators see it in `stockd log dump`.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::ProductCreated { .. } => "ProductCreated",
            Record::ProductPatched { .. } => "ProductPatched",
            Record::Replenished { .. } => "Replenished",
            Record::Adjusted { .. } => "Adjusted",
            Record::ProductDeleted { .. } => "ProductDeleted",
            Record::ReservationCreated { .. } => "ReservationCreated",
            Record::ReservationConfirmed { .. } => "ReservationConfirmed",
            Record::ReservationCancelled { .. } => "ReservationCancelled",
            Record::ReservationExpired { .. } => "ReservationExpired",
            Record::ReservationExtended { .. } => "ReservationExtended",
            Record::Forgotten { .. } => "Forgotten",
            Record::KeyCreated { .. } => "KeyCreated",
            Record::KeyRevoked { .. } => "KeyRevoked",
            Record::WebhookSaved { .. } => "WebhookSaved",
            Record::WebhookRemoved { .. } => "WebhookRemoved",
            Record::WebhookPositions { .. } => "WebhookPositions",
        }
    }

    /// The format version the record is written in: format 4 for the kinds it added,
    /// format 3 for every other (the module's documentation).
    pub fn format_version(&self) -> u8 {
        match self {
            Record::WebhookSaved { .. }
            | Record::WebhookRemoved { .. }
            | Record::WebhookPositions { .. } => RECORD_FORMAT_VERSION,
            _ => RECORD_FORMAT_V3,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("checksum mismatch")]
    Checksum,
    #[error("undecodable payload: {0}")]
    Payload(String),
    /// The log's batch framing around the record is damaged (`storage::log`).
    #[error("damaged batch framing: {0}")]
    Framing(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a record with its version byte and checksum.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(record, &mut out);
    out
}

/// Appends the encoding of `record` (as `encode` makes it) to `out`: the log's writer
/// encodes a whole batch into one buffer this way.
pub fn encode_into(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[record.format_version(), 0, 0, 0, 0]);
    // Encoding plain data into a Vec cannot fail: no I/O, no size limit.
    bincode::serde::encode_into_std_write(record, &mut *out, config())
        .expect("encoding a record into memory cannot fail");
    let crc = crc32fast::hash(&out[start + HEADER_BYTES..]);
    out[start + 1..start + HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes and verifies a record written by `encode`.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    if bytes.len() < HEADER_BYTES {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    let version = bytes[0];
    if ![
        RECORD_FORMAT_VERSION,
        RECORD_FORMAT_V3,
        legacy::RECORD_V2,
        legacy::RECORD_V1,
    ]
    .contains(&version)
    {
        return Err(DecodeError::UnknownVersion(version));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[HEADER_BYTES..];
    if crc32fast::hash(payload) != stored {
        return Err(DecodeError::Checksum);
    }
    match version {
        legacy::RECORD_V1 => decode_payload::<legacy::RecordV1>(payload).map(Record::from),
        legacy::RECORD_V2 => decode_payload::<legacy::RecordV2>(payload).map(Record::from),
        _ => decode_payload(payload),
    }
}

fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (record, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| DecodeError::Payload(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::Payload("trailing bytes".into()));
    }
    Ok(record)
}

/// Encodes a record in format version 1, as builds before version 2 wrote it: for tests
/// that prove old logs still read.
#[cfg(test)]
pub(crate) fn encode_v1(record: &legacy::RecordV1) -> Vec<u8> {
    encode_old(legacy::RECORD_V1, record)
}

/// Encodes a record in format version 2, as builds before version 3 wrote it: for tests
/// that prove old logs still read.
#[cfg(test)]
pub(crate) fn encode_v2(record: &legacy::RecordV2) -> Vec<u8> {
    encode_old(legacy::RECORD_V2, record)
}

#[cfg(test)]
fn encode_old(version: u8, record: &impl Serialize) -> Vec<u8> {
    let mut out = vec![version, 0, 0, 0, 0];
    bincode::serde::encode_into_std_write(record, &mut out, config()).expect("in memory");
    let crc = crc32fast::hash(&out[HEADER_BYTES..]);
    out[1..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The webhook records are format 4 and round-trip; every other kind is still
    /// written as format 3, and a format-3 record decodes as before.
    #[test]
    fn webhook_records_are_format_4_and_the_others_format_3() {
        let saved = Record::WebhookSaved {
            registration: crate::domain::webhook::tests::registration(1),
            at: 1,
        };
        let removed = Record::WebhookRemoved {
            id: Uuid::from_u128(1),
            at: 3,
        };
        let positions = Record::WebhookPositions {
            positions: vec![(Uuid::from_u128(1), 7, 0)],
            at: 2,
        };
        for record in [saved, removed, positions] {
            let bytes = encode(&record);
            assert_eq!(bytes[0], 4);
            assert_eq!(decode(&bytes).unwrap(), record);
        }
        let sample = sample();
        let bytes = encode(&sample);
        assert_eq!(bytes[0], 3);
        assert_eq!(decode(&bytes).unwrap(), sample);
    }

    fn sample() -> Record {
        Record::ReservationCreated {
            id: Uuid::now_v7(),
            customer_id: "user-1".into(),
            items: vec![Line {
                sku: "A".into(),
                quantity: 2,
            }],
            counted: LineSet::EMPTY,
            created_at: 1,
            expires_at: 2,
            by: None,
            idempotency: Some((
                IdempotencyKey {
                    customer_id: "user-1".into(),
                    key: "k".into(),
                },
                vec![1, 2, 3],
            )),
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(decode(&encode(&r)), Ok(r));
    }

    #[test]
    fn encoding_into_a_buffer_appends_what_encode_makes() {
        let record = sample();
        let mut out = vec![7u8; 3];
        encode_into(&record, &mut out);
        let first = encode(&record);
        encode_into(&record, &mut out);
        assert_eq!(&out[..3], &[7, 7, 7]);
        assert_eq!(&out[3..3 + first.len()], &first[..]);
        assert_eq!(&out[3 + first.len()..], &first[..]);
    }

    /// A record written by a build before format version 2 decodes into today's record,
    /// with no sale rules, no counted lines and no key.
    #[test]
    fn version_1_records_still_read() {
        let old = legacy::RecordV1::ProductCreated {
            sku: "A".into(),
            name: "a".into(),
            price: None,
            on_hand: 3,
            at: 9,
        };
        assert_eq!(
            decode(&encode_v1(&old)),
            Ok(Record::ProductCreated {
                sku: "A".into(),
                name: "a".into(),
                price: None,
                on_hand: 3,
                rules: SaleRules::default(),
                low_stock_threshold: None,
                at: 9,
                by: None,
            })
        );
        let id = Uuid::from_u128(5);
        let old = legacy::RecordV1::ReservationCancelled { id, at: 4 };
        assert_eq!(
            decode(&encode_v1(&old)),
            Ok(Record::ReservationCancelled {
                id,
                at: 4,
                by: None
            })
        );
        let mut damaged = encode_v1(&old);
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert_eq!(decode(&damaged), Err(DecodeError::Checksum));
    }

    /// Records written by builds before format version 3 (the low-stock threshold) decode
    /// into today's records, with no threshold and everything else as it was: every
    /// variant, with the bytes format 2 wrote.
    #[test]
    fn version_2_records_still_read() {
        use crate::domain::Scope;
        let rules = SaleRules {
            max_per_customer: Some(2),
            starts_at: Some(5),
            ends_at: None,
        };
        let patch = RulesPatch {
            max_per_customer: Some(None),
            starts_at: None,
            ends_at: Some(Some(9)),
        };
        let key = ApiKey {
            id: Uuid::from_u128(7),
            name: "ops".into(),
            scopes: vec![Scope::Stock, Scope::Read],
            secret_hash: [4; 32],
            created_at: 3,
        };
        let by = Some(Uuid::from_u128(8));
        let id = Uuid::from_u128(9);
        let mut counted = LineSet::EMPTY;
        counted.insert(1);
        let line = |sku: &str| Line {
            sku: sku.into(),
            quantity: 2,
        };
        let idempotency = Some((
            IdempotencyKey {
                customer_id: "c".into(),
                key: "k".into(),
            },
            vec![1, 2],
        ));
        use legacy::RecordV2 as V2;
        let cases = vec![
            (
                V2::ProductCreated {
                    sku: "A".into(),
                    name: "a".into(),
                    price: Some(Price {
                        amount_minor: 5,
                        currency: "EUR".into(),
                    }),
                    on_hand: 3,
                    rules,
                    at: 9,
                    by,
                },
                Record::ProductCreated {
                    sku: "A".into(),
                    name: "a".into(),
                    price: Some(Price {
                        amount_minor: 5,
                        currency: "EUR".into(),
                    }),
                    on_hand: 3,
                    rules,
                    low_stock_threshold: None,
                    at: 9,
                    by,
                },
            ),
            (
                V2::ProductPatched {
                    sku: "A".into(),
                    name: Some("b".into()),
                    price: Some(None),
                    rules: patch,
                    at: 10,
                    by,
                },
                Record::ProductPatched {
                    sku: "A".into(),
                    name: Some("b".into()),
                    price: Some(None),
                    rules: patch,
                    low_stock_threshold: None,
                    at: 10,
                    by,
                },
            ),
            (
                V2::Replenished {
                    sku: "A".into(),
                    quantity: 4,
                    at: 11,
                    by,
                },
                Record::Replenished {
                    sku: "A".into(),
                    quantity: 4,
                    at: 11,
                    by,
                },
            ),
            (
                V2::Adjusted {
                    sku: "A".into(),
                    delta: -2,
                    reason: Some("r".into()),
                    at: 12,
                    by,
                },
                Record::Adjusted {
                    sku: "A".into(),
                    delta: -2,
                    reason: Some("r".into()),
                    at: 12,
                    by,
                },
            ),
            (
                V2::ProductDeleted {
                    sku: "A".into(),
                    at: 13,
                    by,
                },
                Record::ProductDeleted {
                    sku: "A".into(),
                    at: 13,
                    by,
                },
            ),
            (
                V2::ReservationCreated {
                    id,
                    customer_id: "c".into(),
                    items: vec![line("A"), line("B")],
                    counted,
                    created_at: 14,
                    expires_at: 99,
                    idempotency: idempotency.clone(),
                    by,
                },
                Record::ReservationCreated {
                    id,
                    customer_id: "c".into(),
                    items: vec![line("A"), line("B")],
                    counted,
                    created_at: 14,
                    expires_at: 99,
                    idempotency,
                    by,
                },
            ),
            (
                V2::ReservationConfirmed {
                    id,
                    order_id: Some("o".into()),
                    at: 15,
                    by,
                },
                Record::ReservationConfirmed {
                    id,
                    order_id: Some("o".into()),
                    at: 15,
                    by,
                },
            ),
            (
                V2::ReservationCancelled { id, at: 16, by },
                Record::ReservationCancelled { id, at: 16, by },
            ),
            (
                V2::ReservationExpired { id, at: 17 },
                Record::ReservationExpired { id, at: 17 },
            ),
            (
                V2::ReservationExtended {
                    id,
                    expires_at: 200,
                    at: 18,
                    by,
                },
                Record::ReservationExtended {
                    id,
                    expires_at: 200,
                    at: 18,
                    by,
                },
            ),
            (
                V2::Forgotten { before: 1, at: 19 },
                Record::Forgotten { before: 1, at: 19 },
            ),
            (
                V2::KeyCreated {
                    key: key.clone(),
                    by,
                },
                Record::KeyCreated { key, by },
            ),
            (
                V2::KeyRevoked {
                    id: Uuid::from_u128(7),
                    at: 20,
                    by,
                },
                Record::KeyRevoked {
                    id: Uuid::from_u128(7),
                    at: 20,
                    by,
                },
            ),
        ];
        assert_eq!(cases.len(), 13, "every variant of format 2");
        for (old, new) in cases {
            let bytes = encode_v2(&old);
            assert_eq!(bytes[0], 2);
            assert_eq!(decode(&bytes), Ok(new.clone()), "{old:?}");
            // Today's encoding is another format: the same change, another version byte.
            assert_eq!(encode(&new)[0], RECORD_FORMAT_V3);
        }
        // The new fields round trip in format 3.
        let set = Record::ProductPatched {
            sku: "A".into(),
            name: None,
            price: None,
            rules: RulesPatch::default(),
            low_stock_threshold: Some(Some(0)),
            at: 1,
            by: None,
        };
        assert_eq!(decode(&encode(&set)), Ok(set));
        let cleared = Record::ProductPatched {
            sku: "A".into(),
            name: None,
            price: None,
            rules: RulesPatch::default(),
            low_stock_threshold: Some(None),
            at: 1,
            by: None,
        };
        assert_eq!(decode(&encode(&cleared)), Ok(cleared));
        // A damaged format-2 record is caught like any other.
        let mut damaged = encode_v2(&V2::Forgotten { before: 1, at: 2 });
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert_eq!(decode(&damaged), Err(DecodeError::Checksum));
    }

    #[test]
    fn detects_damage() {
        let mut bytes = encode(&sample());
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        assert_eq!(decode(&bytes), Err(DecodeError::Checksum));
        assert_eq!(decode(&bytes[..3]), Err(DecodeError::Truncated(3)));
        let mut other = encode(&sample());
        other[0] = 99;
        assert_eq!(decode(&other), Err(DecodeError::UnknownVersion(99)));
    }
}
