//! The feed's own store: `<data>/events/`, segment files of JSON lines.
//!
//! A segment file `events-<base>.jsonl` holds the events of records after `base`, in feed
//! order, one event per line (its JSON exactly as the API sends it). After the events of
//! each batch of records the projector appends a *mark* line `{"through":N}`: every event
//! of every record up to N is in the store. A record's events are never split by a mark,
//! so the store's content up to its last mark is whole; whatever follows the last mark
//! (a batch cut short by a crash, a torn line) is cut when the store is opened. The store
//! is not fsynced per event: the log is the truth, and recovery derives again the events
//! of the records after the store's last mark (docs/ARCHITECTURE.md, "The change feed").
//!
//! Reading seeks: each segment keeps a sparse index (a mark's `through` → the offset
//! after it, one entry per `INDEX_EVERY_BYTES`), built as the segment is written, or by one
//! scan the first time an older segment is read after a restart. A read starts at the
//! last entry before the cursor and scans at most one index interval to reach it.
//!
//! Retention removes whole segments, oldest first: while the store is over its byte
//! budget, and while the oldest segment was last written longer ago than the retention
//! period. The newest segment is never removed. The store's *floor* is the oldest
//! segment's base: a reader asking for events after a record before it is told they are
//! gone (410 `events_gone`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::feed::event::Position;

/// A segment gets a new index entry once this many bytes were written since the last one
/// (at most: a sixteenth of the segment target, for small segments).
const INDEX_EVERY_BYTES: u64 = 32 * 1024;
/// The largest segment, whatever the byte budget (a segment is the unit of retention).
const SEGMENT_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The smallest segment target (tiny budgets, in tests).
const SEGMENT_BYTES_MIN: u64 = 1024;
/// A segment's target size is this fraction of the byte budget, so retention frees the
/// budget in small steps.
const SEGMENTS_PER_BUDGET: u64 = 16;

/// The store's limits.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Segments last written longer ago than this are removed.
    pub age: Duration,
    /// Segments are removed, oldest first, while the store is larger than this.
    pub max_bytes: u64,
}

/// What one line of a segment says about itself (an event, or a mark).
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    id: Option<&'a str>,
    #[serde(default)]
    through: Option<u64>,
}

enum Line {
    Event(Position),
    Mark(u64),
}

fn parse_line(line: &[u8]) -> Option<Line> {
    let peek: Peek = serde_json::from_slice(line).ok()?;
    match (peek.id, peek.through) {
        (Some(id), None) => Position::parse(id).map(Line::Event),
        (None, Some(through)) => Some(Line::Mark(through)),
        _ => None,
    }
}

struct Segment {
    base: u64,
    path: PathBuf,
    /// Bytes of whole lines (up to and including the last mark, for the newest segment).
    bytes: u64,
    /// `(through, offset)`: the lines from `offset` on are events of records after
    /// `through`. `None` until built (an older segment after a restart).
    index: Option<Vec<(u64, u64)>>,
}

fn index_every(segment_bytes_target: u64) -> u64 {
    (segment_bytes_target / 16).clamp(256, INDEX_EVERY_BYTES)
}

fn segment_name(base: u64) -> String {
    format!("events-{base:020}.jsonl")
}

