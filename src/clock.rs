//! Wall-clock time as Unix milliseconds, behind a trait so tests can move time by hand.
//!
//! Deadlines (`expires_at`) are wall-clock instants that must survive restarts, so the
//! server reasons in Unix milliseconds (`Millis`) rather than `tokio::time::Instant`.
//! Formatting to RFC 3339 with millisecond precision happens only at the HTTP edge.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Unix time in milliseconds (UTC).
pub type Millis = i64;

/// A source of the current wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

/// Shared handle to the clock every component reads.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that only moves when told to: used by tests of expiry and deadlines.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    pub fn new(start_ms: Millis) -> Self {
        Self {
            now_ms: AtomicI64::new(start_ms),
        }
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance_ms(&self, ms: i64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// A clock that never goes back, and never shows a time before `floor`: `max(inner, floor,
/// the last time it showed)`. A cluster's new leader reads time through one, its floor the
/// newest time in the replicated log (`RaftMeta::clock_floor`), so that after a failover
/// to a node whose clock is behind, no decided `at`, `created_at` or `expires_at` is
/// earlier than one already logged: time never runs backwards across a failover
/// (invariant 5's deadlines stay as logged; docs/REPLICATION.md, "The clock").
pub struct FloorClock {
    inner: SharedClock,
    /// The latest time shown (or the floor it started from).
    shown: AtomicI64,
}

impl FloorClock {
    pub fn new(inner: SharedClock, floor: Millis) -> Self {
        Self {
            inner,
            shown: AtomicI64::new(floor),
        }
    }
}

impl Clock for FloorClock {
    fn now_ms(&self) -> Millis {
        let now = self.inner.now_ms();
        // `fetch_max` returns what was shown before: the answer is the larger of the two,
        // and what is stored never decreases, whichever thread asks.
        let before = self.shown.fetch_max(now, Ordering::AcqRel);
        now.max(before)
    }
}

/// Formats `ms` as RFC 3339 UTC with millisecond precision (`2026-11-22T10:00:00.123Z`).
///
/// Written out by hand: it runs several times per response, and chrono's `format` parses
/// its format string on every call.
pub fn rfc3339(ms: Millis) -> String {
    use chrono::{Datelike, Timelike};
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return String::from("1970-01-01T00:00:00.000Z");
    };
    // Written digit by digit: `format!` with padding was 1.5 % of a reserve's CPU (perf),
    // and every reservation answer carries two or three of these.
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return format!(
            "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            ms.rem_euclid(1000)
        );
    }
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 3, ms.rem_euclid(1000) as u32);
    // Only ASCII digits and separators were written.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_milliseconds_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_341_600_123), "2026-11-22T10:00:00.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        for ms in [0, 1_795_341_600_007, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(rfc3339(ms), chrono_rfc3339(ms));
        }
    }

    fn chrono_rfc3339(ms: Millis) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    }

    /// 20,000 instants spread over `span` milliseconds from `from` (a fixed seed).
    fn instants(from: Millis, span: u64) -> impl Iterator<Item = Millis> {
        let mut rng = fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15);
        (0..20_000).map(move |_| from + rng.u64(..span) as i64)
    }

    /// The implementation before it was written by hand, for every year chrono can hold.
    fn reference(ms: Millis) -> String {
        use chrono::{Datelike, Timelike};
        let t = chrono::DateTime::from_timestamp_millis(ms).unwrap();
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            ms.rem_euclid(1000)
        )
    }

    #[test]
    fn agrees_with_the_previous_implementation_for_every_year() {
        // Years 0 and 9999/10000 at their edges, years before 0, far future.
        let year_0 = -62_167_219_200_000;
        let year_10000 = 253_402_300_800_000;
        for ms in [
            year_0,
            year_0 - 1,
            year_0 + 1,
            year_10000,
            year_10000 - 1,
            -100_000_000_000_000,
            1_000_000_000_000_000,
        ] {
            assert_eq!(rfc3339(ms), reference(ms), "{ms}");
        }
        // Years about -20000 to 40000.
        for ms in instants(-700_000_000_000_000, 1_900_000_000_000_000) {
            assert_eq!(rfc3339(ms), reference(ms), "{ms}");
        }
    }

    #[test]
    fn agrees_with_chrono_over_a_spread_of_instants() {
        // Years about 5 to 9987, where RFC 3339 and the digit-by-digit path apply.
        for ms in instants(-62_000_000_000_000, 315_000_000_000_000) {
            assert_eq!(rfc3339(ms), chrono_rfc3339(ms), "{ms}");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance_ms(500);
        assert_eq!(clock.now_ms(), 1_500);
    }

    /// A wall clock set by hand, backwards too.
    struct SetClock(AtomicI64);

    impl Clock for SetClock {
        fn now_ms(&self) -> Millis {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_floor_clock_starts_at_its_floor_and_never_goes_back() {
        let wall = Arc::new(SetClock(AtomicI64::new(5_000)));
        let clock = FloorClock::new(wall.clone(), 10_000);
        assert_eq!(clock.now_ms(), 10_000, "a wall clock behind the floor");
        wall.0.store(12_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 12_000, "past the floor: the wall clock");
        wall.0.store(11_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 12_000, "the wall clock stepped back");
        wall.0.store(13_000, Ordering::SeqCst);
        assert_eq!(clock.now_ms(), 13_000);
    }
}
