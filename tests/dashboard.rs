//! The dashboard (`GET /dashboard`) in a real headless Chromium, driven over WebDriver
//! (chromedriver): the page follows a reservation live from the change feed and
//! `/metrics`, resumes after a dropped stream with neither a gap nor a duplicate, fits a
//! phone's screen, says so when the feed is off, and asks for a read key when the server
//! wants one. Screenshots are left in `$CARGO_TARGET_DIR/tmp/dashboard/` (by default
//! `target/tmp/dashboard/`) to be looked at.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`chromedriver`) on the `PATH`. Without
//! them each test says so loudly and passes, unless `STOCKD_REQUIRE_BROWSER=1` (CI sets
//! it), which makes a missing browser a failure.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::feed::with_feed;
use common::{Client, TestServer, START_MS};
use fantoccini::Locator;
use reqwest::Method;
use serde_json::{json, Value};
use stockd::clock::ManualClock;
use stockd::config::AdminKey;
use stockd::{Config, Durability};

/// Each test's whole run, browser start included: it stops by itself past this.
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// How long the page may take to show a change.
const SHOW_LIMIT: Duration = Duration::from_secs(20);

/// One browser at a time: the machine's cores are few, and Chromium is heavy.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Chromium and chromedriver, or `None` (after saying so loudly) when either is missing
/// and a browser is not required.
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser"));
    let driver = on_path("chromedriver");
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let missing = [("chromium", c.is_none()), ("chromedriver", d.is_none())]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" and ");
            let how = "install Debian's chromium and chromium-driver \
                       (apt-get install chromium chromium-driver)";
            if std::env::var("STOCKD_REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("STOCKD_REQUIRE_BROWSER=1, but no {missing} on the PATH: {how}");
            }
            // Straight to the process's stderr: the test harness keeps what `eprintln!`
            // prints for a passing test to itself, and this skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: the dashboard's browser test needs {missing}: none on the PATH.\n\
                 !!! To run it, {how}.\n\
                 !!! (STOCKD_REQUIRE_BROWSER=1 turns this skip into a failure.)\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}

