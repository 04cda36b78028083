//! A product's catalogue data and stock figures, and every change that can be made to them.
//!
//! Invariant 1 of docs/ARCHITECTURE.md (`0 <= reserved <= on_hand <= STOCK_MAX`) is checked by
//! `debug_assert!` after every change; the checks that refuse a change (insufficient stock,
//! overflow) are done before anything is modified, so a refused change leaves no trace.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::domain::sale::{Buyers, Rules, SaleRules};
use crate::limits::STOCK_MAX;

/// A price in the currency's minor unit (cents for USD).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub amount_minor: u64,
    /// Three-letter upper-case ISO 4217 code.
    pub currency: String,
}

/// One product: what the catalogue says about it and how many units are where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub price: Option<Price>,
    /// Units physically in stock, including those held by pending reservations.
    pub on_hand: u64,
    /// Units held by pending (registered, logged) reservations.
    pub reserved: u64,
    /// Units held for reservations still being assembled (see `hold`): unavailable to
    /// others, but not yet a logged change, so not yet in `reserved` or the version.
    /// Always 0 in a state folded from the log.
    pub holding: u64,
    /// Units moved out of `on_hand` by confirmed reservations, cumulative.
    pub sold: u64,
    /// Increases by one on every logged change; the HTTP `ETag`.
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Purchase limit and sale window (`crate::domain::sale`), and beside them, in the same
    /// optional allocation, the low-stock threshold (`low_stock_threshold`).
    pub rules: Rules,
    /// Units counted toward the purchase limit, per buyer. Left out of the product's
    /// hot-path copies (`clone_without_buyers`).
    pub buyers: Buyers,
}

/// A product to create (validated by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewProduct {
    pub sku: String,
    pub name: String,
    pub price: Option<Price>,
    pub on_hand: u64,
    /// Checked (`SaleRules::check`) before anything is logged.
    pub rules: SaleRules,
    /// `available` at or below this is low; `None`: no threshold.
    pub low_stock_threshold: Option<u64>,
}

impl NewProduct {
    /// A product without sale rules.
    pub fn new(sku: String, name: String, price: Option<Price>, on_hand: u64) -> NewProduct {
        NewProduct {
            sku,
            name,
            price,
            on_hand,
            rules: SaleRules::default(),
            low_stock_threshold: None,
        }
    }
}

/// Why a hold was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error(transparent)]
    Stock(#[from] StockError),
    #[error("the sale starts at {starts_at}")]
    NotStarted { starts_at: Millis, now: Millis },
    #[error("the sale ended at {ended_at}")]
    Ended { ended_at: Millis },
    #[error("the customer holds {held} of at most {limit}, and asked for {requested} more")]
    CustomerLimit {
        limit: u64,
        held: u64,
        requested: u64,
    },
}

/// Why a stock change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    #[error("insufficient stock: {available} available")]
    Insufficient { available: u64 },
    #[error("the change would take on_hand above {STOCK_MAX}")]
    Overflow,
}

impl Product {
    pub fn new(
        sku: String,
        name: String,
        price: Option<Price>,
        on_hand: u64,
        at: Millis,
    ) -> Product {
        let product = Product {
            sku,
            name,
            price,
            on_hand,
            reserved: 0,
            holding: 0,
            sold: 0,
            version: 1,
            created_at: at,
            updated_at: at,
            rules: Rules::default(),
            buyers: Buyers::default(),
        };
        debug_assert!(product.invariant_holds());
        product
    }

    /// A copy without the per-buyer counts, which can be large (a million buyers): what
    /// reads, replies and the actor's undo copy take. Everything else is copied.
    pub fn clone_without_buyers(&self) -> Product {
        Product {
            sku: self.sku.clone(),
            name: self.name.clone(),
            price: self.price.clone(),
            on_hand: self.on_hand,
            reserved: self.reserved,
            holding: self.holding,
            sold: self.sold,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            rules: self.rules.clone(),
            buyers: Buyers::default(),
        }
    }

