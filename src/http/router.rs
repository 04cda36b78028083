//! Routing and the endpoint handlers: parse, call the service, render.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;
use warp::http::{header, HeaderValue, Method, Response, StatusCode};

use crate::cluster::Role;
use crate::domain::{KeyId, Product, Reservation};
use crate::http::input;
use crate::http::problem::Problem;
use crate::http::views::{KeyView, PageView, ProductView, ReservationView};
use crate::http::{App, Request};
use crate::keyring::{Caller, Scope};

type Reply = warp::reply::Response;
type Result<T> = std::result::Result<T, Problem>;

enum Endpoint {
    Index,
    Dashboard(&'static crate::http::dashboard::Asset),
    Health,
    Metrics,
    OpenApi,
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
    CreateKey,
    ListKeys,
    RevokeKey(String),
    Events,
    Cluster,
    ClusterDigest,
    AddLearner,
    RemoveLearner(String),
    ChangeVoters,
    CreateWebhook,
    ListWebhooks,
    GetWebhook(String),
    DeleteWebhook(String),
    EnableWebhook(String),
}

/// Every path the router answers, spelled as the OpenAPI document (`src/http/openapi.json`)
/// spells it, with the methods it takes: the `Allow` header of its 405. `route` takes its
/// `Allow` values from here (`allow`, checked at compile time), and the router's tests hold
/// the document to this table and to `route`, both ways.
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET, HEAD"),
    ("/dashboard", "GET, HEAD"),
    ("/dashboard/app.js", "GET, HEAD"),
    ("/dashboard/app.css", "GET, HEAD"),
    ("/health", "GET, HEAD"),
    ("/metrics", "GET, HEAD"),
    ("/openapi.json", "GET, HEAD"),
    ("/v1/products", "GET, HEAD, POST"),
    ("/v1/products/{sku}", "GET, HEAD, PATCH, DELETE"),
    ("/v1/products/{sku}/replenish", "POST"),
    ("/v1/products/{sku}/adjust", "POST"),
    ("/v1/reservations", "POST"),
    ("/v1/reservations/{id}", "GET, HEAD"),
    ("/v1/reservations/{id}/confirm", "POST"),
    ("/v1/reservations/{id}/cancel", "POST"),
    ("/v1/reservations/{id}/extend", "POST"),
    ("/v1/admin/snapshot", "POST"),
    ("/v1/admin/keys", "GET, HEAD, POST"),
    ("/v1/admin/keys/{id}", "DELETE"),
    ("/v1/events", "GET, HEAD"),
    ("/v1/cluster", "GET, HEAD"),
    ("/v1/admin/cluster/digest", "GET, HEAD"),
    ("/v1/admin/cluster/learners", "POST"),
    ("/v1/admin/cluster/learners/{id}", "DELETE"),
    ("/v1/admin/cluster/voters", "PUT"),
    ("/v1/webhooks", "GET, HEAD, POST"),
    ("/v1/webhooks/{id}", "GET, HEAD, DELETE"),
    ("/v1/webhooks/{id}/enable", "POST"),
];

/// The `Allow` value of a path template in `ROUTES`; used in `const` blocks, so that a
/// route missing from the table does not compile.
const fn allow(template: &str) -> &'static str {
    let mut i = 0;
    while i < ROUTES.len() {
        let (path, methods) = ROUTES[i];
        if path.len() == template.len() {
            let (a, b) = (path.as_bytes(), template.as_bytes());
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return methods;
            }
        }
        i += 1;
    }
    panic!("a route that is not in ROUTES")
}

/// The OpenAPI 3.1 description of this API, served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

