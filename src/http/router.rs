//! Routing and the endpoint handlers: parse, call the service, render.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;
use warp::http::{header, HeaderValue, Method, Response, StatusCode};

use crate::domain::{Product, Reservation};
use crate::http::input;
use crate::http::problem::Problem;
use crate::http::views::{PageView, ProductView, ReservationView};
use crate::http::{App, Request};

type Reply = warp::reply::Response;
type Result<T> = std::result::Result<T, Problem>;

enum Endpoint {
    Health,
    Metrics,
    CreateProduct,
    ListProducts,
    GetProduct(String),
    PatchProduct(String),
    DeleteProduct(String),
    Replenish(String),
    Adjust(String),
    Reserve,
    GetReservation(String),
    Confirm(String),
    Cancel(String),
    Extend(String),
    Snapshot,
}

enum Route {
    Found(Endpoint),
    NotFound,
    MethodNotAllowed(&'static str),
}

fn route(method: &Method, path: &str) -> Route {
    use Endpoint::*;
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let m = method;
    let pick = |allowed: &'static str, found: Option<Endpoint>| match found {
        Some(e) => Route::Found(e),
        None => Route::MethodNotAllowed(allowed),
    };
    let s = |x: &str| x.to_string();
    // HEAD is GET without the body (hyper leaves the body out), for health checkers and
    // caches that probe with it.
    let read = m == Method::GET || m == Method::HEAD;
    match segments.as_slice() {
        ["health"] => pick("GET, HEAD", read.then_some(Health)),
        ["metrics"] => pick("GET, HEAD", read.then_some(Metrics)),
        ["v1", "products"] => pick(
            "GET, HEAD, POST",
            match *m {
                Method::GET | Method::HEAD => Some(ListProducts),
                Method::POST => Some(CreateProduct),
                _ => None,
            },
        ),
        ["v1", "products", sku] if !sku.is_empty() => pick(
            "GET, HEAD, PATCH, DELETE",
            match *m {
                Method::GET | Method::HEAD => Some(GetProduct(s(sku))),
                Method::PATCH => Some(PatchProduct(s(sku))),
                Method::DELETE => Some(DeleteProduct(s(sku))),
                _ => None,
            },
        ),
        ["v1", "products", sku, "replenish"] if !sku.is_empty() => {
            pick("POST", (m == Method::POST).then(|| Replenish(s(sku))))
        }
        ["v1", "products", sku, "adjust"] if !sku.is_empty() => {
            pick("POST", (m == Method::POST).then(|| Adjust(s(sku))))
        }
        ["v1", "reservations"] => pick("POST", (m == Method::POST).then_some(Reserve)),
        ["v1", "admin", "snapshot"] => pick("POST", (m == Method::POST).then_some(Snapshot)),
        ["v1", "reservations", id] if !id.is_empty() => {
            pick("GET, HEAD", read.then(|| GetReservation(s(id))))
        }
        ["v1", "reservations", id, action] if !id.is_empty() => {
            let endpoint = match *action {
                "confirm" => Confirm(s(id)),
                "cancel" => Cancel(s(id)),
                "extend" => Extend(s(id)),
                _ => return Route::NotFound,
            };
            pick("POST", (m == Method::POST).then_some(endpoint))
        }
        _ => Route::NotFound,
    }
}

