//! The rules of a sale on one product: how many units one buyer may take
//! (`max_per_customer`) and when holds may be made (`starts_at` .. `ends_at`), and the
//! per-buyer counts the limit is checked against.
//!
//! The counts are kept per product, beside its stock, so the limit is checked in the same
//! step as the stock (in the product's actor): parallel reservations from one buyer cannot
//! both pass it. A hold made while the product has a limit is *counted*: its units are
//! added to the buyer's count, and the reservation remembers which of its lines were
//! counted (`LineSet`), so that a cancel or expiry gives back exactly what was counted,
//! whatever happened to the limit since. A confirmed hold stays counted (the buyer has
//! bought it). Changing or removing the limit never changes a count; counts are dropped
//! only with the product.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::limits::RESERVATION_LINES_MAX;

/// A product's sale rules; the default is no rule at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleRules {
    /// Units of this product one customer may hold plus have bought (counted holds).
    pub max_per_customer: Option<u64>,
    /// Holds are refused before this instant.
    pub starts_at: Option<Millis>,
    /// Holds are refused from this instant on.
    pub ends_at: Option<Millis>,
}

/// A product's optional settings as it keeps them: one pointer, null for a product
/// without any (nearly all of them: a million products are held in memory, and the rules
/// inline were 48 bytes each). Reads and writes of the sale rules go through
/// `Deref`/`DerefMut` as if it were the `SaleRules`; the low-stock threshold, which is no
/// sale rule but is as optional and as rare, shares the allocation
/// (`low_stock_threshold`, `set_low_stock_threshold`). `set` and
/// `set_low_stock_threshold` drop the allocation when nothing is left. Encoded as
/// `Settings` (the rules, then the threshold: snapshot format 4; formats 2 and 3 held the
/// rules alone, `storage::legacy::ProductV2`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Settings", into = "Settings")]
pub struct Rules(Option<Box<Settings>>);

/// What `Rules` points to: the sale rules and the low-stock threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub sale: SaleRules,
    /// `available` at or below this is low (`stock.low`); `None`: no threshold.
    pub low_stock_threshold: Option<u64>,
}

const NO_RULES: SaleRules = SaleRules {
    max_per_customer: None,
    starts_at: None,
    ends_at: None,
};

const NO_SETTINGS: Settings = Settings {
    sale: NO_RULES,
    low_stock_threshold: None,
};

impl Rules {
    /// Replaces the sale rules; the threshold stays.
    pub fn set(&mut self, rules: SaleRules) {
        *self = Rules::from(Settings {
            sale: rules,
            low_stock_threshold: self.low_stock_threshold(),
        });
    }

    /// The low-stock threshold, if any.
    pub fn low_stock_threshold(&self) -> Option<u64> {
        self.0.as_ref().and_then(|s| s.low_stock_threshold)
    }

    /// Sets or clears the low-stock threshold; the sale rules stay.
    pub fn set_low_stock_threshold(&mut self, threshold: Option<u64>) {
        *self = Rules::from(Settings {
            sale: **self,
            low_stock_threshold: threshold,
        });
    }
}

impl From<SaleRules> for Rules {
    fn from(rules: SaleRules) -> Rules {
        Rules::from(Settings {
            sale: rules,
            low_stock_threshold: None,
        })
    }
}

impl From<Settings> for Rules {
    fn from(settings: Settings) -> Rules {
        Rules((settings != NO_SETTINGS).then(|| Box::new(settings)))
    }
}

impl From<Rules> for Settings {
    fn from(rules: Rules) -> Settings {
        rules.0.map_or(NO_SETTINGS, |settings| *settings)
    }
}

impl std::ops::Deref for Rules {
    type Target = SaleRules;
    fn deref(&self) -> &SaleRules {
        self.0
            .as_deref()
            .map_or(&NO_RULES, |settings| &settings.sale)
    }
}

impl std::ops::DerefMut for Rules {
    fn deref_mut(&mut self) -> &mut SaleRules {
        &mut self.0.get_or_insert_with(Box::default).sale
    }
}

