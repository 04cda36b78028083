//! The webhooks' own files, under `<data>/webhooks/` (the data directory's lock guards it).
//!
//! - `endpoints.json`: every registered endpoint (its URL, filters, secret, and the state
//!   that must survive a restart: failing since when, disabled and why). Rewritten whole on
//!   each change (a registration, a removal, a delivery streak starting or ending to fail,
//!   an endpoint disabled or enabled): written to a temporary file, fsynced, renamed over
//!   the old one, and the directory fsynced, so a crash leaves the old file or the new one.
//!   It holds the signing secrets: created readable by its owner only.
//! - `positions.log`: each endpoint's cursor (the last event acknowledged with a 2xx, or
//!   passed over by its filters), one line appended per change,
//!   `<endpoint id> <seq> <index> <crc32>`; the last whole line of an endpoint wins. A line
//!   is appended with write(2) after each acknowledged delivery and before the next one
//!   is sent, so it is in the page cache before anything later happens: it survives
//!   `kill -9`. The file is fsynced once a second (`FLUSH_EVERY`), so a power loss or a
//!   kernel crash loses at most the last second of positions (those events are sent again;
//!   a position never moves backwards past what was fsynced, and never forwards past what
//!   was acknowledged). A torn or damaged line fails its checksum and is ignored. Once the
//!   file passes `POSITIONS_COMPACT_BYTES`, it is rewritten with one line per endpoint
//!   (temporary file, fsync, rename, directory fsync).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::feed::Position;

/// The positions file is compacted once it is this large.
pub const POSITIONS_COMPACT_BYTES: u64 = 1024 * 1024;

const ENDPOINTS_FILE: &str = "endpoints.json";
const POSITIONS_FILE: &str = "positions.log";

pub use crate::domain::webhook::{Disabled, Registration};

#[derive(Serialize, Deserialize)]
struct EndpointsFile {
    version: u32,
    endpoints: Vec<Registration>,
}

/// The store's open files.
pub struct Store {
    dir: PathBuf,
    positions: File,
    positions_bytes: u64,
    unsynced: bool,
}

/// What the store held when opened.
pub struct Opened {
    pub store: Store,
    pub registrations: Vec<Registration>,
    pub positions: HashMap<Uuid, Position>,
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn position_line(id: Uuid, position: Position) -> String {
    let body = format!("{id} {} {}", position.seq, position.index);
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body} {crc:08x}\n")
}