/// Serves one request; never panics on input (a panic inside a handler task is a 500).
pub async fn handle(app: &Arc<App>, request: Request, started: Instant) -> Reply {
    let method = request.method.clone();
    let path = request.path.clone();
    let response = match route(&request.method, &request.path) {
        Route::NotFound => {
            Problem::new(404, "not_found", format!("no route for {path}")).into_response()
        }
        Route::MethodNotAllowed(allow) => Problem::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}; allowed: {allow}"),
        )
        .header(header::ALLOW, allow)
        .into_response(),
        Route::Found(endpoint) => run(app, endpoint, request).await,
    };
    let status = response.status().as_u16();
    if status >= 500 {
        tracing::warn!(%method, %path, status, "request refused");
    }
    tracing::debug!(
        %method,
        %path,
        status,
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// Runs the endpoint on its own task, under admission control.
async fn run(app: &Arc<App>, endpoint: Endpoint, request: Request) -> Reply {
    // `/metrics` has a small limit of its own: an overload of requests is when it is
    // needed, and a flood of scrapes must not load the supervisor in turn.
    let gate = match endpoint {
        Endpoint::Metrics => &app.scrapes,
        _ => &app.in_flight,
    };
    let Ok(permit) = gate.clone().try_acquire_owned() else {
        return Problem::new(503, "unavailable", "too many requests in flight; retry")
            .header(header::RETRY_AFTER, "1")
            .into_response();
    };
    let app = Arc::clone(app);
    // A task of its own: a client hanging up cannot cancel a change half made.
    let task = tokio::spawn(async move {
        let _permit = permit;
        match serve(&app, endpoint, &request).await {
            Ok(reply) => reply,
            Err(problem) => problem.into_response(),
        }
    });
    match task.await {
        Ok(reply) => reply,
        Err(err) => {
            tracing::error!(error = %err, "request handler failed");
            Problem::new(
                500,
                "internal_error",
                "the request failed inside the server",
            )
            .into_response()
        }
    }
}

async fn serve(app: &App, endpoint: Endpoint, req: &Request) -> Result<Reply> {
    use Endpoint::*;
    let svc = &app.service;
    // Once the log has failed, changes (and `/health`, for load balancers) are refused
    // until the operator restarts the server; reads and metrics are answered from memory,
    // which may hold changes that were refused (503) and will not survive a restart
    // (docs/API.md says which).
    let read = matches!(
        endpoint,
        Metrics | GetProduct(_) | ListProducts | GetReservation(_)
    );
    if !read && !svc.log_healthy() {
        return Err(Problem::new(
            503,
            "unavailable",
            "the write-ahead log cannot be written; restart the server once storage is fixed",
        )
        .header(header::RETRY_AFTER, "1"));
    }
    let body = || input::json_body(&req.headers, &req.body);
    match endpoint {
        Health => Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
        Metrics => metrics(app).await,
        CreateProduct => {
            let input = input::create_product(&input::required(body()?)?)?;
            let p = svc
                .create_product(input.sku, input.name, input.price, input.on_hand)
                .await?;
            let mut reply = product(StatusCode::CREATED, &p);
            set(
                &mut reply,
                header::LOCATION,
                &format!("/v1/products/{}", p.sku),
            );
            Ok(reply)
        }
        ListProducts => {
            let (limit, after) = input::page(&req.query)?;
            let (products, next_after) = svc.list_products(after, limit).await?;
            let page = PageView {
                items: products.iter().map(ProductView::from).collect(),
                next_after: next_after.as_deref(),
            };
            Ok(json(StatusCode::OK, &page))
        }
        GetProduct(sku) => {
            let sku = known_sku(sku)?;
            Ok(product(StatusCode::OK, &svc.get_product(&sku).await?))
        }
        PatchProduct(sku) => change(svc, req, sku, input::patch_product).await,
        Replenish(sku) => change(svc, req, sku, input::replenish).await,
        Adjust(sku) => change(svc, req, sku, input::adjust).await,
        DeleteProduct(sku) => {
            let sku = known_sku(sku)?;
            let if_match = input::if_match(&req.headers)?;
            svc.delete_product(&sku, if_match).await?;
            let mut reply = Response::new(Vec::new().into());
            *reply.status_mut() = StatusCode::NO_CONTENT;
            Ok(reply)
        }
        Reserve => {
            let key = input::idempotency_key(&req.headers)?;
            let request = input::reserve_body(&req.headers, &req.body)?;
            // An attempt (an idempotent replay included) counts once its body is valid;
            // one refused here changes nothing.
            if let Some(limiter) = &app.customer_rate {
                limiter.check(&request.customer_id).map_err(rate_limited)?;
            }
            let (r, replayed) = svc.reserve(request, key).await?;
            let view = if replayed {
                ReservationView::original(&r)
            } else {
                ReservationView::new(&r)
            };
            let mut reply = json(StatusCode::CREATED, &view);
            set(
                &mut reply,
                header::LOCATION,
                &format!("/v1/reservations/{}", r.id),
            );
            if replayed {
                set(&mut reply, "idempotent-replayed", "true");
            }
            Ok(reply)
        }
        GetReservation(id) => reservation(&svc.get_reservation(reservation_id(&id)?).await?),
        Snapshot => {
            if let Some(value) = body()? {
                if value.as_object().is_none_or(|o| !o.is_empty()) {
                    return Err(Problem::invalid("body", "a snapshot request takes no body"));
                }
            }
            let taken = svc.snapshot().await?;
            let status = if taken.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json(status, &taken))
        }
        Confirm(id) => {
            let id = reservation_id(&id)?;
            let order_id = input::confirm(body()?.as_ref())?;
            reservation(&svc.confirm(id, order_id).await?)
        }
        Cancel(id) => {
            let id = reservation_id(&id)?;
            // A body is not expected; if one is sent it must at least be an empty object.
            if let Some(value) = body()? {
                if value.as_object().is_none_or(|o| !o.is_empty()) {
                    return Err(Problem::invalid("body", "cancel takes no body"));
                }
            }
            reservation(&svc.cancel(id).await?)
        }
        Extend(id) => {
            let id = reservation_id(&id)?;
            let ttl = input::extend(&input::required(body()?)?)?;
            reservation(&svc.extend(id, ttl).await?)
        }
    }
}

