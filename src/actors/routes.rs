//! The supervisor's routing table: SKU → where the product lives, and the SKUs in order.
//!
//! A product without an actor (passive) is plain data in `passive`, which is the state's
//! own map of products, taken as it is: a recovered state's, or the one a cluster node's
//! state machine lends a leader's epoch. So building the table moves no product, and a new
//! leader serves a million products as soon as the state is lent (docs/PERFORMANCE.md,
//! "Cluster"). The others (`L`: an actor, or a rebuild under way) are in `live`, a map the
//! size of the resident actors; a SKU is in exactly one of the two. The SKUs in order
//! (`SkuIndex`) are what a page of `GET /v1/products` walks: a cluster node's state keeps
//! them as it folds (`storage::fold::SkuOrder`), and a single server's supervisor sorts them
//! from the recovered products once, at start-up.

use std::collections::HashMap;

use crate::domain::{Product, SkuIndex};
use crate::storage::fold::Products;

pub struct Routes<L> {
    /// Products without an actor: the state's map (an `IndexMap`, dense).
    passive: Products,
    /// Products with an actor, or being rebuilt.
    live: HashMap<String, L, foldhash::fast::RandomState>,
    /// Every SKU of both, in order.
    index: SkuIndex,
}

/// Where a product lives: as plain data, or with what `L` says.
#[derive(Debug, PartialEq)]
pub enum Route<'a, L> {
    Passive(&'a Product),
    Live(&'a L),
}

/// `Route`, to change in place.
pub enum RouteMut<'a, L> {
    Passive(&'a mut Product),
    Live(&'a mut L),
}

/// A route taken out of the table.
#[derive(Debug, PartialEq)]
pub enum Slot<L> {
    Passive(Product),
    Live(L),
}

impl<L> Routes<L> {
    /// The table of `products`, all passive, whose SKUs in order are `index` (see
    /// `storage::fold::State::take_sku_index`). Moves nothing.
    pub fn new(products: Products, index: SkuIndex) -> Routes<L> {
        assert_eq!(
            index.len(),
            products.len(),
            "the index holds the products' SKUs"
        );
        Routes {
            passive: products,
            live: HashMap::default(),
            index,
        }
    }

    /// The SKUs added since the index was last built are a large enough share of it:
    /// rebuilds it (`SkuIndex::compact`). Answers whether it did.
    pub fn compact(&mut self) -> bool {
        self.index.compact()
    }

    /// Shrinks the map of live products to the ones left (after a passivation sweep).
    pub fn shrink_live(&mut self) {
        self.live.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        debug_assert_eq!(self.index.len(), self.passive.len() + self.live.len());
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, sku: &str) -> Option<Route<'_, L>> {
        // The live map first: it is small, and holds what a sale is busy with.
        if let Some(live) = self.live.get(sku) {
            return Some(Route::Live(live));
        }
        self.passive.get(sku).map(Route::Passive)
    }

    pub fn get_mut(&mut self, sku: &str) -> Option<RouteMut<'_, L>> {
        if let Some(live) = self.live.get_mut(sku) {
            return Some(RouteMut::Live(live));
        }
        self.passive.get_mut(sku).map(RouteMut::Passive)
    }

    /// `product` becomes passive under `sku` (its own); returns what was live there.
    pub fn set_passive(&mut self, sku: String, product: Product) -> Option<L> {
        debug_assert_eq!(product.sku, sku, "a product is routed by its own SKU");
        let was = self.live.remove(sku.as_str());
        if was.is_none() {
            self.index.insert(&sku);
        }
        let replaced = self.passive.insert(sku, product);
        debug_assert!(
            replaced.is_none() || was.is_none(),
            "a SKU is passive or live, not both"
        );
        was
    }

    /// `sku` becomes live with `live`; returns its passive product, if it was passive.
    pub fn set_live(&mut self, sku: &str, live: L) -> Option<Product> {
        let was = self.passive.swap_remove(sku);
        match self.live.get_mut(sku) {
            Some(slot) => {
                debug_assert!(was.is_none(), "a SKU is passive or live, not both");
                *slot = live;
            }
            None => {
                if was.is_none() {
                    self.index.insert(sku);
                }
                self.live.insert(sku.to_string(), live);
            }
        }
        was
    }

    pub fn remove(&mut self, sku: &str) -> Option<Slot<L>> {
        let slot = match self.live.remove(sku) {
            Some(live) => Slot::Live(live),
            None => Slot::Passive(self.passive.swap_remove(sku)?),
        };
        let indexed = self.index.remove(sku);
        debug_assert!(indexed, "every routed SKU is in the index");
        Some(slot)
    }

    /// The products after `after` (all if `None`), in SKU order.
    pub fn after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a str, Route<'a, L>)> + 'a {
        self.index.after(after).filter_map(|sku| {
            let route = self.get(sku);
            debug_assert!(route.is_some(), "every SKU in the index is routed");
            Some((sku, route?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(sku: &str, on_hand: u64) -> Product {
        Product::new(sku.to_string(), "n".into(), None, on_hand, 1)
    }

    fn products(skus: &[&str]) -> Products {
        skus.iter()
            .enumerate()
            .map(|(i, sku)| (sku.to_string(), product(sku, i as u64)))
            .collect()
    }

    fn table(skus: &[&str]) -> Routes<u32> {
        Routes::new(products(skus), SkuIndex::of(skus.iter().copied()))
    }

    /// The SKUs listed, each with its on-hand units if passive, or its live value + 1000.
    fn listed(routes: &Routes<u32>, after: Option<&str>) -> Vec<(String, u64)> {
        routes
            .after(after)
            .map(|(sku, route)| {
                let n = match route {
                    Route::Passive(p) => {
                        assert_eq!(p.sku, sku, "each SKU keeps its product");
                        p.on_hand
                    }
                    Route::Live(&n) => 1000 + u64::from(n),
                };
                (sku.to_string(), n)
            })
            .collect()
    }

    #[test]
    fn a_product_moves_between_passive_and_live_and_keeps_its_place_in_order() {
        let mut routes = table(&["C", "A"]);
        assert_eq!(listed(&routes, None), [("A".into(), 1), ("C".into(), 0)]);
        assert_eq!(routes.get("B"), None);
        // Live: its product is handed back, and it stays in order.
        let was = routes.set_live("A", 7).expect("A was passive");
        assert_eq!((was.sku.as_str(), was.on_hand), ("A", 1));
        assert_eq!(routes.get("A"), Some(Route::Live(&7)));
        if let Some(RouteMut::Live(n)) = routes.get_mut("A") {
            *n = 8;
        }
        assert_eq!(routes.set_live("A", 9), None, "already live");
        assert_eq!(listed(&routes, None), [("A".into(), 1009), ("C".into(), 0)]);
        // Passive again: what was live there is handed back.
        assert_eq!(routes.set_passive("A".into(), product("A", 5)), Some(9));
        assert_eq!(listed(&routes, None), [("A".into(), 5), ("C".into(), 0)]);
        if let Some(RouteMut::Passive(p)) = routes.get_mut("C") {
            p.on_hand = 3;
        }
        // New SKUs, passive or live, join the order.
        assert_eq!(routes.set_passive("B".into(), product("B", 2)), None);
        assert_eq!(routes.set_live("AA", 1), None);
        assert_eq!(
            listed(&routes, None),
            [
                ("A".into(), 5),
                ("AA".into(), 1001),
                ("B".into(), 2),
                ("C".into(), 3)
            ]
        );
        assert_eq!(
            listed(&routes, Some("AA")),
            [("B".into(), 2), ("C".into(), 3)]
        );
        assert_eq!(routes.len(), 4);
        // Removed from wherever it lives, and from the order.
        assert_eq!(routes.remove("AA"), Some(Slot::Live(1)));
        assert!(matches!(routes.remove("B"), Some(Slot::Passive(p)) if p.on_hand == 2));
        assert_eq!(routes.remove("B"), None);
        assert_eq!(listed(&routes, None), [("A".into(), 5), ("C".into(), 3)]);
        assert_eq!(routes.len(), 2);
    }

    #[test]
    #[should_panic(expected = "the index holds the products' SKUs")]
    fn a_table_refuses_an_index_of_other_skus() {
        Routes::<u32>::new(products(&["A", "B"]), SkuIndex::of(["A"]));
    }

    #[test]
    fn compacting_keeps_every_route() {
        let skus: Vec<String> = (0..64).map(|i| format!("SKU-{i:03}")).collect();
        let refs: Vec<&str> = skus.iter().map(String::as_str).collect();
        let mut routes = table(&refs);
        for i in 64..80 {
            let sku = format!("SKU-{i:03}");
            routes.set_passive(sku.clone(), product(&sku, i));
        }
        routes.set_live("SKU-003", 3);
        assert!(matches!(routes.remove("SKU-010"), Some(Slot::Passive(_))));
        assert!(routes.compact(), "16 added to 79");
        let all: Vec<String> = routes.after(None).map(|(s, _)| s.to_string()).collect();
        let expected: Vec<String> = (0..80)
            .filter(|&i| i != 10)
            .map(|i| format!("SKU-{i:03}"))
            .collect();
        assert_eq!(all, expected);
        assert_eq!(routes.get("SKU-003"), Some(Route::Live(&3)));
        assert_eq!(routes.len(), 79);
    }
}
