//! Request validation: JSON syntax errors are 400 `bad_request`; valid JSON of the wrong
//! shape (missing or unknown field, wrong type, out of range) is 422 `validation_failed`
//! naming the field, e.g. `items[2].quantity`. Parsing goes through `serde_json::Value`
//! so that every message can name its field precisely; typos never pass silently. The
//! one exception is the hottest request, a reservation: a typed parse takes the bodies
//! that are entirely valid, and everything else goes the `Value` way (`reserve_body`).

use std::borrow::Cow;

use serde_json::{Map, Value};
use warp::http::HeaderMap;

use crate::actors::product::{Change, IfMatch};
use crate::clock::Millis;
use crate::domain::{Line, Price, RulesError, RulesPatch, SaleRules};
use crate::http::problem::Problem;
use crate::keyring::Scope;
use crate::limits::*;
use crate::service::{NewProduct, ReserveRequest};

type Result<T> = std::result::Result<T, Problem>;

/// Parses the body as JSON. An empty body is `None` (the caller decides if that is allowed).
pub fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Option<Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    json_content_type(headers)?;
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))
}

/// A body, when there is one, must be declared as JSON (or sent without a Content-Type).
fn json_content_type(headers: &HeaderMap) -> Result<()> {
    if let Some(ct) = headers.get(warp::http::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(Problem::bad_request(format!(
                "Content-Type must be application/json, not {essence:?}"
            )));
        }
    }
    Ok(())
}

pub fn required(body: Option<Value>) -> Result<Value> {
    body.ok_or_else(|| Problem::bad_request("this request needs a JSON body"))
}

/// A JSON object being validated, with the path of its fields for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, path: &str, allowed: &[&str]) -> Result<Obj<'a>> {
        let map = value.as_object().ok_or_else(|| {
            let field = if path.is_empty() { "body" } else { path };
            Problem::invalid(field, format!("{field} must be a JSON object"))
        })?;
        let obj = Obj {
            map,
            path: path.to_string(),
        };
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let field = obj.field(unknown);
            return Err(Problem::invalid(
                field.clone(),
                format!("unknown field {field}; allowed: {}", allowed.join(", ")),
            ));
        }
        Ok(obj)
    }

    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The field's value; JSON `null` counts as absent.
    fn opt(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn req(&self, name: &str) -> Result<&'a Value> {
        self.opt(name).ok_or_else(|| {
            let field = self.field(name);
            Problem::invalid(field.clone(), format!("{field} is required"))
        })
    }
}