enum Route {
    Found(Endpoint),
    NotFound,
    MethodNotAllowed(&'static str),
}

fn route(method: &Method, path: &str) -> Route {
    use crate::http::dashboard::{PAGE, SCRIPT, STYLE};
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
        [""] => pick(const { allow("/") }, read.then_some(Index)),
        ["dashboard"] => pick(
            const { allow("/dashboard") },
            read.then_some(Dashboard(&PAGE)),
        ),
        ["dashboard", "app.js"] => pick(
            const { allow("/dashboard/app.js") },
            read.then_some(Dashboard(&SCRIPT)),
        ),
        ["dashboard", "app.css"] => pick(
            const { allow("/dashboard/app.css") },
            read.then_some(Dashboard(&STYLE)),
        ),
        ["health"] => pick(const { allow("/health") }, read.then_some(Health)),
        ["metrics"] => pick(const { allow("/metrics") }, read.then_some(Metrics)),
        ["openapi.json"] => pick(const { allow("/openapi.json") }, read.then_some(OpenApi)),
        ["v1", "products"] => pick(
            const { allow("/v1/products") },
            match *m {
                Method::GET | Method::HEAD => Some(ListProducts),
                Method::POST => Some(CreateProduct),
                _ => None,
            },
        ),
        ["v1", "products", sku] if !sku.is_empty() => pick(
            const { allow("/v1/products/{sku}") },
            match *m {
                Method::GET | Method::HEAD => Some(GetProduct(s(sku))),
                Method::PATCH => Some(PatchProduct(s(sku))),
                Method::DELETE => Some(DeleteProduct(s(sku))),
                _ => None,
            },
        ),
        ["v1", "products", sku, "replenish"] if !sku.is_empty() => pick(
            const { allow("/v1/products/{sku}/replenish") },
            (m == Method::POST).then(|| Replenish(s(sku))),
        ),
        ["v1", "products", sku, "adjust"] if !sku.is_empty() => pick(
            const { allow("/v1/products/{sku}/adjust") },
            (m == Method::POST).then(|| Adjust(s(sku))),
        ),
        ["v1", "reservations"] => pick(
            const { allow("/v1/reservations") },
            (m == Method::POST).then_some(Reserve),
        ),
        ["v1", "admin", "snapshot"] => pick(
            const { allow("/v1/admin/snapshot") },
            (m == Method::POST).then_some(Snapshot),
        ),
        ["v1", "admin", "keys"] => pick(
            const { allow("/v1/admin/keys") },
            match *m {
                Method::GET | Method::HEAD => Some(ListKeys),
                Method::POST => Some(CreateKey),
                _ => None,
            },
        ),
        ["v1", "admin", "keys", id] if !id.is_empty() => pick(
            const { allow("/v1/admin/keys/{id}") },
            (m == Method::DELETE).then(|| RevokeKey(s(id))),
        ),
        ["v1", "events"] => pick(const { allow("/v1/events") }, read.then_some(Events)),
        ["v1", "cluster"] => pick(const { allow("/v1/cluster") }, read.then_some(Cluster)),
        ["v1", "admin", "cluster", "digest"] => pick(
            const { allow("/v1/admin/cluster/digest") },
            read.then_some(ClusterDigest),
        ),
        ["v1", "admin", "cluster", "learners"] => pick(
            const { allow("/v1/admin/cluster/learners") },
            (m == Method::POST).then_some(AddLearner),
        ),
        ["v1", "admin", "cluster", "learners", id] if !id.is_empty() => pick(
            const { allow("/v1/admin/cluster/learners/{id}") },
            (m == Method::DELETE).then(|| RemoveLearner(s(id))),
        ),
        ["v1", "admin", "cluster", "voters"] => pick(
            const { allow("/v1/admin/cluster/voters") },
            (m == Method::PUT).then_some(ChangeVoters),
        ),
        ["v1", "webhooks"] => pick(
            const { allow("/v1/webhooks") },
            match *m {
                Method::GET | Method::HEAD => Some(ListWebhooks),
                Method::POST => Some(CreateWebhook),
                _ => None,
            },
        ),
        ["v1", "webhooks", id] if !id.is_empty() => pick(
            const { allow("/v1/webhooks/{id}") },
            match *m {
                Method::GET | Method::HEAD => Some(GetWebhook(s(id))),
                Method::DELETE => Some(DeleteWebhook(s(id))),
                _ => None,
            },
        ),
        ["v1", "webhooks", id, "enable"] if !id.is_empty() => pick(
            const { allow("/v1/webhooks/{id}/enable") },
            (m == Method::POST).then(|| EnableWebhook(s(id))),
        ),
        ["v1", "reservations", id] if !id.is_empty() => pick(
            const { allow("/v1/reservations/{id}") },
            read.then(|| GetReservation(s(id))),
        ),
        ["v1", "reservations", id, action] if !id.is_empty() => {
            let (endpoint, allowed) = match *action {
                "confirm" => (
                    Confirm(s(id)),
                    const { allow("/v1/reservations/{id}/confirm") },
                ),
                "cancel" => (
                    Cancel(s(id)),
                    const { allow("/v1/reservations/{id}/cancel") },
                ),
                "extend" => (
                    Extend(s(id)),
                    const { allow("/v1/reservations/{id}/extend") },
                ),
                _ => return Route::NotFound,
            };
            pick(allowed, (m == Method::POST).then_some(endpoint))
        }
        _ => Route::NotFound,
    }
}

