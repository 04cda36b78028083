//! API keys: the live table every request is checked against, and its changes.
//!
//! A key's secret is never kept: only its SHA-256 (`secret_hash`), in the log, in
//! snapshots and here. A request's bearer secret is hashed and looked up by that hash; the
//! entry found is confirmed with a constant-time comparison (`subtle`), and so is the
//! bootstrap key's. A lookup by hash leaks through its timing at most how a guess's
//! SHA-256 compares with a stored one, which tells nothing about a secret.
//!
//! Keys are created and revoked by appending one record to the write-ahead log and
//! waiting until it is durable (in either durability mode: a key change is rare, and an
//! answered revocation must survive a crash), then changing the table; one change at a
//! time, so that the log never holds a revocation of a key it does not hold. A revoked
//! key is therefore refused from the request after the answer on.
//!
//! Authentication is on (`enforced`) when an admin key is configured (`--admin-key-file`
//! or `STOCKD_ADMIN_KEY`: the *bootstrap* key, never stored, id `BOOTSTRAP_KEY_ID`) or
//! when any key exists; once on it stays on until the process stops, even if every key is
//! revoked (revoking the last key must not open the server). With neither, a server on a
//! loopback address runs open (`crate::server` refuses any other address).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::{Millis, SharedClock};
use crate::cluster::Journal;
pub use crate::domain::key::{ApiKey, KeyId, Scope};
use crate::error::{Error, Result};
use crate::storage::record::Record;

/// The bootstrap key's id (the nil UUID): what `by` names for its changes.
pub const BOOTSTRAP_KEY_ID: KeyId = uuid::Uuid::nil();
/// The bootstrap key's name, as logs show it.
pub const BOOTSTRAP_KEY_NAME: &str = "bootstrap";
/// Shortest admin key accepted from `--admin-key-file` or `STOCKD_ADMIN_KEY`.
pub const ADMIN_KEY_CHARS_MIN: usize = 16;
/// Longest admin key accepted (a header's token stays well under hyper's limits).
pub const ADMIN_KEY_CHARS_MAX: usize = 256;
/// What every secret stockd makes starts with (so that secret scanners can find them).
pub const SECRET_PREFIX: &str = "stk_";

/// A set of scopes, one bit each: what a request's check reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub const ALL: Scopes = Scopes(0b1111);

    fn bit(scope: Scope) -> u8 {
        match scope {
            Scope::Read => 1,
            Scope::Reserve => 2,
            Scope::Stock => 4,
            Scope::Admin => 8,
        }
    }

    pub fn of(scopes: &[Scope]) -> Scopes {
        Scopes(scopes.iter().fold(0, |bits, s| bits | Scopes::bit(*s)))
    }

    /// Whether a key with these scopes may do what `need` allows: `admin` implies every
    /// other scope.
    pub fn allow(self, need: Scope) -> bool {
        self.0 & (Scopes::bit(need) | Scopes::bit(Scope::Admin)) != 0
    }
}

/// The SHA-256 of a secret: all that is kept of it.
pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// A new secret: `stk_` and 64 hex digits of 32 bytes from the OS's random source.
pub fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no random bytes for a secret: {e}")))?;
    let mut secret = String::with_capacity(SECRET_PREFIX.len() + 64);
    secret.push_str(SECRET_PREFIX);
    for b in bytes {
        secret.push_str(&format!("{b:02x}"));
    }
    Ok(secret)
}

/// The bootstrap admin key, as configured (never logged: its `Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminKey(String);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

impl AdminKey {
    /// Checks a configured admin key: 16 to 256 visible ASCII characters (what a bearer
    /// token may hold; no space).
    pub fn new(value: &str) -> std::result::Result<AdminKey, String> {
        if value.is_empty() {
            return Err("the admin key is empty".into());
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the admin key must be visible ASCII characters (no space or control character)"
                    .into(),
            );
        }
        if value.len() < ADMIN_KEY_CHARS_MIN || value.len() > ADMIN_KEY_CHARS_MAX {
            return Err(format!(
                "the admin key is {} characters; it must be {ADMIN_KEY_CHARS_MIN} to \
                 {ADMIN_KEY_CHARS_MAX}",
                value.len()
            ));
        }
        Ok(AdminKey(value.to_string()))
    }

    /// The secret, as a request presents it.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

/// Who made a request: a key (its id and scopes), or nobody while the server runs open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `None`: the server runs open.
    pub id: Option<KeyId>,
    pub scopes: Scopes,
}

/// Why a request is not authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No secret was presented.
    Missing,
    /// A secret that names no key (unknown or revoked).
    Unknown,
}