    /// Checks a hold of `quantity` units for `customer` at `now` against the sale window,
    /// the purchase limit and the stock, in that order, and takes it (see `hold`). Returns
    /// whether the hold is counted toward the limit (the product has one); a counted hold
    /// is added to the customer's count last, after everything that can fail.
    pub fn hold_for(
        &mut self,
        customer: &str,
        quantity: u64,
        now: Millis,
    ) -> Result<bool, HoldError> {
        if let Some(starts_at) = self.rules.starts_at {
            if now < starts_at {
                return Err(HoldError::NotStarted { starts_at, now });
            }
        }
        if let Some(ended_at) = self.rules.ends_at {
            if now >= ended_at {
                return Err(HoldError::Ended { ended_at });
            }
        }
        let limit = self.rules.max_per_customer;
        if let Some(limit) = limit {
            let held = self.buyers.held(customer);
            if held.saturating_add(quantity) > limit {
                return Err(HoldError::CustomerLimit {
                    limit,
                    held,
                    requested: quantity,
                });
            }
        }
        self.hold(quantity)?;
        if limit.is_some() {
            self.buyers.add(customer, quantity);
            debug_assert!(limit.is_some_and(|limit| self.buyers.held(customer) <= limit));
        }
        Ok(limit.is_some())
    }

    /// Gives back `quantity` counted units of `customer` (a counted hold that was rolled
    /// back, cancelled or expired).
    pub fn uncount(&mut self, customer: &str, quantity: u64) {
        self.buyers.remove(customer, quantity);
    }

    /// Units not held by registered reservations (`on_hand − reserved`, as shown to clients).
    pub fn available(&self) -> u64 {
        debug_assert!(self.reserved <= self.on_hand);
        self.on_hand - self.reserved
    }

    /// The low-stock threshold, if any: `available` at or below it is low.
    pub fn low_stock_threshold(&self) -> Option<u64> {
        self.rules.low_stock_threshold()
    }

    /// Whether the product is low on stock: it has a threshold and `available` is at or
    /// below it (`stock.low` in the change feed).
    pub fn is_low(&self) -> bool {
        self.low_stock_threshold()
            .is_some_and(|threshold| self.available() <= threshold)
    }

    /// Units that a new hold can take: also excludes holds still being assembled.
    pub fn holdable(&self) -> u64 {
        debug_assert!(self.reserved + self.holding <= self.on_hand);
        self.on_hand - self.reserved - self.holding
    }

    /// Invariant 1: `0 <= reserved (+ holds being assembled) <= on_hand <= STOCK_MAX`.
    pub fn invariant_holds(&self) -> bool {
        self.reserved
            .checked_add(self.holding)
            .is_some_and(|held| held <= self.on_hand)
            && self.on_hand <= STOCK_MAX
    }

    fn touch(&mut self, at: Millis) {
        self.version += 1;
        self.updated_at = self.updated_at.max(at);
        debug_assert!(self.invariant_holds(), "invariant 1 broken: {self:?}");
    }

    /// Takes `quantity` units for a reservation being assembled: from now on no one else
    /// can hold them. The view (`reserved`, `version`) does not move yet: a hold becomes a
    /// logged change only when its reservation is registered (`settle_hold`); a hold that
    /// is rolled back (`unhold`) never reaches the log and never shows.
    pub fn hold(&mut self, quantity: u64) -> Result<(), StockError> {
        if quantity > self.holdable() {
            return Err(StockError::Insufficient {
                available: self.holdable(),
            });
        }
        self.holding += quantity;
        debug_assert!(self.invariant_holds());
        Ok(())
    }

    /// Rolls back a hold that never reached the log.
    pub fn unhold(&mut self, quantity: u64) {
        debug_assert!(quantity <= self.holding);
        self.holding -= quantity.min(self.holding);
    }

    /// The reservation holding `quantity` units is registered (logged): the hold becomes
    /// part of `reserved`.
    pub fn settle_hold(&mut self, quantity: u64, at: Millis) {
        debug_assert!(quantity <= self.holding);
        let quantity = quantity.min(self.holding);
        self.holding -= quantity;
        self.reserved += quantity;
        self.touch(at);
    }