/// A change to sale rules: `None` keeps a rule, `Some(None)` removes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesPatch {
    pub max_per_customer: Option<Option<u64>>,
    pub starts_at: Option<Option<Millis>>,
    pub ends_at: Option<Option<Millis>>,
}

impl RulesPatch {
    pub fn is_empty(&self) -> bool {
        *self == RulesPatch::default()
    }
}

impl SaleRules {
    /// The rules with `patch` applied.
    pub fn patched(self, patch: RulesPatch) -> SaleRules {
        SaleRules {
            max_per_customer: patch.max_per_customer.unwrap_or(self.max_per_customer),
            starts_at: patch.starts_at.unwrap_or(self.starts_at),
            ends_at: patch.ends_at.unwrap_or(self.ends_at),
        }
    }

    /// A window must end after it starts; a limit is at least 1.
    pub fn check(&self) -> Result<(), RulesError> {
        if let (Some(starts), Some(ends)) = (self.starts_at, self.ends_at) {
            if ends <= starts {
                return Err(RulesError::WindowEndsBeforeStart);
            }
        }
        if self.max_per_customer == Some(0) {
            return Err(RulesError::ZeroLimit);
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("sale_ends_at must be after sale_starts_at")]
    WindowEndsBeforeStart,
    #[error("max_per_customer must be at least 1")]
    ZeroLimit,
}

impl RulesError {
    /// The product field at fault, as the API names it.
    pub fn field(&self) -> &'static str {
        match self {
            RulesError::WindowEndsBeforeStart => "sale_ends_at",
            RulesError::ZeroLimit => "max_per_customer",
        }
    }
}

/// Units counted toward the purchase limit, per customer, for one product. Only buyers
/// with a count above zero are kept: memory grows with the buyers of products that have
/// (or had) a limit, 65–85 bytes a buyer with 16-character ids (`cargo bench --bench
/// buyers`: a million buyers of one product, +80 MiB), and nothing for the others.
///
/// `Clone` copies every count: the product's hot paths clone a product without them
/// (`Product::clone_without_buyers`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
// Boxed so that a product without counts (nearly all of them) pays one pointer, not an
// empty map's 40 bytes: a million products are held in memory.
#[allow(clippy::box_collection)]
pub struct Buyers(Option<Box<HashMap<Box<str>, u64, foldhash::fast::RandomState>>>);

impl Buyers {
    /// The units counted for `customer`.
    pub fn held(&self, customer: &str) -> u64 {
        self.0
            .as_ref()
            .and_then(|counts| counts.get(customer).copied())
            .unwrap_or(0)
    }

    pub fn add(&mut self, customer: &str, quantity: u64) {
        if quantity == 0 {
            return;
        }
        let counts = self.0.get_or_insert_with(Box::default);
        match counts.get_mut(customer) {
            Some(count) => *count = count.saturating_add(quantity),
            None => {
                counts.insert(customer.into(), quantity);
            }
        }
    }

    /// Gives back counted units (a counted hold was cancelled, expired or rolled back).
    pub fn remove(&mut self, customer: &str, quantity: u64) {
        let Some(counts) = self.0.as_mut() else {
            debug_assert!(quantity == 0, "giving back units never counted");
            return;
        };
        if let Some(count) = counts.get_mut(customer) {
            debug_assert!(*count >= quantity, "giving back more than was counted");
            *count = count.saturating_sub(quantity);
            if *count == 0 {
                counts.remove(customer);
                if counts.is_empty() {
                    self.0 = None;
                }
            }
        } else {
            debug_assert!(quantity == 0, "giving back units never counted");
        }
    }

    /// How many customers have a count.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |counts| counts.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every (customer, count), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .iter()
            .flat_map(|counts| counts.iter().map(|(c, n)| (&**c, *n)))
    }
}

/// Which lines of a reservation (by index) were counted toward a purchase limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LineSet(u128);

const _: () = assert!(RESERVATION_LINES_MAX <= 128, "LineSet holds 128 lines");

impl LineSet {
    pub const EMPTY: LineSet = LineSet(0);

    pub fn insert(&mut self, line: usize) {
        debug_assert!(line < 128);
        self.0 |= 1u128 << (line & 127);
    }

