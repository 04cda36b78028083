//! Snapshot files: the complete state after log record S, so recovery reads one file and
//! the log after S instead of the whole log.
//!
//! One file per snapshot, named `snapshot-<S, 20 digits>.snap` so names sort by sequence.
//! Layout (integers little-endian):
//!
//! ```text
//! magic "STOCKDSN" (8) | format version u8 | crc32 u32 | seq u64 | created_at i64 |
//! body_len u64 | body
//! ```
//!
//! The body, by format version (bincode 2, standard config):
//!
//! | format | body | written by |
//! | --- | --- | --- |
//! | 1 | `legacy::StateV1`: products and reservations before sale rules and API keys | builds before sale rules; read only |
//! | 2 | `legacy::StateV2`: sale rules, per-buyer counts, API keys | a single node, before the low-stock threshold; read only |
//! | 3 | `legacy::StateV2`, then `entry::RaftMeta` | a replicated node, before the low-stock threshold (replication was dormant: no release wrote it); read only |
//! | 4 | `legacy::StateV4` (products with their low-stock threshold), then `Option<entry::RaftMeta>` | every node whose state has no webhooks (a single server always) |
//! | 5 | `fold::State` (format 4's and a cluster's webhooks), then `Option<entry::RaftMeta>` | a cluster node whose state has webhooks |
//!
//! Format 5 added a cluster's webhooks after the API keys, and is written only when there
//! are some: a state without (every single server's) is still written as format 4, so
//! that a server taken back to a build before format 5 still reads its snapshots.
//!
//! Format 4 added the low-stock threshold to each product. It is one format for a single
//! node and a replicated one alike (the Raft metadata is `None` on a single node, one byte),
//! so that the next change of the body is one new format, not one per role: formats 2 and
//! 3 differed only by the metadata, and a new body would otherwise have needed two new
//! numbers again. A file's format is told by its version byte alone, so no file of one
//! format is ever read as another; older files are turned into today's state as they are
//! decoded (`storage::legacy`), with no threshold (and, from format 1, no rules, counts
//! or keys).
//!
//! The checksum covers the body and then the three header fields after it, so a flipped
//! byte anywhere but the magic is caught (a damaged magic or version is refused too). The
//! body is streamed to a temporary file through the checksum, the header patched in,
//! the file fsynced, renamed into place, and the directory fsynced: a snapshot file either
//! is complete and verifiable, or is not there. A reader checks the checksum before it
//! decodes, so a damaged length prefix can never make it allocate wildly.
//!
//! Which snapshot recovery uses, and when snapshots are taken, is `crate::storage::snapshotter`'s
//! business; this module only writes, reads, lists and prunes files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock::Millis;
use crate::storage::entry::RaftMeta;
use crate::storage::fold::State;
use crate::storage::legacy;

/// The newest snapshot format, written for a state that has webhooks (a cluster's); a
/// state without them, every single node's, is written as format 4 (`SNAPSHOT_FORMAT_V4`).
/// In both, `State::raft` follows the state (`None` on a single node). Formats 1 to 3 are
/// still read.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 5;
/// The format of a state without webhooks (the module's documentation).
pub const SNAPSHOT_FORMAT_V4: u8 = 4;
const MAGIC: &[u8; 8] = b"STOCKDSN";
const HEADER_BYTES: usize = 8 + 1 + 4 + 8 + 8 + 8;
const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".snap";
const TEMP_PREFIX: &str = ".tmp-snapshot-";

/// A snapshot file on disk, as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The state is exactly the fold of log records 1..=seq.
    pub seq: u64,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub created_at: Millis,
    /// The file's format version (older versions are still read).
    pub format_version: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is not a stockd snapshot (bad magic)")]
    Magic { path: String },
    #[error("{path} has unknown snapshot format version {version}")]
    Version { path: String, version: u8 },
    #[error("{path} is truncated: {len} bytes, its header says {expected}")]
    Truncated {
        path: String,
        len: u64,
        expected: u64,
    },
    #[error("{path} fails its checksum (damaged)")]
    Checksum { path: String },
    #[error("{path} says sequence {inside}, its name says {named}")]
    Misnamed {
        path: String,
        inside: u64,
        named: u64,
    },
    #[error("{path} cannot be decoded: {detail}")]
    Decode { path: String, detail: String },
}

/// The file name of the snapshot after record `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{PREFIX}{seq:020}{SUFFIX}")
}

/// The sequence number a snapshot file name stands for.
pub fn seq_of_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Snapshot files in `dir`, newest (highest sequence) first. Temporary files are ignored.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(seq_of_name) {
            found.push((seq, entry.path()));
        }
    }
    found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    Ok(found)
}