    /// A pending reservation ended without a sale (cancelled or expired): its units are
    /// available again.
    pub fn release(&mut self, quantity: u64, at: Millis) {
        debug_assert!(
            quantity <= self.reserved,
            "release beyond reserved: {self:?}"
        );
        self.reserved -= quantity.min(self.reserved);
        self.touch(at);
    }

    /// A pending reservation was confirmed: its units leave the shelf as sold.
    pub fn commit(&mut self, quantity: u64, at: Millis) {
        debug_assert!(
            quantity <= self.reserved,
            "commit beyond reserved: {self:?}"
        );
        let quantity = quantity.min(self.reserved);
        self.reserved -= quantity;
        self.on_hand -= quantity;
        self.sold = self.sold.saturating_add(quantity);
        self.touch(at);
    }

    /// Whether `on_hand` may become `on_hand`: it, and `sold` after every unit on the shelf
    /// is sold, stay within `STOCK_MAX`. A confirmation moves units from `on_hand` to
    /// `sold` and cannot be refused, so `on_hand + sold` is the figure to bound here.
    fn within_limit(&self, on_hand: i128) -> bool {
        on_hand + i128::from(self.sold) <= i128::from(STOCK_MAX)
    }

    /// Checks a replenishment without applying it.
    pub fn check_replenish(&self, quantity: u64) -> Result<(), StockError> {
        if self.within_limit(i128::from(self.on_hand) + i128::from(quantity)) {
            Ok(())
        } else {
            Err(StockError::Overflow)
        }
    }

    /// Whether a logged replenishment can be applied as a fact: the shelf stays within
    /// `STOCK_MAX`. Requests are held to the stricter `check_replenish`, but a log written
    /// before `sold` counted toward the limit may hold replenishments that meet only this,
    /// and the fold must still replay them.
    pub fn can_apply_replenish(&self, quantity: u64) -> bool {
        self.on_hand
            .checked_add(quantity)
            .is_some_and(|total| total <= STOCK_MAX)
    }

    pub fn replenish(&mut self, quantity: u64, at: Millis) {
        debug_assert!(self.can_apply_replenish(quantity));
        self.on_hand = self.on_hand.saturating_add(quantity).min(STOCK_MAX);
        self.touch(at);
    }

    /// Checks an adjustment without applying it: the result must keep every reserved unit
    /// (reserved units cannot be written off) and stay within `STOCK_MAX`.
    pub fn check_adjust(&self, delta: i64) -> Result<(), StockError> {
        let result = i128::from(self.on_hand) + i128::from(delta);
        if result < i128::from(self.reserved + self.holding) {
            return Err(StockError::Insufficient {
                available: self.holdable(),
            });
        }
        if delta > 0 && !self.within_limit(result) {
            return Err(StockError::Overflow);
        }
        Ok(())
    }

    /// Whether a logged adjustment can be applied as a fact: every reserved unit kept, the
    /// shelf within `STOCK_MAX` (as `can_apply_replenish`, without the `sold` bound that
    /// `check_adjust` holds requests to).
    pub fn can_apply_adjust(&self, delta: i64) -> bool {
        let result = i128::from(self.on_hand) + i128::from(delta);
        result >= i128::from(self.reserved + self.holding) && result <= i128::from(STOCK_MAX)
    }

    pub fn adjust(&mut self, delta: i64, at: Millis) {
        debug_assert!(self.can_apply_adjust(delta), "adjust {delta} on {self:?}");
        let result = (i128::from(self.on_hand) + i128::from(delta)).clamp(
            i128::from(self.reserved + self.holding),
            i128::from(STOCK_MAX),
        );
        self.on_hand = result as u64;
        self.touch(at);
    }