#[derive(Default)]
struct Table {
    /// Secret hash → the key's id and scopes: the request path's lookup.
    by_hash: HashMap<[u8; 32], (KeyId, Scopes), foldhash::fast::RandomState>,
    keys: BTreeMap<KeyId, ApiKey>,
}

impl Table {
    fn insert(&mut self, key: ApiKey) {
        self.by_hash
            .insert(key.secret_hash, (key.id, Scopes::of(&key.scopes)));
        self.keys.insert(key.id, key);
    }
}

/// The live key table (one per server, shared by every request).
pub struct Keyring {
    table: RwLock<Table>,
    bootstrap: Option<[u8; 32]>,
    enforced: AtomicBool,
    /// Held while a change is logged and applied: one change at a time.
    changes: tokio::sync::Mutex<()>,
    /// Where key records go: fixed on a single node; on a cluster node, each epoch of its
    /// leadership brings its own (`begin_epoch`).
    log: RwLock<Journal>,
    /// The time key changes are stamped with (a cluster leader's epoch's clock, which
    /// never runs behind the log, while it serves).
    clock: RwLock<SharedClock>,
}

impl Keyring {
    /// The table of the recovered `keys`, with the bootstrap key if one is configured.
    pub fn new(
        keys: impl IntoIterator<Item = ApiKey>,
        bootstrap: Option<&AdminKey>,
        log: impl Into<Journal>,
        clock: SharedClock,
    ) -> Keyring {
        let mut table = Table::default();
        keys.into_iter().for_each(|k| table.insert(k));
        let enforced = bootstrap.is_some() || !table.keys.is_empty();
        Keyring {
            table: RwLock::new(table),
            bootstrap: bootstrap.map(|k| secret_hash(k.secret().as_bytes())),
            enforced: AtomicBool::new(enforced),
            changes: tokio::sync::Mutex::new(()),
            log: RwLock::new(log.into()),
            clock: RwLock::new(clock),
        }
    }

    /// Whether requests need a key (see the module's documentation).
    pub fn enforced(&self) -> bool {
        self.enforced.load(Ordering::Relaxed)
    }

    /// Whether a bootstrap admin key is configured.
    pub fn has_bootstrap(&self) -> bool {
        self.bootstrap.is_some()
    }

    /// The key a bearer secret names. Call only when `enforced`.
    pub fn authenticate(
        &self,
        secret: Option<&[u8]>,
    ) -> std::result::Result<Caller, Unauthenticated> {
        let secret = secret.ok_or(Unauthenticated::Missing)?;
        let hash = secret_hash(secret);
        if let Some(bootstrap) = &self.bootstrap {
            if bool::from(bootstrap.ct_eq(&hash)) {
                return Ok(Caller {
                    id: Some(BOOTSTRAP_KEY_ID),
                    scopes: Scopes::ALL,
                });
            }
        }
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match table.by_hash.get_key_value(&hash) {
            Some((stored, (id, scopes))) if bool::from(stored.ct_eq(&hash)) => Ok(Caller {
                id: Some(*id),
                scopes: *scopes,
            }),
            _ => Err(Unauthenticated::Unknown),
        }
    }