/// Bytes written between two `sync_data` calls while a snapshot is written. Without
/// them the whole file would be dirty in the page cache until the final fsync, which then
/// writes it all at once and makes the log's own flushes (the latency of every `sync`
/// acknowledgement) wait behind it.
const SYNC_EVERY_BYTES: u64 = 1 << 20;
/// The pace of snapshot writing: the disk is shared with the log's flushes, which are in
/// every sync request's latency. 64 MB/s writes a 160 MB snapshot (1M products and 1M
/// reservations) in 2.5 s, and leaves the disk to the log between chunks.
const WRITE_BYTES_PER_SECOND: u64 = 64 << 20;

/// A writer that checksums and counts what passes through it, and syncs as it goes.
struct Checksummed<'a> {
    inner: BufWriter<&'a mut File>,
    hasher: crc32fast::Hasher,
    bytes: u64,
    synced_at: u64,
    started: std::time::Instant,
}

impl Write for Checksummed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        if self.bytes - self.synced_at >= SYNC_EVERY_BYTES {
            self.inner.flush()?;
            self.inner.get_ref().sync_data()?;
            self.synced_at = self.bytes;
            let due = Duration::from_secs_f64(self.bytes as f64 / WRITE_BYTES_PER_SECOND as f64);
            if let Some(early) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(early);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn trailer_fields(seq: u64, created_at: Millis, body_len: u64) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..16].copy_from_slice(&created_at.to_le_bytes());
    out[16..].copy_from_slice(&body_len.to_le_bytes());
    out
}

/// Test hook: pause this long after the body is written, before the file is complete
/// (so a test can kill the process while a snapshot is being written).
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteHooks {
    pub pause_before_rename: Option<Duration>,
}

/// Writes `state` (the fold of records 1..=seq) as a snapshot in `dir`: temporary file,
/// fsync, rename, directory fsync. An existing snapshot of the same sequence is replaced.
pub fn write(
    dir: &Path,
    seq: u64,
    state: &State,
    created_at: Millis,
    hooks: WriteHooks,
) -> io::Result<SnapshotInfo> {
    fs::create_dir_all(dir)?;
    let final_path = dir.join(file_name(seq));
    let temp_path = dir.join(format!("{TEMP_PREFIX}{seq:020}-{}", std::process::id()));
    // bincode encodes a pair as its two members one after the other: the state's body
    // (without `raft`, which it skips), then the metadata, `None` on a single node.
    let format_version = format_of(state);
    let result = if format_version == SNAPSHOT_FORMAT_V4 {
        let body = legacy::StateV4 {
            products: &state.products,
            reservations: &state.reservations,
            idempotency: &state.idempotency,
            keys: &state.keys,
        };
        write_temp(
            &temp_path,
            seq,
            &(body, &state.raft),
            format_version,
            created_at,
            hooks,
        )
    } else {
        write_temp(
            &temp_path,
            seq,
            &(state, &state.raft),
            format_version,
            created_at,
            hooks,
        )
    };
    let size_bytes = match result {
        Ok(size) => size,
        Err(err) => {
            let _ = fs::remove_file(&temp_path);
            return Err(err);
        }
    };
    fs::rename(&temp_path, &final_path)?;
    sync_dir(dir)?;
    Ok(SnapshotInfo {
        seq,
        path: final_path,
        size_bytes,
        created_at,
        format_version,
    })
}

/// The format `state` is written in: 5 with webhooks, 4 without.
pub fn format_of(state: &State) -> u8 {
    if state.webhooks == crate::domain::WebhookBook::default() {
        SNAPSHOT_FORMAT_V4
    } else {
        SNAPSHOT_FORMAT_VERSION
    }
}

/// Writes a snapshot file of `state` in format `version` (the current one, but for tests
/// that write what an older build did).
fn write_temp(
    path: &Path,
    seq: u64,
    state: &impl serde::Serialize,
    version: u8,
    created_at: Millis,
    hooks: WriteHooks,
) -> io::Result<u64> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // The header is written last, once the checksum and length are known; zeros until then
    // make an unfinished file fail verification.
    file.write_all(&[0u8; HEADER_BYTES])?;
    let (mut hasher, body_len) = {
        let mut body = Checksummed {
            inner: BufWriter::with_capacity(1 << 20, &mut file),
            hasher: crc32fast::Hasher::new(),
            bytes: 0,
            synced_at: 0,
            started: std::time::Instant::now(),
        };
        bincode::serde::encode_into_std_write(state, &mut body, bincode::config::standard())
            .map_err(|e| io::Error::other(format!("encoding the snapshot: {e}")))?;
        body.flush()?;
        (body.hasher, body.bytes)
    };
    if let Some(pause) = hooks.pause_before_rename {
        std::thread::sleep(pause);
    }
    let fields = trailer_fields(seq, created_at, body_len);
    hasher.update(&fields);
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.push(version);
    header.extend_from_slice(&hasher.finalize().to_le_bytes());
    header.extend_from_slice(&fields);
    debug_assert_eq!(header.len(), HEADER_BYTES);
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    file.sync_all()?;
    Ok(HEADER_BYTES as u64 + body_len)
}

