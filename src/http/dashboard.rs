//! `GET /dashboard`: a live page of the server's figures, and `GET /`, which links to it.
//!
//! The page is three files built into the binary (`include_str!`): plain HTML, CSS and
//! JavaScript with no build step, nothing fetched from elsewhere, so it works offline. They
//! hold no data and are served without an API key; the page's script reads `/metrics` and
//! the change feed (`/v1/events`) with the key the person enters, as any client would.
//!
//! Each answer carries a strict Content-Security-Policy (only this origin's script, style
//! and connections; no inline script or style, no frames, no forms posted anywhere),
//! `X-Content-Type-Options: nosniff`, and `Cache-Control: no-cache` with a strong `ETag`
//! (a hash of the file): a browser revalidates and gets 304 until the binary changes.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};

type Reply = warp::reply::Response;

/// One embedded file, with its entity tag (computed on first use).
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
    tag: OnceLock<String>,
}

impl Asset {
    const fn new(path: &'static str, content_type: &'static str, body: &'static str) -> Asset {
        Asset {
            path,
            content_type,
            body,
            tag: OnceLock::new(),
        }
    }

    /// The strong entity tag of the body: the first 128 bits of its SHA-256, in hex.
    pub fn etag(&self) -> &str {
        self.tag.get_or_init(|| {
            let digest = Sha256::digest(self.body.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        })
    }
}

pub static PAGE: Asset = Asset::new(
    "/dashboard",
    "text/html; charset=utf-8",
    include_str!("dashboard/index.html"),
);
pub static SCRIPT: Asset = Asset::new(
    "/dashboard/app.js",
    "text/javascript; charset=utf-8",
    include_str!("dashboard/app.js"),
);
pub static STYLE: Asset = Asset::new(
    "/dashboard/app.css",
    "text/css; charset=utf-8",
    include_str!("dashboard/app.css"),
);

/// `GET /`'s page for a browser: what this server is, and where to go.
static INDEX_HTML: Asset = Asset::new(
    "/",
    "text/html; charset=utf-8",
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>stockd</title><link rel=\"icon\" href=\"data:,\"></head><body>\
<h1>stockd</h1><p>An inventory reservation server.</p><ul>\
<li><a href=\"/dashboard\">Dashboard</a>: live stock, holds and the log's health</li>\
<li><a href=\"/openapi.json\">/openapi.json</a>: the API (OpenAPI 3.1)</li>\
<li><a href=\"/metrics\">/metrics</a>: Prometheus metrics</li>\
<li><a href=\"/health\">/health</a></li></ul></body></html>\n",
);

/// `GET /`'s answer for anything else (API clients, curl): the same links, as JSON.
static INDEX_JSON: Asset = Asset::new(
    "/",
    "application/json",
    "{\"name\":\"stockd\",\"links\":{\"dashboard\":\"/dashboard\",\
\"openapi\":\"/openapi.json\",\"metrics\":\"/metrics\",\"health\":\"/health\",\
\"events\":\"/v1/events\"}}",
);

/// The policy of every answer here: the page's own script and style only, connections
/// to this origin only (the feed and `/metrics`), images only as `data:` (the blank
/// favicon), nothing framed, no `<base>`, no form posted.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Whether `If-None-Match` names `tag` (or is `*`): the client's copy is current. Weak
/// comparison (RFC 9110 13.1.2), as `If-None-Match` asks.
fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

/// Serves an embedded file with its type, tag and the headers above (304 when the
/// client's copy is current).
pub fn asset(asset: &Asset, headers: &HeaderMap) -> Reply {
    let tag = asset.etag();
    let mut reply = if not_modified(headers, tag) {
        let mut r = Response::new(Vec::new().into());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(asset.body.into());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = reply.headers_mut();
    if let Ok(tag) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, tag);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The answer differs by `Accept` at `/`; saying so on the others is harmless.
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    reply
}

/// `GET /`: a small HTML page for a browser (its `Accept` names `text/html`), JSON
/// otherwise; both link to the dashboard.
pub fn index(headers: &HeaderMap) -> Reply {
    let html = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    asset(if html { &INDEX_HTML } else { &INDEX_JSON }, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn each_file_has_its_own_strong_tag() {
        let all = [&PAGE, &SCRIPT, &STYLE, &INDEX_HTML, &INDEX_JSON];
        let tags: Vec<&str> = all.iter().map(|a| a.etag()).collect();
        for (i, tag) in tags.iter().enumerate() {
            assert_eq!(tag.len(), 34, "{tag}");
            assert!(tag.starts_with('"') && tag.ends_with('"'));
            assert!(!tags[..i].contains(tag), "{tag} twice");
        }
    }

    #[test]
    fn if_none_match_answers_304_for_the_current_tag_only() {
        let tag = SCRIPT.etag();
        for current in [
            tag.to_string(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            let r = asset(&SCRIPT, &with(header::IF_NONE_MATCH, &current));
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{current}");
            assert_eq!(r.headers()[header::ETAG], tag);
        }
        let r = asset(&SCRIPT, &with(header::IF_NONE_MATCH, "\"stale\""));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
    }

    #[test]
    fn the_page_refers_only_to_its_own_files() {
        // No CDN, no external font, no inline script or style (the policy forbids them).
        for asset in [&PAGE, &SCRIPT, &STYLE] {
            for outside in ["http://", "https://", "//fonts", "@import"] {
                assert!(
                    !asset.body.contains(outside),
                    "{} has {outside}",
                    asset.path
                );
            }
        }
        assert!(PAGE.body.contains("src=\"/dashboard/app.js\""));
        assert!(PAGE.body.contains("href=\"/dashboard/app.css\""));
        assert!(!PAGE.body.contains("<script>") && !PAGE.body.contains("style="));
        assert!(!PAGE.body.contains("<style"));
    }

    #[test]
    fn the_index_is_html_for_a_browser_and_json_otherwise() {
        let r = index(&with(header::ACCEPT, "text/html,application/xhtml+xml"));
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let r = index(&HeaderMap::new());
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(INDEX_JSON.body).unwrap();
        assert_eq!(v["links"]["dashboard"], "/dashboard");
        assert!(INDEX_HTML.body.contains("href=\"/dashboard\""));
    }
}