/// chromedriver in a process group of its own, with the Chromium it starts: the whole
/// group is killed on drop (a test that fails or times out included), and the browser's
/// fresh profile directory removed.
struct Browser {
    driver: Child,
    client: Option<fantoccini::Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let mut driver = Command::new(chromedriver)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        // It prints the port it chose: "ChromeDriver was started successfully on port N."
        let stdout = driver.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on port ").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    if line.contains("started successfully") {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let mut browser = Browser {
            driver,
            client: None,
            _profile: profile,
        };
        let port = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("chromedriver says which port it listens on");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            "--hide-scrollbars",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!(
            "--user-data-dir={}",
            browser._profile.path().join("chromium").display()
        )])
        .collect::<Vec<_>>();
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        });
        let client = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(capabilities.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
        browser.client = Some(client);
        browser
    }

    fn client(&self) -> &fantoccini::Client {
        self.client.as_ref().unwrap()
    }

    /// Ends the session (Chromium quits) and chromedriver.
    async fn stop(mut self) {
        if let Some(client) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group: chromedriver, and Chromium with its helper processes.
        let group = self.driver.id() as i32;
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// A script's value in the page.
async fn js(b: &Browser, script: &str) -> Value {
    b.client()
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Waits until `script` (a function body returning JSON) returns `expected`; on time-out,
/// fails with the last value seen.
async fn shows(b: &Browser, what: &str, script: &str, expected: Value) {
    let deadline = Instant::now() + SHOW_LIMIT;
    loop {
        let seen = js(b, script).await;
        if seen == expected {
            return;
        }
        if Instant::now() > deadline {
            save_screenshot(b, &format!("failed-{}", what.replace(' ', "-"))).await;
            panic!("the page does not show {what}: expected {expected}, it shows {seen}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A product's figures as its row in "Hottest products" shows them.
fn row(sku: &str) -> String {
    format!(
        "const r = document.querySelector('#hot-products li[data-sku=\"{sku}\"]'); \
         if (!r) return null; \
         const t = (c) => Number(r.querySelector('.v-' + c).textContent); \
         return {{on_hand: Number(r.dataset.onHand), reserved: Number(r.dataset.reserved), \
                  available: Number(r.dataset.available), sold: Number(r.dataset.sold), \
                  shown: [t('on-hand'), t('reserved'), t('available'), t('sold')]}};"
    )
}

fn figures(on_hand: u64, reserved: u64, available: u64, sold: u64) -> Value {
    json!({"on_hand": on_hand, "reserved": reserved, "available": available, "sold": sold,
           "shown": [on_hand, reserved, available, sold]})
}

const STATE: &str = "return document.getElementById('conn').dataset.state;";
const PENDING: &str = "return document.getElementById('pending-holds').dataset.value;";

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn save_screenshot(b: &Browser, name: &str) -> PathBuf {
    let png = b.client().screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

async fn server(tweak: fn(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    TestServer::start_tweaked(dir, clock, Durability::Sync, tweak).await
}

/// The reservation's id, after checking it was created.
async fn reserve(c: &Client, customer: &str, sku: &str, quantity: u64) -> String {
    let a = c.reserve(customer, sku, quantity).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

/// How many events the feed holds (all of them: the page replays the last 500 records).
async fn events_in_feed(c: &Client) -> u64 {
    let (mut after, mut n) = (0u64, 0u64);
    loop {
        let a = c.get(&format!("/v1/events?after={after}&limit=1000")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let page = a.body["events"].as_array().unwrap().len() as u64;
        if page == 0 {
            return n;
        }
        n += page;
        after = a.body["next_after"].as_u64().unwrap();
    }
}

/// Runs `body` with a browser, at most `TEST_LIMIT`; the browser is always stopped.
macro_rules! with_browser {
    (|$b:ident| $body:block) => {{
        let Some((chromium, chromedriver)) = browser_programs() else {
            return;
        };
        let _one = ONE_BROWSER.lock().await;
        let run = async {
            let $b = Browser::start(&chromium, &chromedriver).await;
            $body
            $b.stop().await;
        };
        tokio::time::timeout(TEST_LIMIT, run)
            .await
            .expect("the test finished in time");
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_reservation_live_and_fits_a_phone() {
    with_browser!(|b| {
        let t = server(with_feed).await;
        let c = &t.client;
        // A little history for the page to replay: three products, holds, a sale, a 409.
        c.create_product("LAPTOP-001", 5).await;
        c.create_product("SNEAKER-42", 200).await;
        c.create_product("HEADPHONES-7", 40).await;
        for i in 0..12 {
            reserve(c, &format!("fan-{i}"), "SNEAKER-42", 1 + i % 3).await;
        }
        let id = reserve(c, "early", "HEADPHONES-7", 4).await;
        let a = c
            .post(
                &format!("/v1/reservations/{id}/confirm"),
                json!({"order_id": "o-1"}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        reserve(c, "late", "HEADPHONES-7", 3).await;
        assert_eq!(c.reserve("greedy", "LAPTOP-001", 99).await.status, 409);

        let url = format!("{}/dashboard", c.base);
        b.client().goto(&url).await.unwrap();
        shows(&b, "the live feed", STATE, json!("live")).await;
        shows(
            &b,
            "LAPTOP-001 before",
            &row("LAPTOP-001"),
            figures(5, 0, 5, 0),
        )
        .await;
        shows(
            &b,
            "HEADPHONES-7",
            &row("HEADPHONES-7"),
            figures(36, 3, 33, 4),
        )
        .await;
        shows(&b, "13 pending holds", PENDING, json!("13")).await;
        shows(
            &b,
            "a healthy log",
            "return document.getElementById('log-health').dataset.value;",
            json!("1"),
        )
        .await;

        // A hold made now, through the API: the page's figures change.
        let id = reserve(c, "user-123", "LAPTOP-001", 2).await;
        shows(&b, "the hold", &row("LAPTOP-001"), figures(5, 2, 3, 0)).await;
        shows(&b, "14 pending holds", PENDING, json!("14")).await;
        let a = c
            .post(
                &format!("/v1/reservations/{id}/confirm"),
                json!({"order_id": "o-2"}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        shows(&b, "the sale", &row("LAPTOP-001"), figures(3, 0, 3, 2)).await;
        shows(
            &b,
            "the newest event first",
            "const li = document.querySelector('#events-list li'); \
             return li && [li.dataset.type, li.querySelector('.subject').textContent];",
            json!(["reservation.confirmed", id]),
        )
        .await;
        // The bars are drawn (their widths set from the script, as the policy allows).
        let widths = js(
            &b,
            "const r = document.querySelector('#hot-products li[data-sku=\"LAPTOP-001\"] .bar'); \
             return ['available', 'reserved', 'sold'].map((k) => \
                 Math.round(r.querySelector('.' + k).getBoundingClientRect().width));",
        )
        .await;
        let w: Vec<u64> = serde_json::from_value(widths).unwrap();
        assert!(w[0] > 0 && w[1] == 0 && w[2] > 0, "bar widths {w:?}");
        // The chart has its lines once two scrapes are in.
        shows(
            &b,
            "the chart's four lines",
            "return document.querySelectorAll('#rates-chart polyline').length;",
            json!(4),
        )
        .await;
        save_screenshot(&b, "dashboard-wide").await;

        // The stream drops (the badge reconnects it): the hold made meanwhile comes once,
        // and every event of the feed was seen exactly once.
        let streams = js(
            &b,
            "return Number(document.getElementById('conn').dataset.connections);",
        )
        .await;
        let streams = streams.as_u64().expect("a count of streams");
        assert!(streams >= 1);
        b.client()
            .find(Locator::Id("conn"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        reserve(c, "user-456", "LAPTOP-001", 1).await;
        shows(
            &b,
            "the hold after the drop",
            &row("LAPTOP-001"),
            figures(3, 1, 2, 2),
        )
        .await;
        shows(
            &b,
            "a second stream",
            &format!(
                "const c = document.getElementById('conn'); \
                 return [c.dataset.state, Number(c.dataset.connections) > {streams}];"
            ),
            json!(["live", true]),
        )
        .await;
        let total = events_in_feed(c).await;
        shows(
            &b,
            "every event once",
            "const l = document.getElementById('events-list'); \
             const ids = [...l.querySelectorAll('li')].map((li) => li.dataset.id); \
             return [Number(l.dataset.seen), new Set(ids).size === ids.length];",
            json!([total, true]),
        )
        .await;

        // A phone: one column, nothing wider than the screen, the figures still there.
        b.client().set_window_size(390, 844).await.unwrap();
        shows(
            &b,
            "a phone layout",
            "const d = document.documentElement; \
             const hot = document.querySelector('.hot-panel').getBoundingClientRect(); \
             const tile = document.querySelector('.tile').getBoundingClientRect(); \
             return [d.scrollWidth <= window.innerWidth, window.innerWidth < 500, \
                     hot.width > window.innerWidth * 0.8, tile.width < window.innerWidth / 2];",
            json!([true, true, true, true]),
        )
        .await;
        shows(
            &b,
            "LAPTOP-001 on a phone",
            &row("LAPTOP-001"),
            figures(3, 1, 2, 2),
        )
        .await;
        save_screenshot(&b, "dashboard-phone").await;
        t.stop().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_when_the_feed_is_off_and_still_shows_the_metrics() {
    with_browser!(|b| {
        // Off explicitly, whatever the default.
        let t = server(|config| config.events = None).await;
        let c = &t.client;
        c.create_product("LAPTOP-001", 5).await;
        b.client()
            .goto(&format!("{}/dashboard", c.base))
            .await
            .unwrap();
        shows(&b, "the feed off", STATE, json!("off")).await;
        shows(
            &b,
            "the notice",
            "const n = document.getElementById('feed-notice'); \
             return !n.hidden && n.textContent.includes('events_disabled') \
                 && n.textContent.includes('--events on');",
            json!(true),
        )
        .await;
        shows(&b, "no pending hold", PENDING, json!("0")).await;
        reserve(c, "user-1", "LAPTOP-001", 2).await;
        shows(&b, "the hold, from /metrics", PENDING, json!("1")).await;
        shows(
            &b,
            "a healthy log",
            "return document.getElementById('log-health').dataset.value;",
            json!("1"),
        )
        .await;
        save_screenshot(&b, "dashboard-feed-off").await;
        t.stop().await;
    });
}

/// The page's stream parser, fed chunks cut where a network may cut them: a CRLF split in
/// two, bare CRs, a comment, a field without a colon, an id kept for later events, and a
/// `retry`. The server itself only sends LFs, so this is where the other endings are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_parses_server_sent_events_by_the_rules() {
    with_browser!(|b| {
        let t = server(with_feed).await;
        b.client()
            .goto(&format!("{}/dashboard", t.client.base))
            .await
            .unwrap();
        let out = js(
            &b,
            "const out = []; \
             const push = window.stockd.sseParser( \
                 (id, type, data) => out.push([id, type, data]), \
                 (ms) => out.push(['retry', ms]), null); \
             for (const chunk of ['id: 1\\r', '\\nevent: a\\r\\ndata: x\\r\\ndata:  y\\r\\n\\r', \
                                  '\\n', ': heartbeat\\n\\n', 'data:z\\rid:2\\r\\r', \
                                  'retry: 5000\\n', 'data\\n\\n', 'id: 3\\nda', 'ta: w\\n', '\\n', \
                                  'data: p\\r', '\\ndata: q\\n\\n', \
                                  'event: b\\n\\n', 'data: no end yet']) push(chunk); \
             return out;",
        )
        .await;
        assert_eq!(
            out,
            json!([
                ["1", "a", "x\n y"],
                ["2", "", "z"],
                ["retry", 5000],
                ["2", "", ""],
                ["3", "", "w"],
                ["3", "", "p\nq"],
            ])
        );
        t.stop().await;
    });
}

const ADMIN: &str = "bootstrap-secret-for-dashboard-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_read_key_and_keeps_it_for_the_tab_only() {
    with_browser!(|b| {
        let t = server(|config| {
            with_feed(config);
            config.admin_key = Some(AdminKey::new(ADMIN).unwrap());
        })
        .await;
        let c = &t.client;
        let admin = format!("Bearer {ADMIN}");
        let key = |scopes: Value| {
            let admin = admin.clone();
            async move {
                let a = c
                    .post_with(
                        "/v1/admin/keys",
                        json!({"name": "dashboard", "scopes": scopes}),
                        &[("authorization", &admin)],
                    )
                    .await;
                assert_eq!(a.status, 201, "{:?}", a.body);
                a.body["secret"].as_str().unwrap().to_string()
            }
        };
        let read = key(json!(["read"])).await;
        let reserve_only = key(json!(["reserve"])).await;
        let a = c
            .post_with(
                "/v1/products",
                json!({"sku": "LAPTOP-001", "name": "Laptop", "on_hand": 5}),
                &[("authorization", &admin)],
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);

        // The page and its files need no key; the data does.
        b.client()
            .goto(&format!("{}/dashboard", c.base))
            .await
            .unwrap();
        shows(&b, "the key form", STATE, json!("auth")).await;
        let form_shown = "return !document.getElementById('key-form').hidden \
             && document.getElementById('key-reason').textContent;";
        shows(
            &b,
            "why a key is needed",
            form_shown,
            json!("This server needs an API key with the read scope."),
        )
        .await;

        let browser = &b;
        let enter = |secret: String| async move {
            let input = browser
                .client()
                .find(Locator::Id("key-input"))
                .await
                .unwrap();
            input.send_keys(&secret).await.unwrap();
            browser
                .client()
                .find(Locator::Css("#key-form button[type=submit]"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        };
        // A key without the read scope: refused, saying why.
        enter(reserve_only).await;
        shows(
            &b,
            "the missing scope",
            form_shown,
            json!("This API key lacks the read scope: enter a key with read (or admin)."),
        )
        .await;
        enter(read.clone()).await;
        shows(&b, "the live feed", STATE, json!("live")).await;
        shows(&b, "LAPTOP-001", &row("LAPTOP-001"), figures(5, 0, 5, 0)).await;
        shows(&b, "no pending hold", PENDING, json!("0")).await;

        // Kept for this tab (a reload does not ask again), never in the URL.
        b.client().refresh().await.unwrap();
        shows(&b, "the live feed after a reload", STATE, json!("live")).await;
        let stored = js(&b, "return sessionStorage.getItem('stockd.apiKey');").await;
        assert_eq!(stored, json!(read));
        let url = b.client().current_url().await.unwrap();
        assert!(!url.as_str().contains(&read), "{url}");
        assert_eq!(
            js(&b, "return localStorage.length;").await,
            json!(0),
            "nothing in localStorage"
        );
        t.stop().await;
    });
}

/// The page and its files over plain HTTP: no key needed (they hold no data) while the
/// data behind them needs one, a strict Content-Security-Policy, revalidation by `ETag`,
/// `HEAD`, 405 with `Allow`, `GET /` linking to the page, and all of it still served once
/// the log has failed, when an operator needs the page most.
#[tokio::test]
async fn the_page_and_its_files_are_served_without_a_key_under_a_strict_policy() {
    let t = server(|config| config.admin_key = Some(AdminKey::new(ADMIN).unwrap())).await;
    let c = &t.client;
    let files = [
        (
            "/dashboard",
            "text/html; charset=utf-8",
            "<title>stockd dashboard</title>",
        ),
        (
            "/dashboard/app.js",
            "text/javascript; charset=utf-8",
            "Last-Event-ID",
        ),
        ("/dashboard/app.css", "text/css; charset=utf-8", ".hot"),
    ];
    for (path, content_type, needle) in files {
        let a = c.get(path).await;
        assert_eq!(a.status, 200, "{path}: {:?}", a.body);
        assert_eq!(a.header("content-type"), Some(content_type), "{path}");
        let policy = a.header("content-security-policy").unwrap_or_default();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{path}: {policy}");
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("cache-control"), Some("no-cache"), "{path}");
        let body = a.body.as_str().unwrap_or_else(|| panic!("{path}: text"));
        assert!(body.contains(needle), "{path}");
        // Revalidation: the same tag is 304 without a body; another is the file.
        let tag = a.header("etag").expect("an ETag").to_string();
        let again = c
            .send(Method::GET, path, None, &[("if-none-match", &tag)])
            .await
            .unwrap();
        assert_eq!(again.status, 304, "{path}");
        assert_eq!(again.body, Value::Null);
        assert_eq!(again.header("etag"), Some(tag.as_str()));
        let stale = c
            .send(Method::GET, path, None, &[("if-none-match", "\"old\"")])
            .await
            .unwrap();
        assert_eq!(stale.status, 200, "{path}");
        let head = c.send(Method::HEAD, path, None, &[]).await.unwrap();
        assert_eq!(
            (head.status.as_u16(), head.body.clone()),
            (200, Value::Null)
        );
        let post = c.send(Method::POST, path, Some("{}"), &[]).await.unwrap();
        post.assert_problem(405, "method_not_allowed");
        assert_eq!(post.header("allow"), Some("GET, HEAD"));
    }
    // What the page reads needs a key with the read scope.
    c.get("/metrics").await.assert_problem(401, "unauthorized");
    c.get("/v1/events")
        .await
        .assert_problem(401, "unauthorized");
    // Other files are not there.
    c.get("/dashboard/secrets.js")
        .await
        .assert_problem(404, "not_found");

    // `GET /`: JSON for an API client, a page for a browser; both link to the dashboard.
    let a = c.get("/").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.body["links"]["dashboard"], "/dashboard");
    let a = c
        .send(Method::GET, "/", None, &[("accept", "text/html")])
        .await
        .unwrap();
    assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(a.body.as_str().unwrap().contains("href=\"/dashboard\""));
    let a = c.send(Method::DELETE, "/", None, &[]).await.unwrap();
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("GET, HEAD"));

    // Once the log has failed, changes are refused but the page is still served.
    t.service().inject_log_failure();
    let admin = format!("Bearer {ADMIN}");
    c.post_with(
        "/v1/products",
        json!({"sku": "B", "name": "b"}),
        &[("authorization", &admin)],
    )
    .await
    .assert_problem(503, "unavailable");
    for (path, _, needle) in files {
        let a = c.get(path).await;
        assert_eq!(a.status, 200, "{path}");
        assert!(a.body.as_str().unwrap().contains(needle));
    }
    assert!(
        t.shutdown().await.is_err(),
        "shutdown reports the failed log"
    );
}
