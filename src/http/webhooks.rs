//! The webhook endpoints' HTTP side (`/v1/webhooks...`): the feature's availability, ids
//! from the path, and the problems of `crate::webhooks`. Bodies are validated in
//! `input::create_webhook`; the routes are in `router`.

use uuid::Uuid;

use crate::http::problem::Problem;
use crate::http::App;
use crate::service::Service;
use crate::webhooks::{WebhookError, Webhooks, ENDPOINTS_MAX};

/// The server's webhooks (a single server's, or the serving epoch's of a cluster leader),
/// or 404 `events_disabled`: they deliver the change feed's events.
pub fn enabled(app: &App, svc: &Service) -> Result<Webhooks, Problem> {
    app.webhooks
        .clone()
        .or_else(|| svc.webhooks.clone())
        .ok_or_else(|| {
            Problem::new(
                404,
                "events_disabled",
                "the change feed is off on this server (--events off), and webhooks deliver its \
             events: start the server with --events on",
            )
        })
}

/// An endpoint id from the path: a string that is no UUID names no endpoint.
pub fn id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| not_found(raw))
}

fn not_found(id: &str) -> Problem {
    Problem::new(
        404,
        "webhook_not_found",
        format!("no webhook endpoint has the id {id}"),
    )
    .with("id", id)
}

/// The problem answering an error of a webhook operation on endpoint `id` (`""`: none).
pub fn problem(id: &str) -> impl Fn(WebhookError) -> Problem + '_ {
    move |err| match err {
        WebhookError::NotFound => not_found(id),
        WebhookError::TooMany => Problem::new(
            409,
            "too_many_webhooks",
            format!("a server takes at most {ENDPOINTS_MAX} webhook endpoints; delete one first"),
        )
        .with("limit", ENDPOINTS_MAX),
        WebhookError::Unavailable(detail) => {
            Problem::new(503, "unavailable", detail).header(warp::http::header::RETRY_AFTER, "1")
        }
    }
}