/// The scope an endpoint needs (`None`: none, even with authentication on). An exhaustive
/// match: a new endpoint does not compile until it is given one. The index and the
/// dashboard's files hold no data: the page asks for a key before it reads any.
fn scope(endpoint: &Endpoint) -> Option<Scope> {
    use Endpoint::*;
    match endpoint {
        Health | Index | Dashboard(_) => None,
        Metrics | OpenApi | ListProducts | GetProduct(_) | GetReservation(_) | Events | Cluster => {
            Some(Scope::Read)
        }
        Reserve | Confirm(_) | Cancel(_) | Extend(_) => Some(Scope::Reserve),
        CreateProduct | PatchProduct(_) | DeleteProduct(_) | Replenish(_) | Adjust(_) => {
            Some(Scope::Stock)
        }
        Snapshot | CreateKey | ListKeys | RevokeKey(_) | ClusterDigest | AddLearner
        | RemoveLearner(_) | ChangeVoters => Some(Scope::Admin),
        // Webhooks hold signing secrets and make the server call out: admin, reads too.
        CreateWebhook | ListWebhooks | GetWebhook(_) | DeleteWebhook(_) | EnableWebhook(_) => {
            Some(Scope::Admin)
        }
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
        // Routing comes first: a 404 or 405 tells nothing the published contract does
        // not, and so needs no key.
        Route::Found(endpoint) => {
            match crate::http::auth::authorize(&app.keys, &request.headers, scope(&endpoint)) {
                Ok(caller) => run(app, endpoint, request, caller).await,
                Err(problem) => problem.into_response(),
            }
        }
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
async fn run(app: &Arc<App>, endpoint: Endpoint, request: Request, caller: Caller) -> Reply {
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
        match serve(&app, endpoint, &request, caller).await {
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

/// A cluster leader past its lease: it may no longer be the leader.
fn lease_lapsed() -> Problem {
    Problem::new(
        503,
        "unavailable",
        "this leader has not heard from a majority of the cluster within its lease; retry \
         (another node may be leading now)",
    )
    .header(header::RETRY_AFTER, "1")
}

/// How long `POST /v1/admin/snapshot` on a cluster node waits for its engine's snapshot.
const CLUSTER_SNAPSHOT_WAIT: Duration = Duration::from_secs(300);

/// Whether a node in `role` refuses `endpoint`: only a node that serves (a single node, a
/// ready leader) answers application requests; `/health`, `/metrics`, the OpenAPI document,
/// `GET /v1/cluster` and the dashboard's static page and assets are answered by every node
/// (docs/REPLICATION.md, "HTTP surface").
fn refused_in(role: Role, endpoint: &Endpoint) -> Option<Problem> {
    use Endpoint::*;
    if role.serves()
        || matches!(
            endpoint,
            Health | Index | Dashboard(_) | Metrics | OpenApi | Cluster | ClusterDigest
        )
    {
        return None;
    }
    Some(
        Problem::new(
            503,
            "unavailable",
            format!(
                "this node is a {} and does not serve this request now; retry",
                role.as_str()
            ),
        )
        .header(header::RETRY_AFTER, "1"),
    )
}

async fn serve(app: &App, endpoint: Endpoint, req: &Request, caller: Caller) -> Result<Reply> {
    use Endpoint::*;
    // Read once each: the role and the service the whole request is answered in.
    let mut role = *app.role.borrow();
    let svc = app.service.load();
    let svc: &crate::service::Service = &svc;
    // A cluster node's role and service change one after the other (the service first
    // when an epoch begins, the role first when it ends): it serves only when both say so.
    if role.serves() && !svc.serves {
        role = Role::Leader { ready: false };
    }
    if let Some(problem) = refused_in(role, &endpoint) {
        // A follower sends the client to its leader, if it knows where that is.
        if let (Role::Follower { leader }, Some(cluster)) = (role, &app.cluster) {
            if let Some(api) = cluster.api_of(leader) {
                return Ok(to_leader(leader, &api, req));
            }
        }
        return Err(problem);
    }
    // Once the log has failed, changes (and `/health`, for load balancers) are refused
    // until the operator restarts the server; reads and metrics are answered from memory,
    // which may hold changes that were refused (503) and will not survive a restart
    // (docs/API.md says which). The OpenAPI document is a read too: it needs no log.
    let read = matches!(
        endpoint,
        Index
            | Dashboard(_)
            | Metrics
            | OpenApi
            | GetProduct(_)
            | ListProducts
            | GetReservation(_)
            | ListKeys
            | Events
            | Cluster
            | ClusterDigest
            | ListWebhooks
            | GetWebhook(_)
    );
    // A cluster leader answers reads only within its lease: past it, another node may
    // have been elected and have changed what this one would answer.
    let application_read = read
        && !matches!(
            endpoint,
            Index | Dashboard(_) | Metrics | OpenApi | Cluster | ClusterDigest
        );
    if let (true, Some(cluster)) = (application_read, &app.cluster) {
        if !cluster.lease_holds() {
            return Err(lease_lapsed());
        }
    }
    if !read && !svc.log_healthy() && app.cluster.is_some() {
        return Err(Problem::new(
            503,
            "unavailable",
            "this node's leadership is ending; retry (on the next leader)",
        )
        .header(header::RETRY_AFTER, "1"));
    }
    if !read && !svc.log_healthy() {
        return Err(Problem::new(
            503,
            "unavailable",
            "the write-ahead log cannot be written; restart the server once storage is fixed",
        )
        .header(header::RETRY_AFTER, "1"));
    }
    let body = || input::json_body(&req.headers, &req.body);
    // The API key making the request, recorded with every change it makes (`None`: the
    // server runs open).
    let by: Option<KeyId> = caller.id;
    // An application request (one a node that does not serve refuses).
    let application = refused_in(Role::Leaderless, &endpoint).is_some();
    let answered: Result<Reply> = async {
        match endpoint {
            Health => health(role, &req.query),
            Cluster => Ok(json(
                StatusCode::OK,
                &match &app.cluster {
                    Some(cluster) => cluster.status(),
                    None => crate::cluster::Status::single(
                        app.api_addr.clone(),
                        svc.journal(),
                        svc.newest_snapshot_seq(),
                    ),
                },
            )),
            ClusterDigest => {
                let (seq, digest) = match &app.cluster {
                    Some(cluster) => cluster
                        .digest()
                        .await
                        .map_err(crate::error::Error::Unavailable)?,
                    None => svc.durable_digest().await?,
                };
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"applied_seq": seq, "digest": hex}),
                ))
            }
            AddLearner => {
                let new = input::new_learner(&input::required(body()?)?)?;
                let cluster = membership_of(app)?;
                let status = cluster
                    .add_learner(new.id, new.api, new.raft)
                    .await
                    .map_err(membership_problem)?;
                Ok(json(StatusCode::OK, &status))
            }
            RemoveLearner(id) => {
                let id = input::node_id(&id)?;
                let cluster = membership_of(app)?;
                let status = cluster
                    .remove_learner(id)
                    .await
                    .map_err(membership_problem)?;
                Ok(json(StatusCode::OK, &status))
            }
            ChangeVoters => {
                let voters = input::voters(&input::required(body()?)?)?;
                let cluster = membership_of(app)?;
                let status = cluster
                    .change_voters(&voters)
                    .await
                    .map_err(membership_problem)?;
                Ok(json(StatusCode::OK, &status))
            }
            Index => Ok(crate::http::dashboard::index(&req.headers)),
            Dashboard(asset) => Ok(crate::http::dashboard::asset(asset, &req.headers)),
            Metrics => metrics(app).await,
            OpenApi => {
                let mut reply = Response::new(OPENAPI.into());
                reply.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok(reply)
            }
            CreateProduct => {
                let new = input::create_product(&input::required(body()?)?)?;
                let p = svc.create_product(new, by).await?;
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
            PatchProduct(sku) => change(svc, req, sku, input::patch_product, by).await,
            Replenish(sku) => change(svc, req, sku, input::replenish, by).await,
            Adjust(sku) => change(svc, req, sku, input::adjust, by).await,
            DeleteProduct(sku) => {
                let sku = known_sku(sku)?;
                let if_match = input::if_match(&req.headers)?;
                svc.delete_product(&sku, if_match, by).await?;
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
                let (r, replayed) = svc.reserve(request, key, by).await?;
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
            Events => crate::http::events::serve(svc.feed(), &req.query, &req.headers).await,
            CreateWebhook => {
                let hooks = crate::http::webhooks::enabled(app, svc)?;
                let new = input::create_webhook(&input::required(body()?)?)?;
                let view = hooks
                    .register(new)
                    .await
                    .map_err(crate::http::webhooks::problem(""))?;
                let mut reply = json(StatusCode::CREATED, &view);
                set(
                    &mut reply,
                    header::LOCATION,
                    &format!("/v1/webhooks/{}", view.id),
                );
                Ok(reply)
            }
            ListWebhooks => {
                let hooks = crate::http::webhooks::enabled(app, svc)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "items": hooks.list() }),
                ))
            }
            GetWebhook(id) => {
                let hooks = crate::http::webhooks::enabled(app, svc)?;
                let view = hooks
                    .show(crate::http::webhooks::id(&id)?)
                    .map_err(crate::http::webhooks::problem(&id))?;
                Ok(json(StatusCode::OK, &view))
            }
            DeleteWebhook(id) => {
                let hooks = crate::http::webhooks::enabled(app, svc)?;
                hooks
                    .delete(crate::http::webhooks::id(&id)?)
                    .await
                    .map_err(crate::http::webhooks::problem(&id))?;
                let mut reply = Response::new(Vec::new().into());
                *reply.status_mut() = StatusCode::NO_CONTENT;
                Ok(reply)
            }
            EnableWebhook(id) => {
                let hooks = crate::http::webhooks::enabled(app, svc)?;
                let uuid = crate::http::webhooks::id(&id)?;
                if let Some(value) = body()? {
                    if value.as_object().is_none_or(|o| !o.is_empty()) {
                        return Err(Problem::invalid("body", "enable takes no body"));
                    }
                }
                let view = hooks
                    .enable(uuid)
                    .await
                    .map_err(crate::http::webhooks::problem(&id))?;
                Ok(json(StatusCode::OK, &view))
            }
            Snapshot => {
                if let Some(value) = body()? {
                    if value.as_object().is_none_or(|o| !o.is_empty()) {
                        return Err(Problem::invalid("body", "a snapshot request takes no body"));
                    }
                }
                let taken = match &app.cluster {
                    // A cluster node's snapshots are its engine's (a single server's
                    // snapshotter cannot read its log).
                    Some(cluster) => cluster
                        .snapshot(CLUSTER_SNAPSHOT_WAIT)
                        .await
                        .map_err(crate::error::Error::Unavailable)?,
                    None => svc.snapshot().await?,
                };
                let status = if taken.created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(json(status, &taken))
            }
            CreateKey => {
                let input = input::create_key(&input::required(body()?)?)?;
                if !app.keys.enforced() && !input.scopes.contains(&Scope::Admin) {
                    // The first key turns authentication on: without admin among its scopes,
                    // nobody could manage keys any more.
                    return Err(Problem::invalid(
                        "scopes",
                        "the server runs without authentication, and its first key turns it on: \
                         give that key the admin scope",
                    ));
                }
                let (key, secret) = app.keys.create(input.name, input.scopes, caller.id).await?;
                Ok(json(StatusCode::CREATED, &KeyView::created(&key, &secret)))
            }
            ListKeys => {
                let keys = app.keys.list();
                let items: Vec<KeyView> = keys.iter().map(KeyView::listed).collect();
                Ok(json(StatusCode::OK, &serde_json::json!({ "items": items })))
            }
            RevokeKey(id) => {
                let id = Uuid::parse_str(&id)
                    .map_err(|_| crate::error::Error::KeyNotFound { id: id.to_string() })?;
                app.keys.revoke(id, caller.id).await?;
                let mut reply = Response::new(Vec::new().into());
                *reply.status_mut() = StatusCode::NO_CONTENT;
                Ok(reply)
            }
            Confirm(id) => {
                let id = reservation_id(&id)?;
                let order_id = input::confirm(body()?.as_ref())?;
                reservation(&svc.confirm(id, order_id, by).await?)
            }
            Cancel(id) => {
                let id = reservation_id(&id)?;
                // A body is not expected; if one is sent it must at least be an empty object.
                if let Some(value) = body()? {
                    if value.as_object().is_none_or(|o| !o.is_empty()) {
                        return Err(Problem::invalid("body", "cancel takes no body"));
                    }
                }
                reservation(&svc.cancel(id, by).await?)
            }
            Extend(id) => {
                let id = reservation_id(&id)?;
                let ttl = input::extend(&input::required(body()?)?)?;
                reservation(&svc.extend(id, ttl, by).await?)
            }
        }
    }
    .await;
    match answered {
        // A cluster leader's epoch that ended while the request was in its actors: they
        // stopped before answering. Nothing was acknowledged; another node may serve it.
        Err(problem) if problem.status == 500 && app.cluster.is_some() && !svc.log_healthy() => {
            Err(Problem::new(
                503,
                "unavailable",
                "this node stopped leading while the request was being served; retry \
                 (a reservation with the same Idempotency-Key)",
            )
            .header(header::RETRY_AFTER, "1"))
        }
        // A cluster leader's answer that no commit vouches for (a read, or a change refused
        // from its state without a record) is sent only if its lease still holds now,
        // after the state was read: the lease checked before may have run out while the
        // request waited in the actors, and another leader been elected meanwhile.
        answered
            if app.cluster.as_ref().is_some_and(|cluster| {
                application
                    && (application_read || answered.as_ref().is_err_and(|p| p.status != 503))
                    && !cluster.lease_holds()
            }) =>
        {
            Err(lease_lapsed())
        }
        answered => answered,
    }
}

