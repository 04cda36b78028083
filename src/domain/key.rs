//! API keys: who may make which requests. The secret itself is never kept, only its
//! SHA-256, so a copy of the data directory does not hand out working keys.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;

/// An API key's id. Every logged change names the key that made it (`None` when the server
/// runs open, and for changes the server makes itself: expiries, retention).
pub type KeyId = Uuid;

/// What a key may do. `Admin` implies every other scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GET and HEAD endpoints, `/metrics`.
    Read,
    /// Create, confirm, cancel and extend reservations.
    Reserve,
    /// Create, change and delete products; replenish; adjust.
    Stock,
    /// Keys and snapshots; implies all the others.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Reserve, Scope::Stock, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Reserve => "reserve",
            Scope::Stock => "stock",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

/// A key as the log and snapshots keep it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: KeyId,
    pub name: String,
    pub scopes: Vec<Scope>,
    /// SHA-256 of the secret (the bearer token).
    pub secret_hash: [u8; 32],
    pub created_at: Millis,
}

impl ApiKey {
    /// Whether the key grants `scope` (`admin` grants all).
    pub fn grants(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|&have| have == scope || have == Scope::Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_every_scope_and_others_only_themselves() {
        let key = |scopes: Vec<Scope>| ApiKey {
            id: Uuid::nil(),
            name: "k".into(),
            scopes,
            secret_hash: [0; 32],
            created_at: 0,
        };
        let admin = key(vec![Scope::Admin]);
        assert!(Scope::ALL.iter().all(|&s| admin.grants(s)));
        let reader = key(vec![Scope::Read]);
        assert!(reader.grants(Scope::Read));
        assert!(!reader.grants(Scope::Reserve) && !reader.grants(Scope::Admin));
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("Admin"), None);
    }
}