/// Writes `state` as a snapshot of format 2 (no low-stock threshold), as the builds
/// before format 4 wrote it: for tests that prove old data directories still load.
#[cfg(test)]
pub(crate) fn write_format_2(dir: &Path, seq: u64, state: &State) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join(file_name(seq));
    let body = tests::body_v2(state);
    write_temp(
        &path,
        seq,
        &body,
        legacy::SNAPSHOT_V2,
        0,
        WriteHooks::default(),
    )
    .unwrap();
    path
}

/// Makes the directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// A reader that checksums and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: crc32fast::Hasher,
    read: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: crc32fast::Hasher::new(),
            read: 0,
        }
    }

    /// The file's checksum: the body read, then the header fields after the checksum.
    fn finish(&mut self, header: &[u8; HEADER_BYTES]) -> u32 {
        let mut hasher = std::mem::take(&mut self.hasher);
        hasher.update(&header[13..]);
        hasher.finalize()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// A snapshot file whose header, name and checksum verified, positioned after its header.
struct Verified {
    file: File,
    header: [u8; HEADER_BYTES],
    info: SnapshotInfo,
    name: String,
    body_len: u64,
    stored: u32,
}

/// Opens a snapshot file and verifies magic, version, length, name and checksum, reading
/// the body once without decoding it (so a damaged length prefix can never make a decoder
/// allocate wildly).
fn open_verified(path: &Path) -> Result<Verified, SnapshotError> {
    let name = path.display().to_string();
    let io_err = |source| SnapshotError::Io {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut header = [0u8; HEADER_BYTES];
    if len < HEADER_BYTES as u64 {
        return Err(SnapshotError::Truncated {
            path: name,
            len,
            expected: HEADER_BYTES as u64,
        });
    }
    file.read_exact(&mut header).map_err(io_err)?;
    let info = verify_header(&name, &header, len)?;
    let body_len = len - HEADER_BYTES as u64;
    let stored = u32::from_le_bytes(header[9..13].try_into().expect("4 bytes"));
    let mut hashing = Hashing::new(io::BufReader::with_capacity(1 << 20, &mut file));
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err)?;
    if hashing.read != body_len || hashing.finish(&header) != stored {
        return Err(SnapshotError::Checksum { path: name });
    }
    if let Some(named) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(seq_of_name)
    {
        if named != info.seq {
            return Err(SnapshotError::Misnamed {
                path: name,
                inside: info.seq,
                named,
            });
        }
    }
    let info = SnapshotInfo {
        path: path.to_path_buf(),
        ..info
    };
    Ok(Verified {
        file,
        header,
        info,
        name,
        body_len,
        stored,
    })
}

/// Verifies a snapshot file (header, name, checksum) without decoding its state: what a
/// server asks of its newest snapshot when a snapshot is asked for again with nothing new
/// (decoding would hold a second copy of the state in the server).
pub fn verify(path: &Path) -> Result<SnapshotInfo, SnapshotError> {
    open_verified(path).map(|verified| verified.info)
}

/// Reads and verifies a snapshot file: magic, version, length, checksum, then decodes.
pub fn read(path: &Path) -> Result<(SnapshotInfo, State), SnapshotError> {
    // Two passes, so that the body never sits in memory beside the state decoded from it
    // (160 MB at a million products, on top of the state, at the peak of start-up): the
    // first checks the checksum, the second decodes while it checksums again (the file is
    // immutable once renamed into place; a change between the passes is still caught).
    let Verified {
        mut file,
        header,
        info,
        name,
        body_len,
        stored,
    } = open_verified(path)?;
    file.seek(SeekFrom::Start(HEADER_BYTES as u64))
        .map_err(|source| SnapshotError::Io {
            path: name.clone(),
            source,
        })?;
    let mut hashing = Hashing::new(io::BufReader::with_capacity(1 << 20, &mut file));
    let decode_err = |e: bincode::error::DecodeError| SnapshotError::Decode {
        path: name.clone(),
        detail: e.to_string(),
    };
    let config = bincode::config::standard();
    let state: State = match info.format_version {
        legacy::SNAPSHOT_V1 => {
            let old: legacy::StateV1 =
                bincode::serde::decode_from_std_read(&mut hashing, config).map_err(decode_err)?;
            old.into()
        }
        legacy::SNAPSHOT_V2 => {
            let old: legacy::StateV2 =
                bincode::serde::decode_from_std_read(&mut hashing, config).map_err(decode_err)?;
            old.into()
        }
        legacy::SNAPSHOT_V3 => {
            let (old, raft): (legacy::StateV2, RaftMeta) =
                bincode::serde::decode_from_std_read(&mut hashing, config).map_err(decode_err)?;
            let mut state = State::from(old);
            state.raft = Some(raft);
            state
        }
        SNAPSHOT_FORMAT_V4 => {
            let (old, raft): (legacy::StateV4, Option<RaftMeta>) =
                bincode::serde::decode_from_std_read(&mut hashing, config).map_err(decode_err)?;
            let mut state = State::from(old);
            state.raft = raft;
            state
        }
        _ => {
            let (mut state, raft): (State, Option<RaftMeta>) =
                bincode::serde::decode_from_std_read(&mut hashing, config).map_err(decode_err)?;
            state.raft = raft;
            state
        }
    };
    debug_assert!(
        info.format_version != legacy::SNAPSHOT_V3 || state.raft.is_some(),
        "format 3 always carries Raft metadata"
    );
    if hashing.read != body_len {
        return Err(SnapshotError::Decode {
            path: name,
            detail: "trailing bytes after the state".into(),
        });
    }
    if hashing.finish(&header) != stored {
        return Err(SnapshotError::Checksum { path: name });
    }
    Ok((info, state))
}

fn verify_header(name: &str, header: &[u8], len: u64) -> Result<SnapshotInfo, SnapshotError> {
    if &header[..8] != MAGIC {
        return Err(SnapshotError::Magic { path: name.into() });
    }
    let format_version = header[8];
    if ![
        legacy::SNAPSHOT_V1,
        legacy::SNAPSHOT_V2,
        legacy::SNAPSHOT_V3,
        SNAPSHOT_FORMAT_V4,
        SNAPSHOT_FORMAT_VERSION,
    ]
    .contains(&format_version)
    {
        return Err(SnapshotError::Version {
            path: name.into(),
            version: header[8],
        });
    }
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let seq = u64_at(13);
    let created_at = u64_at(21) as i64;
    let body_len = u64_at(29);
    let expected = (HEADER_BYTES as u64).saturating_add(body_len);
    if expected != len {
        return Err(SnapshotError::Truncated {
            path: name.into(),
            len,
            expected,
        });
    }
    Ok(SnapshotInfo {
        seq,
        path: PathBuf::from(name),
        size_bytes: len,
        created_at,
        format_version,
    })
}

/// What `stockd snapshot inspect` reports about a file that verifies.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Inspection {
    pub file: String,
    pub valid: bool,
    pub format_version: u8,
    pub sequence: u64,
    pub created_at: String,
    pub size_bytes: u64,
    pub products: usize,
    pub reservations: usize,
    pub reservations_by_status: std::collections::BTreeMap<String, usize>,
    pub idempotency_keys: usize,
    /// Sums over every product.
    pub units_on_hand: u64,
    pub units_reserved: u64,
    pub units_sold: u64,
}