fn segment_base(name: &str) -> Option<u64> {
    name.strip_prefix("events-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// One event read back: its position and its JSON line (no newline).
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub position: Position,
    pub json: String,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct Found {
    pub events: Vec<Stored>,
    /// True when the read reached the end of the store (no event after the last one).
    pub at_end: bool,
    /// The store's `through` when it was read.
    pub through: u64,
}

/// A read asked for events after a record the store no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone {
    /// The first record whose events are still kept (the floor + 1).
    pub oldest_seq: u64,
}

pub struct Store {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// The newest segment, open for appending.
    file: File,
    retention: Retention,
    segment_bytes_target: u64,
    /// Bytes between two index entries.
    index_every: u64,
    /// Every event of every record up to here is in the store (as of its last mark).
    through: u64,
    /// The newest event written.
    newest: Option<Position>,
    /// Bytes written since the last fsync.
    unsynced: bool,
    /// Events written since start.
    pub events_written: u64,
    /// Segments removed by retention since start.
    pub segments_removed: u64,
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens the store in `dir` (created if missing), cutting what follows the newest
    /// segment's last mark. An empty store starts at `base`: it holds the events of
    /// records after it.
    pub fn open(dir: &Path, base: u64, retention: Retention) -> io::Result<Store> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let mut bases: Vec<u64> = fs::read_dir(dir)
            .map_err(io_at(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| segment_base(e.file_name().to_str()?))
            .collect();
        bases.sort_unstable();
        let segment_bytes_target =
            (retention.max_bytes / SEGMENTS_PER_BUDGET).clamp(SEGMENT_BYTES_MIN, SEGMENT_BYTES_MAX);
        if bases.is_empty() {
            return Store::create(dir, base, retention, segment_bytes_target);
        }
        let mut segments: Vec<Segment> = bases
            .iter()
            .map(|&base| {
                let path = dir.join(segment_name(base));
                let bytes = fs::metadata(&path).map_or(0, |m| m.len());
                Segment {
                    base,
                    path,
                    bytes,
                    index: None,
                }
            })
            .collect();
        let last = segments.last_mut().expect("at least one");
        let index_every = index_every(segment_bytes_target);
        let Scanned {
            index,
            whole,
            through,
            newest,
        } = scan(&last.path, last.base, index_every)?;
        if whole < last.bytes {
            tracing::warn!(
                file = %last.path.display(),
                kept = whole,
                cut = last.bytes - whole,
                "cutting the change feed's store after its last mark (the log gives those events again)"
            );
            let file = OpenOptions::new().write(true).open(&last.path)?;
            file.set_len(whole)?;
            file.sync_all()?;
        }
        last.bytes = whole;
        last.index = Some(index);
        let file = OpenOptions::new()
            .append(true)
            .open(&last.path)
            .map_err(io_at(&last.path))?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            segments,
            file,
            retention,
            segment_bytes_target,
            index_every,
            through,
            newest,
            unsynced: false,
            events_written: 0,
            segments_removed: 0,
        };
        if store.newest.is_none() {
            store.newest = store.newest_in_older_segments()?;
        }
        Ok(store)
    }

    fn create(
        dir: &Path,
        base: u64,
        retention: Retention,
        segment_bytes_target: u64,
    ) -> io::Result<Store> {
        let path = dir.join(segment_name(base));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        sync_dir(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            segments: vec![Segment {
                base,
                path,
                bytes: 0,
                index: Some(vec![(base, 0)]),
            }],
            file,
            retention,
            segment_bytes_target,
            index_every: index_every(segment_bytes_target),
            through: base,
            newest: None,
            unsynced: false,
            events_written: 0,
            segments_removed: 0,
        })
    }

    /// Removes every segment and starts again at `base` (the store no longer joins the
    /// log: it is older than the newest snapshot, or ahead of a log cut short).
    pub fn reset(&mut self, base: u64) -> io::Result<()> {
        tracing::warn!(
            store_through = self.through,
            base,
            "the change feed starts again after record {base}: earlier events are not in it"
        );
        let retention = self.retention;
        let target = self.segment_bytes_target;
        for segment in self.segments.drain(..) {
            fs::remove_file(&segment.path).map_err(io_at(&segment.path))?;
        }
        *self = Store::create(&self.dir.clone(), base, retention, target)?;
        Ok(())
    }

    /// The newest event in a segment before the newest one (the newest has none).
    fn newest_in_older_segments(&mut self) -> io::Result<Option<Position>> {
        for i in (0..self.segments.len().saturating_sub(1)).rev() {
            let segment = &self.segments[i];
            let newest = scan(&segment.path, segment.base, self.index_every)?.newest;
            if newest.is_some() {
                return Ok(newest);
            }
        }
        Ok(None)
    }

    /// Every event of every record up to here is in the store.
    pub fn through(&self) -> u64 {
        self.through
    }

    /// Events of records after the floor are kept.
    pub fn floor(&self) -> u64 {
        self.segments[0].base
    }

    pub fn newest(&self) -> Option<Position> {
        self.newest
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Appends the events of the records up to `through` (in feed order, each an event's
    /// JSON line), then the mark. A segment takes whole records while it has room: a large
    /// batch is split at record boundaries, each part with its mark, so that no segment
    /// grows much past its target (retention removes whole segments).
    pub fn append(&mut self, events: &[Stored], through: u64) -> io::Result<()> {
        assert!(through >= self.through, "the store only moves forward");
        let mut start = 0;
        while start < events.len() {
            let bytes = self.segments.last().map_or(0, |s| s.bytes);
            let room = self.segment_bytes_target.saturating_sub(bytes);
            let (mut end, mut size) = (start, 0);
            while end < events.len() {
                let seq = events[end].position.seq;
                let record_end = end + events[end..].partition_point(|e| e.position.seq == seq);
                let record_size: u64 = events[end..record_end]
                    .iter()
                    .map(|e| e.json.len() as u64 + 1)
                    .sum();
                if end > start && size + record_size > room {
                    break;
                }
                size += record_size;
                end = record_end;
            }
            let mark = if end == events.len() {
                through
            } else {
                events[end - 1].position.seq
            };
            self.write(&events[start..end], mark)?;
            start = end;
        }
        if events.is_empty() {
            self.write(&[], through)?;
        }
        Ok(())
    }

    /// Writes events and their mark in one write; rolls to a new segment (and applies
    /// retention) once the segment is full.
    fn write(&mut self, events: &[Stored], through: u64) -> io::Result<()> {
        if events.is_empty() && through == self.through {
            return Ok(());
        }
        let mut buf =
            Vec::with_capacity(events.iter().map(|e| e.json.len() + 1).sum::<usize>() + 32);
        for e in events {
            debug_assert!(self.newest.is_none_or(|n| n < e.position));
            debug_assert!(e.position.seq > self.through && e.position.seq <= through);
            buf.extend_from_slice(e.json.as_bytes());
            buf.push(b'\n');
        }
        writeln!(buf, "{{\"through\":{through}}}")?;
        let segment = self.segments.last_mut().expect("a newest segment");
        self.file.write_all(&buf).map_err(io_at(&segment.path))?;
        let index = segment.index.get_or_insert_with(Vec::new);
        segment.bytes += buf.len() as u64;
        if index
            .last()
            .is_none_or(|&(_, offset)| segment.bytes - offset >= self.index_every)
        {
            index.push((through, segment.bytes));
        }
        self.through = through;
        if let Some(last) = events.last() {
            self.newest = Some(last.position);
        }
        self.events_written += events.len() as u64;
        self.unsynced = true;
        if segment.bytes >= self.segment_bytes_target {
            self.roll()?;
        }
        Ok(())
    }

    /// Seals the newest segment (synced) and starts the next one after `through`.
    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let base = self.through;
        let path = self.dir.join(segment_name(base));
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            base,
            path,
            bytes: 0,
            index: Some(vec![(base, 0)]),
        });
        self.enforce_retention(SystemTime::now())
    }

    /// Removes the oldest segments while the store is over its budget or they are older
    /// than the retention period (never the newest).
    pub fn enforce_retention(&mut self, now: SystemTime) -> io::Result<()> {
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let over = self.bytes() > self.retention.max_bytes;
            let expired = fs::metadata(&oldest.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > self.retention.age);
            if !(over || expired) {
                break;
            }
            let oldest = self.segments.remove(0);
            fs::remove_file(&oldest.path).map_err(io_at(&oldest.path))?;
            self.segments_removed += 1;
        }
        Ok(())
    }

    /// Makes everything appended so far durable; returns `through`.
    pub fn sync(&mut self) -> io::Result<u64> {
        if let Some(file) = self.to_sync()? {
            file.sync_data()?;
        }
        Ok(self.through)
    }

    /// What `sync` would fsync (a handle on the newest segment, if anything is unsynced),
    /// taken as synced: the caller fsyncs it without holding the store, so that readers
    /// never wait for the disk. `through` is synced once it has.
    pub fn to_sync(&mut self) -> io::Result<Option<File>> {
        if !self.unsynced {
            return Ok(None);
        }
        self.unsynced = false;
        self.file.try_clone().map(Some)
    }

    /// Up to `max` events after `cursor`, in feed order, and then the rest of the last
    /// record's events (a read never splits a record).
    pub fn read_after(&mut self, cursor: Position, max: usize) -> Result<Found, Gone> {
        if cursor.seq < self.floor() {
            return Err(Gone {
                oldest_seq: self.floor() + 1,
            });
        }
        let mut out = Found {
            through: self.through,
            ..Found::default()
        };
        let first = self
            .segments
            .partition_point(|s| s.base < cursor.seq)
            .saturating_sub(1);
        for i in first..self.segments.len() {
            let done = self.read_segment(i, cursor, max, &mut out.events);
            match done {
                Ok(true) => return Ok(out),
                Ok(false) => {}
                Err(err) => {
                    // A segment that cannot be read (removed by retention under the read,
                    // a disk error): what was read so far is answered, not the end.
                    tracing::warn!(error = %err, "cannot read the change feed's store");
                    return Ok(out);
                }
            }
        }
        out.at_end = true;
        Ok(out)
    }

    /// Reads segment `i` into `out`; true once `max` events (and their record's rest)
    /// were read.
    fn read_segment(
        &mut self,
        i: usize,
        cursor: Position,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> io::Result<bool> {
        if self.segments[i].index.is_none() {
            let segment = &self.segments[i];
            let index = scan(&segment.path, segment.base, self.index_every)?.index;
            self.segments[i].index = Some(index);
        }
        let segment = &self.segments[i];
        let index = segment.index.as_ref().expect("built above");
        let at = index.partition_point(|&(through, _)| through < cursor.seq);
        let offset = index.get(at.saturating_sub(1)).map_or(0, |entry| entry.1);
        let mut file = File::open(&segment.path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut reader = BufReader::new(file.take(segment.bytes - offset));
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(false);
            }
            let Some(parsed) = parse_line(line.strip_suffix(b"\n").unwrap_or(&line)) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a damaged line in {}", segment.path.display()),
                ));
            };
            let Line::Event(position) = parsed else {
                continue;
            };
            if position <= cursor {
                continue;
            }
            if out.len() >= max && out.last().is_some_and(|l| l.position.seq != position.seq) {
                return Ok(true);
            }
            line.pop();
            out.push(Stored {
                position,
                json: String::from_utf8_lossy(&line).into_owned(),
            });
        }
    }
}

