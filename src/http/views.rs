//! JSON views of products and reservations, exactly as API.md shows them.

use serde::Serialize;

use crate::clock::rfc3339;
use crate::domain::{Price, Product, Reservation};
use crate::keyring::ApiKey;

#[derive(Serialize)]
pub struct ProductView<'a> {
    sku: &'a str,
    name: &'a str,
    price: Option<&'a Price>,
    on_hand: u64,
    reserved: u64,
    available: u64,
    sold: u64,
    version: u64,
    max_per_customer: Option<u64>,
    sale_starts_at: Option<String>,
    sale_ends_at: Option<String>,
    low_stock_threshold: Option<u64>,
    created_at: String,
    updated_at: String,
}

impl<'a> From<&'a Product> for ProductView<'a> {
    fn from(p: &'a Product) -> Self {
        ProductView {
            sku: &p.sku,
            name: &p.name,
            price: p.price.as_ref(),
            on_hand: p.on_hand,
            reserved: p.reserved,
            available: p.available(),
            sold: p.sold,
            version: p.version,
            max_per_customer: p.rules.max_per_customer,
            sale_starts_at: p.rules.starts_at.map(rfc3339),
            sale_ends_at: p.rules.ends_at.map(rfc3339),
            low_stock_threshold: p.low_stock_threshold(),
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

/// An API key as `GET /v1/admin/keys` lists it; `POST /v1/admin/keys` adds its secret,
/// which is shown that once. The secret's hash is never shown.
#[derive(Serialize)]
pub struct KeyView<'a> {
    id: String,
    name: &'a str,
    scopes: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
    created_at: String,
}

impl<'a> KeyView<'a> {
    pub fn listed(key: &'a ApiKey) -> KeyView<'a> {
        KeyView {
            id: key.id.to_string(),
            name: &key.name,
            scopes: key.scopes.iter().map(|s| s.as_str()).collect(),
            secret: None,
            created_at: rfc3339(key.created_at),
        }
    }

    pub fn created(key: &'a ApiKey, secret: &'a str) -> KeyView<'a> {
        KeyView {
            secret: Some(secret),
            ..KeyView::listed(key)
        }
    }
}

#[derive(Serialize)]
pub struct PageView<'a> {
    pub items: Vec<ProductView<'a>>,
    pub next_after: Option<&'a str>,
}

#[derive(Serialize)]
pub struct LineView<'a> {
    sku: &'a str,
    quantity: u64,
}

#[derive(Serialize)]
pub struct ReservationView<'a> {
    id: String,
    customer_id: &'a str,
    items: Vec<LineView<'a>>,
    status: &'static str,
    created_at: String,
    expires_at: String,
    confirmed_at: Option<String>,
    order_id: Option<&'a str>,
}

impl<'a> ReservationView<'a> {
    pub fn new(r: &'a Reservation) -> Self {
        ReservationView {
            id: r.id.to_string(),
            customer_id: &r.customer_id,
            items: r
                .items
                .iter()
                .map(|l| LineView {
                    sku: &l.sku,
                    quantity: l.quantity,
                })
                .collect(),
            status: r.status.as_str(),
            created_at: rfc3339(r.created_at),
            expires_at: rfc3339(r.expires_at),
            confirmed_at: r.confirmed_at.map(rfc3339),
            order_id: r.order_id.as_deref(),
        }
    }

    /// The body first answered for this reservation (pending, original deadline): what an
    /// idempotent replay answers.
    pub fn original(r: &'a Reservation) -> Self {
        let mut view = ReservationView::new(r);
        view.status = "pending";
        view.expires_at = rfc3339(r.original_expires_at);
        view.confirmed_at = None;
        view.order_id = None;
        view
    }
}