/// Verifies a snapshot file and describes it.
pub fn inspect(path: &Path) -> Result<Inspection, SnapshotError> {
    let (info, state) = read(path)?;
    let mut by_status = std::collections::BTreeMap::new();
    for r in state.reservations.values() {
        *by_status
            .entry(format!("{:?}", r.status).to_lowercase())
            .or_insert(0) += 1;
    }
    let sum = |f: fn(&crate::domain::Product) -> u64| {
        state
            .products
            .values()
            .map(f)
            .fold(0u64, u64::saturating_add)
    };
    Ok(Inspection {
        file: path.display().to_string(),
        valid: true,
        format_version: info.format_version,
        sequence: info.seq,
        created_at: crate::clock::rfc3339(info.created_at),
        size_bytes: info.size_bytes,
        products: state.products.len(),
        reservations: state.reservations.len(),
        reservations_by_status: by_status,
        idempotency_keys: state.idempotency.len(),
        units_on_hand: sum(|p| p.on_hand),
        units_reserved: sum(|p| p.reserved),
        units_sold: sum(|p| p.sold),
    })
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "file:             {} (verified)", self.file)?;
        writeln!(f, "format version:   {}", self.format_version)?;
        writeln!(f, "state after log:  record {}", self.sequence)?;
        writeln!(f, "created at:       {}", self.created_at)?;
        writeln!(f, "size:             {} bytes", self.size_bytes)?;
        writeln!(f, "products:         {}", self.products)?;
        let statuses: Vec<String> = self
            .reservations_by_status
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            f,
            "reservations:     {} ({})",
            self.reservations,
            statuses.join(", ")
        )?;
        writeln!(f, "idempotency keys: {}", self.idempotency_keys)?;
        writeln!(
            f,
            "units:            on_hand {}, reserved {}, sold {}",
            self.units_on_hand, self.units_reserved, self.units_sold
        )
    }
}