    /// Changes catalogue data, sale rules and the low-stock threshold. `price: Some(None)`
    /// clears the price, `low_stock_threshold: Some(None)` the threshold. The rules are
    /// checked by the caller (`SaleRules::check` on the patched rules); counts are never
    /// changed by a change of rules.
    pub fn patch(
        &mut self,
        name: Option<String>,
        price: Option<Option<Price>>,
        rules: crate::domain::sale::RulesPatch,
        low_stock_threshold: Option<Option<u64>>,
        at: Millis,
    ) {
        if let Some(name) = name {
            self.name = name;
        }
        if let Some(price) = price {
            self.price = price;
        }
        let patched = self.rules.patched(rules);
        self.rules.set(patched);
        if let Some(threshold) = low_stock_threshold {
            self.rules.set_low_stock_threshold(threshold);
        }
        self.touch(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(on_hand: u64) -> Product {
        Product::new("SKU-1".into(), "Thing".into(), None, on_hand, 0)
    }

    #[test]
    fn hold_refuses_more_than_available_and_changes_nothing() {
        let mut p = product(2);
        assert_eq!(p.hold(3), Err(StockError::Insufficient { available: 2 }));
        assert_eq!(p, product(2));
        p.hold(2).unwrap();
        assert_eq!(p.holdable(), 0);
        assert_eq!(p.hold(1), Err(StockError::Insufficient { available: 0 }));
        assert_eq!(
            (p.reserved, p.available(), p.version),
            (0, 2, 1),
            "a hold is not a visible change until settled"
        );
        p.settle_hold(2, 5);
        assert_eq!(
            (p.reserved, p.holding, p.version, p.updated_at),
            (2, 0, 2, 5)
        );
        p.hold(0).unwrap();
        p.unhold(0);
        assert_eq!(p.version, 2);
    }

    #[test]
    fn commit_moves_units_from_reserved_to_sold() {
        let mut p = product(5);
        p.hold(2).unwrap();
        p.settle_hold(2, 1);
        p.commit(2, 1);
        assert_eq!((p.on_hand, p.reserved, p.sold), (3, 0, 2));
    }

    #[test]
    fn adjust_cannot_write_off_reserved_units() {
        let mut p = product(5);
        p.hold(3).unwrap();
        p.settle_hold(3, 1);
        assert_eq!(
            p.check_adjust(-3),
            Err(StockError::Insufficient { available: 2 })
        );
        assert!(p.check_adjust(-2).is_ok());
        p.adjust(-2, 1);
        assert_eq!((p.on_hand, p.reserved), (3, 3));
    }

    #[test]
    fn stock_never_exceeds_the_json_safe_maximum() {
        let p = product(STOCK_MAX - 1);
        assert_eq!(p.check_replenish(2), Err(StockError::Overflow));
        assert_eq!(p.check_adjust(2), Err(StockError::Overflow));
        assert!(p.check_replenish(1).is_ok());
    }

    #[test]
    fn sold_counts_toward_the_maximum_so_it_stays_exact() {
        // Every unit on the shelf can still be sold, and a confirmation cannot be refused:
        // so a replenishment is bounded by what has been sold already.
        let mut p = product(10);
        p.hold(4).unwrap();
        p.settle_hold(4, 1);
        p.commit(4, 1);
        assert_eq!((p.on_hand, p.sold), (6, 4));
        let room = STOCK_MAX - 10;
        assert_eq!(p.check_replenish(room + 1), Err(StockError::Overflow));
        assert_eq!(p.check_adjust(room as i64 + 1), Err(StockError::Overflow));
        assert!(p.check_replenish(room).is_ok());
        assert!(p.check_adjust(room as i64).is_ok());
        // Taking stock away is never refused for the limit's sake.
        assert!(p.check_adjust(-6).is_ok());
        p.replenish(room, 2);
        assert_eq!(p.on_hand + p.sold, STOCK_MAX);
        // A log written before the `sold` bound can still be replayed: as facts, only the
        // shelf's own bound applies.
        assert_eq!(p.check_replenish(1), Err(StockError::Overflow));
        assert!(p.can_apply_replenish(4) && !p.can_apply_replenish(5));
        assert!(p.can_apply_adjust(4) && !p.can_apply_adjust(5));
        assert!(!p.can_apply_adjust(-(p.on_hand as i64) - 1));
    }

    #[test]
    fn a_limit_caps_what_one_customer_holds_and_a_refusal_changes_nothing() {
        let mut p = product(10);
        p.rules.max_per_customer = Some(2);
        assert_eq!(p.hold_for("a", 1, 0), Ok(true));
        let before = p.clone();
        assert_eq!(
            p.hold_for("a", 2, 0),
            Err(HoldError::CustomerLimit {
                limit: 2,
                held: 1,
                requested: 2
            })
        );
        assert_eq!(p, before, "a refused hold leaves no trace");
        assert_eq!(p.hold_for("a", 1, 0), Ok(true));
        assert_eq!(p.hold_for("b", 2, 0), Ok(true));
        assert_eq!(
            (p.holding, p.buyers.held("a"), p.buyers.held("b")),
            (4, 2, 2)
        );
        // A cancel gives the units back; the customer may hold again.
        p.unhold(1);
        p.uncount("a", 1);
        assert_eq!(p.hold_for("a", 1, 0), Ok(true));
        // Without a limit nothing is counted.
        p.rules.max_per_customer = None;
        assert_eq!(p.hold_for("a", 5, 0), Ok(false));
        assert_eq!(p.buyers.held("a"), 2);
    }

    #[test]
    fn the_window_opens_at_its_start_and_closes_at_its_end() {
        let mut p = product(10);
        p.rules.starts_at = Some(100);
        p.rules.ends_at = Some(200);
        assert_eq!(
            p.hold_for("a", 1, 99),
            Err(HoldError::NotStarted {
                starts_at: 100,
                now: 99
            })
        );
        assert_eq!(p.hold_for("a", 1, 100), Ok(false));
        assert_eq!(p.hold_for("a", 1, 199), Ok(false));
        assert_eq!(
            p.hold_for("a", 1, 200),
            Err(HoldError::Ended { ended_at: 200 })
        );
        assert_eq!(p.holding, 2);
    }

    /// A million products must fit in memory: a product without a threshold (or sale
    /// rules) pays one null pointer for both, and the threshold costs it nothing more.
    /// 152 bytes before the threshold, 152 with it.
    #[test]
    fn a_product_stays_152_bytes_with_the_threshold() {
        assert_eq!(std::mem::size_of::<Product>(), 152);
        let mut p = product(10);
        assert_eq!(
            p.rules,
            Rules::default(),
            "no allocation without a threshold"
        );
        p.rules.set_low_stock_threshold(Some(3));
        assert_eq!(p.low_stock_threshold(), Some(3));
    }

    #[test]
    fn low_means_a_threshold_and_available_at_or_below_it() {
        let mut p = product(5);
        assert!(!p.is_low(), "no threshold: never low");
        p.rules.set_low_stock_threshold(Some(3));
        assert!(!p.is_low());
        p.hold(2).unwrap();
        p.settle_hold(2, 1);
        assert_eq!(p.available(), 3);
        assert!(p.is_low(), "at the threshold is low");
        p.patch(None, None, Default::default(), Some(Some(2)), 2);
        assert!(!p.is_low());
        p.patch(None, None, Default::default(), Some(Some(0)), 3);
        assert!(!p.is_low());
        p.adjust(-3, 4);
        assert!(p.is_low(), "threshold 0: low when nothing is available");
        p.patch(Some("x".into()), None, Default::default(), None, 5);
        assert_eq!(p.low_stock_threshold(), Some(0), "absent leaves it");
        p.patch(None, None, Default::default(), Some(None), 6);
        assert!(!p.is_low() && p.low_stock_threshold().is_none());
    }

    #[test]
    fn copies_without_buyers_keep_everything_else() {
        let mut p = product(10);
        p.rules.max_per_customer = Some(3);
        p.rules.set_low_stock_threshold(Some(4));
        p.hold_for("a", 3, 0).unwrap();
        let copy = p.clone_without_buyers();
        assert!(copy.buyers.is_empty());
        assert_eq!(
            Product {
                buyers: p.buyers.clone(),
                ..copy
            },
            p
        );
    }
}
