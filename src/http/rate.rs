//! The per-customer rate limit on reservation attempts (`--customer-rate`, off by default).
//!
//! One GCRA bucket per `customer_id` (governor: one atomic word per key in a sharded map,
//! measured on governor's own monotonic clock, never the business clock). Memory is bounded
//! under a flood of distinct ids in two ways:
//!
//! - every `CUSTOMER_RATE_SWEEP_MS` a background task drops the keys whose bucket is full
//!   again (`retain_recent`: a customer idle for `burst / rate` seconds is indistinguishable
//!   from one never seen);
//! - at most `keys_max` keys are held at once (`CUSTOMER_RATE_KEYS_MAX`); while the map is
//!   full, a customer it does not hold is checked against one bucket shared by all such
//!   customers (same rate and burst), so a flood of new ids is limited as a whole until the
//!   sweep makes room, and customers already held keep their own buckets.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use crate::limits::{
    CUSTOMER_BURST_PER_RATE_DEFAULT, CUSTOMER_RATE_KEYS_MAX, CUSTOMER_RATE_SWEEP_MS,
};

/// The limit: attempts per second per customer, the burst, and the most customers tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CustomerRate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    /// Most customers with a bucket of their own at once (`CUSTOMER_RATE_KEYS_MAX`; tests
    /// lower it).
    pub keys_max: usize,
}

impl CustomerRate {
    /// `per_second` attempts a second, with `burst` (default: `per_second` ×
    /// `CUSTOMER_BURST_PER_RATE_DEFAULT`, saturating) at once.
    pub fn new(per_second: NonZeroU32, burst: Option<NonZeroU32>) -> CustomerRate {
        CustomerRate {
            per_second,
            burst: burst.unwrap_or_else(|| {
                per_second.saturating_mul(
                    NonZeroU32::new(CUSTOMER_BURST_PER_RATE_DEFAULT).expect("a positive default"),
                )
            }),
            keys_max: CUSTOMER_RATE_KEYS_MAX,
        }
    }
}

/// The buckets, capped at `keys_max` keys (governor's own `DashMapStateStore` inside, with
/// a count of its keys kept exactly: incremented on insert, decremented by the sweep).
struct CappedStore {
    keys: DashMapStateStore<String>,
    count: AtomicUsize,
    keys_max: usize,
    /// The bucket of every customer not held while the map is full.
    overflow: InMemoryState,
}

impl StateStore for CappedStore {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.keys.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        // A new key takes a slot first, so the cap holds however many arrive at once.
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.keys_max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let mut inserted = false;
        let state = self.keys.entry(key.clone()).or_insert_with(|| {
            inserted = true;
            InMemoryState::default()
        });
        if !inserted {
            // Another request inserted it meanwhile: give the slot back.
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

/// The bucket's state (its theoretical arrival time), read without changing it.
fn arrival(state: &InMemoryState) -> Option<Nanos> {
    let read: Result<((), Nanos), Option<Nanos>> =
        state.measure_and_replace(&NotKeyed::NonKey, Err);
    read.err().flatten()
}

impl ShrinkableKeyedStateStore<String> for CappedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.keys.retain(|_, state| {
            let keep = arrival(state).is_some_and(|at| at > drop_below);
            if !keep {
                self.count.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.keys.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limiter `POST /v1/reservations` consults once the body is valid.
pub struct CustomerLimiter {
    limiter: RateLimiter<String, CappedStore, DefaultClock>,
    /// Attempts refused (`stockd_rate_limited_total`).
    refused: AtomicU64,
    /// Keys after the last shrink of the map's capacity, at most (see `sweep`).
    peak: AtomicUsize,
}

impl CustomerLimiter {
    pub fn new(rate: CustomerRate) -> CustomerLimiter {
        let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
        let store = CappedStore {
            keys: DashMapStateStore::default(),
            count: AtomicUsize::new(0),
            keys_max: rate.keys_max,
            overflow: InMemoryState::default(),
        };
        CustomerLimiter {
            limiter: RateLimiter::new(quota, store, DefaultClock::default()),
            refused: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// One attempt by `customer`: `Err(wait)` if it is over its limit (and counted).
    pub fn check(&self, customer: &String) -> Result<(), Duration> {
        match self.limiter.check_key(customer) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(not_until.wait_time_from(self.limiter.clock().now()))
            }
        }
    }

    /// Attempts refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Customers with a bucket of their own now.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }

    /// Drops the buckets that are full again; returns the map's memory once it holds
    /// fewer than a quarter of the keys it held at its peak.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        let keys = self.keys();
        let peak = self.peak.fetch_max(keys, Ordering::Relaxed).max(keys);
        if keys < peak / 4 {
            self.limiter.shrink_to_fit();
            self.peak.store(keys, Ordering::Relaxed);
        }
    }

    /// Sweeps `limiter` every `CUSTOMER_RATE_SWEEP_MS` until it is dropped.
    pub fn spawn_sweeper(limiter: &Arc<CustomerLimiter>) {
        let weak: Weak<CustomerLimiter> = Arc::downgrade(limiter);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(CUSTOMER_RATE_SWEEP_MS));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(limiter) = weak.upgrade() else { break };
                limiter.sweep();
            }
        });
    }
}

