//! Moving a log written by an earlier stockd (one sled database directly in the log
//! directory, a tree per segment) to a database per segment, when it is opened.

use std::fs;
use std::path::Path;

use crate::storage::snapshot::sync_dir;

use super::*;

/// Moves a log written by an earlier stockd (one sled database directly in `dir`, a tree
/// `wal` or `wal-<first>` per segment, the mark in a tree `meta`) to a database per
/// segment. Crash-safe: the old database is removed only after every record and the mark
/// are durable in the new layout, and its `db` file goes first; until then, the next open
/// starts the move again from scratch. Segments of `segment_records` records, moved
/// `batch_keys` records per sled batch.
pub(super) fn migrate_single_database(
    segments: &Segments,
    segment_records: u64,
    batch_keys: usize,
) -> Result<(), OpenError> {
    let dir = &segments.dir;
    let (db_file, conf_file) = (dir.join("db"), dir.join("conf"));
    if !db_file.is_file() {
        if conf_file.is_file() {
            remove_single_database_leftovers(dir); // a move that ended after its `db` went
        }
        return Ok(());
    }
    tracing::info!(dir = %dir.display(), "moving the log to one database per segment");
    for slot in segments.list() {
        segments.remove(slot.first)?; // left by an interrupted move
    }
    // As a segment is opened: sled's lock on the old database can outlast its last close
    // by a moment (or be held by a child process forked meanwhile, until it execs).
    let old = open_sled(dir)?;
    let meta = old.open_tree("meta").map_err(sled_err(dir))?;
    let mark = match meta.get(b"truncated_through").map_err(sled_err(dir))? {
        Some(bytes) => seq_of(&bytes)?,
        None => 0,
    };
    let mut trees = Vec::new();
    for name in old.tree_names() {
        let text = String::from_utf8_lossy(&name).into_owned();
        if text == "wal" || text.starts_with("wal-") {
            let tree = old.open_tree(&name).map_err(sled_err(dir))?;
            if let Some((key, _)) = tree.first().map_err(sled_err(dir))? {
                trees.push((seq_of(&key)?, tree));
            }
        }
    }
    trees.sort_by_key(|(first, _)| *first);
    let mut moved = 0u64;
    let mut current: Option<SegmentRef> = None;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for (_, tree) in &trees {
        for item in tree.iter() {
            let (key, value) = item.map_err(sled_err(dir))?;
            let seq = seq_of(&key)?;
            let full = current
                .as_ref()
                .is_none_or(|s| seq >= s.first() + segment_records);
            if full || in_batch == batch_keys {
                if let Some(segment) = &current {
                    let batch = std::mem::take(&mut batch);
                    segment.db().apply_batch(batch).map_err(sled_err(dir))?;
                    segment.db().flush().map_err(sled_err(dir))?;
                    in_batch = 0;
                }
            }
            if full {
                current = Some(segments.create(seq)?);
            }
            batch.insert(key, value);
            in_batch += 1;
            moved += 1;
        }
    }
    if let Some(segment) = &current {
        segment.db().apply_batch(batch).map_err(sled_err(dir))?;
        segment.db().flush().map_err(sled_err(dir))?;
    }
    drop(current);
    segments.raise_mark(mark, None)?;
    drop((meta, trees, old));
    sync_dir(dir).map_err(io_err(dir))?;
    fs::remove_file(&db_file).map_err(io_err(&db_file))?;
    sync_dir(dir).map_err(io_err(dir))?;
    remove_single_database_leftovers(dir);
    tracing::info!(records = moved, "log moved to one database per segment");
    Ok(())
}

/// What is left of a single-database log once its `db` file is gone (best effort: none of
/// it is read again).
pub(super) fn remove_single_database_leftovers(dir: &Path) {
    let _ = fs::remove_file(dir.join("conf"));
    let _ = fs::remove_dir_all(dir.join("blobs"));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}
