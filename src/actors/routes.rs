//! The supervisor's routing table: SKU → where the product lives, in SKU order.
//!
//! A B-tree keeps the SKUs in order (pages of `GET /v1/products`), but only SKU → index;
//! the slots themselves (a product's plain data is ~140 bytes) live in a slab. Why: a
//! B-tree filled in key order, as a catalogue import creates SKUs, splits its nodes in the
//! middle and leaves them about half full, while one built from sorted input at start-up is
//! full. With the slots inside the tree's nodes, that half made an imported catalogue take
//! 1.63× the memory of the same catalogue after a restart (docs/PERFORMANCE.md, "Catalogue
//! import over HTTP"); with an index there, the half-full nodes waste ~30 bytes a product.

use std::collections::BTreeMap;
use std::ops::Bound;

use slab::Slab;

pub struct Routes<T> {
    index: BTreeMap<String, usize>,
    slots: Slab<T>,
}

impl<T> Routes<T> {
    /// The table of `sorted` (ascending SKUs, each once): the tree is built in one pass.
    pub fn from_sorted(sorted: impl ExactSizeIterator<Item = (String, T)>) -> Routes<T> {
        let mut slots = Slab::with_capacity(sorted.len());
        let index = sorted
            .map(|(sku, slot)| (sku, slots.insert(slot)))
            .collect::<BTreeMap<_, _>>();
        debug_assert_eq!(index.len(), slots.len(), "SKUs are unique");
        Routes { index, slots }
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
        match self.index.get(&sku) {
            Some(&i) => Some(std::mem::replace(&mut self.slots[i], slot)),
            None => {
                let i = self.slots.insert(slot);
                self.index.insert(sku, i);
                None
            }
        }
    }

    pub fn remove(&mut self, sku: &str) -> Option<T> {
        let i = self.index.remove(sku)?;
        Some(self.slots.remove(i))
    }

    /// The products after `after` (all if `None`), in SKU order.
    pub fn after(&self, after: Option<String>) -> impl Iterator<Item = (&String, &T)> {
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        self.index
            .range((start, Bound::Unbounded))
            .map(|(sku, &i)| (sku, &self.slots[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_behaves_as_an_ordered_map() {
        let mut routes =
            Routes::from_sorted([("A".to_string(), 1), ("C".to_string(), 3)].into_iter());
        assert_eq!(
            (routes.len(), routes.get("A"), routes.get("B")),
            (2, Some(&1), None)
        );
        assert_eq!(routes.insert("B".into(), 2), None);
        assert_eq!(routes.insert("C".into(), 30), Some(3));
        *routes.get_mut("A").unwrap() = 10;
        let all: Vec<_> = routes.after(None).map(|(s, v)| (s.clone(), *v)).collect();
        assert_eq!(all, [("A".into(), 10), ("B".into(), 2), ("C".into(), 30)]);
        let rest: Vec<_> = routes.after(Some("A".into())).map(|(_, v)| *v).collect();
        assert_eq!(rest, [2, 30]);
        assert_eq!(routes.remove("B"), Some(2));
        assert_eq!(routes.remove("B"), None);
        // A freed slot is reused, and the index still points right.
        assert_eq!(routes.insert("D".into(), 4), None);
        let all: Vec<_> = routes.after(None).map(|(s, v)| (s.clone(), *v)).collect();
        assert_eq!(all, [("A".into(), 10), ("C".into(), 30), ("D".into(), 4)]);
        assert_eq!(routes.len(), 3);
    }
}