fn integer(value: &Value, field: &str, min: i128, max: i128) -> Result<i128> {
    let n = match value {
        Value::Number(n) if n.is_i64() => n.as_i64().map(i128::from),
        Value::Number(n) if n.is_u64() => n.as_u64().map(i128::from),
        _ => None,
    };
    let n = n.ok_or_else(|| Problem::invalid(field, format!("{field} must be an integer")))?;
    if n < min || n > max {
        return Err(Problem::invalid(
            field,
            format!("{field} must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

fn unsigned(value: &Value, field: &str, min: u64, max: u64) -> Result<u64> {
    integer(value, field, min.into(), max.into()).map(|n| n as u64)
}

fn string<'v>(value: &'v Value, field: &str, max_chars: usize) -> Result<&'v str> {
    let s = value
        .as_str()
        .ok_or_else(|| Problem::invalid(field, format!("{field} must be a string")))?;
    match text_fault(s, max_chars) {
        None => Ok(s),
        Some(TextFault::Length) => Err(Problem::invalid(
            field,
            format!("{field} must be 1 to {max_chars} characters"),
        )),
        Some(TextFault::Unprintable) => Err(Problem::invalid(
            field,
            format!(
                "{field} must be printable: no control, invisible formatting, \
                 private-use or noncharacter code points"
            ),
        )),
    }
}

enum TextFault {
    Length,
    Unprintable,
}

/// What is wrong with a free-text field, if anything: its length in characters, or a
/// character that is not printable in it.
fn text_fault(s: &str, max_chars: usize) -> Option<TextFault> {
    let chars = s.chars().count();
    if chars == 0 || chars > max_chars {
        Some(TextFault::Length)
    } else if !s.chars().all(is_printable) {
        Some(TextFault::Unprintable)
    } else {
        None
    }
}

/// Whether `c` may appear in a text field: not a control character (Unicode Cc); not a
/// bidirectional embedding, override or isolate (U+202A–202E, U+2066–2069: an unclosed one
/// makes everything shown after the field read other than it is stored, "Trojan Source",
/// CVE-2021-42574); not a line or paragraph separator; not the byte-order mark, a word
/// joiner or invisible operator (U+2060–2064), a deprecated format character
/// (U+206A–206F), an interlinear annotation mark or the language tag; not private-use; not
/// a noncharacter. Format characters that real text needs stay allowed: the directional
/// marks (LRM, RLM, ALM), the soft hyphen, the zero-width space (Thai, Khmer), the
/// zero-width joiner and non-joiner (scripts and emoji), the Mongolian vowel separator,
/// and the tag characters of subdivision flags.
fn is_printable(c: char) -> bool {
    let invisible = matches!(
        c,
        '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0001}'
    );
    let private_use = matches!(c, '\u{E000}'..='\u{F8FF}' | '\u{F0000}'..);
    let noncharacter = matches!(c, '\u{FDD0}'..='\u{FDEF}') || (c as u32) & 0xFFFE == 0xFFFE;
    !(c.is_control() || invisible || private_use || noncharacter)
}

/// Whether `s` is a well-formed SKU: 1..=64 of `A-Z a-z 0-9 . _ -`, and not `.` or `..`,
/// which URL clients collapse as dot segments (RFC 3986 5.2.4) and so could never reach.
pub fn is_sku(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= SKU_LEN_MAX
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn sku(value: &Value, field: &str) -> Result<String> {
    let s = value
        .as_str()
        .ok_or_else(|| Problem::invalid(field, format!("{field} must be a string")))?;
    if !is_sku(s) {
        return Err(Problem::invalid(
            field,
            format!("{field} must be 1 to {SKU_LEN_MAX} characters of A-Z a-z 0-9 . _ -"),
        ));
    }
    Ok(s.to_string())
}

fn price(value: &Value, field: &str) -> Result<Price> {
    let obj = Obj::new(value, field, &["amount_minor", "currency"])?;
    let amount_minor = unsigned(
        obj.req("amount_minor")?,
        &obj.field("amount_minor"),
        0,
        STOCK_MAX,
    )?;
    let currency_field = obj.field("currency");
    let currency = obj
        .req("currency")?
        .as_str()
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        .ok_or_else(|| {
            Problem::invalid(
                currency_field.clone(),
                format!("{currency_field} must be a three-letter upper-case ISO 4217 code"),
            )
        })?;
    Ok(Price {
        amount_minor,
        currency: currency.to_string(),
    })
}

/// An instant in RFC 3339 (`2026-12-06T18:00:00Z`, any offset), as milliseconds since the
/// epoch; years 1970 to 9999.
fn instant(value: &Value, field: &str) -> Result<Millis> {
    let bad = || {
        Problem::invalid(
            field,
            format!("{field} must be an RFC 3339 date-time such as 2026-12-06T18:00:00Z"),
        )
    };
    let text = value.as_str().ok_or_else(bad)?;
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| bad())?;
    let ms = at.timestamp_millis();
    if !(0..=INSTANT_MAX_MS).contains(&ms) {
        return Err(Problem::invalid(
            field,
            format!("{field} must be between 1970 and 9999"),
        ));
    }
    Ok(ms)
}

/// 9999-12-31T23:59:59.999Z.
const INSTANT_MAX_MS: Millis = 253_402_300_799_999;

/// A field that may be set, or cleared with `null`: `None` when absent.
fn settable<T>(
    obj: &Obj,
    name: &str,
    parse: impl FnOnce(&Value, &str) -> Result<T>,
) -> Result<Option<Option<T>>> {
    match obj.map.get(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => parse(v, &obj.field(name)).map(|t| Some(Some(t))),
    }
}

fn purchase_limit(value: &Value, field: &str) -> Result<u64> {
    unsigned(value, field, 1, STOCK_MAX)
}

/// A low-stock threshold: 0..=2^53−1 units (`available` at or below it is low).
fn low_stock_threshold(value: &Value, field: &str) -> Result<u64> {
    unsigned(value, field, 0, STOCK_MAX)
}

/// The sale-rule fields of a product body, as a change to the rules.
fn rules_patch(obj: &Obj) -> Result<RulesPatch> {
    Ok(RulesPatch {
        max_per_customer: settable(obj, "max_per_customer", purchase_limit)?,
        starts_at: settable(obj, "sale_starts_at", instant)?,
        ends_at: settable(obj, "sale_ends_at", instant)?,
    })
}

/// The problem for sale rules that do not hold together (`SaleRules::check`).
fn rules_problem(err: &RulesError) -> Problem {
    Problem::invalid(err.field(), err.to_string())
}

pub fn create_product(body: &Value) -> Result<NewProduct> {
    let obj = Obj::new(
        body,
        "",
        &[
            "sku",
            "name",
            "price",
            "on_hand",
            "max_per_customer",
            "sale_starts_at",
            "sale_ends_at",
            "low_stock_threshold",
        ],
    )?;
    let rules = SaleRules::default().patched(rules_patch(&obj)?);
    rules.check().map_err(|err| rules_problem(&err))?;
    let low_stock_threshold = settable(&obj, "low_stock_threshold", low_stock_threshold)?.flatten();
    Ok(NewProduct {
        sku: sku(obj.req("sku")?, "sku")?,
        name: string(obj.req("name")?, "name", NAME_CHARS_MAX)?.to_string(),
        price: obj.opt("price").map(|v| price(v, "price")).transpose()?,
        on_hand: match obj.opt("on_hand") {
            Some(v) => unsigned(v, "on_hand", 0, STOCK_MAX)?,
            None => 0,
        },
        rules,
        low_stock_threshold,
    })
}

/// `PATCH /v1/products/{sku}`: `null` clears the price, a sale rule or the low-stock
/// threshold. Whether the rules hold together once patched is checked against the
/// product, in its actor.
pub fn patch_product(body: &Value) -> Result<Change> {
    let obj = Obj::new(
        body,
        "",
        &[
            "name",
            "price",
            "max_per_customer",
            "sale_starts_at",
            "sale_ends_at",
            "low_stock_threshold",
        ],
    )?;
    let name = obj
        .opt("name")
        .map(|v| string(v, "name", NAME_CHARS_MAX).map(str::to_string))
        .transpose()?;
    let price = settable(&obj, "price", price)?;
    let rules = rules_patch(&obj)?;
    let low_stock_threshold = settable(&obj, "low_stock_threshold", low_stock_threshold)?;
    if name.is_none() && price.is_none() && rules.is_empty() && low_stock_threshold.is_none() {
        return Err(Problem::invalid(
            "body",
            "give name, price, max_per_customer, sale_starts_at, sale_ends_at and/or \
             low_stock_threshold to change",
        ));
    }
    Ok(Change::Patch {
        name,
        price,
        rules,
        low_stock_threshold,
    })
}

pub fn replenish(body: &Value) -> Result<Change> {
    let obj = Obj::new(body, "", &["quantity"])?;
    let quantity = unsigned(obj.req("quantity")?, "quantity", 1, QUANTITY_MAX)?;
    Ok(Change::Replenish { quantity })
}

pub fn adjust(body: &Value) -> Result<Change> {
    let obj = Obj::new(body, "", &["delta", "reason"])?;
    let max = i128::from(QUANTITY_MAX);
    let delta = integer(obj.req("delta")?, "delta", -max, max)? as i64;
    if delta == 0 {
        return Err(Problem::invalid("delta", "delta must not be zero"));
    }
    let reason = obj
        .opt("reason")
        .map(|v| string(v, "reason", REASON_CHARS_MAX).map(str::to_string))
        .transpose()?;
    Ok(Change::Adjust { delta, reason })
}

/// `POST /v1/admin/keys`.
pub struct CreateKey {
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// `POST /v1/admin/keys`: `name` 1..=100 printable characters, `scopes` 1 to 4 distinct
/// scope names.
pub fn create_key(body: &Value) -> Result<CreateKey> {
    let obj = Obj::new(body, "", &["name", "scopes"])?;
    let name = string(obj.req("name")?, "name", KEY_NAME_CHARS_MAX)?.to_string();
    let names = obj
        .req("scopes")?
        .as_array()
        .ok_or_else(|| Problem::invalid("scopes", "scopes must be an array"))?;
    if names.is_empty() {
        return Err(Problem::invalid(
            "scopes",
            "scopes must name at least one scope",
        ));
    }
    let allowed = Scope::ALL.map(Scope::as_str).join(", ");
    let mut scopes = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let field = format!("scopes[{i}]");
        let scope = name.as_str().and_then(Scope::parse).ok_or_else(|| {
            Problem::invalid(field.clone(), format!("{field} must be one of {allowed}"))
        })?;
        if scopes.contains(&scope) {
            return Err(Problem::invalid(
                field.clone(),
                format!("{field}: {} appears more than once", scope.as_str()),
            ));
        }
        scopes.push(scope);
    }
    Ok(CreateKey { name, scopes })
}

/// `POST /v1/webhooks` `{"url", "types"?, "skus"?}`: an absolute `http` or `https` URL
/// with a host (no user name or password in it, no fragment), at most
/// `webhooks::URL_CHARS_MAX` characters; `types` 1 to 14 distinct event types (at most
/// each of `Kind::ALL` once); `skus` 1 to `webhooks::SKUS_MAX` distinct SKUs. Each fault is
/// a 422 naming its field.
pub fn create_webhook(body: &Value) -> Result<crate::webhooks::NewEndpoint> {
    use crate::feed::Kind;
    use crate::webhooks::{NewEndpoint, SKUS_MAX, URL_CHARS_MAX};
    let obj = Obj::new(body, "", &["url", "types", "skus"])?;
    let raw = obj
        .req("url")?
        .as_str()
        .ok_or_else(|| Problem::invalid("url", "url must be a string"))?;
    let bad_url = |why: &str| Problem::invalid("url", format!("url {why}"));
    if raw.chars().count() > URL_CHARS_MAX {
        return Err(bad_url(&format!(
            "must be at most {URL_CHARS_MAX} characters"
        )));
    }
    let url = reqwest::Url::parse(raw)
        .map_err(|e| bad_url(&format!("must be an absolute http or https URL ({e})")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad_url(&format!(
            "must be an http or https URL, not {}:",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad_url("must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad_url(
            "must not carry a user name or password (the signature authenticates deliveries)",
        ));
    }
    if url.fragment().is_some() {
        return Err(bad_url("must not have a fragment (#...)"));
    }
    let list = |name: &str, max: usize| -> Result<Option<&Vec<Value>>> {
        let Some(value) = obj.opt(name) else {
            return Ok(None);
        };
        let items = value
            .as_array()
            .ok_or_else(|| Problem::invalid(name, format!("{name} must be an array")))?;
        if items.is_empty() || items.len() > max {
            return Err(Problem::invalid(
                name,
                format!("{name} must hold 1 to {max} values (leave it out for all)"),
            ));
        }
        Ok(Some(items))
    };
    let types = match list("types", Kind::ALL.len())? {
        None => None,
        Some(items) => {
            let allowed = Kind::ALL.map(Kind::as_str).join(", ");
            let mut kinds = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let field = format!("types[{i}]");
                let kind = item.as_str().and_then(Kind::parse).ok_or_else(|| {
                    Problem::invalid(field.clone(), format!("{field} must be one of {allowed}"))
                })?;
                if kinds.contains(&kind) {
                    return Err(Problem::invalid(
                        field.clone(),
                        format!("{field}: {} appears more than once", kind.as_str()),
                    ));
                }
                kinds.push(kind);
            }
            Some(kinds)
        }
    };
    let skus = match list("skus", SKUS_MAX)? {
        None => None,
        Some(items) => {
            let mut skus: Vec<String> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let field = format!("skus[{i}]");
                let s = sku(item, &field)?;
                if skus.contains(&s) {
                    return Err(Problem::invalid(
                        field.clone(),
                        format!("{field}: {s} appears more than once"),
                    ));
                }
                skus.push(s);
            }
            Some(skus)
        }
    };
    Ok(NewEndpoint {
        url: url.to_string(),
        types,
        skus,
    })
}

/// `POST /v1/reservations`, the hottest request: a typed parse that borrows from the body,
/// with the checks of `reserve`. Anything it does not accept, for whatever reason, goes
/// through `reserve` on a `serde_json::Value`, which finds the exact error and names its
/// field; so both paths accept the same bodies, with the same result (a test holds them
/// to it). Parsing into a `Value` first was ~3.7 % of a reserve's CPU (perf).
pub fn reserve_body(headers: &HeaderMap, body: &[u8]) -> Result<ReserveRequest> {
    match reserve_fast(headers, body) {
        Some(request) => Ok(request),
        None => reserve_exact(headers, body),
    }
}

/// The `Value` path for a reservation body: finds the exact error and names its field.
fn reserve_exact(headers: &HeaderMap, body: &[u8]) -> Result<ReserveRequest> {
    reserve(&required(json_body(headers, body)?)?)
}

/// Only a JSON object deserializes into `T`: serde's derived structs also accept an
/// array of their fields in order (`["c1", [...]]`), which the API does not.
struct ObjectOnly<T>(T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody<'a> {
    #[serde(borrow)]
    customer_id: Cow<'a, str>,
    #[serde(borrow)]
    items: Vec<ObjectOnly<LineBody<'a>>>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody<'a> {
    #[serde(borrow)]
    sku: Cow<'a, str>,
    quantity: u64,
}

fn reserve_fast(headers: &HeaderMap, body: &[u8]) -> Option<ReserveRequest> {
    json_content_type(headers).ok()?;
    let ObjectOnly(parsed): ObjectOnly<ReserveBody> = serde_json::from_slice(body).ok()?;
    let valid = text_fault(&parsed.customer_id, CUSTOMER_ID_CHARS_MAX).is_none()
        && (1..=RESERVATION_LINES_MAX).contains(&parsed.items.len())
        && parsed
            .items
            .iter()
            .enumerate()
            .all(|(i, ObjectOnly(line))| {
                is_sku(&line.sku)
                    && (1..=QUANTITY_MAX).contains(&line.quantity)
                    && parsed.items[..i].iter().all(|l| l.0.sku != line.sku)
            })
        && parsed
            .ttl_seconds
            .is_none_or(|t| (TTL_SECONDS_MIN..=TTL_SECONDS_MAX).contains(&t));
    valid.then(|| ReserveRequest {
        customer_id: parsed.customer_id.into_owned(),
        items: parsed
            .items
            .into_iter()
            .map(|ObjectOnly(line)| Line {
                sku: line.sku.into_owned(),
                quantity: line.quantity,
            })
            .collect(),
        ttl_seconds: parsed.ttl_seconds,
    })
}

pub fn reserve(body: &Value) -> Result<ReserveRequest> {
    let obj = Obj::new(body, "", &["customer_id", "items", "ttl_seconds"])?;
    let customer_id = string(
        obj.req("customer_id")?,
        "customer_id",
        CUSTOMER_ID_CHARS_MAX,
    )?;
    let items = obj
        .req("items")?
        .as_array()
        .ok_or_else(|| Problem::invalid("items", "items must be an array"))?;
    if items.is_empty() || items.len() > RESERVATION_LINES_MAX {
        return Err(Problem::invalid(
            "items",
            format!("items must have 1 to {RESERVATION_LINES_MAX} lines"),
        ));
    }
    let mut lines: Vec<Line> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("items[{i}]");
        let line = Obj::new(item, &path, &["sku", "quantity"])?;
        let sku_field = line.field("sku");
        let sku = sku(line.req("sku")?, &sku_field)?;
        if lines.iter().any(|l| l.sku == sku) {
            return Err(Problem::invalid(
                sku_field,
                format!("{sku} appears in more than one line"),
            ));
        }
        let quantity = unsigned(
            line.req("quantity")?,
            &line.field("quantity"),
            1,
            QUANTITY_MAX,
        )?;
        lines.push(Line { sku, quantity });
    }
    let ttl_seconds = obj.opt("ttl_seconds").map(ttl).transpose()?;
    Ok(ReserveRequest {
        customer_id: customer_id.to_string(),
        items: lines,
        ttl_seconds,
    })
}

fn ttl(value: &Value) -> Result<u64> {
    unsigned(value, "ttl_seconds", TTL_SECONDS_MIN, TTL_SECONDS_MAX)
}

/// `POST /v1/reservations/{id}/confirm`: the body is optional.
pub fn confirm(body: Option<&Value>) -> Result<Option<String>> {
    let Some(body) = body else { return Ok(None) };
    let obj = Obj::new(body, "", &["order_id"])?;
    obj.opt("order_id")
        .map(|v| string(v, "order_id", ORDER_ID_CHARS_MAX).map(str::to_string))
        .transpose()
}

/// `POST /v1/admin/cluster/learners` `{"id", "api", "raft"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLearner {
    pub id: u64,
    pub api: String,
    pub raft: String,
}

/// The longest address a membership change takes, in bytes.
pub const NODE_ADDRESS_MAX: usize = 255;

/// `POST /v1/admin/cluster/learners`: `id` a whole number from 1, `api` and `raft`
/// `HOST:PORT` (`cluster::settings::host_port`), each a 422 naming its field. Whether they
/// fit the membership is checked by the cluster (`cluster::membership`).
pub fn new_learner(body: &Value) -> Result<NewLearner> {
    let obj = Obj::new(body, "", &["id", "api", "raft"])?;
    let id = unsigned(obj.req("id")?, "id", 1, u64::MAX)?;
    let address = |field: &str| -> Result<String> {
        let value = obj
            .req(field)?
            .as_str()
            .ok_or_else(|| Problem::invalid(field, format!("{field} must be a string")))?;
        if value.len() > NODE_ADDRESS_MAX {
            return Err(Problem::invalid(
                field,
                format!("{field} must be at most {NODE_ADDRESS_MAX} bytes"),
            ));
        }
        crate::cluster::settings::host_port(value)
            .map_err(|why| Problem::invalid(field, format!("{field} must be HOST:PORT ({why})")))?;
        Ok(value.to_string())
    };
    Ok(NewLearner {
        id,
        api: address("api")?,
        raft: address("raft")?,
    })
}

/// A node id in a path (`DELETE /v1/admin/cluster/learners/{id}`): a whole number from 1,
/// in decimal digits; anything else is 422 naming `id`.
pub fn node_id(text: &str) -> Result<u64> {
    match text.parse::<u64>() {
        Ok(id) if id >= 1 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(Problem::invalid(
            "id",
            format!("id must be a node id, a whole number from 1, not {text:?}"),
        )),
    }
}

/// The most voters `PUT /v1/admin/cluster/voters` takes.
pub const VOTERS_MAX: usize = 100;

/// `PUT /v1/admin/cluster/voters` `{"voters": [ids]}`: 1 to `VOTERS_MAX` node ids, each a
/// whole number from 1, none twice. Whether they are members is checked by the cluster.
pub fn voters(body: &Value) -> Result<Vec<u64>> {
    let obj = Obj::new(body, "", &["voters"])?;
    let list = obj
        .req("voters")?
        .as_array()
        .ok_or_else(|| Problem::invalid("voters", "voters must be an array of node ids"))?;
    if list.is_empty() || list.len() > VOTERS_MAX {
        return Err(Problem::invalid(
            "voters",
            format!("voters must name 1 to {VOTERS_MAX} nodes"),
        ));
    }
    let mut ids = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let id = unsigned(v, &format!("voters[{i}]"), 1, u64::MAX)?;
        if ids.contains(&id) {
            return Err(Problem::invalid(
                format!("voters[{i}]"),
                format!("voters[{i}]: node {id} is named more than once"),
            ));
        }
        ids.push(id);
    }
    Ok(ids)
}

pub fn extend(body: &Value) -> Result<u64> {
    let obj = Obj::new(body, "", &["ttl_seconds"])?;
    ttl(obj.req("ttl_seconds")?)
}

/// Decodes the percent-encoded octets of `s` that stand for unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`), which RFC 3986 6.2.2.2 makes equivalent to the characters
/// themselves: `/v1/products/A%2DB` is `/v1/products/A-B`. Anything else stays encoded, and
/// so stays out of a SKU.
pub fn decode_unreserved(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        match decoded {
            Some(b) => {
                out.push(char::from(b));
                i += 3;
            }
            None => {
                let c = s[i..].chars().next().expect("i is on a char boundary");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    Cow::Owned(out)
}

/// A page's `limit` (1..=`PAGE_LIMIT_MAX`), from its query value.
pub fn page_limit(value: &str) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=PAGE_LIMIT_MAX).contains(n))
        .ok_or_else(|| {
            Problem::invalid(
                "limit",
                format!("limit must be an integer from 1 to {PAGE_LIMIT_MAX}"),
            )
        })
}