    /// Every stored key, oldest first (ids are UUID v7); the bootstrap key is not stored.
    pub fn list(&self) -> Vec<ApiKey> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<ApiKey> = table.keys.values().cloned().collect();
        keys.sort_by_key(|k| (k.created_at, k.id));
        keys
    }

    /// Creates a key; answers it and its secret (shown this once) once its record is
    /// durable. Turns authentication on if it was off.
    pub async fn create(
        &self,
        name: String,
        scopes: Vec<Scope>,
        by: Option<KeyId>,
    ) -> Result<(ApiKey, String)> {
        let secret = new_secret()?;
        let _one_at_a_time = self.changes.lock().await;
        let key = ApiKey {
            id: uuid::Uuid::now_v7(),
            name,
            scopes,
            secret_hash: secret_hash(secret.as_bytes()),
            created_at: self.now_ms(),
        };
        self.persist(Record::KeyCreated {
            key: key.clone(),
            by,
        })
        .await?;
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        self.enforced.store(true, Ordering::Relaxed);
        tracing::info!(id = %key.id, name = %key.name, by = ?by, "API key created");
        Ok((key, secret))
    }

    /// Revokes a stored key once its record is durable; `KeyNotFound` for any other id.
    pub async fn revoke(&self, id: KeyId, by: Option<KeyId>) -> Result<()> {
        let _one_at_a_time = self.changes.lock().await;
        if !self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .contains_key(&id)
        {
            return Err(Error::KeyNotFound { id: id.to_string() });
        }
        let at: Millis = self.now_ms();
        self.persist(Record::KeyRevoked { id, at, by }).await?;
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = table.keys.remove(&id) {
            table.by_hash.remove(&key.secret_hash);
        }
        drop(table);
        tracing::info!(%id, by = ?by, "API key revoked");
        Ok(())
    }

    /// Appends `record` and waits until it is durable.
    async fn persist(&self, record: Record) -> Result<()> {
        let log = self.log.read().unwrap_or_else(|e| e.into_inner()).clone();
        if !log.is_healthy() {
            return Err(Error::Unavailable(
                "the write-ahead log cannot be written; keys cannot change".into(),
            ));
        }
        log.append(record).durable().await?;
        Ok(())
    }

    fn now_ms(&self) -> Millis {
        self.clock
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .now_ms()
    }

    /// A cluster node that does not serve keeps its table to the committed `keys`, so
    /// that it authenticates what the leader would (its journal is left as it is).
    pub async fn replace_keys(&self, keys: impl IntoIterator<Item = ApiKey>) {
        let _one_at_a_time = self.changes.lock().await;
        let mut table = Table::default();
        keys.into_iter().for_each(|k| table.insert(k));
        if !table.keys.is_empty() {
            self.enforced.store(true, Ordering::Relaxed);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    /// A cluster node's leadership begins an epoch: the table becomes the `keys` of the
    /// committed state it starts from, key changes go to `log`, the epoch's journal, and
    /// are stamped by `clock`, the epoch's.
    /// Waits for a change in progress (which ends with its own epoch's answer), so no
    /// change decided on the previous epoch's table reaches this one.
    pub async fn begin_epoch(
        &self,
        keys: impl IntoIterator<Item = ApiKey>,
        log: Journal,
        clock: SharedClock,
    ) {
        let _one_at_a_time = self.changes.lock().await;
        let mut table = Table::default();
        keys.into_iter().for_each(|k| table.insert(k));
        if !table.keys.is_empty() {
            self.enforced.store(true, Ordering::Relaxed);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        *self.log.write().unwrap_or_else(|e| e.into_inner()) = log;
        *self.clock.write().unwrap_or_else(|e| e.into_inner()) = clock;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_every_scope_and_others_only_themselves() {
        for need in Scope::ALL {
            assert!(Scopes::of(&[Scope::Admin]).allow(need));
            assert!(Scopes::ALL.allow(need));
            for has in Scope::ALL {
                let allowed = Scopes::of(&[has]).allow(need);
                assert_eq!(
                    allowed,
                    has == need || has == Scope::Admin,
                    "{has:?} {need:?}"
                );
            }
        }
        assert!(!Scopes::of(&[]).allow(Scope::Read));
        assert!(Scopes::of(&[Scope::Read, Scope::Stock]).allow(Scope::Stock));
    }

    #[test]
    fn scope_names_match_serde() {
        for scope in Scope::ALL {
            assert_eq!(
                serde_json::to_value(scope).unwrap(),
                serde_json::Value::from(scope.as_str())
            );
        }
    }

    /// The bit set agrees with `ApiKey::grants` for every key of one or two scopes.
    #[test]
    fn scope_sets_agree_with_the_keys_own_rule() {
        for a in Scope::ALL {
            for b in Scope::ALL {
                let key = ApiKey {
                    id: uuid::Uuid::nil(),
                    name: "k".into(),
                    scopes: vec![a, b],
                    secret_hash: [0; 32],
                    created_at: 0,
                };
                for need in Scope::ALL {
                    assert_eq!(Scopes::of(&key.scopes).allow(need), key.grants(need));
                }
            }
        }
    }

    #[test]
    fn secrets_are_fresh_and_well_formed() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), SECRET_PREFIX.len() + 64);
        assert!(a.starts_with(SECRET_PREFIX));
        assert!(a[SECRET_PREFIX.len()..]
            .bytes()
            .all(|c| c.is_ascii_hexdigit()));
        assert!(
            AdminKey::new(&a).is_ok(),
            "a made secret is a valid admin key"
        );
    }

    #[test]
    fn admin_keys_are_checked() {
        assert!(AdminKey::new("").is_err());
        assert!(AdminKey::new("short").is_err());
        assert!(AdminKey::new("fifteen-chars-x").is_err());
        assert!(AdminKey::new("sixteen-chars-xx").is_ok());
        assert!(AdminKey::new("has a space in it, long enough").is_err());
        assert!(AdminKey::new(&"x".repeat(257)).is_err());
        assert_eq!(
            format!("{:?}", AdminKey::new("sixteen-chars-xx").unwrap()),
            "AdminKey(..)"
        );
    }
}