/// What a scan of a segment found.
struct Scanned {
    index: Vec<(u64, u64)>,
    /// Bytes up to and including the last mark: what is whole.
    whole: u64,
    /// The last mark's `through` (the base if none).
    through: u64,
    /// The newest event before the last mark.
    newest: Option<Position>,
}

/// Reads a segment through (see `Scanned`).
fn scan(path: &Path, base: u64, index_every: u64) -> io::Result<Scanned> {
    let file = File::open(path).map_err(io_at(path))?;
    let mut reader = BufReader::new(file);
    let mut index = vec![(base, 0)];
    let (mut offset, mut whole, mut through, mut newest) = (0u64, 0u64, base, None);
    let mut pending_newest = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // the end, or a torn line
        }
        offset += n as u64;
        match parse_line(&line[..n - 1]) {
            Some(Line::Event(p)) => pending_newest = Some(p),
            Some(Line::Mark(t)) => {
                whole = offset;
                through = t;
                if pending_newest.is_some() {
                    newest = pending_newest;
                }
                if offset - index.last().map_or(0, |e| e.1) >= index_every {
                    index.push((t, offset));
                }
            }
            None => break,
        }
    }
    Ok(Scanned {
        index,
        whole,
        through,
        newest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, index: u32, pad: usize) -> Stored {
        let position = Position { seq, index };
        Stored {
            position,
            json: format!(
                "{{\"id\":\"{}\",\"seq\":{seq},\"pad\":\"{}\"}}",
                position.id(),
                "x".repeat(pad)
            ),
        }
    }

    fn roomy() -> Retention {
        Retention {
            age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
        }
    }

    fn positions(read: &Found) -> Vec<String> {
        read.events.iter().map(|e| e.position.id()).collect()
    }

    #[test]
    fn reads_after_any_position_without_splitting_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 0, roomy()).unwrap();
        store.append(&[event(1, 0, 1), event(1, 1, 1)], 2).unwrap();
        store.append(&[event(3, 0, 1)], 3).unwrap();
        store.append(&[], 5).unwrap();
        let all = store.read_after(Position::default(), 100).unwrap();
        assert_eq!(positions(&all), vec!["1", "1.1", "3"]);
        assert!(all.at_end);
        assert_eq!(all.through, 5);
        let one = store.read_after(Position::default(), 1).unwrap();
        assert_eq!(
            positions(&one),
            vec!["1", "1.1"],
            "the record's rest comes too"
        );
        assert!(!one.at_end);
        let mid = store
            .read_after(Position { seq: 1, index: 0 }, 100)
            .unwrap();
        assert_eq!(positions(&mid), vec!["1.1", "3"]);
        let whole = Position::after_record(1);
        assert_eq!(positions(&store.read_after(whole, 100).unwrap()), vec!["3"]);
    }

    #[test]
    fn segments_roll_index_seeks_and_retention_removes_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            age: Duration::from_secs(3600),
            max_bytes: 64 * 1024,
        };
        let mut store = Store::open(dir.path(), 0, retention).unwrap();
        for seq in 1..=2_000u64 {
            store.append(&[event(seq, 0, 100)], seq).unwrap();
        }
        assert!(store.segments.len() > 2, "{}", store.segments.len());
        assert!(store.bytes() <= 64 * 1024 + store.segment_bytes_target);
        assert!(store.segments_removed > 0);
        let floor = store.floor();
        assert!(floor > 0);
        assert_eq!(
            store
                .read_after(
                    Position {
                        seq: floor - 1,
                        index: 0
                    },
                    10
                )
                .unwrap_err(),
            Gone {
                oldest_seq: floor + 1
            }
        );
        let read = store.read_after(Position::after_record(1_990), 5).unwrap();
        assert_eq!(
            positions(&read),
            vec!["1991", "1992", "1993", "1994", "1995"]
        );
        // After a restart the older segments are indexed by a scan on first read.
        drop(store);
        let mut store = Store::open(dir.path(), 0, retention).unwrap();
        assert_eq!(store.through(), 2_000);
        assert_eq!(
            store.newest(),
            Some(Position {
                seq: 2_000,
                index: 0
            })
        );
        let read = store
            .read_after(
                Position {
                    seq: floor + 3,
                    index: 0,
                },
                2,
            )
            .unwrap();
        assert_eq!(
            positions(&read),
            vec![(floor + 4).to_string(), (floor + 5).to_string()]
        );
        let index = store.segments[0].index.as_ref().unwrap();
        assert!(index.len() > 1, "a sparse index, not one entry");
        // One large batch is split across segments at record boundaries: retention keeps
        // the newest of it.
        let batch: Vec<Stored> = (2_001..=2_600u64).map(|s| event(s, 0, 100)).collect();
        store.append(&batch, 2_600).unwrap();
        assert!(store
            .segments
            .iter()
            .all(|s| s.bytes <= store.segment_bytes_target + 200));
        let newest = store
            .read_after(
                Position {
                    seq: 2_590,
                    index: 0,
                },
                100,
            )
            .unwrap();
        assert_eq!(newest.events.len(), 10);
    }

    #[test]
    fn a_torn_tail_is_cut_after_the_last_mark() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 10, roomy()).unwrap();
        store.append(&[event(11, 0, 1)], 11).unwrap();
        store
            .append(&[event(12, 0, 1), event(12, 1, 1)], 12)
            .unwrap();
        let path = store.segments[0].path.clone();
        drop(store);
        // A batch cut short by a crash: whole event lines with no mark, then a torn one.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(event(13, 0, 1).json.as_bytes()).unwrap();
        file.write_all(b"\n{\"id\":\"13.1\",\"se").unwrap();
        drop(file);
        let mut store = Store::open(dir.path(), 0, roomy()).unwrap();
        assert_eq!(store.through(), 12);
        assert_eq!(store.floor(), 10);
        assert_eq!(store.newest(), Some(Position { seq: 12, index: 1 }));
        store.append(&[event(13, 0, 1)], 13).unwrap();
        let read = store.read_after(Position::default(), 100);
        assert!(read.is_err(), "0 is below the floor 10");
        let read = store.read_after(Position::after_record(10), 100).unwrap();
        assert_eq!(positions(&read), vec!["11", "12", "12.1", "13"]);
        store.reset(40).unwrap();
        assert_eq!(
            (store.floor(), store.through(), store.newest()),
            (40, 40, None)
        );
    }
}
