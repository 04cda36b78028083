//! The OpenAPI document served at `GET /openapi.json` (`src/http/openapi.json`): a valid
//! OpenAPI 3.1 document, whose examples fit their schemas, served as it is. That it matches
//! the router, route for route and problem code for problem code, is tested beside the
//! router (`src/http/router.rs`).

mod common;

use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

fn document() -> Value {
    serde_json::from_str(stockd::http::router::OPENAPI).expect("the document is JSON")
}

/// The official OpenAPI 3.1 schema, vendored (tests/fixtures/README.md says whence).
fn openapi_schema() -> Value {
    serde_json::from_str(include_str!("fixtures/openapi-3.1-schema.json")).unwrap()
}

fn messages(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// A validator for the schema at `pointer` in the document, with the whole document as its
/// root so that `#/components/...` references resolve.
fn component_validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#{pointer}"));
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("{pointer}: {e}"))
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let schema = openapi_schema();
    assert_eq!(
        schema["$id"],
        "https://spec.openapis.org/oas/3.1/schema/2022-10-07"
    );
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the OpenAPI 3.1 schema compiles");
    let doc = document();
    let errors = messages(&validator, &doc);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(doc["openapi"], "3.1.0");
}

/// The validator is not vacuous: it refuses what OpenAPI 3.1 refuses.
#[test]
fn the_schema_refuses_broken_documents() {
    let validator = jsonschema::validator_for(&openapi_schema()).unwrap();
    let broken = |change: &dyn Fn(&mut Value)| {
        let mut doc = document();
        change(&mut doc);
        !validator.is_valid(&doc)
    };
    assert!(broken(&|d| d["openapi"] = json!("3.0.3")));
    assert!(broken(&|d| {
        d["info"].as_object_mut().unwrap().remove("title");
    }));
    assert!(broken(
        &|d| d["paths"]["/health"]["get"]["responses"] = json!([])
    ));
    assert!(broken(&|d| {
        d["paths"]["/v1/products/{sku}"]["get"]["parameters"] =
            json!([{"name": "sku", "in": "path", "schema": {"type": "string"}}]);
    }));
    assert!(broken(&|d| d["paths"]["/health"]["fetch"] = json!({})));
}

/// Every example in the document validates against the schema it illustrates.
#[test]
fn examples_fit_their_schemas() {
    let doc = document();
    let validator_for = |pointer: &str| component_validator(&doc, pointer);
    let mut checked = 0;
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        let pointer = format!("/components/schemas/{name}");
        let validator = validator_for(&pointer);
        for example in schema["examples"].as_array().into_iter().flatten() {
            let errors = messages(&validator, example);
            assert!(errors.is_empty(), "{name}: {example}: {errors:#?}");
            checked += 1;
        }
    }
    for kind in ["parameters", "headers"] {
        for (name, item) in doc["components"][kind].as_object().unwrap() {
            if let Some(example) = item.get("example") {
                let validator = validator_for(&format!("/components/{kind}/{name}/schema"));
                let errors = messages(&validator, example);
                assert!(errors.is_empty(), "{kind}/{name}: {errors:#?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "{checked} examples");
    // And they are not vacuous: a wrong one is refused.
    let product = validator_for("/components/schemas/Product");
    let mut wrong = doc["components"]["schemas"]["Product"]["examples"][0].clone();
    wrong["on_hand"] = json!(-1);
    assert!(!product.is_valid(&wrong));
}

/// Asserts that `value` fits the document's schema `name`, naming every mismatch.
fn assert_fits(doc: &Value, name: &str, value: &Value) {
    let validator = component_validator(doc, &format!("/components/schemas/{name}"));
    let errors = messages(&validator, value);
    assert!(errors.is_empty(), "{name}: {value}: {errors:#?}");
}

/// What the server answers fits the document: a product, a page, a reservation and a
/// problem, checked against their schemas.
#[tokio::test]
async fn answers_fit_the_documented_schemas() {
    let doc = document();
    let check = |name: &str, value: &Value| assert_fits(&doc, name, value);
    let t = TestServer::start().await;
    let c = &t.client;
    let a = c.create_product("A", 5).await;
    check("Product", &a.body);
    check("Page", &c.get("/v1/products").await.body);
    let r = c.reserve("u", "A", 2).await;
    check("Reservation", &r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let a = c
        .post(
            &format!("/v1/reservations/{id}/confirm"),
            json!({"order_id": "o-1"}),
        )
        .await;
    check("Reservation", &a.body);
    check("Health", &c.get("/health").await.body);
    check("Cluster", &c.get("/v1/cluster").await.body);
    let a = c.reserve("u", "A", 9).await;
    a.assert_problem(409, "insufficient_stock");
    check("Problem.insufficient_stock", &a.body);
    let a = c.get("/v1/reservations/nope").await;
    check("Problem.reservation_not_found", &a.body);
    let a = c
        .send(Method::PUT, "/openapi.json", None, &[])
        .await
        .unwrap();
    check("Problem.method_not_allowed", &a.body);
    assert_eq!(a.header("allow"), Some("GET, HEAD"));
    t.stop().await;
}

#[tokio::test]
async fn get_openapi_json_serves_the_document_even_after_the_log_failed() {
    let t = TestServer::start().await;
    let c = &t.client;
    let a = c.get("/openapi.json").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.body, document());
    // HEAD answers as GET, without the body.
    let a = c
        .send(Method::HEAD, "/openapi.json", None, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.body, Value::Null);
    // A read: served from memory when changes are refused.
    t.service().inject_log_failure();
    // The failure shows at the next write.
    c.post("/v1/products", json!({"sku": "B", "name": "b"}))
        .await
        .assert_problem(503, "unavailable");
    c.get("/health").await.assert_problem(503, "unavailable");
    let a = c.get("/openapi.json").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, document());
    assert!(
        t.shutdown().await.is_err(),
        "shutdown reports the failed log"
    );
}

/// The answers about keys and their refusals fit the document too.
#[tokio::test]
async fn key_answers_fit_the_documented_schemas() {
    let doc = document();
    let check = |name: &str, value: &Value| assert_fits(&doc, name, value);
    let t = TestServer::start().await;
    let c = &t.client;
    let a = c
        .post(
            "/v1/admin/keys",
            json!({"name": "ops", "scopes": ["admin"]}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    check("CreatedApiKey", &a.body);
    let admin = format!("Bearer {}", a.body["secret"].as_str().unwrap());
    let auth = [("authorization", admin.as_str())];
    let a = c
        .send(
            Method::POST,
            "/v1/admin/keys",
            Some(r#"{"name":"reader","scopes":["read"]}"#),
            &auth,
        )
        .await
        .unwrap();
    let reader = format!("Bearer {}", a.body["secret"].as_str().unwrap());
    let a = c
        .send(Method::GET, "/v1/admin/keys", None, &auth)
        .await
        .unwrap();
    check("KeyList", &a.body);
    let a = c.get("/v1/products").await;
    a.assert_problem(401, "unauthorized");
    check("Problem.unauthorized", &a.body);
    let a = c
        .send(
            Method::GET,
            "/v1/admin/keys",
            None,
            &[("authorization", &reader)],
        )
        .await
        .unwrap();
    a.assert_problem(403, "forbidden");
    check("Problem.forbidden", &a.body);
    let a = c
        .send(Method::DELETE, "/v1/admin/keys/nope", None, &auth)
        .await
        .unwrap();
    a.assert_problem(404, "key_not_found");
    check("Problem.key_not_found", &a.body);
    t.stop().await;
}
