//! The SKUs of a catalogue in order: what a page of `GET /v1/products` walks.
//!
//! Products themselves live in a hash map (`storage::fold::Products`), in no useful order;
//! this index keeps every SKU once, in the strings' order, in a B-tree of keys. A state kept
//! by a cluster node's state machine carries one, kept by the fold as records create and
//! delete products (`storage::fold::SkuOrder`), so that a new leader's supervisor takes it
//! with the products instead of sorting a million SKUs while the cluster waits for it
//! (docs/PERFORMANCE.md, "Cluster"). A single server's supervisor builds its own from the
//! recovered products (`SkuIndex::of`).
//!
//! A B-tree filled in key order, as a catalogue import creates SKUs, splits its nodes in the
//! middle and leaves them about half full, while one built from sorted input is full; and
//! the nodes allocated while product actors run pin the allocator's pages among the actors'
//! blocks (docs/PERFORMANCE.md, "Where the memory after a drain was"). `compact` rebuilds
//! the tree from its sorted keys, into full nodes allocated together, once enough SKUs were
//! added (amortized). The supervisor calls it once the actors of a large passivation sweep
//! have stopped; a cluster node's state machine after each batch of entries it applies.

use std::collections::BTreeSet;
use std::ops::Bound;

/// Every SKU once, in order. Two indexes are equal if they hold the same SKUs.
#[derive(Clone, Debug, Default)]
pub struct SkuIndex {
    keys: BTreeSet<SkuKey>,
    /// SKUs inserted since the tree was last built from sorted input.
    added: usize,
}

impl PartialEq for SkuIndex {
    fn eq(&self, other: &SkuIndex) -> bool {
        self.keys == other.keys
    }
}

impl Eq for SkuIndex {}

/// `compact` rebuilds the tree only once the SKUs added since it was last built are at
/// least this share of it (1/8): the rebuild is linear in the catalogue (~100 ms at a
/// million SKUs), so its cost stays a constant per SKU added (amortized), and a sweep after
/// a handful of creates does not pay it.
const COMPACT_ADDED_SHARE: usize = 8;

impl SkuIndex {
    /// The index of `skus` (each once, in any order): their keys sorted, and the tree
    /// built from them in one pass, its nodes full. The SKUs themselves are compared only
    /// where two share their first 8 bytes (`SkuKey`). Panics if a SKU comes twice (the
    /// callers take them from a map's keys).
    pub fn of<'a>(skus: impl IntoIterator<Item = &'a str>) -> SkuIndex {
        let mut keys: Vec<SkuKey> = skus.into_iter().map(SkuKey::new).collect();
        keys.sort_unstable();
        let n = keys.len();
        let keys: BTreeSet<SkuKey> = keys.into_iter().collect();
        assert_eq!(keys.len(), n, "each SKU once");
        SkuIndex { keys, added: 0 }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, sku: &str) -> bool {
        self.keys.contains(sku)
    }

    /// Adds `sku`; answers whether it was new.
    pub fn insert(&mut self, sku: &str) -> bool {
        if self.keys.contains(sku) {
            return false;
        }
        self.keys.insert(SkuKey::new(sku));
        self.added += 1;
        true
    }

    /// Removes `sku`; answers whether it was there.
    pub fn remove(&mut self, sku: &str) -> bool {
        self.keys.remove(sku)
    }

    /// The SKUs after `after` (all if `None`), in order.
    pub fn after(&self, after: Option<&str>) -> impl Iterator<Item = &str> {
        let range = match after {
            Some(after) => self
                .keys
                .range::<str, _>((Bound::Excluded(after), Bound::Unbounded)),
            None => self.keys.range::<str, _>(..),
        };
        range.map(|key| &*key.sku)
    }

    /// Rebuilds the tree from its sorted keys if enough SKUs were added since it was last
    /// built (`COMPACT_ADDED_SHARE`): full nodes, allocated now (see the module's
    /// documentation). Answers whether it did.
    pub fn compact(&mut self) -> bool {
        if self.added == 0 || self.added * COMPACT_ADDED_SHARE < self.keys.len() {
            return false;
        }
        self.added = 0;
        // In SKU order: the tree is built in one pass, its nodes full.
        self.keys = std::mem::take(&mut self.keys).into_iter().collect();
        true
    }
}