fn parse_position_line(line: &str) -> Option<(Uuid, Position)> {
    let (body, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    let mut parts = body.split(' ');
    let id = Uuid::parse_str(parts.next()?).ok()?;
    let seq = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((id, Position { seq, index }))
}

/// Writes `bytes` to `dir/name` through a temporary file: fsync, rename, directory fsync.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(io_at(&tmp))?;
        file.write_all(bytes).map_err(io_at(&tmp))?;
        file.sync_all().map_err(io_at(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    sync_dir(dir).map_err(io_at(dir))
}

impl Store {
    /// Opens (or creates) the store in `dir`, reading the registrations and the newest
    /// whole position line of each endpoint; the positions file is compacted at once.
    pub fn open(dir: &Path) -> io::Result<Opened> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let endpoints_path = dir.join(ENDPOINTS_FILE);
        let registrations = match fs::read(&endpoints_path) {
            Ok(bytes) => {
                let file: EndpointsFile = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", endpoints_path.display()),
                    )
                })?;
                file.endpoints
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_at(&endpoints_path)(e)),
        };
        let positions_path = dir.join(POSITIONS_FILE);
        let mut positions = HashMap::new();
        match File::open(&positions_path) {
            Ok(mut file) => {
                let mut text = Vec::new();
                file.read_to_end(&mut text)
                    .map_err(io_at(&positions_path))?;
                for line in text.split(|b| *b == b'\n') {
                    let parsed = std::str::from_utf8(line).ok().and_then(parse_position_line);
                    if let Some((id, position)) = parsed {
                        positions.insert(id, position);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&positions_path)(e)),
        }
        // Positions of endpoints no longer registered are dropped by the compaction.
        positions.retain(|id, _| registrations.iter().any(|r| r.id == *id));
        let mut store = Store {
            dir: dir.to_path_buf(),
            positions: File::open(dir)?, // replaced by `compact` below
            positions_bytes: 0,
            unsynced: false,
        };
        let current: Vec<(Uuid, Position)> = positions.iter().map(|(k, v)| (*k, *v)).collect();
        store.compact(&current)?;
        Ok(Opened {
            store,
            registrations,
            positions,
        })
    }

    /// Rewrites `endpoints.json` with `registrations`, durably, before returning.
    pub fn save_registrations(&self, registrations: &[Registration]) -> io::Result<()> {
        let file = EndpointsFile {
            version: 1,
            endpoints: registrations.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        replace_file(&self.dir, ENDPOINTS_FILE, &bytes)
    }

    /// Appends an endpoint's new position (write(2), no fsync: see the module's header).
    pub fn record(&mut self, id: Uuid, position: Position) -> io::Result<()> {
        let line = position_line(id, position);
        self.positions.write_all(line.as_bytes())?;
        self.positions_bytes += line.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Whether the positions file should be compacted.
    pub fn wants_compaction(&self) -> bool {
        self.positions_bytes > POSITIONS_COMPACT_BYTES
    }

    /// A handle to fsync the positions file with (taken as synced), if anything was
    /// appended since the last one: the caller fsyncs it without holding the store.
    pub fn to_sync(&mut self) -> io::Result<Option<File>> {
        if !self.unsynced {
            return Ok(None);
        }
        self.unsynced = false;
        self.positions.try_clone().map(Some)
    }

    /// Rewrites the positions file with one line per endpoint, durably.
    pub fn compact(&mut self, positions: &[(Uuid, Position)]) -> io::Result<()> {
        let text: String = positions
            .iter()
            .map(|(id, position)| position_line(*id, *position))
            .collect();
        replace_file(&self.dir, POSITIONS_FILE, text.as_bytes())?;
        let path = self.dir.join(POSITIONS_FILE);
        self.positions = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        self.positions_bytes = text.len() as u64;
        self.unsynced = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(id: Uuid) -> Registration {
        Registration {
            id,
            url: "http://127.0.0.1:9/hook".into(),
            types: None,
            skus: Some(vec!["A".into()]),
            secret: "whsec_AAAA".into(),
            created_at: 1,
            started_after_seq: 4,
            failing_since: None,
            disabled: None,
        }
    }

    #[test]
    fn positions_survive_reopening_and_a_torn_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let opened = Store::open(dir.path()).unwrap();
        assert!(opened.registrations.is_empty() && opened.positions.is_empty());
        let mut store = opened.store;
        store
            .save_registrations(&[registration(a), registration(b)])
            .unwrap();
        store.record(a, Position { seq: 5, index: 0 }).unwrap();
        store.record(b, Position { seq: 6, index: 1 }).unwrap();
        store.record(a, Position { seq: 7, index: 2 }).unwrap();
        drop(store);
        // A line cut short (a torn write) and garbage: ignored, the last whole line wins.
        let path = dir.path().join(POSITIONS_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let torn = position_line(a, Position { seq: 99, index: 0 });
        file.write_all(&torn.as_bytes()[..torn.len() - 3]).unwrap();
        file.write_all(b"\n\0\0\0 garbage\n").unwrap();
        drop(file);
        let opened = Store::open(dir.path()).unwrap();
        assert_eq!(opened.registrations.len(), 2);
        assert_eq!(opened.positions[&a], Position { seq: 7, index: 2 });
        assert_eq!(opened.positions[&b], Position { seq: 6, index: 1 });
        // Compacted on open: one line per endpoint.
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_changed_checksum_is_refused() {
        let id = Uuid::now_v7();
        let line = position_line(id, Position { seq: 12, index: 0 });
        let line = line.trim_end();
        assert_eq!(
            parse_position_line(line),
            Some((id, Position { seq: 12, index: 0 }))
        );
        let forged = line.replacen(" 12 ", " 13 ", 1);
        assert_eq!(parse_position_line(&forged), None);
    }
}
