//! The operations the HTTP layer offers, as plain async functions over the actors.
//!
//! Each mutating operation ends by waiting for its log ticket (in `sync` durability), so
//! an `Ok` here means the change is durable. Input arrives already validated
//! (`crate::http::input`): this layer enforces business rules, not syntax.
//!
//! Callers run mutations on a task of their own (`tokio::spawn`), so a client that hangs
//! up mid-request cannot abandon a change between its steps (a reservation being
//! assembled needs no task: it travels between the actors, see `actors::assembly`).

use ractor::{ActorRef, RpcReplyPort};
use uuid::Uuid;

use crate::actors::assembly::{NewReservation, Reserved};
use crate::actors::product::{Change, IfMatch, ProductMsg};
use crate::actors::supervisor::{Listed, Stats, SupervisorMsg};
use crate::actors::{ask, AskError};
use crate::cluster::Journal;
pub use crate::domain::NewProduct;
use crate::domain::{KeyId, Line, Product, Reservation};
use crate::error::{Error, Result};
use crate::storage::log::Ticket;
use crate::storage::record::IdempotencyKey;
use crate::storage::snapshotter::{Priority, Snapshotter, Taken};
use crate::storage::Durability;

/// A validated reservation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveRequest {
    pub customer_id: String,
    pub items: Vec<Line>,
    pub ttl_seconds: Option<u64>,
}

impl ReserveRequest {
    /// What "the same body" means for `Idempotency-Key`: the request as parsed.
    fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(self.customer_id.as_bytes());
        out.push(0);
        for line in &self.items {
            out.extend_from_slice(line.sku.as_bytes());
            out.push(0);
            out.extend_from_slice(&line.quantity.to_le_bytes());
        }
        out.extend_from_slice(&self.ttl_seconds.map_or(0, |t| t + 1).to_le_bytes());
        out
    }
}

/// A handle on the running core. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub(crate) supervisor: ActorRef<SupervisorMsg>,
    pub(crate) log: Journal,
    pub(crate) durability: Durability,
    pub(crate) default_ttl_seconds: u64,
    pub(crate) snapshotter: Snapshotter,
    /// The change feed (`None`: `--events off`).
    pub(crate) feed: Option<crate::feed::Feed>,
    /// A cluster leader's epoch's webhooks (`None`: the feed is off, or no epoch; a single
    /// server's are `http::App::webhooks`).
    pub(crate) webhooks: Option<crate::webhooks::Webhooks>,
    /// Whether this service answers application requests: a single node's and a cluster
    /// leader's epoch's do; a cluster node's standby service (on an empty state, its
    /// journal refusing every record) answers only `/metrics` and the like.
    pub(crate) serves: bool,
}

impl Service {
    /// Waits until the change is durable (sync) or lets it go (async).
    async fn settle(&self, ticket: Ticket) -> Result<()> {
        match self.durability {
            Durability::Sync => ticket.durable().await.map(drop).map_err(Error::from),
            Durability::Async => Ok(()),
        }
    }

