//! `GET /v1/events`: the change feed, as a page of JSON or as a live Server-Sent Events
//! stream (`Accept: text/event-stream`).
//!
//! A page never splits the events of one record, so `next_after` (a log sequence number)
//! always continues exactly where the page ended. A filtered page scans at most
//! `EVENTS_SCAN_MAX` events, so a filter that matches little cannot make one request read
//! the whole store: the page may then hold fewer than `limit` events, and `next_after`
//! still says how far the scan got.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use warp::Reply as _;

use crate::feed::{Feed, Filter, Gone, Kind, LiveReader, Position, Stored};
use crate::http::input::{decode_unreserved, is_sku, page_limit};
use crate::http::problem::Problem;
use crate::limits::PAGE_LIMIT_DEFAULT;

type Reply = warp::reply::Response;
type Result<T> = std::result::Result<T, Problem>;

/// Events a filtered page reads from the store, at most.
const EVENTS_SCAN_MAX: usize = 10_000;
/// Events read from the store at a time (a page, or a live reader catching up).
const EVENTS_READ_CHUNK: usize = 256;

/// What a request asks for.
struct Query {
    /// `None`: from the oldest event kept.
    after: Option<u64>,
    limit: usize,
    filter: Filter,
}

fn query(raw: &str) -> Result<Query> {
    let mut q = Query {
        after: None,
        limit: PAGE_LIMIT_DEFAULT,
        filter: Filter::default(),
    };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode_unreserved(key), decode_unreserved(value));
        match key.as_ref() {
            "after" => {
                q.after = Some(value.parse().map_err(|_| {
                    Problem::invalid("after", "after must be a log sequence number (an integer)")
                })?);
            }
            "limit" => q.limit = page_limit(&value)?,
            "type" => {
                let kinds = value
                    .split(',')
                    .map(|t| {
                        Kind::parse(t).ok_or_else(|| {
                            Problem::invalid("type", format!("{t:?} is not an event type"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                q.filter.kinds = Some(kinds);
            }
            "sku" => {
                if !is_sku(&value) {
                    return Err(Problem::invalid("sku", "sku must be a SKU"));
                }
                q.filter.sku = Some(value.into_owned());
            }
            other => {
                return Err(Problem::invalid(
                    other,
                    format!("unknown query parameter {other}; allowed: after, limit, type, sku"),
                ))
            }
        }
    }
    Ok(q)
}

fn gone(g: Gone) -> Problem {
    Problem::new(
        410,
        "events_gone",
        format!(
            "the events asked for are no longer kept; the oldest kept are those of log record {}",
            g.oldest_seq
        ),
    )
    .with("oldest_seq", g.oldest_seq)
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Reads the store off the runtime's threads (a read may wait for the disk).
async fn blocking<T: Send + 'static>(
    feed: &Feed,
    read: impl FnOnce(&Feed) -> T + Send + 'static,
) -> Result<T> {
    let feed = feed.clone();
    tokio::task::spawn_blocking(move || read(&feed))
        .await
        .map_err(|err| {
            Problem::new(
                500,
                "internal_error",
                format!("reading the change feed: {err}"),
            )
        })
}

/// Serves `GET /v1/events`.
pub async fn serve(feed: Option<&Feed>, raw_query: &str, headers: &HeaderMap) -> Result<Reply> {
    let feed = feed.ok_or_else(|| {
        Problem::new(
            404,
            "events_disabled",
            "the change feed is off on this server (--events off)",
        )
    })?;
    let q = query(raw_query)?;
    let after = q.after.unwrap_or_else(|| feed.floor());
    if wants_stream(headers) {
        let cursor = match headers.get("last-event-id") {
            Some(id) => id.to_str().ok().and_then(Position::parse).ok_or_else(|| {
                Problem::invalid("Last-Event-ID", "Last-Event-ID must be an event id")
            })?,
            None => Position::after_record(after),
        };
        return stream(feed, cursor, q.filter).await;
    }
    blocking(feed, move |feed| page(feed, after, q)).await?
}

fn page(feed: &Feed, after: u64, q: Query) -> Result<Reply> {
    let mut events: Vec<String> = Vec::new();
    // The last record whose events were all looked at.
    let mut done = after;
    let mut scanned = 0;
    let next_after = 'scan: loop {
        let found = feed
            .read_after(Position::after_record(done), EVENTS_READ_CHUNK)
            .map_err(gone)?;
        let mut record = None;
        for event in found.events {
            if record != Some(event.position.seq) {
                // A new record: the one before it is done.
                if let Some(seq) = record {
                    done = seq;
                }
                if events.len() >= q.limit || scanned >= EVENTS_SCAN_MAX {
                    break 'scan done;
                }
                record = Some(event.position.seq);
            }
            scanned += 1;
            if q.filter.matches(&event.json) {
                events.push(event.json);
            }
        }
        if let Some(seq) = record {
            done = seq; // a read never splits a record
        }
        if found.at_end {
            break done.max(found.through);
        }
    };
    let mut body = String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 48);
    body.push_str("{\"events\":[");
    body.push_str(&events.join(","));
    body.push_str(&format!("],\"next_after\":{next_after}}}"));
    let mut reply = Response::new(body.into());
    *reply.status_mut() = StatusCode::OK;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(reply)
}

/// A live reader's stream: first the events in the store after its cursor, then those
/// the projector hands out, each once, in order.
struct Live {
    feed: Feed,
    reader: LiveReader,
    cursor: Position,
    filter: Filter,
    ready: VecDeque<Stored>,
    caught_up: bool,
}

/// Events formatted for a live reader's response and not yet taken by it.
const SSE_SEND_BUFFER: usize = 64;
/// How often a live reader that does not take its events is checked for lag.
const SSE_STALL_CHECK_MS: u64 = 250;

impl Live {
    /// Sends events into `tx` until the client goes, the reader falls behind the ring,
    /// or the server shuts down.
    async fn run(mut self, tx: tokio::sync::mpsc::Sender<warp::sse::Event>) {
        loop {
            let permit = loop {
                tokio::select! {
                    permit = tx.reserve() => break permit,
                    _ = tokio::time::sleep(Duration::from_millis(SSE_STALL_CHECK_MS)) => {
                        if *self.reader.closing.borrow() {
                            return;
                        }
                        // The client takes nothing and the ring is about to pass it: it is
                        // dropped now rather than when its socket drains.
                        if self.reader.events.len() >= crate::feed::LIVE_EVENTS_BUFFERED {
                            self.reader.dropped_for_lag();
                            return;
                        }
                    }
                }
            };
            let Ok(permit) = permit else {
                return; // the client hung up
            };
            let Some(event) = self.next().await else {
                return;
            };
            permit.send(
                warp::sse::Event::default()
                    .id(event.position.id())
                    .event(event_type(&event.json))
                    .data(event.json),
            );
        }
    }

    /// The next event to send (`None`: the stream ends).
    async fn next(&mut self) -> Option<Stored> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                if event.position <= self.cursor {
                    continue; // read from the store and seen in the ring too
                }
                self.cursor = event.position;
                if self.filter.matches(&event.json) {
                    return Some(event);
                }
                continue;
            }
            if !self.caught_up {
                let cursor = self.cursor;
                let read = blocking(&self.feed, move |feed| {
                    feed.read_after(cursor, EVENTS_READ_CHUNK)
                });
                let found = read.await.ok()?.ok()?;
                self.caught_up = found.at_end && found.events.is_empty();
                self.ready.extend(found.events);
                continue;
            }
            tokio::select! {
                received = self.reader.events.recv() => match received {
                    // The store started again after a gap before this event was made: the
                    // stream ends, and the reconnection is told `events_gone`.
                    Ok(_) if self.reader.started_again.has_changed().unwrap_or(true) => {
                        return None;
                    }
                    Ok(event) => self.ready.push_back(Stored::clone(&event)),
                    Err(RecvError::Lagged(_)) => {
                        // Too slow for the ring: dropped, never waited for. The client
                        // resumes with Last-Event-ID from the store.
                        self.reader.dropped_for_lag();
                        return None;
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = self.reader.closing.changed() => return None,
                _ = self.reader.started_again.changed() => return None,
            }
        }
    }
}

/// The event's `type`, from its JSON.
fn event_type(json: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    serde_json::from_str::<Peek>(json).map_or_else(|_| "message".into(), |p| p.kind.to_string())
}

async fn stream(feed: &Feed, cursor: Position, filter: Filter) -> Result<Reply> {
    // Subscribed before the store is read: an event appended meanwhile is in one or the
    // other (or both: the cursor skips what was sent).
    let reader = feed.subscribe().map_err(|_| {
        Problem::new(
            503,
            "unavailable",
            "too many live event readers are connected; retry",
        )
        .header(header::RETRY_AFTER, "1")
    })?;
    // Asked for events no longer kept: 410 now, not an empty stream.
    blocking(feed, move |feed| feed.read_after(cursor, 1).map(drop))
        .await?
        .map_err(gone)?;
    let live = Live {
        feed: feed.clone(),
        reader,
        cursor,
        filter,
        ready: VecDeque::new(),
        caught_up: false,
    };
    // A task of its own feeds the response through a small channel, so that a client
    // that stops reading is noticed (and dropped) while hyper waits for its socket.
    let (tx, mut rx) = tokio::sync::mpsc::channel(SSE_SEND_BUFFER);
    tokio::spawn(live.run(tx));
    let events = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, Infallible>);
    let events = warp::sse::keep_alive()
        .interval(Duration::from_secs(crate::feed::HEARTBEAT_SECONDS))
        .text("heartbeat")
        .stream(events);
    Ok(warp::sse::reply(events).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster node's store that starts again after an installed snapshot ends the live
    /// streams, rather than let a caught-up reader jump the gap: its reconnection is told
    /// `events_gone`.
    #[tokio::test]
    async fn a_live_stream_ends_when_the_store_starts_again_after_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::feed::store::Store::open(dir.path(), 0, crate::feed::retention_default())
                .unwrap();
        let feed = Feed::new(store);
        let event = |seq| Stored {
            position: Position { seq, index: 0 },
            json: format!("{{\"id\":\"{seq}\"}}"),
        };
        crate::feed::publish(&feed, &mut vec![event(1)], 1).unwrap();
        let mut live = Live {
            feed: feed.clone(),
            reader: feed.subscribe().unwrap(),
            cursor: Position::default(),
            filter: Filter::default(),
            ready: VecDeque::new(),
            caught_up: false,
        };
        assert_eq!(live.next().await.map(|e| e.position.seq), Some(1));
        // Caught up: it waits on the ring.
        let waited = tokio::time::timeout(Duration::from_millis(100), live.next()).await;
        assert!(waited.is_err(), "{waited:?}");
        feed.hold_store().reset(10).unwrap();
        feed.started_again();
        crate::feed::publish(&feed, &mut vec![event(11)], 11).unwrap();
        let after = tokio::time::timeout(Duration::from_secs(5), live.next()).await;
        assert!(
            matches!(after, Ok(None)),
            "the stream ends rather than skip the gap: {after:?}"
        );
    }

    #[test]
    fn queries_parse_and_refuse_what_is_wrong() {
        let q = query("after=5&limit=10&type=stock.sold_out,reservation.created&sku=A-1").unwrap();
        assert_eq!((q.after, q.limit), (Some(5), 10));
        assert_eq!(
            q.filter.kinds,
            Some(vec![Kind::StockSoldOut, Kind::ReservationCreated])
        );
        assert_eq!(q.filter.sku.as_deref(), Some("A-1"));
        for bad in [
            "after=x",
            "limit=0",
            "limit=1001",
            "type=nope",
            "sku=",
            "page=2",
        ] {
            assert!(query(bad).is_err(), "{bad}");
        }
    }
}