/// A SKU as the index keeps it, with its first 8 bytes as an integer beside it
/// (`sku_prefix`). Keys order exactly as their SKUs do, so that the index is searched by
/// `&str` (`Borrow`); but comparing two keys compares the integers, and reads the strings
/// behind their pointers only when two SKUs share their first 8 bytes. (Building the index
/// compares each key with its neighbours twice, its order checked and its duplicates looked
/// for: at a million SKUs scattered over the heap, reading the strings was a cache miss
/// each time.) 24 bytes: the SKU is a `Box<str>`. SKUs that share their first 8 bytes
/// (`SKU-00012345`) gain nothing from the prefix.
#[derive(Clone, Debug)]
struct SkuKey {
    prefix: u64,
    sku: Box<str>,
}

impl SkuKey {
    fn new(sku: &str) -> SkuKey {
        SkuKey {
            prefix: sku_prefix(sku),
            sku: sku.into(),
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
        /// The index lists the SKUs in the strings' own order, whatever they share: a
        /// prefix of 8 bytes or more, a shorter SKU that is a prefix of a longer one, a NUL
        /// byte (which the padding of a short SKU also reads as), bytes of any value; built
        /// at once or one SKU at a time.
        #[test]
        fn the_index_is_in_the_strings_order(
            skus in proptest::collection::hash_set("(SKU-12|S|\\x00|é)?[a-c\\x00\\xff]{0,10}", 0..200)
        ) {
            let mut expected: Vec<String> = skus.iter().cloned().collect();
            expected.sort();
            let built = SkuIndex::of(skus.iter().map(String::as_str));
            let mut inserted = SkuIndex::default();
            for sku in &skus {
                proptest::prop_assert!(inserted.insert(sku));
            }
            for index in [&built, &inserted] {
                let listed: Vec<&str> = index.after(None).collect();
                proptest::prop_assert_eq!(&listed, &expected);
                // Found by `&str` after any SKU, absent or present.
                for (i, sku) in expected.iter().enumerate() {
                    proptest::prop_assert!(index.contains(sku));
                    let next = index.after(Some(sku)).next();
                    proptest::prop_assert_eq!(next, expected.get(i + 1).map(String::as_str));
                    let mut absent = sku.clone();
                    absent.push('\u{1}');
                    proptest::prop_assert!(!index.contains(&absent));
                }
            }
        }
    }

    #[test]
    fn it_behaves_as_an_ordered_set() {
        let mut index = SkuIndex::of(["C", "A"]);
        assert_eq!(
            (index.len(), index.contains("A"), index.contains("B")),
            (2, true, false)
        );
        assert!(index.insert("B"));
        assert!(!index.insert("C"), "already there");
        assert_eq!(index.after(None).collect::<Vec<_>>(), ["A", "B", "C"]);
        assert_eq!(index.after(Some("A")).collect::<Vec<_>>(), ["B", "C"]);
        assert_eq!(index.after(Some("AA")).collect::<Vec<_>>(), ["B", "C"]);
        assert!(index.remove("B"));
        assert!(!index.remove("B"));
        assert_eq!(index.after(None).collect::<Vec<_>>(), ["A", "C"]);
        assert_eq!(index.len(), 2);
    }

    #[test]
    #[should_panic(expected = "each SKU once")]
    fn a_sku_given_twice_is_refused() {
        SkuIndex::of(["A", "B", "A"]);
    }

    #[test]
    fn compacting_keeps_every_sku_and_waits_for_enough_additions() {
        let skus: Vec<String> = (0..64).map(|i| format!("SKU-{i:03}")).collect();
        let mut index = SkuIndex::of(skus.iter().map(String::as_str));
        assert!(!index.compact(), "nothing added since it was built");
        for i in 64..70 {
            index.insert(&format!("SKU-{i:03}"));
        }
        assert!(!index.compact(), "6 added to 70: less than an eighth");
        for i in 70..80 {
            index.insert(&format!("SKU-{i:03}"));
        }
        assert!(index.remove("SKU-010"));
        assert!(index.compact(), "16 added to 79");
        assert!(!index.compact(), "nothing added since");
        let expected: Vec<String> = (0..80)
            .filter(|&i| i != 10)
            .map(|i| format!("SKU-{i:03}"))
            .collect();
        assert_eq!(index.after(None).collect::<Vec<_>>(), expected);
        assert_eq!(index.len(), 79);
    }
}
