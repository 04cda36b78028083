//! RFC 9457 problem details: every error answer is built here, and `From<Error>` is the one
//! place where a service error becomes an HTTP status and a stable `code`.

use serde_json::{Map, Value};
use warp::http::{header, HeaderValue, Response, StatusCode};

use crate::clock::rfc3339;
use crate::error::Error;

/// A problem+json answer.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
    /// Extension members (`sku`, `field`, `available`, ...).
    pub extra: Map<String, Value>,
    /// Extra headers (`Allow` on 405, `Retry-After` on 503).
    pub headers: Vec<(header::HeaderName, String)>,
}

impl Problem {
    pub fn new(status: u16, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
            extra: Map::new(),
            headers: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Problem {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn header(mut self, name: header::HeaderName, value: impl Into<String>) -> Problem {
        self.headers.push((name, value.into()));
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(400, "bad_request", detail)
    }

    /// 422 naming the offending field.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Problem {
        let field = field.into();
        Problem::new(422, "validation_failed", detail).with("field", field)
    }

    pub(crate) fn title(&self) -> &'static str {
        match self.code {
            "bad_request" => "Malformed request",
            "validation_failed" => "The request is not valid",
            "payload_too_large" => "Request body too large",
            "product_not_found" => "Product not found",
            "reservation_not_found" => "Reservation not found",
            "sku_exists" => "SKU already exists",
            "insufficient_stock" => "Insufficient stock",
            "product_has_reservations" => "Product has pending reservations",
            "reservation_expired" => "Reservation expired",
            "reservation_cancelled" => "Reservation cancelled",
            "reservation_confirmed" => "Reservation confirmed",
            "idempotency_key_reused" => "Idempotency key reused with a different request",
            "idempotency_key_in_flight" => "Idempotency key in flight",
            "version_mismatch" => "Version mismatch",
            "not_found" => "Not found",
            "method_not_allowed" => "Method not allowed",
            "unavailable" => "Service unavailable",
            "rate_limited" => "Too many requests",
            "unauthorized" => "Unauthorized",
            "forbidden" => "Forbidden",
            "key_not_found" => "API key not found",
            "customer_limit_exceeded" => "Purchase limit reached",
            "sale_not_started" => "Sale not started",
            "sale_ended" => "Sale ended",
            "events_gone" => "Events no longer kept",
            "events_disabled" => "Change feed off",
            "webhook_not_found" => "Webhook not found",
            "too_many_webhooks" => "Too many webhooks",
            "membership_conflict" => "Membership change refused",
            // "internal_error", and any code without a title of its own (a test holds
            // every code the server answers to a title of its own).
            _ => "Internal server error",
        }
    }

    pub fn into_response(self) -> warp::reply::Response {
        let mut body = Map::new();
        body.insert("type".into(), format!("/problems/{}", self.code).into());
        body.insert("title".into(), self.title().into());
        body.insert("status".into(), self.status.into());
        body.insert("detail".into(), self.detail.into());
        body.insert("code".into(), self.code.into());
        for (k, v) in self.extra {
            body.insert(k, v);
        }
        let bytes = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
        let mut response = Response::new(bytes.into());
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        response
    }
}

impl From<Error> for Problem {
    fn from(err: Error) -> Problem {
        let detail = err.to_string();
        match err {
            Error::ProductNotFound { sku } => {
                Problem::new(404, "product_not_found", detail).with("sku", sku)
            }
            Error::ReservationNotFound { id } => {
                Problem::new(404, "reservation_not_found", detail).with("id", id)
            }
            Error::SkuExists { sku } => Problem::new(409, "sku_exists", detail).with("sku", sku),
            Error::InsufficientStock {
                sku,
                requested,
                available,
            } => Problem::new(409, "insufficient_stock", detail)
                .with("sku", sku)
                .with("requested", requested)
                .with("available", available),
            Error::StockOverflow { field, .. } => Problem::invalid(field, detail),
            Error::ProductHasReservations { sku } => {
                Problem::new(409, "product_has_reservations", detail).with("sku", sku)
            }
            Error::ReservationExpired { id } => {
                Problem::new(409, "reservation_expired", detail).with("id", id.to_string())
            }
            Error::ReservationCancelled { id } => {
                Problem::new(409, "reservation_cancelled", detail).with("id", id.to_string())
            }
            Error::ReservationConfirmed { id } => {
                Problem::new(409, "reservation_confirmed", detail).with("id", id.to_string())
            }
            Error::IdempotencyKeyReused => Problem::new(422, "idempotency_key_reused", detail),
            Error::IdempotencyKeyInFlight => Problem::new(409, "idempotency_key_in_flight", detail)
                .header(header::RETRY_AFTER, "1"),
            Error::VersionMismatch { sku, current, .. } => {
                Problem::new(412, "version_mismatch", detail)
                    .with("sku", sku)
                    .with("current_version", current)
            }
            Error::KeyNotFound { id } => Problem::new(404, "key_not_found", detail).with("id", id),
            Error::CustomerLimitExceeded {
                sku,
                limit,
                held,
                requested,
            } => Problem::new(409, "customer_limit_exceeded", detail)
                .with("sku", sku)
                .with("limit", limit)
                .with("held", held)
                .with("requested", requested),
            Error::SaleNotStarted {
                sku,
                starts_at,
                wait_ms,
            } => {
                // Whole seconds, rounded up: a client that waits that long finds it open.
                let seconds = (wait_ms.max(1) as u64).div_ceil(1000);
                Problem::new(409, "sale_not_started", detail)
                    .with("sku", sku)
                    .with("starts_at", rfc3339(starts_at))
                    .header(header::RETRY_AFTER, seconds.to_string())
            }
            Error::SaleEnded { sku, ended_at } => Problem::new(409, "sale_ended", detail)
                .with("sku", sku)
                .with("ended_at", rfc3339(ended_at)),
            Error::InvalidRules { field, .. } => Problem::invalid(field, detail),
            Error::Unavailable(_) => {
                Problem::new(503, "unavailable", detail).header(header::RETRY_AFTER, "1")
            }
            Error::Internal(_) => Problem::new(500, "internal_error", detail),
        }
    }
}