/// Whole seconds to announce in `Retry-After`: the wait rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32, keys_max: usize) -> CustomerRate {
        CustomerRate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            keys_max,
        }
    }

    #[test]
    fn the_default_burst_is_twice_the_rate() {
        let r = CustomerRate::new(NonZeroU32::new(5).unwrap(), None);
        assert_eq!(r.burst.get(), 10);
        assert_eq!(r.keys_max, CUSTOMER_RATE_KEYS_MAX);
        let r = CustomerRate::new(NonZeroU32::MAX, None);
        assert_eq!(r.burst, NonZeroU32::MAX);
    }

    #[test]
    fn a_customer_gets_its_burst_then_waits() {
        let l = CustomerLimiter::new(rate(1, 3, 100));
        let a = "a".to_string();
        let outcomes: Vec<bool> = (0..10).map(|_| l.check(&a).is_ok()).collect();
        assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 3, "{outcomes:?}");
        assert!(outcomes[..3].iter().all(|ok| *ok));
        let wait = l.check(&a).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(l.refused(), 8);
        assert!(
            l.check(&"b".to_string()).is_ok(),
            "another customer is unaffected"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
    }

    /// 200,000 distinct customers never grow the map past its cap: the ones beyond it
    /// share one bucket.
    #[test]
    fn distinct_customers_never_grow_the_map_past_the_cap() {
        let l = CustomerLimiter::new(rate(1, 3, CUSTOMER_RATE_KEYS_MAX));
        let mut refused = 0;
        for i in 0..200_000 {
            if l.check(&format!("customer-{i}")).is_err() {
                refused += 1;
            }
            assert!(l.keys() <= CUSTOMER_RATE_KEYS_MAX);
        }
        assert_eq!(l.keys(), CUSTOMER_RATE_KEYS_MAX);
        assert_eq!(
            l.limiter.into_state_store().keys.len(),
            CUSTOMER_RATE_KEYS_MAX
        );
        // The shared bucket let its burst through (and perhaps a refill), no more.
        assert!(
            refused >= 200_000 - CUSTOMER_RATE_KEYS_MAX - 3 - 10,
            "{refused}"
        );
    }

    #[test]
    fn customers_held_keep_their_own_bucket_while_the_map_is_full() {
        let l = CustomerLimiter::new(rate(1, 2, 2));
        let (a, b) = ("a".to_string(), "b".to_string());
        assert!(l.check(&a).is_ok() && l.check(&b).is_ok());
        // c, d and e share the overflow bucket: 2 of them pass.
        let shared: Vec<bool> = ["c", "d", "e"]
            .iter()
            .map(|c| l.check(&c.to_string()).is_ok())
            .collect();
        assert_eq!(shared, [true, true, false]);
        assert!(
            l.check(&a).is_ok() && l.check(&b).is_ok(),
            "their second unit"
        );
        assert_eq!(l.keys(), 2);
    }

    #[test]
    fn the_sweep_drops_only_buckets_that_are_full_again() {
        // A bucket refills at a million a second: by the sweep, a customer's one attempt
        // is long forgotten; one that used a huge burst is not.
        let l = CustomerLimiter::new(rate(1_000_000, 1_000_000, 10));
        assert!(l.check(&"quick".to_string()).is_ok());
        let heavy = "heavy".to_string();
        let n = NonZeroU32::new(1_000_000).unwrap();
        assert!(matches!(l.limiter.check_key_n(&heavy, n), Ok(Ok(()))));
        std::thread::sleep(Duration::from_millis(5));
        l.sweep();
        assert_eq!(
            l.keys(),
            1,
            "the heavy customer's bucket is still being refilled"
        );
    }
}
