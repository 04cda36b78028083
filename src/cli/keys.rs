//! `stockd keys`: API keys of a stopped server's data (create, list, revoke).
//!
//! Like `stockd snapshot`, these open the log, which a running server holds locked: they
//! are refused then, naming the likely cause. The keys are read from the recovered state
//! (the newest snapshot and the log after it); a change is one record appended to the log
//! and flushed before the command reports it, exactly as the server would write it
//! (`by`: none, the operator at the console).

use std::path::Path;
use std::process::ExitCode;

use super::KeysArgs;
use crate::clock::rfc3339;
use crate::keyring::{secret_hash, ApiKey, KeyId};
use crate::storage::log::{Log, OpenError};
use crate::storage::record::Record;
use crate::storage::recovery;

/// What `stockd keys` was asked to do.
pub(super) enum Action {
    Create { name: String, scopes: Vec<String> },
    List,
    Revoke { id: String },
}

pub(super) fn keys(action: Action, args: KeysArgs) -> ExitCode {
    match run(action, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(action: Action, args: &KeysArgs) -> Result<(), String> {
    let log_dir = args.data_dir.join("log");
    if let Action::Create { name, scopes } = &action {
        // Validated as `POST /v1/admin/keys` validates it, before anything is opened.
        let body = serde_json::json!({"name": name, "scopes": scopes});
        let input = crate::http::input::create_key(&body).map_err(|p| p.detail)?;
        std::fs::create_dir_all(&args.data_dir)
            .map_err(|e| format!("cannot create directory {}: {e}", args.data_dir.display()))?;
        let (log, keys, last_seq) = open(&log_dir, &args.snapshot_dir)?;
        let secret = crate::keyring::new_secret().map_err(|e| e.to_string())?;
        let key = ApiKey {
            id: uuid::Uuid::now_v7(),
            name: input.name,
            scopes: input.scopes,
            secret_hash: secret_hash(secret.as_bytes()),
            created_at: chrono::Utc::now().timestamp_millis(),
        };
        drop(keys);
        append(
            log,
            last_seq,
            Record::KeyCreated {
                key: key.clone(),
                by: None,
            },
        )?;
        if args.json {
            let mut view = view(&key);
            view["secret"] = secret.into();
            println!("{view:#}");
        } else {
            println!("created key {} ({})", key.id, key.name);
            println!("scopes: {}", scopes_text(&key));
            println!("secret: {secret}");
            println!("(the secret is shown this once: only its SHA-256 is kept)");
        }
        return Ok(());
    }
    if !log_dir.exists() {
        return Err(format!("no log in {}", log_dir.display()));
    }
    let (log, keys, last_seq) = open(&log_dir, &args.snapshot_dir)?;
    match action {
        Action::Create { .. } => unreachable!("handled above"),
        Action::List => {
            let mut keys: Vec<&ApiKey> = keys.values().collect();
            keys.sort_by_key(|k| (k.created_at, k.id));
            if args.json {
                let items: Vec<serde_json::Value> = keys.iter().map(|k| view(k)).collect();
                println!("{:#}", serde_json::json!({ "items": items }));
            } else if keys.is_empty() {
                println!("no keys");
            } else {
                for key in keys {
                    println!(
                        "{}  {}  {}  {}",
                        key.id,
                        rfc3339(key.created_at),
                        scopes_text(key),
                        key.name
                    );
                }
            }
            log.flush().map_err(|e| e.to_string())?;
            Ok(())
        }
        Action::Revoke { id } => {
            let known = KeyId::parse_str(&id)
                .ok()
                .filter(|id| keys.contains_key(id));
            let Some(id) = known else {
                return Err(format!("no stored API key has the id {id}"));
            };
            let at = chrono::Utc::now().timestamp_millis();
            append(log, last_seq, Record::KeyRevoked { id, at, by: None })?;
            println!("revoked key {id}");
            Ok(())
        }
    }
}

fn view(key: &ApiKey) -> serde_json::Value {
    serde_json::json!({
        "id": key.id.to_string(),
        "name": key.name,
        "scopes": key.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "created_at": rfc3339(key.created_at),
    })
}

fn scopes_text(key: &ApiKey) -> String {
    key.scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The keys of a recovered state.
type Keys = std::collections::BTreeMap<KeyId, ApiKey>;

/// The log, the keys of its recovered state, and the sequence of the last record
/// (recovered, or in the log: what the server would continue after).
fn open(log_dir: &Path, snapshot_dir: &Path) -> Result<(Log, Keys, u64), String> {
    let log = Log::open(log_dir).map_err(|err| match err {
        OpenError::Locked { .. } => {
            format!("{err}: is a server running on this data directory? Stop it first")
        }
        err => err.to_string(),
    })?;
    let recovered = recovery::recover(&log.reader(), snapshot_dir, u64::MAX)
        .map_err(|e| format!("cannot read the keys: {e}"))?;
    let last_seq = log
        .last_seq()
        .map_err(|e| e.to_string())?
        .max(recovered.last_seq);
    Ok((log, recovered.state.keys, last_seq))
}

/// Appends one record after record `last_seq` and waits until it is flushed.
fn append(log: Log, last_seq: u64, record: Record) -> Result<(), String> {
    let (handle, writer) = log.start_writer(last_seq + 1).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let written = runtime.block_on(async {
        handle.append(record).durable().await?;
        handle.shutdown().await
    });
    let _ = writer.join();
    written
        .map(drop)
        .map_err(|e| format!("cannot write the log: {e}"))
}