    pub fn contains(self, line: usize) -> bool {
        line < 128 && self.0 & (1u128 << line) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_and_go_and_empty_buyers_keep_no_map() {
        let mut b = Buyers::default();
        b.add("a", 2);
        b.add("a", 1);
        b.add("b", 1);
        assert_eq!(
            (b.held("a"), b.held("b"), b.held("c"), b.len()),
            (3, 1, 0, 2)
        );
        b.remove("a", 3);
        b.remove("b", 1);
        assert_eq!(b, Buyers::default(), "no map left once every count is zero");
    }

    #[test]
    fn rules_patch_and_check() {
        let rules = SaleRules {
            max_per_customer: Some(2),
            starts_at: Some(10),
            ends_at: None,
        };
        let patched = rules.patched(RulesPatch {
            max_per_customer: Some(None),
            ends_at: Some(Some(5)),
            ..RulesPatch::default()
        });
        assert_eq!(
            patched,
            SaleRules {
                max_per_customer: None,
                starts_at: Some(10),
                ends_at: Some(5)
            }
        );
        assert_eq!(patched.check(), Err(RulesError::WindowEndsBeforeStart));
        assert!(rules.check().is_ok());
    }

    #[test]
    fn rules_are_one_pointer_encoded_as_the_rules_and_empty_when_none_is_left() {
        assert_eq!(std::mem::size_of::<Rules>(), std::mem::size_of::<usize>());
        let some = SaleRules {
            max_per_customer: Some(2),
            starts_at: None,
            ends_at: Some(9),
        };
        let config = bincode::config::standard();
        for rules in [SaleRules::default(), some] {
            for threshold in [None, Some(0), Some(300)] {
                let mut kept = Rules::from(rules);
                kept.set_low_stock_threshold(threshold);
                assert_eq!(*kept, rules);
                assert_eq!(kept.low_stock_threshold(), threshold);
                let mut expected = bincode::serde::encode_to_vec(rules, config).unwrap();
                expected.extend(bincode::serde::encode_to_vec(threshold, config).unwrap());
                let bytes = bincode::serde::encode_to_vec(&kept, config).unwrap();
                assert_eq!(
                    bytes, expected,
                    "the same bytes as the rules themselves, then the threshold"
                );
                let (back, _): (Rules, usize) =
                    bincode::serde::decode_from_slice(&bytes, config).unwrap();
                assert_eq!(back, kept);
            }
        }
        let mut kept = Rules::from(some);
        kept.set(SaleRules::default());
        assert_eq!(kept, Rules::default(), "no allocation once no rule is left");
        kept.max_per_customer = Some(1);
        assert_eq!(kept.max_per_customer, Some(1));
    }

    /// The threshold and the rules share one allocation, each kept when the other changes,
    /// and the allocation goes once neither is left.
    #[test]
    fn the_threshold_shares_the_rules_allocation() {
        let mut kept = Rules::default();
        kept.set_low_stock_threshold(Some(5));
        assert_eq!(
            (kept.low_stock_threshold(), *kept),
            (Some(5), SaleRules::default())
        );
        kept.max_per_customer = Some(2);
        kept.set(SaleRules {
            max_per_customer: Some(3),
            ..SaleRules::default()
        });
        assert_eq!(
            kept.low_stock_threshold(),
            Some(5),
            "set keeps the threshold"
        );
        kept.set_low_stock_threshold(None);
        assert_eq!(
            kept.max_per_customer,
            Some(3),
            "clearing the threshold keeps the rules"
        );
        kept.set(SaleRules::default());
        assert_eq!(kept, Rules::default());
        kept.set_low_stock_threshold(Some(0));
        assert_ne!(kept, Rules::default(), "0 is a threshold");
        kept.set_low_stock_threshold(None);
        assert_eq!(kept, Rules::default());
    }

    #[test]
    fn line_sets_hold_every_line_index() {
        let mut set = LineSet::EMPTY;
        set.insert(0);
        set.insert(99);
        assert!(set.contains(0) && set.contains(99) && !set.contains(1));
        assert!(!set.contains(500));
    }
}