/// `GET /v1/products?limit=N&after=SKU`.
pub fn page(query: &str) -> Result<(usize, Option<String>)> {
    let mut limit = PAGE_LIMIT_DEFAULT;
    let mut after = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode_unreserved(key), decode_unreserved(value));
        let (key, value) = (key.as_ref(), value.as_ref());
        match key {
            "limit" => limit = page_limit(value)?,
            "after" => {
                if !is_sku(value) {
                    return Err(Problem::invalid("after", "after must be a SKU"));
                }
                after = Some(value.to_string());
            }
            other => {
                return Err(Problem::invalid(
                    other,
                    format!("unknown query parameter {other}; allowed: limit, after"),
                ))
            }
        }
    }
    Ok((limit, after))
}

/// `If-Match`: `*` (or no header) matches any version; otherwise a list of entity tags, on
/// one header line or several (`"6", "7"`), that matches if the product's version is one of
/// its strong tags, compared as the ETag we send (`"7"`; `"07"` is another tag). A weak tag
/// (`W/"7"`) or a tag that is no version of ours (`"abc"`, `"a,b"`) is well-formed and never
/// matches (RFC 9110 13.1.1): 412, not 400. What is no list of entity tags (`7` unquoted,
/// `*` inside a list, an empty value) is 400.
pub fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>> {
    let lines: Vec<&[u8]> = headers
        .get_all(warp::http::header::IF_MATCH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if lines.is_empty() {
        return Ok(None);
    }
    if let [line] = lines[..] {
        if line.trim_ascii() == b"*" {
            return Ok(None);
        }
    }
    let malformed = || {
        Problem::bad_request(
            "If-Match must be * or entity tags in quotes, like \"7\" or \"6\", \"7\"",
        )
    };
    let mut versions = Vec::new();
    let mut tags = 0;
    for line in lines {
        let mut rest = line;
        loop {
            // Elements are separated by commas; empty ones are ignored (RFC 9110 5.6.1).
            rest = rest.trim_ascii_start();
            while let Some(after) = rest.strip_prefix(b",") {
                rest = after.trim_ascii_start();
            }
            if rest.is_empty() {
                break;
            }
            let (weak, tag) = match rest.strip_prefix(b"W/") {
                Some(after) => (true, after),
                None => (false, rest),
            };
            // opaque-tag = DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text
            let body = tag.strip_prefix(b"\"").ok_or_else(malformed)?;
            let end = body.iter().position(|&b| b == b'"').ok_or_else(malformed)?;
            let opaque = &body[..end];
            if !opaque
                .iter()
                .all(|&b| b == 0x21 || (b >= 0x23 && b != 0x7f))
            {
                return Err(malformed());
            }
            rest = body[end + 1..].trim_ascii_start();
            if !(rest.is_empty() || rest.starts_with(b",")) {
                return Err(malformed());
            }
            tags += 1;
            // Our ETags are versions in decimal, without leading zeros.
            let canonical = !opaque.is_empty()
                && opaque.iter().all(u8::is_ascii_digit)
                && (opaque == b"0" || opaque[0] != b'0');
            let version = std::str::from_utf8(opaque)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if let (false, true, Some(version)) = (weak, canonical, version) {
                versions.push(version);
            }
        }
    }
    if tags == 0 {
        return Err(malformed());
    }
    Ok(Some(IfMatch { versions }))
}

/// `Idempotency-Key`: 1..=255 printable ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= IDEMPOTENCY_KEY_BYTES_MAX
        && bytes.iter().all(|b| (0x20..=0x7e).contains(b));
    if !ok {
        return Err(Problem::bad_request(format!(
            "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters"
        )));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bodies_are_validated_naming_the_field() {
        let ok =
            create_key(&serde_json::json!({"name": "checkout", "scopes": ["reserve", "read"]}))
                .unwrap();
        assert_eq!(ok.name, "checkout");
        assert_eq!(ok.scopes, vec![Scope::Reserve, Scope::Read]);
        let refused = [
            (serde_json::json!({"name": "a"}), "scopes"),
            (serde_json::json!({"scopes": ["read"]}), "name"),
            (serde_json::json!({"name": "", "scopes": ["read"]}), "name"),
            (
                serde_json::json!({"name": "x".repeat(101), "scopes": ["read"]}),
                "name",
            ),
            (
                serde_json::json!({"name": "a\u{202E}b", "scopes": ["read"]}),
                "name",
            ),
            (serde_json::json!({"name": "a", "scopes": []}), "scopes"),
            (serde_json::json!({"name": "a", "scopes": "read"}), "scopes"),
            (
                serde_json::json!({"name": "a", "scopes": ["read", "write"]}),
                "scopes[1]",
            ),
            (
                serde_json::json!({"name": "a", "scopes": ["Admin"]}),
                "scopes[0]",
            ),
            (serde_json::json!({"name": "a", "scopes": [1]}), "scopes[0]"),
            (
                serde_json::json!({"name": "a", "scopes": ["read", "read"]}),
                "scopes[1]",
            ),
            (
                serde_json::json!({"name": "a", "scopes": ["read"], "secret": "x"}),
                "secret",
            ),
            (serde_json::json!([]), "body"),
        ];
        for (body, field) in refused {
            let Err(problem) = create_key(&body) else {
                panic!("{body} was accepted");
            };
            assert_eq!(
                (problem.status, problem.code),
                (422, "validation_failed"),
                "{body}"
            );
            assert_eq!(problem.extra["field"], field, "{body}");
        }
    }

    struct Rng(fastrand::Rng);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0.u64(..)
        }
        fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
            choices[(self.next() % choices.len() as u64) as usize]
        }
        /// One of `good` nine times in ten, otherwise one of `bad`.
        fn mostly<'a>(&mut self, good: &[&'a str], bad: &[&'a str]) -> &'a str {
            if self.next().is_multiple_of(10) {
                self.pick(bad)
            } else {
                self.pick(good)
            }
        }
    }

    fn content_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(warp::http::header::CONTENT_TYPE, value.parse().unwrap());
        headers
    }

    fn json_headers() -> HeaderMap {
        content_type("application/json")
    }

    /// Reservation bodies, mostly valid, with one thing or another wrong in many.
    fn body(rng: &mut Rng) -> String {
        let long_id = format!("\"{}\"", "c".repeat(CUSTOMER_ID_CHARS_MAX + 1));
        let long_sku = format!("\"{}\"", "S".repeat(SKU_LEN_MAX + 1));
        let max_q = QUANTITY_MAX.to_string();
        let over_q = (QUANTITY_MAX + 1).to_string();
        let max_ttl = TTL_SECONDS_MAX.to_string();
        let over_ttl = (TTL_SECONDS_MAX + 1).to_string();
        let mut fields = Vec::new();
        if !rng.next().is_multiple_of(16) {
            let id = rng.mostly(
                &["\"c1\"", "\"c\\u00e9\"", "\"a\\u200db\""],
                &[
                    "\"\"",
                    "\"a\\u0001\"",
                    "\"a\\u202e\"",
                    "\"\\ufeffa\"",
                    "7",
                    "null",
                    &long_id,
                ],
            );
            fields.push(format!("\"customer_id\":{id}"));
        }
        if !rng.next().is_multiple_of(16) {
            let n = match rng.next() % 30 {
                0 => 0,
                1 => RESERVATION_LINES_MAX + 1,
                _ => 1 + (rng.next() % 3) as usize,
            };
            let mut lines = Vec::new();
            for i in 0..n {
                let sku = format!("\"SKU-{i}\"");
                let sku = rng.mostly(
                    &[&sku, &sku, "\"A\\u002dB\""],
                    &["\"SKU-0\"", "\"bad sku\"", "\"\"", &long_sku, "1"],
                );
                let quantity = rng.mostly(
                    &["1", "2", &max_q],
                    &["0", "-1", "1.5", "\"1\"", "null", &over_q],
                );
                let extra = if rng.next().is_multiple_of(20) {
                    ",\"note\":1"
                } else {
                    ""
                };
                let dup = if rng.next().is_multiple_of(25) {
                    ",\"quantity\":1"
                } else {
                    ""
                };
                if rng.next().is_multiple_of(30) {
                    // A line as an array of its fields, which serde's structs would take.
                    lines.push(format!("[{sku},{quantity}]"));
                    continue;
                }
                lines.push(format!(
                    "{{\"sku\":{sku},\"quantity\":{quantity}{extra}{dup}}}"
                ));
            }
            let items = if rng.next().is_multiple_of(30) {
                "{}".to_string()
            } else {
                format!("[{}]", lines.join(","))
            };
            fields.push(format!("\"items\":{items}"));
        }
        if rng.next().is_multiple_of(2) {
            let ttl = rng.mostly(
                &["30", "null", "1", &max_ttl],
                &["0", &over_ttl, "30.0", "-5"],
            );
            fields.push(format!("\"ttl_seconds\":{ttl}"));
        }
        if rng.next().is_multiple_of(20) {
            fields.push("\"coupon\":\"X\"".to_string());
        }
        if rng.next().is_multiple_of(20) {
            fields.push("\"customer_id\":\"c2\"".to_string());
        }
        let body = format!("{{{}}}", fields.join(","));
        match rng.next() % 40 {
            0 => format!("  {body}\n"),
            1 => format!("{body},"),
            2 => "[]".to_string(),
            // The body as an array of its fields in order.
            3 => r#"["c1",[{"sku":"A","quantity":1}]]"#.to_string(),
            4 => r#"["c1",[{"sku":"A","quantity":1}],30]"#.to_string(),
            _ => body,
        }
    }

    #[test]
    fn the_fast_path_accepts_only_what_the_exact_one_accepts_with_the_same_result() {
        let headers = json_headers();
        let mut rng = Rng(fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D));
        let (mut fast_hits, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let body = body(&mut rng);
            let exact = reserve_exact(&headers, body.as_bytes());
            match reserve_fast(&headers, body.as_bytes()) {
                Some(request) => {
                    fast_hits += 1;
                    assert_eq!(exact.as_ref().ok(), Some(&request), "{body}");
                }
                None => {
                    if exact.is_err() {
                        refused += 1;
                    }
                }
            }
            // What the server runs gives exactly the exact path's answer.
            match (reserve_body(&headers, body.as_bytes()), exact) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{body}"),
                (Err(a), Err(b)) => {
                    assert_eq!((a.status, a.code, &a.detail), (b.status, b.code, &b.detail));
                    assert_eq!(a.extra, b.extra, "{body}");
                }
                (a, b) => panic!("{body}: {:?} against {:?}", a.is_ok(), b.is_ok()),
            }
        }
        // The generator exercises both sides.
        assert!(fast_hits > 2_000, "{fast_hits} bodies took the fast path");
        assert!(refused > 2_000, "{refused} bodies were refused");
    }

    #[test]
    fn if_match_takes_one_version_a_list_or_any() {
        let parse = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(warp::http::header::IF_MATCH, line.parse().unwrap());
            }
            if_match(&h)
        };
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(parse(&[" * "]).unwrap(), None);
        let m = |v: &[u64]| {
            Some(IfMatch {
                versions: v.to_vec(),
            })
        };
        assert_eq!(parse(&["\"7\""]).unwrap(), m(&[7]));
        assert_eq!(parse(&["\"6\", \"7\""]).unwrap(), m(&[6, 7]));
        assert_eq!(parse(&["\"6\"", "\"7\""]).unwrap(), m(&[6, 7]), "two lines");
        assert_eq!(parse(&["W/\"7\""]).unwrap(), m(&[]), "weak: never matches");
        assert_eq!(parse(&["W/\"5\",\"9\","]).unwrap(), m(&[9]));
        for foreign in [
            "\"x\"",
            "\"-1\"",
            "\"+1\"",
            "\"\"",
            "\"07\"",
            "\"99999999999999999999\"",
        ] {
            assert_eq!(
                parse(&[foreign]).unwrap(),
                m(&[]),
                "{foreign}: no version of ours"
            );
        }
        assert_eq!(parse(&["\"0\""]).unwrap(), m(&[0]));
        assert_eq!(
            parse(&["\"a,b\", \"7\""]).unwrap(),
            m(&[7]),
            "a comma inside a tag"
        );
        for bad in [
            "7",
            ",",
            "",
            "*, \"7\"",
            "w/\"7\"",
            "\"7",
            "\"a b\"",
            "\"a\"b\"",
            "\"7\" \"8\"",
        ] {
            assert_eq!(parse(&[bad]).unwrap_err().status, 400, "{bad:?}");
        }
        // obs-text (bytes 0x80-0xFF) is allowed inside a tag.
        let mut h = HeaderMap::new();
        h.insert(
            warp::http::header::IF_MATCH,
            warp::http::HeaderValue::from_bytes(b"\"caf\xe9\", \"7\"").unwrap(),
        );
        assert_eq!(if_match(&h).unwrap(), m(&[7]));
        assert_eq!(
            parse(&["*", "\"7\""]).unwrap_err().status,
            400,
            "* in a list"
        );
    }

    #[test]
    fn unreserved_characters_are_decoded_and_nothing_else() {
        assert_eq!(decode_unreserved("/v1/products/A-B"), "/v1/products/A-B");
        assert_eq!(
            decode_unreserved("/v1/products/A%2DB%2e%5f%7E%41"),
            "/v1/products/A-B._~A"
        );
        assert_eq!(decode_unreserved("A%20B%2F%25%2"), "A%20B%2F%25%2");
        assert_eq!(decode_unreserved("%%41%zz%"), "%A%zz%");
        assert_eq!(
            decode_unreserved("%+5%-A"),
            "%+5%-A",
            "signs are no hex digits"
        );
        assert_eq!(decode_unreserved("caf\u{e9}%41"), "caf\u{e9}A");
        assert!(!is_sku(".") && !is_sku("..") && is_sku("...") && is_sku(".a"));
    }

    #[test]
    fn text_fields_take_only_printable_characters() {
        for ok in [
            "c1",
            "café",
            "Größe 42 – \"blue\"",
            "a\u{200D}b",
            "日本",
            "🏴\u{E0067}",
            "soft\u{AD}hyphen",
            "\u{5E9}\u{5DC}\u{200F} 42",
            "\u{E44}\u{E17}\u{E22}\u{200B}\u{E21}",
        ] {
            assert!(text_fault(ok, 128).is_none(), "{ok:?}");
        }
        for bad in [
            "a\u{7}",
            "line\nbreak",
            "tab\t",
            "\u{202E}txt.exe",
            "\u{FEFF}bom",
            "word\u{2060}joiner",
            "sep\u{2028}",
            "para\u{2029}",
            "\u{202A}embedded",
            "a \u{2067}\u{5E9}\u{2069} b",
            "private\u{E000}",
            "plane16\u{10FFFD}",
            "non\u{FDD0}",
            "non\u{FFFF}",
            "non\u{1FFFE}",
        ] {
            assert!(
                matches!(text_fault(bad, 128), Some(TextFault::Unprintable)),
                "{bad:?}"
            );
        }
        assert!(matches!(text_fault("", 128), Some(TextFault::Length)));
        assert!(matches!(text_fault("ab", 1), Some(TextFault::Length)));
    }

    #[test]
    fn plain_bodies_take_the_fast_path() {
        let headers = json_headers();
        for body in [
            r#"{"customer_id":"c1","items":[{"sku":"A","quantity":1}]}"#,
            r#"{"items":[{"quantity":2,"sku":"A"},{"sku":"B","quantity":1}],"customer_id":"c1","ttl_seconds":30}"#,
            r#"{"customer_id":"caf\u00e9","items":[{"sku":"A","quantity":1}],"ttl_seconds":null}"#,
        ] {
            assert!(reserve_fast(&headers, body.as_bytes()).is_some(), "{body}");
        }
        for body in [
            r#"["c1",[{"sku":"A","quantity":1}]]"#,
            r#"{"customer_id":"c1","items":[["A",1]]}"#,
        ] {
            assert!(reserve_fast(&headers, body.as_bytes()).is_none(), "{body}");
            assert_eq!(
                reserve_body(&headers, body.as_bytes()).unwrap_err().status,
                422,
                "{body}"
            );
        }
        let text = content_type("text/plain");
        let body = br#"{"customer_id":"c1","items":[{"sku":"A","quantity":1}]}"#;
        assert!(reserve_fast(&text, body).is_none());
        assert_eq!(reserve_body(&text, body).unwrap_err().status, 400);
    }
}
