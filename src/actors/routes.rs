//! The supervisor's routing table: SKU → where the product lives, in SKU order.
//!
//! A B-tree keeps the SKUs in order (pages of `GET /v1/products`), but only SKU → index;
//! the slots themselves (a product's plain data is ~140 bytes) live in a slab. Why: a
//! B-tree filled in key order, as a catalogue import creates SKUs, splits its nodes in the
//! middle and leaves them about half full, while one built from sorted input at start-up is
//! full. With the slots inside the tree's nodes, that half made an imported catalogue take
//! 1.63× the memory of the same catalogue after a restart (docs/PERFORMANCE.md, "Catalogue
//! import over HTTP"); with an index there, the half-full nodes waste ~30 bytes a product.
//!
//! Worse than their half-full nodes, the tree's nodes allocated while product actors run
//! pin the allocator's pages: an internal node (464 bytes) falls in mimalloc's 512-byte
//! size class, where product actors allocate too, so the nodes an import creates
//! while it activates products are scattered one or two to a 64 KiB page among the
//! actors' blocks, and once the actors stop those pages cannot be returned. Measured after
//! draining 100,000 activated products: 1,148 pages of that class, 71 MiB, held 1.5 MiB of
//! nodes. `compact` rebuilds the tree from its sorted entries, into as few pages as its
//! full nodes need; the supervisor calls it once the actors of a large passivation sweep
//! have stopped (docs/PERFORMANCE.md, "Where the memory after a drain was"). (A key is
//! a `SkuKey` now, 24 bytes as the `String` was, so those sizes hold.)

use std::collections::BTreeMap;
use std::ops::Bound;

use slab::Slab;

pub struct Routes<T> {
    index: BTreeMap<SkuKey, usize>,
    slots: Slab<T>,
    /// SKUs added to the index since it was last built from sorted input.
    added: usize,
}

/// `compact` rebuilds the index only once the SKUs added since it was last built are at
/// least this share of it (1/8): the rebuild is linear in the catalogue (~100 ms at a
/// million SKUs, in the supervisor), so its cost stays a constant per SKU added
/// (amortized), and a sweep after a handful of creates does not pay it.
const COMPACT_ADDED_SHARE: usize = 8;

impl<T> Routes<T> {
    /// The table of `items` (each SKU once, in any order). Each item is moved once, into
    /// its slot; the index's keys (`SkuKey`) are sorted, and the tree is built from them
    /// in one pass (`collect` checks their order again, and looks for duplicates).
    /// No SKU is copied, and the SKUs themselves are compared only where two share their
    /// first 8 bytes (a leader's epoch builds its table from a million products this way:
    /// docs/PERFORMANCE.md, "Cluster").
    pub fn from_items(items: impl IntoIterator<Item = (String, T)>) -> Routes<T> {
        let items = items.into_iter();
        let mut slots = Slab::with_capacity(items.size_hint().0);
        let mut keys: Vec<(SkuKey, usize)> = items
            .map(|(sku, item)| (SkuKey::new(sku), slots.insert(item)))
            .collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let index = keys.into_iter().collect::<BTreeMap<_, _>>();
        assert_eq!(index.len(), slots.len(), "each SKU once");
        Routes {
            index,
            slots,
            added: 0,
        }
    }

    /// Rebuilds the index from its sorted entries if enough SKUs were added since it was
    /// last built (`COMPACT_ADDED_SHARE`): full nodes, allocated now (see the module's
    /// documentation). Answers whether it did.
    pub fn compact(&mut self) -> bool {
        if self.added == 0 || self.added * COMPACT_ADDED_SHARE < self.index.len() {
            return false;
        }
        self.added = 0;
        // In SKU order: the tree is built in one pass, its nodes full.
        self.index = std::mem::take(&mut self.index).into_iter().collect();
        true
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, sku: &str) -> Option<&T> {
        self.index.get(sku).map(|&i| &self.slots[i])
    }

    pub fn get_mut(&mut self, sku: &str) -> Option<&mut T> {
        let i = *self.index.get(sku)?;
        Some(&mut self.slots[i])
    }

    /// Puts `slot` under `sku`; returns the one it replaces.
    pub fn insert(&mut self, sku: String, slot: T) -> Option<T> {
        match self.index.get(sku.as_str()) {
            Some(&i) => Some(std::mem::replace(&mut self.slots[i], slot)),
            None => {
                let i = self.slots.insert(slot);
                self.index.insert(SkuKey::new(sku), i);
                self.added += 1;
                None
            }
        }
    }

    pub fn remove(&mut self, sku: &str) -> Option<T> {
        let i = self.index.remove(sku)?;
        Some(self.slots.remove(i))
    }

    /// The products after `after` (all if `None`), in SKU order.
    pub fn after(&self, after: Option<String>) -> impl Iterator<Item = (&str, &T)> {
        let range = match &after {
            Some(after) => self
                .index
                .range::<str, _>((Bound::Excluded(after.as_str()), Bound::Unbounded)),
            None => self.index.range::<str, _>(..),
        };
        range.map(|(key, &i)| (&*key.sku, &self.slots[i]))
    }
}

/// A SKU as the index keeps it, with its first 8 bytes as an integer beside it
/// (`sku_prefix`). Keys order exactly as their SKUs do, so that the index is found by
/// `&str` (`Borrow`); but comparing two keys compares the integers held in the tree's
/// nodes, and reads the strings behind their pointers only when two SKUs share their
/// first 8 bytes. (Building the index compares each key with its neighbours twice, its
/// order checked and its duplicates looked for: at a million SKUs scattered over the
/// heap, reading the strings was a cache miss each time.) The SKU is a `Box<str>`, so a
/// key is 24 bytes, as a `String` was: the tree's nodes keep their sizes, and their
/// allocator size classes (see the module's documentation). SKUs that share their first
/// 8 bytes (`SKU-00012345`) gain nothing from the prefix.
#[derive(Clone, Debug)]
struct SkuKey {
    prefix: u64,
    sku: Box<str>,
}

