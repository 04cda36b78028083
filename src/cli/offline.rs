//! The operator's offline commands (the server stopped) and the snapshot worker's entry.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use super::{OfflineSnapshotArgs, WorkerArgs};
use crate::storage::log::OpenError;
use crate::storage::snapshotter::{take_offline, TakeError};

/// Prints `value` as JSON, or `text` for people.
fn print(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(out) => println!("{out}"),
            Err(err) => eprintln!("stockd: {err}"),
        }
    } else {
        print!("{}", text());
    }
}

/// The error, with the usual cause of a log that is in use: a server has it open.
fn explain(err: &dyn std::error::Error, log: Option<&OpenError>) -> String {
    match log {
        Some(OpenError::Locked { .. }) => {
            format!("{err}: is a server running on this data directory? Stop it first")
        }
        _ => err.to_string(),
    }
}

pub(super) fn offline_snapshot(args: OfflineSnapshotArgs) -> ExitCode {
    let now = chrono::Utc::now().timestamp_millis();
    let log_dir = args.data_dir.join("log");
    if !log_dir.exists() {
        eprintln!("stockd: no log in {}", log_dir.display());
        return ExitCode::FAILURE;
    }
    // A snapshot past the change feed's store would leave records whose events the next
    // start could not derive: the store is first brought up to the log's end, as start-up
    // does (recovery's fold, with the feed's catch-up), and the snapshot never passes it.
    let events_dir = args.data_dir.join("events");
    let snapshot_dir = args.snapshot_dir.clone();
    let ceiling = |reader: &crate::storage::log::LogReader| -> std::io::Result<Option<u64>> {
        if !events_dir.exists() {
            return Ok(None);
        }
        let retention = crate::feed::retention_default();
        let mut store = crate::feed::store::Store::open(&events_dir, 0, retention)?;
        let mut catchup = crate::feed::Catchup::new(&mut store);
        let recovered = crate::storage::recovery::recover_observed(
            reader,
            &snapshot_dir,
            u64::MAX,
            Some(&mut catchup),
        )
        .map_err(std::io::Error::other)?;
        let snapshot_seq = recovered.snapshot.as_ref().map_or(0, |s| s.seq);
        catchup.finish(snapshot_seq, recovered.last_seq)?;
        Ok(Some(store.through()))
    };
    match take_offline(
        &log_dir,
        &args.snapshot_dir,
        args.snapshots_keep as usize,
        now,
        &ceiling,
    ) {
        Ok(taken) => {
            print(args.json, &taken, || {
                format!(
                    "{} {} after log record {} ({} bytes, {} records folded, {} log records dropped, {} ms)\n",
                    if taken.created { "wrote" } else { "already current:" },
                    args.snapshot_dir.join(&taken.file).display(),
                    taken.sequence,
                    taken.size_bytes,
                    taken.records_folded,
                    taken.log_records_dropped,
                    taken.elapsed_ms
                )
            });
            ExitCode::SUCCESS
        }
        Err(err) => {
            let log = match &err {
                TakeError::Log(log) => Some(log),
                _ => None,
            };
            eprintln!("stockd: {}", explain(&err, log));
            ExitCode::FAILURE
        }
    }
}

pub(super) fn inspect_snapshot(file: &std::path::Path, json: bool) -> ExitCode {
    match crate::storage::snapshot::inspect(file) {
        Ok(report) => {
            print(json, &report, || report.to_string());
            ExitCode::SUCCESS
        }
        Err(err) => {
            if json {
                print(
                    true,
                    &serde_json::json!({"file": file, "valid": false, "error": err.to_string()}),
                    String::new,
                );
            }
            eprintln!("stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

pub(super) fn dump_log(data_dir: &std::path::Path, records: bool, json: bool) -> ExitCode {
    let log_dir = data_dir.join("log");
    if !log_dir.exists() {
        eprintln!("stockd: no log in {}", log_dir.display());
        return ExitCode::FAILURE;
    }
    let log = match crate::storage::log::Log::open(&log_dir) {
        Ok(log) => log,
        Err(err) => {
            eprintln!("stockd: {}", explain(&err, Some(&err)));
            return ExitCode::FAILURE;
        }
    };
    let reader = log.reader();
    if records {
        for item in reader.records() {
            match item {
                Ok((seq, record)) => {
                    let line =
                        serde_json::json!({"seq": seq, "kind": record.kind(), "record": record});
                    println!("{line}");
                }
                Err(err) => {
                    eprintln!("stockd: {err}");
                    return ExitCode::FAILURE;
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    match reader.summary() {
        Ok(summary) => {
            print(json, &summary, || summary.to_string());
            if summary.damaged_at.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `stockd snapshot-worker`: one snapshot for the server that started this process.
pub(super) fn snapshot_worker(args: WorkerArgs) -> ExitCode {
    if let Some(parent) = args.parent_pid {
        if let Err(err) = crate::storage::snapshot_worker::die_with_parent(parent) {
            let _ = writeln!(std::io::stderr(), "snapshot worker: {err}");
            return ExitCode::FAILURE;
        }
    }
    let job = crate::storage::snapshot_worker::Job {
        snapshot_dir: args.snapshot_dir,
        upto: args.upto,
        truncated_through: args.truncated_through,
        now: args.now,
        pause_before_rename: args.pause_before_rename_ms.map(Duration::from_millis),
        entries: args.entries,
        expect_raft: None,
    };
    let job = match args.expect_raft.as_deref().map(serde_json::from_str) {
        None => job,
        Some(Ok(raft)) => crate::storage::snapshot_worker::Job {
            expect_raft: Some(raft),
            ..job
        },
        Some(Err(err)) => {
            let _ = writeln!(std::io::stderr(), "snapshot worker: --expect-raft: {err}");
            return ExitCode::FAILURE;
        }
    };
    match crate::storage::snapshot_worker::run(&job, std::io::stdin(), std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "{err}");
            ExitCode::FAILURE
        }
    }
}