/// The cluster node whose membership the admin API changes: a single node has none (409).
fn membership_of(app: &App) -> Result<&crate::cluster::node::ClusterNode> {
    app.cluster.as_deref().ok_or_else(|| {
        Problem::new(
            409,
            "membership_conflict",
            "this server runs alone (started without --peers): it has no cluster membership \
             to change",
        )
    })
}

/// A membership change refused or unconfirmed, as problem+json: 422 naming the field,
/// 409 `membership_conflict`, or 503 to retry.
fn membership_problem(err: crate::cluster::membership::MembershipError) -> Problem {
    use crate::cluster::membership::MembershipError;
    let detail = err.to_string();
    match err {
        MembershipError::Invalid { field, .. } => Problem::invalid(field, detail),
        MembershipError::Conflict(_) => Problem::new(409, "membership_conflict", detail),
        MembershipError::Unavailable(_) => {
            Problem::new(503, "unavailable", detail).header(header::RETRY_AFTER, "1")
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
    by: Option<KeyId>,
) -> Result<Reply> {
    let sku = known_sku(sku)?;
    let if_match = input::if_match(&req.headers)?;
    let change = parse(&input::required(input::json_body(
        &req.headers,
        &req.body,
    )?)?)?;
    let p = svc.change_product(&sku, change, if_match, by).await?;
    Ok(product(StatusCode::OK, &p))
}

/// A follower's answer to an application request: 307 to the same path and query on its
/// leader's public address (the client repeats the method and body there), naming the
/// leader in `Stockd-Leader`.
fn to_leader(leader: crate::cluster::NodeId, api: &str, req: &Request) -> Reply {
    let location = match req.query.is_empty() {
        true => format!("http://{api}{}", req.path),
        false => format!("http://{api}{}?{}", req.path, req.query),
    };
    let mut reply = Response::new(Vec::new().into());
    *reply.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    set(&mut reply, header::LOCATION, &location);
    set(&mut reply, "stockd-leader", &leader.to_string());
    reply
}

/// `/health`: 200 with the role (and a follower's leader); 503 `unavailable` with
/// `role: "leaderless"` when no leader is known. `?role=leader` is 200 only on a node that
/// serves (a ready leader, or a single server), for load balancers' pools.
fn health(role: Role, query: &str) -> Result<Reply> {
    let mut wanted = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (
            input::decode_unreserved(name),
            input::decode_unreserved(value),
        );
        if name == "role" {
            match value.as_ref() {
                "leader" => wanted = Some(()),
                other => {
                    return Err(Problem::bad_request(format!(
                        "role={other} is not a role /health can check; only role=leader"
                    )))
                }
            }
        }
    }
    let unavailable = |detail: String| {
        Problem::new(503, "unavailable", detail)
            .with("role", role.as_str())
            .header(header::RETRY_AFTER, "1")
    };
    if wanted.is_some() && !role.serves() {
        return Err(unavailable(format!(
            "this node is a {} that does not serve requests now",
            role.as_str()
        )));
    }
    match role {
        Role::Leaderless => Err(unavailable(
            "this cluster node knows no leader (an election is running, or there is no \
             quorum)"
                .to_string(),
        )),
        Role::Follower { leader } => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "role": role.as_str(), "leader": leader}),
        )),
        _ => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "role": role.as_str()}),
        )),
    }
}