/// 429 for an attempt over its customer's limit, saying when to retry.
fn rate_limited(wait: std::time::Duration) -> Problem {
    let seconds = crate::http::rate::retry_after_seconds(wait);
    Problem::new(
        429,
        "rate_limited",
        format!("too many reservation attempts for this customer; retry in {seconds} s"),
    )
    .with("retry_after_seconds", seconds)
    .header(header::RETRY_AFTER, seconds.to_string())
}

/// PATCH, replenish and adjust: a product change with `If-Match`.
async fn change(
    svc: &crate::service::Service,
    req: &Request,
    sku: String,
    parse: fn(&Value) -> Result<crate::actors::product::Change>,
) -> Result<Reply> {
    let sku = known_sku(sku)?;
    let if_match = input::if_match(&req.headers)?;
    let change = parse(&input::required(input::json_body(
        &req.headers,
        &req.body,
    )?)?)?;
    let p = svc.change_product(&sku, change, if_match).await?;
    Ok(product(StatusCode::OK, &p))
}

async fn metrics(app: &App) -> Result<Reply> {
    let svc = &app.service;
    let text = crate::http::metrics::render(&crate::http::metrics::Figures {
        responses: &app.responses,
        in_flight: app.requests_in_flight(),
        supervisor: svc.stats().await?,
        log: svc.log_stats(),
        newest_snapshot_seq: svc.newest_snapshot_seq(),
        start_time_unix: app.started_unix,
        stderr_lines_lost: crate::logging::lines_lost(),
        rate_limited: app.customer_rate.as_ref().map_or(0, |l| l.refused()),
    });
    let mut reply = Response::new(text.into());
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(reply)
}

/// A SKU from the path: one that cannot exist is simply not found.
fn known_sku(sku: String) -> Result<String> {
    if input::is_sku(&sku) {
        Ok(sku)
    } else {
        Err(crate::error::Error::ProductNotFound { sku }.into())
    }
}

/// Any string that is not a UUID names no reservation.
fn reservation_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| crate::error::Error::ReservationNotFound { id: id.to_string() }.into())
}

fn reservation(r: &Reservation) -> Result<Reply> {
    Ok(json(StatusCode::OK, &ReservationView::new(r)))
}

fn product(status: StatusCode, p: &Product) -> Reply {
    let mut reply = json(status, &ProductView::from(p));
    set(&mut reply, header::ETAG, &format!("\"{}\"", p.version));
    reply
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    // Sized for a reservation or a product view, so that rendering one does not grow the
    // buffer step by step from empty.
    let mut bytes = Vec::with_capacity(512);
    if let Err(err) = serde_json::to_writer(&mut bytes, value) {
        return Problem::new(
            500,
            "internal_error",
            format!("rendering the answer: {err}"),
        )
        .into_response();
    }
    let mut reply = Response::new(bytes.into());
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

fn set<K: header::IntoHeaderName>(reply: &mut Reply, name: K, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        reply.headers_mut().insert(name, value);
    }
}
