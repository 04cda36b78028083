//! Every limit the server enforces, in one place, named with the unit last.

/// Largest requested quantity (reserve line, replenish, |adjust delta|).
pub const QUANTITY_MAX: u64 = 1_000_000_000;
/// Largest stock figure: 2^53 − 1, exactly representable in every JSON client.
pub const STOCK_MAX: u64 = (1 << 53) - 1;
/// SKU length bounds, in characters of `A-Z a-z 0-9 . _ -`.
pub const SKU_LEN_MAX: usize = 64;
/// Product name length bound, in characters.
pub const NAME_CHARS_MAX: usize = 200;
/// `customer_id` and `order_id` length bound, in characters.
pub const CUSTOMER_ID_CHARS_MAX: usize = 128;
pub const ORDER_ID_CHARS_MAX: usize = 128;
/// Adjustment reason length bound, in characters.
pub const REASON_CHARS_MAX: usize = 500;
/// API key name length bound, in characters.
pub const KEY_NAME_CHARS_MAX: usize = 100;
/// Lines in one reservation.
pub const RESERVATION_LINES_MAX: usize = 100;
/// Reservation time-to-live bounds.
pub const TTL_SECONDS_MIN: u64 = 1;
pub const TTL_SECONDS_MAX: u64 = 86_400;
pub const TTL_SECONDS_DEFAULT: u64 = 300;
/// `Idempotency-Key` length bound, in bytes of printable ASCII.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Default retention (`--retention-seconds`): how long an idempotency key is remembered
/// after the reservation it created, and an ended reservation after its deadline (then
/// `GET` answers 404).
pub const RETENTION_SECONDS_DEFAULT: u64 = 24 * 60 * 60;
/// Largest `--retention-seconds`: a year.
pub const RETENTION_SECONDS_MAX: u64 = 365 * 24 * 60 * 60;
/// How often the supervisor forgets what is past retention (`Record::Forgotten`).
pub const FORGET_EVERY_MS: i64 = 60 * 60 * 1000;
/// Request bodies larger than this are refused with 413.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// Page size bounds for `GET /v1/products`.
pub const PAGE_LIMIT_MAX: usize = 1000;
pub const PAGE_LIMIT_DEFAULT: usize = 100;
/// Requests being processed at once; beyond this the server answers 503 at once
/// (admission control: ractor mailboxes are unbounded, so the bound lives here).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 8192;

/// `GET /metrics` requests served at once; more get 503. Apart from `REQUESTS_IN_FLIGHT_MAX`
/// so that an overload never hides the figures that show it.
pub const SCRAPES_IN_FLIGHT_MAX: usize = 4;

/// With `--durability sync`, the log writer starts a flush at most this often: under load
/// a batch waits for up to this long for more records to join it (the commit delay of
/// PostgreSQL's group commit). Fewer, larger flushes leave more CPU for requests
/// (docs/PERFORMANCE.md#decision-commit-delay). A request arriving
/// after a quiet millisecond is flushed at once.
pub const SYNC_FLUSH_INTERVAL_US: u64 = 1_000;
/// With `--durability async`, the log writer starts a flush at most this often (records
/// arriving meanwhile join the batch): the window in which acknowledged changes are not
/// yet on disk is this plus one flush.
pub const ASYNC_FLUSH_INTERVAL_MS: u64 = 5;
/// Most records the log writer applies and flushes as one group commit.
pub const LOG_BATCH_RECORDS_MAX: usize = 4096;
/// How often the supervisor looks for due expiry deadlines.
pub const EXPIRY_TICK_MS: u64 = 100;
/// Most reservations the supervisor expires in one message (each is a log append and a
/// message per line, a few microseconds): more due ones, as after a long outage, are
/// expired by the next messages it sends itself, so requests are served in between.
pub const EXPIRIES_PER_MESSAGE_MAX: usize = 1024;
/// How long a deleted product's actor keeps answering "not found" before it stops.
pub const RETIRE_GRACE_MS: u64 = 5_000;
/// Automatic snapshot after this many durable log records since the newest one.
pub const SNAPSHOT_EVERY_RECORDS_DEFAULT: u64 = 500_000;
/// Automatic snapshot after this long, if anything changed.
pub const SNAPSHOT_EVERY_SECONDS_DEFAULT: u64 = 600;
/// Snapshots kept on disk; the log keeps the records after the oldest of them.
pub const SNAPSHOTS_KEPT_DEFAULT: usize = 3;
/// Largest `--snapshots-keep`.
pub const SNAPSHOTS_KEPT_MAX: u64 = 1000;
/// A product actor with no message for this long is passivated (its state kept as plain
/// data in the supervisor) and activated again by its next message.
pub const PASSIVATE_AFTER_SECONDS_DEFAULT: u64 = 60;
/// Most actors the supervisor passivates in one message (each is one actor round trip
/// inside its mailbox, so this bounds the pause it adds: ~128 × 20 µs); more idle ones are
/// passivated by the next messages it sends itself, so a backlog of any size drains at
/// once while requests are served in between.
pub const PASSIVATIONS_PER_MESSAGE_MAX: usize = 128;
/// A passivation sweep of at least this many actors returns the memory they freed to the
/// OS (`mi_collect`) once they have stopped; smaller ones leave it to the allocator.
pub const PASSIVATION_SWEEP_RELEASE_MIN: usize = 1_024;

/// `--customer-burst` without a value: this many seconds' worth of `--customer-rate`.
pub const CUSTOMER_BURST_PER_RATE_DEFAULT: u32 = 2;
/// Most customers the rate limit tracks with a bucket of their own (estimated: about
/// 600 bytes each with an id of 128 four-byte characters, the map's slack included, so
/// about 60 MB at most); beyond it, customers not tracked share one bucket until the sweep
/// makes room (`crate::http::rate`).
pub const CUSTOMER_RATE_KEYS_MAX: usize = 100_000;
/// How often the rate limit forgets customers whose bucket is full again.
pub const CUSTOMER_RATE_SWEEP_MS: u64 = 1_000;
