//! Log records, and the one codec that turns them into bytes and back.
//!
//! Layout of a stored record: `[format version: u8][crc32 of payload: u32 LE][payload]`,
//! where the payload is bincode 2 (standard config) of `Record`. The version byte lets a
//! future format live beside this one; the checksum catches a damaged record on read.
//! The log stores these bytes unchanged, one record a key or framed in batches
//! (`storage::log`, whose batch values start with a byte of 0x80 or more: record format
//! versions stay below 0x80).
//! `bincode` 3.0.0 on crates.io is a tombstone, so 2.0.1 is pinned and used only here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{Line, Price};

/// The format version written into every record (below 0x80: the log tells a batch of
/// records from a single one by that bit).
pub const RECORD_FORMAT_VERSION: u8 = 1;
const HEADER_BYTES: usize = 5;

/// An idempotency key remembered with the reservation it created.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdempotencyKey {
    pub customer_id: String,
    pub key: String,
}

/// One acknowledged change. Every 2xx mutation produces exactly one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
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
        /// `Some(None)` clears the price.
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
        /// The key and the request fingerprint, when the request carried `Idempotency-Key`.
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
    /// Retention: forget ended reservations whose deadline was before `before`, and
    /// idempotency keys created before it (`fold::forget`). Logged by the supervisor from
    /// time to time, so memory, snapshots and recovery agree on what is remembered.
    Forgotten {
        before: Millis,
        at: Millis,
    },
}

impl Record {
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
    out.extend_from_slice(&[RECORD_FORMAT_VERSION, 0, 0, 0, 0]);
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
    if bytes[0] != RECORD_FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(bytes[0]));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[HEADER_BYTES..];
    if crc32fast::hash(payload) != stored {
        return Err(DecodeError::Checksum);
    }
    let (record, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| DecodeError::Payload(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::Payload("trailing bytes".into()));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record::ReservationCreated {
            id: Uuid::now_v7(),
            customer_id: "user-1".into(),
            items: vec![Line {
                sku: "A".into(),
                quantity: 2,
            }],
            created_at: 1,
            expires_at: 2,
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