impl SkuKey {
    fn new(sku: String) -> SkuKey {
        SkuKey {
            prefix: sku_prefix(&sku),
            sku: sku.into_boxed_str(),
        }
    }
}

impl PartialEq for SkuKey {
    fn eq(&self, other: &SkuKey) -> bool {
        self.prefix == other.prefix && self.sku == other.sku
    }
}

impl Eq for SkuKey {}

impl Ord for SkuKey {
    fn cmp(&self, other: &SkuKey) -> std::cmp::Ordering {
        self.prefix
            .cmp(&other.prefix)
            .then_with(|| self.sku.cmp(&other.sku))
    }
}

impl PartialOrd for SkuKey {
    fn partial_cmp(&self, other: &SkuKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<str> for SkuKey {
    fn borrow(&self) -> &str {
        &self.sku
    }
}

/// The first 8 bytes of `sku`, big-endian, zero-padded. Ordering SKUs by it, and by the
/// whole SKU when it ties, is their order as strings (the property test below).
fn sku_prefix(sku: &str) -> u64 {
    let mut bytes = [0u8; 8];
    let n = sku.len().min(8);
    bytes[..n].copy_from_slice(&sku.as_bytes()[..n]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The table lists the SKUs in the strings' own order, each with its item,
        /// whatever they share: a prefix of 8 bytes or more, a shorter SKU that is a
        /// prefix of a longer one, a NUL byte (which the padding of a short SKU also reads
        /// as), bytes of any value.
        #[test]
        fn the_table_is_in_the_strings_order(
            skus in proptest::collection::hash_set("(SKU-12|S|\\x00|é)?[a-c\\x00\\xff]{0,10}", 0..200)
        ) {
            let mut expected: Vec<String> = skus.iter().cloned().collect();
            expected.sort();
            let map: std::collections::HashMap<String, usize> =
                skus.iter().map(|sku| (sku.clone(), sku.len())).collect();
            let routes = Routes::from_items(map);
            let listed: Vec<String> = routes.after(None).map(|(sku, &n)| {
                assert_eq!(n, sku.len(), "each SKU keeps its item");
                assert_eq!(routes.get(sku), Some(&n));
                sku.to_string()
            }).collect();
            proptest::prop_assert_eq!(&listed, &expected);
            // Found by `&str` after any SKU, absent or present.
            for (i, sku) in expected.iter().enumerate() {
                let next = routes.after(Some(sku.clone())).next().map(|(s, _)| s);
                proptest::prop_assert_eq!(next, expected.get(i + 1).map(String::as_str));
                let mut absent = sku.clone();
                absent.push('\u{1}');
                proptest::prop_assert_eq!(routes.get(&absent), None);
            }
        }
    }

    #[test]
    fn it_behaves_as_an_ordered_map() {
        let mut routes = Routes::from_items([("C".to_string(), 3), ("A".to_string(), 1)]);
        assert_eq!(
            (routes.len(), routes.get("A"), routes.get("B")),
            (2, Some(&1), None)
        );
        assert_eq!(routes.insert("B".into(), 2), None);
        assert_eq!(routes.insert("C".into(), 30), Some(3));
        *routes.get_mut("A").unwrap() = 10;
        let all: Vec<_> = routes
            .after(None)
            .map(|(s, v)| (s.to_string(), *v))
            .collect();
        assert_eq!(all, [("A".into(), 10), ("B".into(), 2), ("C".into(), 30)]);
        let rest: Vec<_> = routes.after(Some("A".into())).map(|(_, v)| *v).collect();
        assert_eq!(rest, [2, 30]);
        assert_eq!(routes.remove("B"), Some(2));
        assert_eq!(routes.remove("B"), None);
        // A freed slot is reused, and the index still points right.
        assert_eq!(routes.insert("D".into(), 4), None);
        let all: Vec<_> = routes
            .after(None)
            .map(|(s, v)| (s.to_string(), *v))
            .collect();
        assert_eq!(all, [("A".into(), 10), ("C".into(), 30), ("D".into(), 4)]);
        assert_eq!(routes.len(), 3);
    }

    #[test]
    fn compacting_keeps_every_route_and_waits_for_enough_additions() {
        let mut routes = Routes::from_items((0..64).map(|i| (format!("SKU-{i:03}"), i)));
        assert!(!routes.compact(), "nothing added since it was built");
        for i in 64..70 {
            routes.insert(format!("SKU-{i:03}"), i);
        }
        assert!(!routes.compact(), "6 added to 70: less than an eighth");
        for i in 70..80 {
            routes.insert(format!("SKU-{i:03}"), i);
        }
        assert_eq!(routes.remove("SKU-010"), Some(10));
        assert!(routes.compact(), "16 added to 79");
        assert!(!routes.compact(), "nothing added since");
        let all: Vec<_> = routes
            .after(None)
            .map(|(s, v)| (s.to_string(), *v))
            .collect();
        let expected: Vec<_> = (0..80)
            .filter(|&i| i != 10)
            .map(|i| (format!("SKU-{i:03}"), i))
            .collect();
        assert_eq!(all, expected);
        assert_eq!(routes.get("SKU-079"), Some(&79));
        assert_eq!(routes.len(), 79);
    }
}