    async fn route<T: Send + 'static>(
        &self,
        sku: &str,
        build: impl FnOnce(RpcReplyPort<Result<T>>) -> ProductMsg,
    ) -> Result<T> {
        let sku_owned = sku.to_string();
        ask(&self.supervisor, |reply| SupervisorMsg::Route {
            sku: sku_owned,
            msg: build(reply),
        })
        .await?
    }

    /// Creates a product; `by` is the API key making the change (so for every change
    /// below).
    pub async fn create_product(&self, new: NewProduct, by: Option<KeyId>) -> Result<Product> {
        let (product, ticket) = ask(&self.supervisor, |reply| SupervisorMsg::CreateProduct {
            new,
            by,
            reply,
        })
        .await??;
        self.settle(ticket).await?;
        Ok(product)
    }

    pub async fn get_product(&self, sku: &str) -> Result<Product> {
        self.route(sku, ProductMsg::Get).await
    }

    /// One page of products after `after`, ordered by SKU, and the SKU to continue after.
    pub async fn list_products(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Product>, Option<String>)> {
        let (listed, next_after) = ask(&self.supervisor, |reply| SupervisorMsg::ListProducts {
            after,
            limit,
            reply,
        })
        .await?;
        let mut products = Vec::with_capacity(listed.len());
        for item in listed {
            let (sku, actor) = match item {
                Listed::Product(p) => {
                    products.push(p);
                    continue;
                }
                Listed::Actor(sku, actor) => (sku, actor),
            };
            match ask(&actor, ProductMsg::Get).await {
                Ok(Ok(p)) => products.push(p),
                // Passivated since the page was cut: ask where it lives now. A product
                // deleted since is simply left out.
                Ok(Err(Error::Unavailable(_))) | Err(AskError::Gone) | Err(AskError::Dropped) => {
                    if let Ok(p) = self.get_product(&sku).await {
                        products.push(p);
                    }
                }
                _ => {}
            }
        }
        Ok((products, next_after))
    }

    pub async fn change_product(
        &self,
        sku: &str,
        change: Change,
        if_match: Option<IfMatch>,
        by: Option<KeyId>,
    ) -> Result<Product> {
        let (product, ticket) = self
            .route(sku, |reply| ProductMsg::Change {
                change: Box::new(change),
                if_match,
                by,
                reply,
            })
            .await?;
        self.settle(ticket).await?;
        Ok(product)
    }

    pub async fn delete_product(
        &self,
        sku: &str,
        if_match: Option<IfMatch>,
        by: Option<KeyId>,
    ) -> Result<()> {
        let ticket = ask(&self.supervisor, |reply| SupervisorMsg::DeleteProduct {
            sku: sku.to_string(),
            if_match,
            by,
            reply,
        })
        .await??;
        self.settle(ticket).await
    }

    /// Holds every line or none. Returns the reservation and whether it is a replay.
    ///
    /// One call: the supervisor and the product actors hold the lines and register the
    /// reservation between them (see `actors::assembly`).
    pub async fn reserve(
        &self,
        request: ReserveRequest,
        idempotency_key: Option<String>,
        by: Option<KeyId>,
    ) -> Result<(Reservation, bool)> {
        let idempotency = idempotency_key.map(|key| {
            let key = IdempotencyKey {
                customer_id: request.customer_id.clone(),
                key,
            };
            (key, request.fingerprint())
        });
        let ttl = request.ttl_seconds.unwrap_or(self.default_ttl_seconds);
        let request = NewReservation {
            id: Uuid::now_v7(),
            customer_id: request.customer_id,
            items: request.items,
            ttl_ms: (ttl as i64) * 1000,
            by,
        };
        let reserved = ask(&self.supervisor, |reply| SupervisorMsg::Reserve {
            request,
            idempotency,
            reply,
        })
        .await??;
        let (reservation, ticket, replay) = match reserved {
            Reserved::Created(reservation, ticket) => (reservation, ticket, false),
            Reserved::Replay(reservation, ticket) => (reservation, ticket, true),
        };
        self.settle(ticket).await?;
        Ok((reservation, replay))
    }

    pub async fn get_reservation(&self, id: Uuid) -> Result<Reservation> {
        ask(&self.supervisor, |reply| SupervisorMsg::GetReservation {
            id,
            reply,
        })
        .await?
    }

    pub async fn confirm(
        &self,
        id: Uuid,
        order_id: Option<String>,
        by: Option<KeyId>,
    ) -> Result<Reservation> {
        let (r, ticket) = ask(&self.supervisor, |reply| SupervisorMsg::Confirm {
            id,
            order_id,
            by,
            reply,
        })
        .await??;
        self.settle(ticket).await?;
        Ok(r)
    }

    pub async fn cancel(&self, id: Uuid, by: Option<KeyId>) -> Result<Reservation> {
        let (r, ticket) = ask(&self.supervisor, |reply| SupervisorMsg::Cancel {
            id,
            by,
            reply,
        })
        .await??;
        self.settle(ticket).await?;
        Ok(r)
    }

    pub async fn extend(
        &self,
        id: Uuid,
        ttl_seconds: u64,
        by: Option<KeyId>,
    ) -> Result<Reservation> {
        let ttl_ms = (ttl_seconds as i64) * 1000;
        let (r, ticket) = ask(&self.supervisor, |reply| SupervisorMsg::Extend {
            id,
            ttl_ms,
            by,
            reply,
        })
        .await??;
        self.settle(ticket).await?;
        Ok(r)
    }

    /// Expires every reservation whose deadline has passed, and waits for the records.
    pub async fn expire_due_now(&self) -> Result<()> {
        let ticket = ask(&self.supervisor, |reply| SupervisorMsg::Tick(Some(reply))).await?;
        ticket.durable().await.map(drop).map_err(Error::from)
    }

    /// Takes a snapshot of everything acknowledged so far (`POST /v1/admin/snapshot`).
    pub async fn snapshot(&self) -> Result<Taken> {
        if !self.log.is_healthy() {
            return Err(Error::Unavailable(
                "the write-ahead log cannot be written; no snapshot".into(),
            ));
        }
        let upto = self.log.barrier().durable().await?;
        self.snapshotter
            .take(upto, Priority::Background)
            .await
            .map_err(|e| Error::Internal(format!("snapshot failed: {e}")))
    }

    /// Passivates every product actor idle for the configured period now; returns how many.
    pub async fn passivate_idle(&self) -> Result<usize> {
        Ok(ask(&self.supervisor, SupervisorMsg::PassivateIdle).await?)
    }

    pub async fn stats(&self) -> Result<Stats> {
        Ok(ask(&self.supervisor, SupervisorMsg::Stats).await?)
    }

    /// The change feed, unless it is off.
    pub fn feed(&self) -> Option<&crate::feed::Feed> {
        self.feed.as_ref()
    }

    /// What changes are appended through (the local log, on a single node).
    pub fn journal(&self) -> &Journal {
        &self.log
    }

    /// Whether the log still accepts writes.
    pub fn log_healthy(&self) -> bool {
        self.log.is_healthy()
    }

    /// The write-ahead log's figures since start.
    pub fn log_stats(&self) -> crate::storage::log::LogStats {
        self.log.log_stats()
    }

    /// The log sequence number the newest snapshot covers (0: none yet).
    /// The digest of the durable state (`GET /v1/admin/cluster/digest` on a single node): the
    /// newest snapshot plus the log through the last durable record, folded on the
    /// snapshotter's rebuild thread. Returns that record's sequence and the digest.
    pub async fn durable_digest(&self) -> Result<(u64, [u8; 32])> {
        let upto = self.log.durable_seq();
        match self.snapshotter.fold_to(upto).await {
            Ok(Ok(state)) => Ok((upto, state.digest())),
            Ok(Err(err)) => Err(Error::Unavailable(format!(
                "cannot fold the durable state: {err}"
            ))),
            Err(_) => Err(Error::Unavailable("the snapshotter has stopped".into())),
        }
    }

    pub fn newest_snapshot_seq(&self) -> u64 {
        self.snapshotter.newest_seq()
    }

    /// Test hook: makes the product actor of `sku` panic while handling a message.
    #[doc(hidden)]
    pub async fn inject_product_panic(&self, sku: &str) -> Result<()> {
        let sku = sku.to_string();
        let outcome = ask(&self.supervisor, |reply| SupervisorMsg::Route {
            sku,
            msg: ProductMsg::Crash(reply),
        })
        .await;
        outcome.map_err(Error::from)
    }

    /// Test hook: the next message the product actor of `sku` handles panics.
    #[doc(hidden)]
    pub fn arm_product_panic(&self, sku: &str) {
        let msg = ProductMsg::ArmPanic;
        let _ = self.supervisor.cast(SupervisorMsg::Route {
            sku: sku.to_string(),
            msg,
        });
    }

    /// Test hook: the product actor of `sku` reads no message until `release` is notified
    /// (`notify_one`; at most a minute).
    #[doc(hidden)]
    pub fn stall_product(&self, sku: &str, release: std::sync::Arc<tokio::sync::Notify>) {
        let _ = self.supervisor.cast(SupervisorMsg::Route {
            sku: sku.to_string(),
            msg: ProductMsg::Stall(release),
        });
    }

    /// Test hook: kills the product actor of `sku` as a crash would; the supervisor
    /// restarts it from the durable state.
    #[doc(hidden)]
    pub fn inject_product_kill(&self, sku: &str) {
        let _ = self
            .supervisor
            .cast(SupervisorMsg::KillProduct(sku.to_string()));
    }

    /// Test hook: every later log write fails.
    #[doc(hidden)]
    pub fn inject_log_failure(&self) {
        self.log.inject_write_failure();
    }
}