/// Removes all but the newest `keep` snapshots, and temporary files left by a crash.
/// Returns the removed snapshot files.
pub fn prune(dir: &Path, keep: usize) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (_, path) in list(dir)?.into_iter().skip(keep) {
        fs::remove_file(&path)?;
        removed.push(path);
    }
    remove_temp_files(dir)?;
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Removes temporary files of snapshots that were never completed.
pub fn remove_temp_files(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX))
        {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Product;

    fn state() -> State {
        let mut s = State::default();
        for i in 0..50 {
            let sku = format!("SKU-{i}");
            s.products
                .insert(sku.clone(), Product::new(sku, "n".into(), None, i, 7));
        }
        s
    }

    /// Snapshots written before reservations and idempotency keys moved from hash maps
    /// to B-trees (format version 1) still load: bincode encodes a map the same way
    /// whichever kind it is.
    #[test]
    fn a_body_encoded_from_hash_maps_decodes_into_the_state() {
        use crate::domain::Reservation;
        use crate::storage::fold::IdempotencyEntry;
        use crate::storage::legacy::{ProductV1, ReservationV1, StateV1};
        use crate::storage::record::IdempotencyKey;
        use std::collections::HashMap;
        use uuid::Uuid;

        #[derive(serde::Serialize)]
        struct Before {
            products: HashMap<String, ProductV1>,
            reservations: HashMap<Uuid, ReservationV1>,
            idempotency: HashMap<IdempotencyKey, IdempotencyEntry>,
        }
        let mut expected = state();
        for n in 1..=20u128 {
            let line = crate::domain::Line {
                sku: format!("SKU-{n}"),
                quantity: 1,
            };
            let r = Reservation::new(Uuid::from_u128(n), "c".into(), vec![line], 1, 2);
            expected.reservations.insert(r.id, r);
            expected.idempotency.insert(
                IdempotencyKey {
                    customer_id: "c".into(),
                    key: n.to_string(),
                },
                IdempotencyEntry {
                    reservation_id: Uuid::from_u128(n),
                    fingerprint: vec![n as u8],
                    created_at: 1,
                },
            );
        }
        let before = Before {
            products: expected
                .products
                .iter()
                .map(|(sku, p)| (sku.clone(), product_v1(p)))
                .collect(),
            reservations: expected
                .reservations
                .iter()
                .map(|(id, r)| (*id, reservation_v1(r)))
                .collect(),
            idempotency: expected.idempotency.clone().into_iter().collect(),
        };
        let body = bincode::serde::encode_to_vec(&before, bincode::config::standard()).unwrap();
        let (decoded, _): (StateV1, usize) =
            bincode::serde::decode_from_slice(&body, bincode::config::standard()).unwrap();
        assert_eq!(State::from(decoded), expected);
    }

    fn product_v1(p: &Product) -> crate::storage::legacy::ProductV1 {
        crate::storage::legacy::ProductV1 {
            sku: p.sku.clone(),
            name: p.name.clone(),
            price: p.price.clone(),
            on_hand: p.on_hand,
            reserved: p.reserved,
            holding: p.holding,
            sold: p.sold,
            version: p.version,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }

    fn reservation_v1(r: &crate::domain::Reservation) -> crate::storage::legacy::ReservationV1 {
        crate::storage::legacy::ReservationV1 {
            id: r.id,
            customer_id: r.customer_id.clone(),
            items: r.items.clone(),
            status: r.status,
            created_at: r.created_at,
            expires_at: r.expires_at,
            original_expires_at: r.original_expires_at,
            confirmed_at: r.confirmed_at,
            order_id: r.order_id.clone(),
        }
    }

    /// A snapshot file of format version 1 (before sale rules and keys) is read, with no
    /// rules, counts or keys; one of today's carries them all.
    #[test]
    fn a_version_1_file_reads_and_version_2_keeps_rules_counts_and_keys() {
        use crate::storage::legacy::StateV1;
        let dir = tempfile::tempdir().unwrap();
        let old = StateV1 {
            products: state()
                .products
                .values()
                .map(|p| (p.sku.clone(), product_v1(p)))
                .collect(),
            ..StateV1::default()
        };
        let path = dir.path().join(file_name(4));
        write_temp(&path, 4, &old, 1, 9, WriteHooks::default()).unwrap();
        let (info, read_back) = read(&path).unwrap();
        assert_eq!((info.seq, info.format_version), (4, 1));
        assert_eq!(read_back, state());
        assert_eq!(inspect(&path).unwrap().format_version, 1);

        let mut new = state();
        let p = new.products.get_mut("SKU-3").unwrap();
        p.rules.max_per_customer = Some(2);
        p.rules.starts_at = Some(100);
        p.hold_for("buyer", 2, 100).unwrap();
        p.settle_hold(2, 100);
        let key = crate::domain::ApiKey {
            id: uuid::Uuid::from_u128(7),
            name: "ops".into(),
            scopes: vec![crate::domain::Scope::Stock],
            secret_hash: [3; 32],
            created_at: 5,
        };
        new.keys.insert(key.id, key);
        let info = write(dir.path(), 5, &new, 10, WriteHooks::default()).unwrap();
        let (info, read_back) = read(&info.path).unwrap();
        assert_eq!(
            info.format_version, SNAPSHOT_FORMAT_V4,
            "no webhooks: format 4"
        );
        assert_eq!(read_back, new);
        assert_eq!(read_back.products["SKU-3"].buyers.held("buyer"), 2);
    }

    /// A cluster's state with webhooks is written as format 5 and read back whole (the
    /// endpoints with their secrets, and the positions); the same state without them is
    /// format 4 again.
    #[test]
    fn a_state_with_webhooks_is_format_5_and_one_without_is_format_4() {
        let dir = tempfile::tempdir().unwrap();
        let mut hooked = state();
        hooked.raft = Some(raft_meta());
        let id = uuid::Uuid::from_u128(9);
        hooked.webhooks.save(crate::domain::Registration {
            id,
            url: "https://shop.example/hooks".into(),
            types: Some(vec!["stock.sold_out".into()]),
            skus: None,
            secret: "whsec_c2VjcmV0".into(),
            created_at: 3,
            started_after_seq: 4,
            failing_since: Some(5),
            disabled: None,
        });
        hooked.webhooks.record(&[(id, 42, 1)]);
        let info = write(dir.path(), 7, &hooked, 12, WriteHooks::default()).unwrap();
        assert_eq!(info.format_version, SNAPSHOT_FORMAT_VERSION);
        let (read_info, read_back) = read(&info.path).unwrap();
        assert_eq!(read_info.format_version, 5);
        assert_eq!(read_back, hooked);
        assert_eq!(read_back.webhooks.positions[&id], (42, 1));

        hooked.webhooks.remove(id);
        assert!(
            hooked.webhooks.positions.is_empty(),
            "a deleted endpoint's position goes"
        );
        let info = write(dir.path(), 8, &hooked, 13, WriteHooks::default()).unwrap();
        assert_eq!(info.format_version, SNAPSHOT_FORMAT_V4);
        assert_eq!(read(&info.path).unwrap().1, hooked);
    }

    fn raft_meta() -> RaftMeta {
        use crate::storage::entry::{loopback_membership, Chain, Epoch, LogPos, StoredMembership};
        RaftMeta {
            last_applied: Some(LogPos { term: 4, seq: 6 }),
            membership: StoredMembership {
                pos: Some(LogPos { term: 1, seq: 1 }),
                membership: loopback_membership(5, &[&[1, 2, 3], &[1, 2, 3, 4, 5]]),
            },
            chain: Chain {
                epoch: Epoch { term: 4, k: 2 },
                next_n: 17,
            },
            clock_floor: 1_795_341_600_123,
        }
    }

    /// A state with Raft metadata is written as format 4 and read back whole, metadata
    /// included; a state without (a single node's) is written as format 4 too, and reads
    /// with no metadata. Damage to the metadata is caught like damage to the state.
    #[test]
    fn a_replicated_state_and_a_single_nodes_are_both_format_4() {
        let dir = tempfile::tempdir().unwrap();
        let single = write(dir.path(), 5, &state(), 10, WriteHooks::default()).unwrap();
        assert_eq!(single.format_version, 4);
        let (info, read_back) = read(&single.path).unwrap();
        assert_eq!(info.format_version, 4);
        assert_eq!(read_back, state());
        assert!(read_back.raft.is_none());

        let mut replicated = state();
        replicated.raft = Some(raft_meta());
        let info = write(dir.path(), 6, &replicated, 11, WriteHooks::default()).unwrap();
        assert_eq!(info.format_version, SNAPSHOT_FORMAT_V4);
        assert!(info.size_bytes > single.size_bytes);
        let (read_info, read_back) = read(&info.path).unwrap();
        assert_eq!(read_info.format_version, 4);
        assert_eq!(read_back, replicated);
        assert_eq!(verify(&info.path).unwrap().format_version, 4);
        assert_eq!(inspect(&info.path).unwrap().format_version, 4);
        // The metadata is covered by the checksum.
        let mut bytes = fs::read(&info.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let other = tempfile::tempdir().unwrap();
        let damaged = other.path().join(file_name(6));
        fs::write(&damaged, &bytes).unwrap();
        assert!(matches!(
            read(&damaged),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    /// The body of snapshot formats 2 and 3 as the builds before format 4 encoded it.
    #[derive(serde::Serialize)]
    pub(super) struct BodyV2 {
        products: std::collections::HashMap<String, crate::storage::legacy::ProductV2>,
        reservations: std::collections::BTreeMap<uuid::Uuid, crate::domain::Reservation>,
        idempotency: std::collections::BTreeMap<
            crate::storage::record::IdempotencyKey,
            crate::storage::fold::IdempotencyEntry,
        >,
        keys: std::collections::BTreeMap<crate::domain::KeyId, crate::domain::ApiKey>,
    }

    pub(super) fn body_v2(s: &State) -> BodyV2 {
        let products = s
            .products
            .iter()
            .map(|(sku, p)| {
                assert_eq!(p.low_stock_threshold(), None, "format 2 has no threshold");
                let old = crate::storage::legacy::ProductV2 {
                    sku: p.sku.clone(),
                    name: p.name.clone(),
                    price: p.price.clone(),
                    on_hand: p.on_hand,
                    reserved: p.reserved,
                    holding: p.holding,
                    sold: p.sold,
                    version: p.version,
                    created_at: p.created_at,
                    updated_at: p.updated_at,
                    rules: *p.rules,
                    buyers: p.buyers.clone(),
                };
                (sku.clone(), old)
            })
            .collect();
        BodyV2 {
            products,
            reservations: s.reservations.clone(),
            idempotency: s.idempotency.clone(),
            keys: s.keys.clone(),
        }
    }

    /// A state with rules, per-buyer counts, a reservation and a key, as formats 2 and 3
    /// could hold it.
    fn rich_state() -> State {
        let mut s = state();
        let p = s.products.get_mut("SKU-3").unwrap();
        p.rules.max_per_customer = Some(2);
        p.rules.starts_at = Some(100);
        p.hold_for("buyer", 2, 100).unwrap();
        p.settle_hold(2, 100);
        let line = crate::domain::Line {
            sku: "SKU-3".into(),
            quantity: 2,
        };
        let mut r = crate::domain::Reservation::new(
            uuid::Uuid::from_u128(3),
            "buyer".into(),
            vec![line],
            100,
            900,
        );
        r.counted.insert(0);
        s.reservations.insert(r.id, r);
        let key = crate::domain::ApiKey {
            id: uuid::Uuid::from_u128(7),
            name: "ops".into(),
            scopes: vec![crate::domain::Scope::Stock],
            secret_hash: [3; 32],
            created_at: 5,
        };
        s.keys.insert(key.id, key);
        s
    }

    /// Files of formats 2 (a single node's) and 3 (a replicated node's, with its Raft
    /// metadata), written as the builds before the low-stock threshold wrote them, still
    /// load whole, with no threshold; today's format 4 keeps the thresholds (and an old
    /// file's bytes are not format 4's: the version byte decides how a body is read).
    #[test]
    fn format_2_and_3_files_still_read_and_format_4_keeps_thresholds() {
        let dir = tempfile::tempdir().unwrap();
        let old = rich_state();
        let path = dir.path().join(file_name(7));
        write_temp(&path, 7, &body_v2(&old), 2, 9, WriteHooks::default()).unwrap();
        let (info, read_back) = read(&path).unwrap();
        assert_eq!((info.seq, info.format_version), (7, 2));
        assert_eq!(read_back, old);
        assert_eq!(read_back.products["SKU-3"].buyers.held("buyer"), 2);
        assert_eq!(inspect(&path).unwrap().format_version, 2);

        let mut replicated = old.clone();
        replicated.raft = Some(raft_meta());
        let path = dir.path().join(file_name(8));
        let body = (body_v2(&old), raft_meta());
        write_temp(&path, 8, &body, 3, 9, WriteHooks::default()).unwrap();
        let (info, read_back) = read(&path).unwrap();
        assert_eq!(info.format_version, 3);
        assert_eq!(read_back, replicated);

        // The same bytes under format 4's number do not pass for a state.
        let path = dir.path().join(file_name(9));
        write_temp(&path, 9, &body_v2(&old), 4, 9, WriteHooks::default()).unwrap();
        assert!(matches!(read(&path), Err(SnapshotError::Decode { .. })));

        let mut new = rich_state();
        new.products
            .get_mut("SKU-3")
            .unwrap()
            .rules
            .set_low_stock_threshold(Some(1));
        new.products
            .get_mut("SKU-4")
            .unwrap()
            .rules
            .set_low_stock_threshold(Some(0));
        let info = write(dir.path(), 10, &new, 10, WriteHooks::default()).unwrap();
        let (_, read_back) = read(&info.path).unwrap();
        assert_eq!(read_back, new);
        assert_eq!(read_back.products["SKU-3"].low_stock_threshold(), Some(1));
        assert_eq!(read_back.products["SKU-3"].rules.max_per_customer, Some(2));
        assert_eq!(read_back.products["SKU-4"].low_stock_threshold(), Some(0));
        assert_eq!(read_back.products["SKU-5"].low_stock_threshold(), None);
    }

    #[test]
    fn round_trips_and_lists_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), 5, &state(), 11, WriteHooks::default()).unwrap();
        let b = write(dir.path(), 12, &State::default(), 12, WriteHooks::default()).unwrap();
        assert_eq!(a.size_bytes, fs::metadata(&a.path).unwrap().len());
        let (info, read_back) = read(&a.path).unwrap();
        assert_eq!((info.seq, info.created_at), (5, 11));
        assert_eq!(read_back, state());
        let listed: Vec<u64> = list(dir.path()).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(listed, vec![12, 5]);
        assert_eq!(read(&b.path).unwrap().1, State::default());
    }

    #[test]
    fn detects_damage_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let info = write(dir.path(), 3, &state(), 1, WriteHooks::default()).unwrap();
        assert_eq!(verify(&info.path).unwrap().seq, 3);
        let good = fs::read(&info.path).unwrap();
        for at in [
            0,
            8,
            10,
            14,
            22,
            30,
            HEADER_BYTES + 1,
            good.len() / 2,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            fs::write(&info.path, &bad).unwrap();
            assert!(read(&info.path).is_err(), "flip at byte {at} not detected");
            assert!(
                verify(&info.path).is_err(),
                "flip at byte {at} not verified"
            );
        }
        fs::write(&info.path, &good[..good.len() - 3]).unwrap();
        assert!(matches!(
            read(&info.path),
            Err(SnapshotError::Truncated { .. })
        ));
    }

    /// A body longer than the state it encodes is refused even with a valid checksum
    /// (the streaming decoder must not stop early and call it a success).
    #[test]
    fn trailing_bytes_after_the_state_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let info = write(dir.path(), 3, &state(), 1, WriteHooks::default()).unwrap();
        let mut file = fs::read(&info.path).unwrap();
        file.extend([1, 2, 3]);
        let body_len = (file.len() - HEADER_BYTES) as u64;
        file[29..37].copy_from_slice(&body_len.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&file[HEADER_BYTES..]);
        hasher.update(&file[13..HEADER_BYTES]);
        let crc = hasher.finalize();
        file[9..13].copy_from_slice(&crc.to_le_bytes());
        fs::write(&info.path, &file).unwrap();
        match read(&info.path) {
            Err(SnapshotError::Decode { detail, .. }) => assert!(detail.contains("trailing")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn prune_keeps_the_newest_and_removes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        for seq in [1, 2, 3, 4] {
            write(dir.path(), seq, &State::default(), 0, WriteHooks::default()).unwrap();
        }
        fs::write(dir.path().join(format!("{TEMP_PREFIX}x")), b"junk").unwrap();
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        let left: Vec<u64> = list(dir.path()).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(left, vec![4, 3]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(seq_of_name(&file_name(42)), Some(42));
        assert_eq!(seq_of_name("snapshot-42.snap"), None);
        assert_eq!(seq_of_name("other"), None);
    }
}
