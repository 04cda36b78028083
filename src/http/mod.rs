//! The HTTP layer (warp): one catch-all filter and a router of our own.
//!
//! A single filter extracts method, path, query, headers and body, and `router::dispatch`
//! matches the route by hand. This keeps 404 vs 405 exact (warp's rejection merging
//! cannot tell them apart reliably), gives every error the same problem+json shape, and
//! avoids backtracking through a chain of filters on every request.

pub mod auth;
pub mod dashboard;
pub mod events;
pub mod input;
pub mod metrics;
pub mod problem;
pub mod rate;
pub mod router;
pub mod views;
pub mod webhooks;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{watch, Semaphore};
use warp::http::{HeaderMap, Method};
use warp::Filter;

use crate::cluster::Role;
use crate::keyring::Keyring;
use crate::limits::{REQUESTS_IN_FLIGHT_MAX, REQUEST_BODY_BYTES_MAX, SCRAPES_IN_FLIGHT_MAX};
use crate::service::Service;
use problem::Problem;

/// Everything a handler needs, shared by all requests (behind one `Arc`; see `routes`).
pub struct App {
    /// The service requests are answered by. A single node's never changes; a cluster
    /// node's is its leadership's epoch's while it serves, and a standby otherwise
    /// (`crate::leadership`). A request loads it once, without a lock.
    pub service: Arc<arc_swap::ArcSwap<Service>>,
    /// Admission control: requests beyond `REQUESTS_IN_FLIGHT_MAX` get 503 at once.
    pub in_flight: Arc<Semaphore>,
    /// `GET /metrics` in flight: limited on its own (`SCRAPES_IN_FLIGHT_MAX`), never by
    /// `in_flight`.
    pub scrapes: Arc<Semaphore>,
    /// Every response sent, by status, for `GET /metrics`.
    pub responses: metrics::Responses,
    /// When the server started serving, in seconds since the Unix epoch.
    pub started_unix: f64,
    /// The per-customer limit on reservation attempts (`None`: no limit).
    pub customer_rate: Option<Arc<rate::CustomerLimiter>>,
    /// The API keys requests are checked against (`crate::keyring`).
    pub keys: Arc<Keyring>,
    /// This node's role in its cluster (`Role::Single` without one): only a node that
    /// serves answers application requests; a follower redirects them to its leader.
    pub role: watch::Receiver<Role>,
    /// The address this server's API is bound to, `HOST:PORT` (`GET /v1/cluster`).
    pub api_addr: String,
    /// Webhook endpoints and their deliveries (`None`: the change feed is off).
    pub webhooks: Option<crate::webhooks::Webhooks>,
    /// A cluster node's engine, for `GET /v1/cluster` and a follower's redirects (`None`:
    /// a single server).
    pub cluster: Option<Arc<crate::cluster::node::ClusterNode>>,
}

impl App {
    /// Must be called inside a Tokio runtime: a rate limit's sweeper is spawned here (it
    /// ends once the `App` is dropped).
    pub fn new(
        service: Service,
        keys: Arc<Keyring>,
        customer_rate: Option<rate::CustomerRate>,
        role: watch::Receiver<Role>,
        api_addr: std::net::SocketAddr,
        webhooks: Option<crate::webhooks::Webhooks>,
    ) -> App {
        let customer_rate = customer_rate.map(|rate| {
            let limiter = Arc::new(rate::CustomerLimiter::new(rate));
            rate::CustomerLimiter::spawn_sweeper(&limiter);
            limiter
        });
        App {
            service: Arc::new(arc_swap::ArcSwap::from_pointee(service)),
            in_flight: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
            scrapes: Arc::new(Semaphore::new(SCRAPES_IN_FLIGHT_MAX)),
            responses: metrics::Responses::default(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            customer_rate,
            keys,
            role,
            api_addr: api_addr.to_string(),
            webhooks,
            cluster: None,
        }
    }

    /// Requests being served now.
    pub fn requests_in_flight(&self) -> usize {
        REQUESTS_IN_FLIGHT_MAX.saturating_sub(self.in_flight.available_permits())
    }
}

/// A request as the router sees it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The warp filter serving the whole API.
pub fn routes(
    app: App,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
       + Clone
       + Send
       + Sync
       + 'static {
    // One `Arc` for every request to share: cloning `App` itself would touch a dozen
    // reference counts (actor ref, log and snapshotter channels...) twice per request, on
    // cache lines both cores write.
    let app = Arc::new(app);
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::method()
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers, body| {
                let app = Arc::clone(&app);
                async move {
                    let started = std::time::Instant::now();
                    let path = input::decode_unreserved(path.as_str()).into_owned();
                    let response = match read_body(&headers, body).await {
                        Ok(body) => {
                            let request = Request {
                                method,
                                path,
                                query,
                                headers,
                                body,
                            };
                            router::handle(&app, request, started).await
                        }
                        Err(problem) => problem.into_response(),
                    };
                    app.responses.count(response.status().as_u16());
                    response
                }
            },
        )
}

/// Reads the body, refusing more than `REQUEST_BODY_BYTES_MAX` bytes with 413.
async fn read_body<S, B>(headers: &HeaderMap, stream: S) -> Result<Bytes, Problem>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    let too_large = || {
        Problem::new(
            413,
            "payload_too_large",
            format!("request bodies are limited to {REQUEST_BODY_BYTES_MAX} bytes"),
        )
    };
    if let Some(len) = headers.get(warp::http::header::CONTENT_LENGTH) {
        let len: Option<usize> = len.to_str().ok().and_then(|v| v.trim().parse().ok());
        match len {
            Some(len) if len > REQUEST_BODY_BYTES_MAX => return Err(too_large()),
            Some(_) => {}
            None => return Err(Problem::bad_request("malformed Content-Length header")),
        }
    }
    let mut stream = std::pin::pin!(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk =
            chunk.map_err(|e| Problem::bad_request(format!("reading the body: {e}")))?;
        while chunk.has_remaining() {
            let part = chunk.chunk();
            if body.len() + part.len() > REQUEST_BODY_BYTES_MAX {
                return Err(too_large());
            }
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(body))
}
