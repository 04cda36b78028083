//! API keys and scopes (docs/API.md "API keys"): 401 without a valid key, 403 without the
//! scope, keys created, used and revoked over HTTP, the bootstrap admin key, and the
//! start-up rules.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Answer, ChildServer, Client, TestServer, START_MS};
use reqwest::Method;
use serde_json::{json, Value};
use stockd::clock::ManualClock;
use stockd::config::AdminKey;
use stockd::{Config, Durability};

const ADMIN: &str = "bootstrap-secret-for-tests-0123";

fn with_admin_key(config: &mut Config) {
    config.admin_key = Some(AdminKey::new(ADMIN).unwrap());
}

async fn start_with_admin_key() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    TestServer::start_tweaked(dir, clock, Durability::Sync, with_admin_key).await
}

/// A request with `Authorization: Bearer <secret>` (`None`: without the header).
async fn call(
    c: &Client,
    secret: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let auth = secret.map(|s| format!("Bearer {s}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let body = body.map(|b| b.to_string());
    c.send(method, path, body.as_deref(), &headers)
        .await
        .expect("request")
}

/// Creates a key with `scopes` (as the bootstrap key); answers its id and secret.
async fn create_key(c: &Client, name: &str, scopes: &[&str]) -> (String, String) {
    let a = call(
        c,
        Some(ADMIN),
        Method::POST,
        "/v1/admin/keys",
        Some(json!({"name": name, "scopes": scopes})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    (
        a.body["id"].as_str().unwrap().to_string(),
        a.body["secret"].as_str().unwrap().to_string(),
    )
}

fn assert_unauthorized(a: &Answer) {
    a.assert_problem(401, "unauthorized");
    let challenge = a.header("www-authenticate").unwrap_or("");
    assert!(challenge.starts_with("Bearer"), "{challenge:?}");
}

#[tokio::test]
async fn without_a_valid_key_every_request_but_health_is_401_with_a_challenge() {
    let t = start_with_admin_key().await;
    let c = &t.client;
    for secret in [None, Some("not-a-key-of-this-server"), Some("")] {
        let a = call(c, secret, Method::GET, "/v1/products", None).await;
        assert_unauthorized(&a);
        let a = call(c, secret, Method::POST, "/v1/reservations", Some(json!({}))).await;
        assert_unauthorized(&a);
        let a = call(c, secret, Method::GET, "/metrics", None).await;
        assert_unauthorized(&a);
    }
    // Another scheme is refused too.
    let a = c
        .send(
            Method::GET,
            "/v1/products",
            None,
            &[("authorization", &format!("Basic {ADMIN}"))],
        )
        .await
        .unwrap();
    assert_unauthorized(&a);
    // /health needs no key, even a wrong one is ignored.
    assert_eq!(
        call(c, None, Method::GET, "/health", None).await.status,
        200
    );
    assert_eq!(
        call(c, Some("wrong"), Method::GET, "/health", None)
            .await
            .status,
        200
    );
    // The scheme is case-insensitive.
    let a = c
        .send(
            Method::GET,
            "/v1/products",
            None,
            &[("authorization", &format!("bearer {ADMIN}"))],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    // Routing answers first: an unknown path is 404 without a key.
    call(c, None, Method::GET, "/v2/nothing", None)
        .await
        .assert_problem(404, "not_found");
    t.stop().await;
}

#[tokio::test]
async fn each_scope_allows_its_endpoints_and_403s_the_others_naming_the_scope() {
    let t = start_with_admin_key().await;
    let c = &t.client;
    let a = call(
        c,
        Some(ADMIN),
        Method::POST,
        "/v1/products",
        Some(json!({"sku": "S", "name": "s", "on_hand": 100})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    // A representative request of each scope, with the status it answers when allowed.
    let reserve = json!({"customer_id": "c", "items": [{"sku": "S", "quantity": 1}]});
    let probes: [(&str, Method, &str, Option<Value>, u16); 4] = [
        ("read", Method::GET, "/v1/products/S", None, 200),
        (
            "reserve",
            Method::POST,
            "/v1/reservations",
            Some(reserve),
            201,
        ),
        (
            "stock",
            Method::POST,
            "/v1/products/S/replenish",
            Some(json!({"quantity": 1})),
            200,
        ),
        ("admin", Method::GET, "/v1/admin/keys", None, 200),
    ];
    for scope in ["read", "reserve", "stock", "admin"] {
        let (_, secret) = create_key(c, &format!("{scope} only"), &[scope]).await;
        for (needs, method, path, body, ok) in &probes {
            let a = call(c, Some(&secret), method.clone(), path, body.clone()).await;
            if scope == *needs || scope == "admin" {
                assert_eq!(a.status, *ok, "{scope} key, {method} {path}: {:?}", a.body);
            } else {
                a.assert_problem(403, "forbidden");
                assert_eq!(a.body["scope"], *needs, "{scope} key, {method} {path}");
                assert!(
                    a.body["detail"].as_str().unwrap().contains(needs),
                    "{:?}",
                    a.body
                );
            }
        }
    }
    // A key with several scopes has each of them.
    let (_, both) = create_key(c, "checkout", &["read", "reserve"]).await;
    assert_eq!(
        call(c, Some(&both), Method::GET, "/v1/products/S", None)
            .await
            .status,
        200
    );
    call(c, Some(&both), Method::DELETE, "/v1/products/S", None)
        .await
        .assert_problem(403, "forbidden");
    // The bootstrap key is an admin key.
    for (_, method, path, body, ok) in &probes {
        let a = call(c, Some(ADMIN), method.clone(), path, body.clone()).await;
        assert_eq!(
            a.status, *ok,
            "bootstrap key, {method} {path}: {:?}",
            a.body
        );
    }
    t.stop().await;
}

#[tokio::test]
async fn a_key_is_created_used_and_revoked_and_its_secret_shown_once() {
    let t = start_with_admin_key().await;
    let c = &t.client;
    let a = call(
        c,
        Some(ADMIN),
        Method::POST,
        "/v1/admin/keys",
        Some(json!({"name": "reader", "scopes": ["read"]})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let created = a.body.as_object().unwrap();
    let mut members: Vec<&str> = created.keys().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(members, ["created_at", "id", "name", "scopes", "secret"]);
    assert_eq!(a.body["name"], "reader");
    assert_eq!(a.body["scopes"], json!(["read"]));
    assert_eq!(a.body["created_at"], "2026-11-22T10:00:00.000Z");
    let id = a.body["id"].as_str().unwrap().to_string();
    let secret = a.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("stk_") && secret.len() == 68, "{secret}");

    // Listed without its secret (nor its hash).
    let list = call(c, Some(ADMIN), Method::GET, "/v1/admin/keys", None).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert_eq!(
        list.body,
        json!({"items": [{"id": id, "name": "reader", "scopes": ["read"],
                          "created_at": "2026-11-22T10:00:00.000Z"}]})
    );
    assert!(!list.body.to_string().contains(&secret[4..]));

    // Used.
    let a = call(c, Some(&secret), Method::GET, "/v1/products", None).await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    // Revoked: refused from the next request on, and gone from the list.
    let a = call(
        c,
        Some(ADMIN),
        Method::DELETE,
        &format!("/v1/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(a.status, 204, "{:?}", a.body);
    assert_unauthorized(&call(c, Some(&secret), Method::GET, "/v1/products", None).await);
    let list = call(c, Some(ADMIN), Method::GET, "/v1/admin/keys", None).await;
    assert_eq!(list.body, json!({"items": []}));

    // Revoking it again, or any id that names no key, is 404.
    for path in [
        format!("/v1/admin/keys/{id}"),
        "/v1/admin/keys/00000000-0000-0000-0000-000000000000".to_string(),
        "/v1/admin/keys/not-a-uuid".to_string(),
    ] {
        call(c, Some(ADMIN), Method::DELETE, &path, None)
            .await
            .assert_problem(404, "key_not_found");
    }
    // A key cannot manage keys without the admin scope.
    let (_, reader) = create_key(c, "reader 2", &["read", "stock", "reserve"]).await;
    let a = call(c, Some(&reader), Method::GET, "/v1/admin/keys", None).await;
    a.assert_problem(403, "forbidden");
    assert_eq!(a.body["scope"], "admin");
    t.stop().await;
}

#[tokio::test]
async fn key_bodies_are_validated_with_the_field_named() {
    let t = start_with_admin_key().await;
    let c = &t.client;
    let cases = [
        (
            json!({"name": "a", "scopes": ["read", "write"]}),
            "scopes[1]",
        ),
        (json!({"name": "", "scopes": ["read"]}), "name"),
        (json!({"name": "x".repeat(101), "scopes": ["read"]}), "name"),
        (json!({"name": "a", "scopes": []}), "scopes"),
        (
            json!({"name": "a", "scopes": ["read"], "secret": "mine"}),
            "secret",
        ),
        (json!({"scopes": ["read"]}), "name"),
    ];
    for (body, field) in cases {
        let a = call(
            c,
            Some(ADMIN),
            Method::POST,
            "/v1/admin/keys",
            Some(body.clone()),
        )
        .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], field, "{body}");
    }
    let a = c
        .send(
            Method::POST,
            "/v1/admin/keys",
            Some("{not json"),
            &[("authorization", &format!("Bearer {ADMIN}"))],
        )
        .await
        .unwrap();
    a.assert_problem(400, "bad_request");
    let a = call(c, Some(ADMIN), Method::PUT, "/v1/admin/keys", None).await;
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("GET, HEAD, POST"));
    t.stop().await;
}

/// Without an admin key and with no key, a loopback server runs open; its first key
/// turns authentication on, so it must be an admin key.
#[tokio::test]
async fn an_open_server_turns_authentication_on_with_its_first_key() {
    let t = TestServer::start().await;
    let c = &t.client;
    assert_eq!(c.get("/v1/products").await.status, 200);
    let a = c
        .post("/v1/admin/keys", json!({"name": "r", "scopes": ["read"]}))
        .await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "scopes");
    assert_eq!(c.get("/v1/products").await.status, 200, "still open");
    let a = c
        .post(
            "/v1/admin/keys",
            json!({"name": "ops", "scopes": ["admin"]}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let secret = a.body["secret"].as_str().unwrap().to_string();
    assert_unauthorized(&c.get("/v1/products").await);
    let a = call(c, Some(&secret), Method::GET, "/v1/products", None).await;
    assert_eq!(a.status, 200);
    // Revoking every key does not open the server again.
    let id = a_key_id(c, &secret).await;
    let a = call(
        c,
        Some(&secret),
        Method::DELETE,
        &format!("/v1/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(a.status, 204);
    assert_unauthorized(&c.get("/v1/products").await);
    t.stop().await;
}

async fn a_key_id(c: &Client, secret: &str) -> String {
    let list = call(c, Some(secret), Method::GET, "/v1/admin/keys", None).await;
    list.body["items"][0]["id"].as_str().unwrap().to_string()
}

/// Off loopback, a server without an admin key (and no key in its log) does not start.
#[tokio::test]
async fn a_server_off_loopback_refuses_to_start_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        snapshot_dir: dir.path().join("snapshots"),
        ..Config::default()
    };
    let Err(err) = stockd::start(config).await else {
        panic!("started without a key off loopback");
    };
    let message = err.to_string();
    assert!(
        message.contains("--admin-key-file") && message.contains("STOCKD_ADMIN_KEY"),
        "{message}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");

    // The binary says so on stderr and exits 1.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"));
    cmd.args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--snapshot-dir")
        .arg(dir.path().join("snapshots"))
        .env_remove("STOCKD_ADMIN_KEY")
        .env_remove("STOCKD_ADMIN_KEY_FILE");
    let out = loadtest::server::run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("--admin-key-file") && out.stderr.contains("STOCKD_ADMIN_KEY"),
        "{}",
        out.stderr
    );
}

/// `STOCKD_ADMIN_KEY` and `--admin-key-file` configure the bootstrap key of the binary;
/// an empty or short one is refused at start-up, naming where it came from.
#[tokio::test]
async fn the_binary_takes_its_admin_key_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        ChildServer::spawn_with_env(&dir.path().join("env"), &[], &[("STOCKD_ADMIN_KEY", ADMIN)]);
    let c = &server.client;
    assert_unauthorized(&c.get("/v1/products").await);
    assert_eq!(
        call(c, Some(ADMIN), Method::GET, "/v1/products", None)
            .await
            .status,
        200
    );
    drop(server);

    let file = dir.path().join("admin.key");
    std::fs::write(&file, format!("{ADMIN}\n")).unwrap();
    let file_arg = file.display().to_string();
    let server = ChildServer::spawn(&dir.path().join("file"), &["--admin-key-file", &file_arg]);
    let c = &server.client;
    assert_unauthorized(&c.get("/v1/products").await);
    assert_eq!(
        call(c, Some(ADMIN), Method::GET, "/v1/products", None)
            .await
            .status,
        200,
        "the trailing newline is not part of the key"
    );
    drop(server);

    for (value, why) in [("", "empty"), ("short-key", "9 characters")] {
        let mut cmd = common::serve_command(&dir.path().join("refused"), &[]);
        cmd.env("STOCKD_ADMIN_KEY", value);
        let out = loadtest::server::run_to_exit(cmd, Duration::from_secs(20)).unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(
            out.stderr.contains(why) && out.stderr.contains("STOCKD_ADMIN_KEY"),
            "{}",
            out.stderr
        );
    }
    std::fs::write(&file, "\n").unwrap();
    let cmd = common::serve_command(
        &dir.path().join("refused"),
        &["--admin-key-file", &file_arg],
    );
    let out = loadtest::server::run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("empty") && out.stderr.contains("--admin-key-file"),
        "{}",
        out.stderr
    );
}

/// Keys are in the log and in snapshots: a restart (from the log, then from a snapshot)
/// honours the keys created and refuses the ones revoked.
#[tokio::test]
async fn keys_survive_restarts_and_revocations_too() {
    let t = start_with_admin_key().await;
    let (kept_id, kept) = create_key(&t.client, "kept", &["read"]).await;
    let (gone_id, gone) = create_key(&t.client, "gone", &["read"]).await;
    let a = call(
        &t.client,
        Some(ADMIN),
        Method::DELETE,
        &format!("/v1/admin/keys/{gone_id}"),
        None,
    )
    .await;
    assert_eq!(a.status, 204);
    let t = t.restart().await;
    let c = &t.client;
    assert_eq!(
        call(c, Some(&kept), Method::GET, "/v1/products", None)
            .await
            .status,
        200
    );
    assert_unauthorized(&call(c, Some(&gone), Method::GET, "/v1/products", None).await);
    let list = call(c, Some(ADMIN), Method::GET, "/v1/admin/keys", None).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["items"][0]["id"], kept_id);

    // From a snapshot: the log before it is gone, the keys are not.
    let a = call(c, Some(ADMIN), Method::POST, "/v1/admin/snapshot", None).await;
    assert!(a.status == 201 || a.status == 200, "{:?}", a.body);
    let t = t.restart().await;
    let c = &t.client;
    assert_eq!(
        call(c, Some(&kept), Method::GET, "/v1/products", None)
            .await
            .status,
        200
    );
    assert_unauthorized(&call(c, Some(&gone), Method::GET, "/v1/products", None).await);
    t.stop().await;
}

/// Every logged change names the key that made it: the bootstrap key's nil id, a stored
/// key's id; `None` while the server runs open.
#[tokio::test]
async fn every_change_records_the_key_that_made_it() {
    // No snapshot at shutdown: it would take the records out of the log.
    fn keep_the_log(config: &mut Config) {
        with_admin_key(config);
        config.snapshots.on_shutdown = false;
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let mut t = TestServer::start_tweaked(dir, clock, Durability::Sync, keep_the_log).await;
    let (id, secret) = create_key(&t.client, "stock", &["stock"]).await;
    let a = call(
        &t.client,
        Some(&secret),
        Method::POST,
        "/v1/products",
        Some(json!({"sku": "A", "name": "a", "on_hand": 1})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    // Stopped, its directory kept (`t` holds it).
    t.server.take().unwrap().shutdown().await.unwrap();
    let log = stockd::storage::log::Log::open(&t.config.data_dir.join("log")).unwrap();
    let mut seen = Vec::new();
    for item in log.reader().records() {
        let (_, record) = item.unwrap();
        let record = serde_json::to_value(&record).unwrap();
        let (kind, fields) = record.as_object().unwrap().iter().next().unwrap();
        seen.push((kind.clone(), fields["by"].clone()));
    }
    assert_eq!(
        seen,
        [
            (
                "KeyCreated".to_string(),
                json!("00000000-0000-0000-0000-000000000000")
            ),
            ("ProductCreated".to_string(), json!(id)),
        ]
    );

    fn open_keeping_the_log(config: &mut Config) {
        config.snapshots.on_shutdown = false;
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let mut t = TestServer::start_tweaked(dir, clock, Durability::Sync, open_keeping_the_log).await;
    t.client.create_product("B", 1).await;
    t.server.take().unwrap().shutdown().await.unwrap();
    let log = stockd::storage::log::Log::open(&t.config.data_dir.join("log")).unwrap();
    let (_, record) = log.reader().records().next().unwrap().unwrap();
    let record = serde_json::to_value(&record).unwrap();
    assert_eq!(record["ProductCreated"]["by"], Value::Null, "open: no key");
}

/// Runs `stockd keys ARGS` on `dir`'s data; answers (status, stdout, stderr).
fn keys_command(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
        .arg("keys")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--snapshot-dir")
        .arg(dir.join("snapshots"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `stockd keys create/list/revoke` on a stopped server's data; the server then honours
/// them (authentication on, with no admin key configured, since keys exist).
#[tokio::test]
async fn offline_keys_are_honoured_by_the_next_server() {
    let dir = tempfile::tempdir().unwrap();
    let (status, out, err) = keys_command(
        dir.path(),
        &[
            "create", "--name", "checkout", "--scope", "reserve", "--scope", "read",
        ],
    );
    assert_eq!(status, 0, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap_or_else(|| panic!("no secret in {out}"))
        .to_string();
    assert!(secret.starts_with("stk_"), "{out}");
    let (status, out, err) = keys_command(
        dir.path(),
        &["create", "--name", "ops", "--scope", "admin", "--json"],
    );
    assert_eq!(status, 0, "{err}");
    let ops: Value = serde_json::from_str(&out).unwrap();
    let ops_secret = ops["secret"].as_str().unwrap().to_string();
    let ops_id = ops["id"].as_str().unwrap().to_string();

    // Validated as the API validates it, before anything is written.
    let (status, _, err) = keys_command(dir.path(), &["create", "--name", "x", "--scope", "write"]);
    assert_eq!(status, 1);
    assert!(
        err.contains("scopes[0] must be one of read, reserve, stock, admin"),
        "{err}"
    );

    let (status, out, err) = keys_command(dir.path(), &["list", "--json"]);
    assert_eq!(status, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["checkout", "ops"]);
    assert!(
        !out.contains(&secret[4..]) && !out.contains("secret"),
        "{out}"
    );
    let (status, out, _) = keys_command(dir.path(), &["list"]);
    assert_eq!(status, 0);
    assert!(
        out.contains("reserve,read") && out.contains("checkout"),
        "{out}"
    );

    // The server: no admin key configured, the keys in the log turn authentication on.
    let mut server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    assert_unauthorized(&c.get("/v1/products").await);
    let a = call(
        &c,
        Some(&ops_secret),
        Method::POST,
        "/v1/products",
        Some(json!({"sku": "A", "name": "a", "on_hand": 5})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let a = call(
        &c,
        Some(&secret),
        Method::POST,
        "/v1/reservations",
        Some(json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1}]})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    call(&c, Some(&secret), Method::DELETE, "/v1/products/A", None)
        .await
        .assert_problem(403, "forbidden");

    // While the server runs, the offline commands are refused, naming the likely cause.
    let (status, _, err) = keys_command(dir.path(), &["list"]);
    assert_eq!(status, 1);
    assert!(
        err.contains("is a server running on this data directory"),
        "{err}"
    );

    // Revoked with the server stopped: refused by the next start.
    assert!(server.terminate().is_some_and(|s| s.success()));
    let checkout_id = list["items"][0]["id"].as_str().unwrap().to_string();
    let (status, out, err) = keys_command(dir.path(), &["revoke", &checkout_id]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains(&checkout_id), "{out}");
    let (status, _, err) = keys_command(dir.path(), &["revoke", &checkout_id]);
    assert_eq!(status, 1, "revoked already");
    assert!(err.contains("no stored API key"), "{err}");
    drop(server);
    let server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    assert_unauthorized(&call(&c, Some(&secret), Method::GET, "/v1/products/A", None).await);
    let list = call(&c, Some(&ops_secret), Method::GET, "/v1/admin/keys", None).await;
    assert_eq!(list.body["items"][0]["id"], ops_id);
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
}

#[test]
fn help_describes_the_keys_commands_and_the_admin_key() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serve = help(&["serve", "--help"]);
    for needed in [
        "--admin-key-file",
        "STOCKD_ADMIN_KEY_FILE",
        "STOCKD_ADMIN_KEY",
    ] {
        assert!(serve.contains(needed), "{needed} missing from:\n{serve}");
    }
    assert!(help(&["--help"]).contains("keys"));
    let keys = help(&["keys", "--help"]);
    for needed in ["create", "list", "revoke"] {
        assert!(keys.contains(needed), "{needed} missing from:\n{keys}");
    }
    let create = help(&["keys", "create", "--help"]);
    for needed in [
        "--name",
        "--scope",
        "--data-dir",
        "--snapshot-dir",
        "read, reserve, stock",
    ] {
        assert!(create.contains(needed), "{needed} missing from:\n{create}");
    }
}

/// Once the log has failed, a key change is refused with 503 (nothing acknowledged); the
/// list is a read, answered from memory, as is its HEAD.
#[tokio::test]
async fn key_changes_need_the_log_and_the_list_does_not() {
    let t = start_with_admin_key().await;
    let c = &t.client;
    let (id, _) = create_key(c, "before", &["read"]).await;
    t.service().inject_log_failure();
    // The failure shows at the next write.
    let a = call(
        c,
        Some(ADMIN),
        Method::POST,
        "/v1/admin/keys",
        Some(json!({"name": "after", "scopes": ["read"]})),
    )
    .await;
    a.assert_problem(503, "unavailable");
    let a = call(
        c,
        Some(ADMIN),
        Method::DELETE,
        &format!("/v1/admin/keys/{id}"),
        None,
    )
    .await;
    a.assert_problem(503, "unavailable");
    let list = call(c, Some(ADMIN), Method::GET, "/v1/admin/keys", None).await;
    assert_eq!(list.status, 200);
    let names: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before"], "the refused change is not applied");
    let head = call(c, Some(ADMIN), Method::HEAD, "/v1/admin/keys", None).await;
    assert_eq!(
        (head.status.as_u16(), head.body.clone()),
        (200, Value::Null)
    );
    // Refusals come before the log's health: 401 and 403 still say what is wrong.
    assert_unauthorized(&call(c, None, Method::POST, "/v1/admin/keys", Some(json!({}))).await);
    assert!(
        t.shutdown().await.is_err(),
        "shutdown reports the failed log"
    );
}

/// Keys in the log and no admin key configured: authentication is on, so a server may
/// serve on any address.
#[tokio::test]
async fn keys_in_the_log_let_a_server_without_an_admin_key_serve_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (status, out, err) =
        keys_command(dir.path(), &["create", "--name", "r", "--scope", "read"]);
    assert_eq!(status, 0, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    let config = Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        snapshot_dir: dir.path().join("snapshots"),
        ..Config::default()
    };
    let server = stockd::start(config).await.expect("starts: keys exist");
    let c = Client::new(format!("http://127.0.0.1:{}", server.local_addr().port()));
    assert_unauthorized(&c.get("/v1/products").await);
    let a = call(&c, Some(&secret), Method::GET, "/v1/products", None).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    server.shutdown().await.unwrap();
}
