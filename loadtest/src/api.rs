//! The few requests to stockd the scenarios make besides their load: setting up products
//! and reading the server's state to verify it.

use serde_json::{json, Value};

pub(crate) async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let res = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Creates a product with `on_hand` units; anything but 201 is an error.
pub(crate) async fn create_product(
    client: &reqwest::Client,
    base: &str,
    sku: &str,
    on_hand: u64,
) -> Result<(), String> {
    let body = json!({"sku": sku, "name": format!("Load-test item {sku}"), "on_hand": on_hand});
    match post_json(client, &format!("{base}/v1/products"), &body).await? {
        (201, _) => Ok(()),
        (status, body) => Err(format!("creating {sku}: {status} {body}")),
    }
}

pub(crate) async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let res = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("GET {url}: {}", res.status()));
    }
    res.json().await.map_err(|e| format!("GET {url}: {e}"))
}