async fn metrics(app: &App) -> Result<Reply> {
    let svc = app.service.load();
    let text = crate::http::metrics::render(&crate::http::metrics::Figures {
        responses: &app.responses,
        in_flight: app.requests_in_flight(),
        supervisor: svc.stats().await?,
        log: svc.log_stats(),
        newest_snapshot_seq: svc.newest_snapshot_seq(),
        start_time_unix: app.started_unix,
        stderr_lines_lost: crate::logging::lines_lost(),
        rate_limited: app.customer_rate.as_ref().map_or(0, |l| l.refused()),
        feed: svc.feed().map(crate::feed::Feed::stats),
        webhooks: crate::http::webhooks::enabled(app, &svc)
            .ok()
            .map(|hooks| hooks.stats()),
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

#[cfg(test)]
mod tests {
    //! The OpenAPI document (`src/http/openapi.json`) against the router, both ways.

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// Where each endpoint lives, as the document spells it: an exhaustive match, so that
    /// a new endpoint does not compile until it is placed (and then the tests below want
    /// it in `ROUTES` and in the document).
    fn template(endpoint: &Endpoint) -> &'static str {
        use Endpoint::*;
        match endpoint {
            Index => "/",
            Dashboard(asset) => asset.path,
            Health => "/health",
            Metrics => "/metrics",
            OpenApi => "/openapi.json",
            CreateProduct | ListProducts => "/v1/products",
            GetProduct(_) | PatchProduct(_) | DeleteProduct(_) => "/v1/products/{sku}",
            Replenish(_) => "/v1/products/{sku}/replenish",
            Adjust(_) => "/v1/products/{sku}/adjust",
            Reserve => "/v1/reservations",
            GetReservation(_) => "/v1/reservations/{id}",
            Confirm(_) => "/v1/reservations/{id}/confirm",
            Cancel(_) => "/v1/reservations/{id}/cancel",
            Extend(_) => "/v1/reservations/{id}/extend",
            Snapshot => "/v1/admin/snapshot",
            CreateKey | ListKeys => "/v1/admin/keys",
            RevokeKey(_) => "/v1/admin/keys/{id}",
            Events => "/v1/events",
            Cluster => "/v1/cluster",
            ClusterDigest => "/v1/admin/cluster/digest",
            AddLearner => "/v1/admin/cluster/learners",
            RemoveLearner(_) => "/v1/admin/cluster/learners/{id}",
            ChangeVoters => "/v1/admin/cluster/voters",
            CreateWebhook | ListWebhooks => "/v1/webhooks",
            GetWebhook(_) | DeleteWebhook(_) => "/v1/webhooks/{id}",
            EnableWebhook(_) => "/v1/webhooks/{id}/enable",
        }
    }

    fn body(reply: Reply) -> (u16, Value) {
        use std::task::{Context, Poll};
        use warp::hyper::body::Body as _;
        let status = reply.status().as_u16();
        let mut body = reply.into_body();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut bytes = Vec::new();
        // The body is in memory: every frame is ready at once.
        while let Poll::Ready(Some(frame)) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
            if let Ok(data) = frame.expect("a frame").into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `/health` by role: a follower names its leader, a node without one is 503 with its
    /// role, and `?role=leader` is 200 only where requests are served.
    #[test]
    fn health_answers_by_role() {
        use serde_json::json;
        let answer = |role, query| match health(role, query) {
            Ok(reply) => body(reply),
            Err(problem) => body(problem.into_response()),
        };
        let (status, v) = answer(Role::Follower { leader: 3 }, "");
        assert_eq!(
            (status, &v["role"], &v["leader"]),
            (200, &json!("follower"), &json!(3))
        );
        let (status, v) = answer(Role::Leader { ready: false }, "");
        assert_eq!((status, &v["role"]), (200, &json!("leader")));
        assert!(v.get("leader").is_none());
        let (status, v) = answer(Role::Leaderless, "");
        assert_eq!(
            (status, &v["role"], &v["code"]),
            (503, &json!("leaderless"), &json!("unavailable"))
        );
        for (role, wanted) in [
            (Role::Single, 200),
            (Role::Leader { ready: true }, 200),
            (Role::Leader { ready: false }, 503),
            (Role::Follower { leader: 1 }, 503),
            (Role::Leaderless, 503),
        ] {
            let (status, v) = answer(role, "role=leader");
            assert_eq!(status, wanted, "{role:?}: {v}");
            if status == 503 {
                assert_eq!(v["role"], role.as_str());
            }
        }
        assert_eq!(answer(Role::Single, "role=boss").0, 400);
        assert_eq!(answer(Role::Single, "other=1").0, 200);
    }

    /// A follower's 307 keeps the path and the query, and names the leader.
    #[test]
    fn a_follower_redirects_to_the_same_path_and_query() {
        let request = |path: &str, query: &str| Request {
            method: Method::POST,
            path: path.into(),
            query: query.into(),
            headers: Default::default(),
            body: Default::default(),
        };
        let reply = to_leader(
            2,
            "10.0.0.2:8080",
            &request("/v1/products", "limit=5&after=A"),
        );
        assert_eq!(reply.status(), 307);
        assert_eq!(
            reply.headers()["location"],
            "http://10.0.0.2:8080/v1/products?limit=5&after=A"
        );
        assert_eq!(reply.headers()["stockd-leader"], "2");
        let reply = to_leader(2, "n2:80", &request("/v1/reservations/x/confirm", ""));
        assert_eq!(
            reply.headers()["location"],
            "http://n2:80/v1/reservations/x/confirm"
        );
    }

    /// Every node answers `/health`, `/metrics`, the document, `GET /v1/cluster` and the
    /// dashboard's static files; only a
    /// single node or a ready leader answers the rest, and the others refuse it with 503
    /// and `Retry-After` (never a 404 or 405: the route exists).
    #[test]
    fn only_a_serving_role_answers_application_requests() {
        let everywhere = [
            "/health",
            "/metrics",
            "/openapi.json",
            "/v1/cluster",
            "/v1/admin/cluster/digest",
            "/",
            "/dashboard",
            "/dashboard/app.js",
            "/dashboard/app.css",
        ];
        let roles = [
            Role::Single,
            Role::Leader { ready: true },
            Role::Leader { ready: false },
            Role::Follower { leader: 2 },
            Role::Leaderless,
        ];
        let mut refused = 0;
        for (path, allow) in ROUTES {
            for method in allow.split(", ") {
                let m = Method::from_bytes(method.as_bytes()).unwrap();
                let Route::Found(endpoint) = route(&m, &concrete(path)) else {
                    panic!("{method} {path}: not routed");
                };
                for role in roles {
                    let answer = refused_in(role, &endpoint);
                    if role.serves() || everywhere.contains(path) {
                        assert!(answer.is_none(), "{role:?} {method} {path}");
                    } else {
                        let problem = answer.expect("refused");
                        let reply = problem.into_response();
                        assert_eq!(reply.status(), 503, "{role:?} {method} {path}");
                        assert_eq!(reply.headers()[header::RETRY_AFTER], "1");
                        refused += 1;
                    }
                }
            }
        }
        assert!(refused > 50, "{refused}");
    }

    /// The membership requests' bodies: each fault a 422 naming its field, and the
    /// cluster's refusals as 422, 409 `membership_conflict` or 503 with `Retry-After`.
    #[test]
    fn membership_requests_are_refused_naming_the_field() {
        use crate::cluster::membership::{check_learner, check_voters, MembershipError};
        use crate::cluster::Member;
        use serde_json::json;
        let refused = |problem: Problem| body(problem.into_response());
        let learner = |v: Value| input::new_learner(&v).map_err(refused);
        assert_eq!(
            learner(json!({"id": 4, "api": "10.0.0.4:80", "raft": "10.0.0.4:90"})).unwrap(),
            input::NewLearner {
                id: 4,
                api: "10.0.0.4:80".into(),
                raft: "10.0.0.4:90".into()
            }
        );
        for (value, field) in [
            (json!([]), "body"),
            (json!({"api": "a:1", "raft": "b:2"}), "id"),
            (json!({"id": 0, "api": "a:1", "raft": "b:2"}), "id"),
            (json!({"id": -1, "api": "a:1", "raft": "b:2"}), "id"),
            (json!({"id": "4", "api": "a:1", "raft": "b:2"}), "id"),
            (json!({"id": 4.5, "api": "a:1", "raft": "b:2"}), "id"),
            (json!({"id": 4, "raft": "b:2"}), "api"),
            (json!({"id": 4, "api": 80, "raft": "b:2"}), "api"),
            (json!({"id": 4, "api": "a", "raft": "b:2"}), "api"),
            (json!({"id": 4, "api": "a:0", "raft": "b:2"}), "api"),
            (json!({"id": 4, "api": "a:1", "raft": "b:99999"}), "raft"),
            (
                json!({"id": 4, "api": "a:1", "raft": format!("{}:1", "b".repeat(300))}),
                "raft",
            ),
            (
                json!({"id": 4, "api": "a:1", "raft": "b:2", "voter": true}),
                "voter",
            ),
        ] {
            let (status, v) = learner(value.clone()).unwrap_err();
            assert_eq!(
                (status, &v["code"], &v["field"]),
                (422, &json!("validation_failed"), &json!(field)),
                "{value}: {v}"
            );
            assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
        assert_eq!(input::node_id("4").unwrap(), 4);
        for bad in [
            "0",
            "-1",
            "+4",
            " 4",
            "x",
            "4.0",
            "18446744073709551616",
            ID,
        ] {
            let (status, v) = refused(input::node_id(bad).unwrap_err());
            assert_eq!((status, &v["field"]), (422, &json!("id")), "{bad}: {v}");
        }
        let voters = |v: Value| input::voters(&v).map_err(refused);
        assert_eq!(voters(json!({"voters": [3, 1, 2]})).unwrap(), vec![3, 1, 2]);
        for (value, field) in [
            (json!({}), "voters"),
            (json!({"voters": []}), "voters"),
            (json!({"voters": 1}), "voters"),
            (json!({"voters": [1, "2"]}), "voters[1]"),
            (json!({"voters": [0]}), "voters[0]"),
            (json!({"voters": [1, 2, 1]}), "voters[2]"),
            (json!({"voters": (1..=101).collect::<Vec<u64>>()}), "voters"),
            (json!({"voters": [1], "learners": [2]}), "learners"),
        ] {
            let (status, v) = voters(value.clone()).unwrap_err();
            assert_eq!(
                (status, &v["code"], &v["field"]),
                (422, &json!("validation_failed"), &json!(field)),
                "{value}: {v}"
            );
        }

        // Against a membership of three voters and a learner.
        let members: Vec<Member> = (1..=4)
            .map(|id| Member {
                id,
                api: format!("n{id}:80"),
                raft: Some(format!("n{id}:90")),
                voter: id <= 3,
            })
            .collect();
        let answer = |err: MembershipError| body(membership_problem(err).into_response());
        let (status, v) = answer(check_voters(&members, &[1, 2, 5]).unwrap_err());
        assert_eq!((status, &v["field"]), (422, &json!("voters")), "{v}");
        assert!(v["detail"].as_str().unwrap().contains("node 5"), "{v}");
        let (status, v) = answer(check_learner(&members, 5, "n1:80", "n5:90").unwrap_err());
        assert_eq!((status, &v["field"]), (422, &json!("api")), "{v}");
        let (status, v) = answer(check_learner(&members, 2, "n2:80", "n2:90").unwrap_err());
        assert_eq!(
            (status, &v["code"], &v["type"], &v["title"]),
            (
                409,
                &json!("membership_conflict"),
                &json!("/problems/membership_conflict"),
                &json!("Membership change refused")
            ),
            "{v}"
        );
        assert!(
            v["detail"].as_str().unwrap().contains("already a voter"),
            "{v}"
        );
        let reply =
            membership_problem(MembershipError::Unavailable("later".into())).into_response();
        assert_eq!(reply.headers()[header::RETRY_AFTER], "1");
        let (status, v) = body(reply);
        assert_eq!(
            (status, &v["code"], &v["detail"]),
            (503, &json!("unavailable"), &json!("later"))
        );
    }

    const SKU: &str = "LAPTOP-001";
    const ID: &str = "0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70";

    fn document() -> Value {
        serde_json::from_str(OPENAPI).expect("src/http/openapi.json is JSON")
    }

    /// A concrete path for a template, with example path parameters.
    fn concrete(template: &str) -> String {
        template.replace("{sku}", SKU).replace("{id}", ID)
    }

    const METHODS: [&str; 8] = [
        "get", "head", "post", "put", "patch", "delete", "options", "trace",
    ];

    /// The document's operations: path template → methods, upper case.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .map(|(path, item)| {
                let item = item.as_object().expect("a path item");
                let methods = METHODS
                    .iter()
                    .filter(|m| item.contains_key(**m))
                    .map(|m| m.to_ascii_uppercase())
                    .collect();
                (path.clone(), methods)
            })
            .collect()
    }

    fn routed() -> BTreeMap<String, BTreeSet<String>> {
        ROUTES
            .iter()
            .map(|(path, allow)| {
                let methods = allow.split(", ").map(str::to_string).collect();
                (path.to_string(), methods)
            })
            .collect()
    }

    #[test]
    fn every_documented_operation_is_routed_to_its_endpoint() {
        let documented = documented();
        assert!(documented.len() >= ROUTES.len());
        for (path, methods) in &documented {
            assert!(!methods.is_empty(), "{path} has no operation");
            for method in methods {
                let m = Method::from_bytes(method.as_bytes()).unwrap();
                match route(&m, &concrete(path)) {
                    Route::Found(endpoint) => assert_eq!(
                        template(&endpoint),
                        path,
                        "{method} {path} is routed elsewhere"
                    ),
                    _ => panic!("{method} {path} is documented but not routed"),
                }
            }
        }
    }

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        assert_eq!(
            documented(),
            routed(),
            "the document's paths and methods differ from the router's ROUTES"
        );
    }

    #[test]
    fn routes_answer_their_methods_and_405_the_others_with_allow() {
        for (path, allow) in ROUTES {
            let allowed: Vec<&str> = allow.split(", ").collect();
            for method in METHODS {
                let upper = method.to_ascii_uppercase();
                let m = Method::from_bytes(upper.as_bytes()).unwrap();
                match route(&m, &concrete(path)) {
                    Route::Found(endpoint) => {
                        assert!(allowed.contains(&upper.as_str()), "{upper} {path}");
                        assert_eq!(template(&endpoint), *path, "{upper} {path}");
                    }
                    Route::MethodNotAllowed(a) => {
                        assert!(!allowed.contains(&upper.as_str()), "{upper} {path}");
                        assert_eq!(a, *allow, "{upper} {path}");
                    }
                    Route::NotFound => panic!("{upper} {path}: no route"),
                }
            }
        }
    }

    /// The scope of every route and method, by the rule docs/API.md states: `/health`,
    /// `/` and the dashboard's files none; `/v1/admin/...` and `/v1/webhooks...` admin;
    /// any other GET or HEAD read; changes to reservations reserve; changes to products
    /// stock.
    #[test]
    fn every_route_needs_the_scope_of_its_kind() {
        let mut checked = 0;
        for (path, allow) in ROUTES {
            for method in allow.split(", ") {
                let m = Method::from_bytes(method.as_bytes()).unwrap();
                let Route::Found(endpoint) = route(&m, &concrete(path)) else {
                    panic!("{method} {path}: not routed");
                };
                let read = method == "GET" || method == "HEAD";
                let expected =
                    if *path == "/health" || *path == "/" || path.starts_with("/dashboard") {
                        None
                    } else if path.starts_with("/v1/admin/") || path.starts_with("/v1/webhooks") {
                        Some(Scope::Admin)
                    } else if read {
                        Some(Scope::Read)
                    } else if path.starts_with("/v1/reservations") {
                        Some(Scope::Reserve)
                    } else if path.starts_with("/v1/products") {
                        Some(Scope::Stock)
                    } else {
                        panic!("{method} {path}: no rule gives it a scope")
                    };
                assert_eq!(scope(&endpoint), expected, "{method} {path}");
                checked += 1;
            }
        }
        assert_eq!(checked, 50);
    }

    /// Each documented operation's `security` names the scope the router asks for (as
    /// the bearer scheme's role), and `/health` none.
    #[test]
    fn the_document_names_each_operations_scope() {
        let doc = document();
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
            "the bearer scheme is declared"
        );
        for (path, methods) in documented() {
            for method in methods {
                let m = Method::from_bytes(method.as_bytes()).unwrap();
                let Route::Found(endpoint) = route(&m, &concrete(&path)) else {
                    panic!("{method} {path}: not routed");
                };
                let op = &doc["paths"][&path][method.to_ascii_lowercase()];
                let expected = match scope(&endpoint) {
                    None => serde_json::json!([]),
                    Some(scope) => {
                        serde_json::json!([{ "bearer": [scope.as_str()] }])
                    }
                };
                assert_eq!(op["security"], expected, "{method} {path}");
                let answers = op["responses"].as_object().unwrap();
                if scope(&endpoint).is_some() {
                    assert!(
                        answers.contains_key("401") && answers.contains_key("403"),
                        "{method} {path} lists 401 and 403"
                    );
                }
            }
        }
    }

    /// Every `(status, code)` the source can answer: `Problem::new(STATUS, "code"`, and
    /// the helpers `bad_request` and `invalid`.
    fn produced_codes() -> BTreeSet<(u64, String)> {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        let mut sources = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut sources,
        );
        let mut codes = BTreeSet::new();
        for source in &sources {
            let squeezed: String = source.split_whitespace().collect::<Vec<_>>().join("");
            for call in squeezed.split("Problem::new(").skip(1) {
                let Some((status, rest)) = call.split_once(',') else {
                    continue;
                };
                let Ok(status) = status.parse::<u64>() else {
                    continue; // the definition, `Problem::new(status: u16, ...`
                };
                let code = rest
                    .strip_prefix('"')
                    .and_then(|r| r.split_once('"'))
                    .map(|(code, _)| code.to_string())
                    .unwrap_or_else(|| panic!("Problem::new({status}, {rest:.40}"));
                codes.insert((status, code));
            }
        }
        codes.insert((400, "bad_request".into()));
        codes.insert((422, "validation_failed".into()));
        assert!(codes.len() >= 17, "{codes:?}");
        codes
    }

    /// A code without a title of its own would be answered "Internal server error".
    #[test]
    fn every_problem_code_has_a_title_of_its_own() {
        for (status, code) in produced_codes() {
            let title =
                Problem::new(status as u16, Box::leak(code.clone().into_boxed_str()), "").title();
            assert!(
                code == "internal_error" || title != "Internal server error",
                "{code} has no title"
            );
        }
    }

    #[test]
    fn every_problem_code_is_documented_with_its_status() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let documented: BTreeSet<(u64, String)> = schemas
            .values()
            .filter_map(|s| {
                let p = &s["properties"];
                Some((
                    p["status"]["const"].as_u64()?,
                    p["code"]["const"].as_str()?.to_string(),
                ))
            })
            .collect();
        let produced = produced_codes();
        let missing: Vec<_> = produced.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "codes the code answers but the document lacks: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&produced).collect();
        assert!(
            extra.is_empty(),
            "codes documented that the code never answers: {extra:?}"
        );
        // The `code` enum of the base Problem lists the same codes.
        let listed: BTreeSet<String> = schemas["Problem"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let codes: BTreeSet<String> = produced.into_iter().map(|(_, c)| c).collect();
        assert_eq!(listed, codes);
    }

    /// Every `$ref` resolves, and every component is used or is one of the answers no
    /// operation lists (unknown path, unknown method).
    #[test]
    fn every_reference_resolves() {
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        out.push(r.clone());
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in &found {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{r} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{r} resolves to nothing");
        }
    }

    /// The examples in the document parse as what they illustrate: each schema's
    /// `examples` validate against that schema (checked here for the objects whose shape
    /// the views and inputs fix: required members present, no member unknown).
    #[test]
    fn examples_have_the_members_of_their_schema() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut checked = 0;
        for (name, schema) in schemas {
            let Some(examples) = schema["examples"].as_array() else {
                continue;
            };
            let Some(props) = schema["properties"].as_object() else {
                continue;
            };
            for example in examples {
                let Some(example) = example.as_object() else {
                    continue;
                };
                for key in example.keys() {
                    assert!(props.contains_key(key), "{name}: example member {key}");
                }
                for key in schema["required"].as_array().into_iter().flatten() {
                    let key = key.as_str().unwrap();
                    assert!(example.contains_key(key), "{name}: example lacks {key}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 10, "{checked}");
    }
}
