//! Tests of the log: segments, truncation, the directory lock, the migration.

use std::fs;
use std::thread;
use std::time::Instant;

use super::*;

/// A product's creation, `SKU-<i>` with `i` units: the record the log's tests (and
/// recovery's) write.
pub(crate) fn created(i: u64) -> Record {
    Record::ProductCreated {
        by: None,
        rules: Default::default(),
        low_stock_threshold: None,
        sku: format!("SKU-{i}"),
        name: "n".into(),
        price: None,
        on_hand: i,
        at: 1,
    }
}

/// Writes records `1..=n` through the real writer, in segments of `per_segment`.
fn write(dir: &Path, n: u64, per_segment: u64) {
    let log = Log::open(dir).unwrap().with_segment_records(per_segment);
    let next = log.last_seq().unwrap() + 1;
    let (handle, join) = log.start_writer(next).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tickets: Vec<_> = (next..next + n)
            .map(|i| handle.append(created(i)))
            .collect();
        for ticket in tickets {
            ticket.durable().await.unwrap();
        }
        handle.shutdown().await.unwrap();
    });
    join.join().unwrap();
}

fn segment_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(SEGMENT_PREFIX))
        .collect();
    names.sort();
    names
}

/// Polls `done` for up to 10 s (work finishing on the segment thread); the caller
/// asserts the outcome.
fn wait_until(done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() && started.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(10));
    }
}

fn seqs(reader: &LogReader) -> Vec<u64> {
    reader.records().map(|r| r.unwrap().0).collect()
}

#[test]
fn truncation_deletes_whole_segment_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 50, 10);
    assert_eq!(segment_dirs(&dir).len(), 5);
    let log = Log::open(&dir).unwrap();
    let reader = log.reader();
    // Segments 1-10 and 11-20 end at or before 25; 21-30 straddles it and stays.
    assert_eq!(reader.truncate_through(25).unwrap(), 20);
    assert_eq!(
        segment_dirs(&dir),
        vec![
            segment_dir_name(21),
            segment_dir_name(31),
            segment_dir_name(41)
        ]
    );
    assert_eq!(seqs(&reader), (21..=50).collect::<Vec<_>>());
    assert_eq!(reader.truncated_through(), 25);
    // The mark is durable and never lowered.
    assert_eq!(reader.truncate_through(5).unwrap(), 0);
    drop((reader, log));
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.reader().truncated_through(), 25);
    assert_eq!(log.last_seq().unwrap(), 50);
}

#[test]
fn a_segment_truncated_while_it_is_read_goes_when_its_reader_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 30, 10);
    let log = Log::open(&dir).unwrap();
    let reader = log.reader();
    let mut records = reader.records();
    assert_eq!(records.next().unwrap().unwrap().0, 1);
    reader.truncate_through(20).unwrap();
    // Truncated segments leave their names at once (a new segment could take them)...
    assert_eq!(segment_dirs(&dir), vec![segment_dir_name(21)]);
    // ...but one being read is read on to its end; the second is read too if it was
    // already opened ahead, else the stream ends there (never a hole, never a wrong
    // or reordered record: a fold then reports the log short of what it asked for).
    let rest: Vec<u64> = records.map(|r| r.unwrap().0).collect();
    let all: Vec<u64> = (2..=30).collect();
    let ended: Vec<u64> = (2..=10).collect();
    assert!(rest == all || rest == ended, "{rest:?}");
    drop(reader);
    // Segments are closed on the segment thread once read; then the trash goes.
    let entries = || fs::read_dir(&dir).unwrap().count();
    wait_until(|| entries() <= 3);
    // LOCK, truncated_through, segment-21.
    assert_eq!(
        entries(),
        3,
        "{:?}",
        fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
    assert_eq!(segment_dirs(&dir), vec![segment_dir_name(21)]);
}

/// A segment removed while someone reads it gives up its name at once: a segment
/// created under that name meanwhile is a new one, untouched when the reader lets go
/// of the old one (whose files are deleted then).
#[test]
fn a_name_freed_by_a_removal_can_be_taken_while_the_old_segment_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 8, 10);
    let log = Log::open(&dir).unwrap();
    let reader = log.reader();
    let mut records = reader.records();
    assert_eq!(records.next().unwrap().unwrap().0, 1);
    log.segments.remove(1).unwrap();
    let new = log.segments.create(1).unwrap();
    new.db().insert(100u64.to_be_bytes(), vec![1]).unwrap();
    new.db().flush().unwrap();
    drop(new);
    // The reader still reads the old segment to its end.
    let rest: Vec<u64> = records.map(|r| r.unwrap().0).collect();
    assert_eq!(rest, (2..=8).collect::<Vec<_>>());
    drop(reader);
    let trash = || {
        fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(TRASH_PREFIX)
            })
            .count()
    };
    wait_until(|| trash() == 0);
    assert_eq!(trash(), 0, "the old segment's files are deleted");
    assert_eq!(segment_dirs(&dir), vec![segment_dir_name(1)]);
    let slot = log.segments.list()[0].clone();
    let segment = open_segment(&slot).unwrap().unwrap();
    assert_eq!(segment.db().len(), 1, "the new segment is intact");
}

#[test]
fn a_segment_directory_under_another_spelling_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 5, 10);
    fs::rename(dir.join(segment_dir_name(1)), dir.join("segment-1")).unwrap();
    let err = Log::open(&dir).err().expect("refused");
    assert!(err.to_string().contains("segment-1"), "{err}");
    assert!(err.to_string().contains("not a log segment name"), "{err}");
}

#[test]
fn a_second_open_of_the_same_log_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap();
    let err = Log::open(&dir).err().expect("the directory is locked");
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    drop(log);
    Log::open(&dir).unwrap();
}

/// sled writes a page-table snapshot when a database is opened (here: read the first
/// time after writing), to `snap.<lsn>.generating` and then renamed; `kill -9` between
/// the two left a file that made every later open of that segment fail.
#[test]
fn a_storage_snapshot_left_half_written_by_a_crash_does_not_stop_the_log_opening() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 25, 10);
    let segments = segment_dirs(&dir);
    assert_eq!(segments.len(), 3);
    // The segment at the front has never been reopened: a crash during its first
    // snapshot leaves only the unfinished file.
    fs::write(
        dir.join(&segments[0])
            .join("snap.FFFFFFFFFFFFFFFF.generating"),
        vec![7u8; 4096],
    )
    .unwrap();
    // The second has been read once (sled wrote `snap.<lsn>`); a crash during the next
    // snapshot leaves half of one beside it, under a name that sorts after it.
    {
        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=25).collect::<Vec<_>>());
    }
    let second = dir.join(&segments[1]);
    let finished = fs::read_dir(&second)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("snap.") && !name.ends_with(".generating"))
        .expect("sled wrote a snapshot when the segment was first read");
    let bytes = fs::read(second.join(&finished)).unwrap();
    fs::write(
        second.join(format!("{finished}.generating")),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();

    let log = Log::open(&dir).unwrap();
    assert_eq!(seqs(&log.reader()), (1..=25).collect::<Vec<_>>());
    for segment in &segments {
        let left: Vec<_> = fs::read_dir(dir.join(segment))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".generating"))
            .collect();
        assert!(left.is_empty(), "{segment}: {left:?}");
    }
}

#[test]
fn appends_continue_the_newest_segment_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 7, 10);
    write(&dir, 7, 10);
    assert_eq!(
        segment_dirs(&dir),
        vec![segment_dir_name(1), segment_dir_name(11)]
    );
    let log = Log::open(&dir).unwrap();
    assert_eq!(seqs(&log.reader()), (1..=14).collect::<Vec<_>>());
}

#[test]
fn a_segment_created_ahead_is_never_written_under_its_name_too_early() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // 15 records: the second segment is half full, so the third is created ahead;
    // a clean shutdown removes it again.
    write(&dir, 15, 10);
    assert_eq!(
        segment_dirs(&dir),
        vec![segment_dir_name(1), segment_dir_name(11)]
    );
    // After a crash it would still be there, empty: appends go on in the second.
    drop(open_sled(&dir.join(segment_dir_name(21))).unwrap());
    write(&dir, 3, 10);
    assert_eq!(
        segment_dirs(&dir),
        vec![segment_dir_name(1), segment_dir_name(11)]
    );
    let log = Log::open(&dir).unwrap();
    assert_eq!(seqs(&log.reader()), (1..=18).collect::<Vec<_>>());
    drop(log);
    // Across many segments, every one holds exactly its own records.
    write(&dir, 100, 10);
    let log = Log::open(&dir).unwrap();
    assert_eq!(seqs(&log.reader()), (1..=118).collect::<Vec<_>>());
    for slot in log.segments.list() {
        let segment = open_segment(&slot).unwrap().unwrap();
        let (first, _) = segment.db().first().unwrap().unwrap();
        assert_eq!(seq_of(&first).unwrap(), slot.first);
    }
}

#[test]
fn a_damaged_mark_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 30, 10);
    Log::open(&dir)
        .unwrap()
        .reader()
        .truncate_through(12)
        .unwrap();
    let mut bytes = fs::read(dir.join(MARK_FILE)).unwrap();
    bytes[3] ^= 1;
    fs::write(dir.join(MARK_FILE), bytes).unwrap();
    let err = Log::open(&dir).err().expect("a damaged mark");
    assert!(matches!(err, OpenError::BadMark { .. }), "{err}");
}

/// A cluster node's purge keeps the purged entry's term in the mark (format 2), read
/// back after a restart and never lowered; a single server's mark stays format 1 (no term),
/// still read, and is no purge position for a cluster node; a damaged format 2 is refused.
#[test]
fn the_truncation_mark_keeps_a_purges_term() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 30, 10);
    let reader = Log::open(&dir).unwrap().reader();
    assert_eq!(reader.purged().unwrap(), None);
    reader.truncate_through(5).unwrap();
    assert_eq!(fs::read(dir.join(MARK_FILE)).unwrap().len(), 12);
    assert!(matches!(reader.purged(), Err(OpenError::BadMark { .. })));
    drop(reader);
    let reader = Log::open(&dir).unwrap().reader();
    assert_eq!(reader.truncated_through(), 5);
    let purged = crate::storage::entry::LogPos { term: 4, seq: 12 };
    assert_eq!(reader.purge_through(purged).unwrap(), 10);
    reader
        .purge_through(crate::storage::entry::LogPos { term: 3, seq: 8 })
        .unwrap();
    assert_eq!(reader.purged().unwrap(), Some(purged));
    drop(reader);
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.reader().purged().unwrap(), Some(purged));
    assert_eq!(log.reader().truncated_through(), 12);
    drop(log);
    let mut bytes = fs::read(dir.join(MARK_FILE)).unwrap();
    assert_eq!(bytes.len(), 20);
    bytes[10] ^= 1;
    fs::write(dir.join(MARK_FILE), bytes).unwrap();
    let err = Log::open(&dir).err().expect("a damaged mark");
    assert!(matches!(err, OpenError::BadMark { .. }), "{err}");
}

#[test]
fn cutting_the_end_removes_later_segments_and_part_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write(&dir, 30, 10);
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.truncate_from(15).unwrap(), 16);
    assert_eq!(seqs(&log.reader()), (1..=14).collect::<Vec<_>>());
    drop(log);
    assert_eq!(segment_dirs(&dir).len(), 2);
    write(&dir, 10, 10);
    let log = Log::open(&dir).unwrap();
    assert_eq!(seqs(&log.reader()), (1..=24).collect::<Vec<_>>());
}

/// Writes the layout of earlier versions: one sled database in `dir`, a tree per
/// segment, the mark in `meta`.
fn write_single_database(dir: &Path, n: u64, per_tree: u64, mark: u64) {
    let db = sled::Config::new().path(dir).open().unwrap();
    let mut first = 1;
    while first <= n {
        let name = if first == 1 {
            "wal".to_string()
        } else {
            format!("wal-{first:020}")
        };
        let tree = db.open_tree(name).unwrap();
        for seq in first..(first + per_tree).min(n + 1) {
            tree.insert(seq.to_be_bytes(), record::encode(&created(seq)))
                .unwrap();
        }
        first += per_tree;
    }
    if mark > 0 {
        let meta = db.open_tree("meta").unwrap();
        meta.insert(b"truncated_through", &mark.to_be_bytes())
            .unwrap();
    }
    db.flush().unwrap();
}

/// The same proportions as the real sizes (65,536 records a segment, 10,000 a sled
/// batch, older trees of 40,000: a tree spans segments, a segment takes several trees
/// and batches), a hundred times smaller, so the test takes a fraction of a second.
#[test]
fn a_single_database_log_is_moved_to_a_database_per_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_single_database(&dir, 1_000, 400, 3);
    let log = Log::open_moving(&dir, 655, 100).unwrap();
    assert!(!dir.join("db").exists() && !dir.join("conf").exists());
    assert_eq!(
        segment_dirs(&dir),
        vec![segment_dir_name(1), segment_dir_name(656)]
    );
    let reader = log.reader();
    assert_eq!(reader.truncated_through(), 3);
    let read: Vec<(u64, Record)> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(read.len(), 1_000);
    assert!(read.iter().all(|(seq, record)| *record == created(*seq)));
    drop((reader, log));
    write(&dir, 5, SEGMENT_RECORDS_DEFAULT);
    assert_eq!(Log::open(&dir).unwrap().last_seq().unwrap(), 1_005);
}

#[test]
fn an_interrupted_move_starts_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_single_database(&dir, 30, 16, 0);
    // What a crash in the middle of a move (by a build with other segment sizes) can
    // leave: a partial new segment beside the old database.
    {
        let partial = open_sled(&dir.join(segment_dir_name(17))).unwrap();
        partial
            .insert(17u64.to_be_bytes(), record::encode(&created(17)))
            .unwrap();
        partial.flush().unwrap();
    }
    let log = Log::open(&dir).unwrap();
    assert_eq!(seqs(&log.reader()), (1..=30).collect::<Vec<_>>());
    assert!(!dir.join("db").exists());
    assert_eq!(segment_dirs(&dir), vec![segment_dir_name(1)]);
}

// --- The batch layout: a key per group commit (and per segment it crosses). ---

/// Writes records `next..next + size` for each size in `sizes`, each size as one group
/// commit: the writer waits `FLUSH` between flushes, so everything queued meanwhile is
/// one batch.
fn write_batches(dir: &Path, sizes: &[u64], per_segment: u64) {
    const FLUSH: Duration = Duration::from_millis(100);
    let log = Log::open(dir)
        .unwrap()
        .with_segment_records(per_segment)
        .with_flush_interval(FLUSH);
    let mut next = log.last_seq().unwrap() + 1;
    let (handle, join) = log.start_writer(next).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for size in sizes {
            // Held, the writer cannot take part of the batch before the rest is queued.
            let release = handle.hold();
            let tickets: Vec<_> = (next..next + size)
                .map(|i| handle.append(created(i)))
                .collect();
            drop(release);
            for (i, ticket) in tickets.into_iter().enumerate() {
                assert_eq!(ticket.durable().await.unwrap(), next + i as u64);
            }
            next += size;
        }
        handle.shutdown().await.unwrap();
    });
    join.join().unwrap();
}

/// The layout of earlier builds, kept for these tests: one key per record, its value the
/// record as `record::encode` makes it, in segments of `per_segment` records.
fn write_per_record(dir: &Path, seqs: std::ops::RangeInclusive<u64>, per_segment: u64) {
    let log = Log::open(dir).unwrap();
    for seq in seqs {
        let first = (seq - 1) / per_segment * per_segment + 1;
        let segment = log.segments.create(first).unwrap();
        segment
            .db()
            .insert(seq.to_be_bytes(), record::encode(&created(seq)))
            .unwrap();
        segment.db().flush().unwrap();
    }
}

/// Every key of every segment: (segment's first sequence, [(key, records under it)]).
fn keys(dir: &Path) -> Vec<(u64, Vec<(u64, u64)>)> {
    let log = Log::open(dir).unwrap();
    log.segments
        .list()
        .iter()
        .map(|slot| {
            let segment = open_segment(slot).unwrap().unwrap();
            let keys = segment
                .db()
                .iter()
                .map(|item| {
                    let (key, value) = item.unwrap();
                    (seq_of(&key).unwrap(), batch::records_in(&value))
                })
                .collect();
            (slot.first, keys)
        })
        .collect()
}

/// Reads everything, checks every record is the one written under its number.
fn check_all(dir: &Path, last: u64) {
    let log = Log::open(dir).unwrap();
    let read: Vec<(u64, Record)> = log.reader().records().map(|r| r.unwrap()).collect();
    assert_eq!(
        read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    assert!(read.iter().all(|(seq, record)| *record == created(*seq)));
    assert_eq!(log.last_seq().unwrap(), last);
    let summary = log.reader().summary().unwrap();
    let range = (last > 0).then_some(());
    assert_eq!(
        (summary.first_seq, summary.last_seq, summary.records),
        (range.map(|_| 1), range.map(|_| last), last)
    );
    let bytes: usize = (1..=last)
        .map(|seq| record::encode(&created(seq)).len())
        .sum();
    assert_eq!(
        summary.record_bytes, bytes as u64,
        "record bytes, not framing"
    );
    assert_eq!(
        summary.kinds.get("ProductCreated").copied().unwrap_or(0),
        last
    );
    assert_eq!(summary.damaged_at, None);
}

#[test]
fn a_group_commit_is_one_key_per_segment_it_crosses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // 1-3 | 4-10 and 11-15 (the second crosses into the second segment) | 16-20, 21-30
    // and 31-34 (the third ends the second segment, fills a third and starts a fourth).
    write_batches(&dir, &[3, 12, 19], 10);
    assert_eq!(
        keys(&dir),
        vec![
            (1, vec![(1, 3), (4, 7)]),
            (11, vec![(11, 5), (16, 5)]),
            (21, vec![(21, 10)]),
            (31, vec![(31, 4)]),
        ]
    );
    check_all(&dir, 34);
    // Every segment starts with its own first record.
    assert_eq!(
        segment_dirs(&dir),
        [1, 11, 21, 31].map(segment_dir_name).to_vec()
    );
}

#[test]
fn reading_from_inside_a_batch_starts_at_the_record_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_batches(&dir, &[6, 9], 100); // keys 1 (1-6) and 7 (7-15)
    let log = Log::open(&dir).unwrap();
    let reader = log.reader();
    for after in 0..=15 {
        let read: Vec<u64> = reader.records_after(after).map(|r| r.unwrap().0).collect();
        assert_eq!(read, (after + 1..=15).collect::<Vec<_>>(), "after {after}");
        let raw: Vec<(u64, sled::IVec)> = reader
            .raw_records_after(after)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(raw.len() as u64, 15 - after);
        for (seq, bytes) in raw {
            assert_eq!(
                &bytes[..],
                &record::encode(&created(seq))[..],
                "record {seq}"
            );
        }
    }
    // And across segments: the batch holding `after + 1` is in the second one.
    drop((reader, log));
    write_batches(&dir, &[3], 10);
    let log = Log::open(&dir).unwrap();
    let read: Vec<u64> = log
        .reader()
        .records_after(16)
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(read, vec![17, 18]);
}

#[test]
fn a_log_written_a_key_per_record_reads_on_and_takes_batches_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // An earlier build wrote 1-14: segment 1 full, segment 11 up to 14.
    write_per_record(&dir, 1..=14, 10);
    check_all(&dir, 14);
    // This build appends to the same segment, then into the next ones.
    write_batches(&dir, &[4, 9], 10);
    assert_eq!(
        keys(&dir),
        vec![
            (1, (1..=10).map(|seq| (seq, 1)).collect()),
            (
                11,
                vec![(11, 1), (12, 1), (13, 1), (14, 1), (15, 4), (19, 2)]
            ),
            (21, vec![(21, 7)]),
        ]
    );
    check_all(&dir, 27);
    // Reading from any point, across the change of layout.
    let log = Log::open(&dir).unwrap();
    for after in [0, 9, 13, 14, 15, 17, 19, 26, 27] {
        let read: Vec<u64> = log
            .reader()
            .records_after(after)
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(read, (after + 1..=27).collect::<Vec<_>>(), "after {after}");
    }
    drop(log);
    // Replay folds the lot; damage is named in either layout.
    write_batches(&dir, &[2], 10);
    check_all(&dir, 29);
    damage_record(&dir, 12).unwrap();
    let log = Log::open(&dir).unwrap();
    let err = log.reader().records().find_map(Result::err).unwrap();
    assert!(matches!(err, OpenError::Damaged { seq: 12, .. }), "{err}");
    assert_eq!(log.reader().summary().unwrap().damaged_at, Some(12));
    assert_eq!(log.truncate_from(12).unwrap(), 18);
    drop(log);
    check_all(&dir, 11);
}

#[test]
fn a_damaged_record_inside_a_batch_is_named_and_the_cut_keeps_the_batch_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_batches(&dir, &[5, 10, 5], 100); // keys 1 (1-5), 6 (6-15), 16 (16-20)
    damage_record(&dir, 9).unwrap();
    let log = Log::open(&dir).unwrap();
    let reader = log.reader();
    let read: Vec<_> = reader.records().collect();
    let first_err = read.iter().position(Result::is_err);
    assert_eq!(first_err, Some(8), "1-8, then the damage");
    let err = read[8].as_ref().unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Damaged {
                seq: 9,
                source: record::DecodeError::Checksum
            }
        ),
        "{err}"
    );
    assert_eq!(reader.summary().unwrap().damaged_at, Some(9));
    // Records before it, in the same batch, read on without it.
    let upto: Vec<u64> = reader
        .records()
        .map_while(Result::ok)
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(upto, (1..=8).collect::<Vec<_>>());
    // Cut there: 9-15 of the batch and the batch after it go; 6-8 stay, in one key.
    assert_eq!(log.truncate_from(9).unwrap(), 12);
    drop((reader, log));
    assert_eq!(keys(&dir), vec![(1, vec![(1, 5), (6, 3)])]);
    check_all(&dir, 8);
    // The log goes on from there.
    write_batches(&dir, &[4], 100);
    assert_eq!(keys(&dir), vec![(1, vec![(1, 5), (6, 3), (9, 4)])]);
    check_all(&dir, 12);
    // Cutting at a batch's first record removes its key; past the end, nothing.
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.truncate_from(13).unwrap(), 0);
    assert_eq!(log.truncate_from(6).unwrap(), 7);
    drop(log);
    assert_eq!(keys(&dir), vec![(1, vec![(1, 5)])]);
    check_all(&dir, 5);
}

/// Overwrites the value under `key` in whichever segment holds it, through `change`.
fn rewrite_value(dir: &Path, key: u64, change: impl FnOnce(&mut Vec<u8>)) {
    let log = Log::open(dir).unwrap();
    for slot in log.segments.list() {
        let segment = open_segment(&slot).unwrap().unwrap();
        if let Some(value) = segment.db().get(key.to_be_bytes()).unwrap() {
            let mut value = value.to_vec();
            change(&mut value);
            segment.db().insert(key.to_be_bytes(), value).unwrap();
            segment.db().flush().unwrap();
            return;
        }
    }
    panic!("no key {key}");
}

fn first_damage(dir: &Path) -> u64 {
    let log = Log::open(dir).unwrap();
    match log.reader().records().find_map(Result::err) {
        Some(OpenError::Damaged { seq, .. }) => seq,
        other => panic!("{other:?}"),
    }
}

/// Damage to the framing around the records (their numbers, lengths, the count) is
/// named by the first record it makes unreadable, and a cut there leaves a log that
/// reads through to the record before it.
#[test]
fn damaged_batch_framing_is_named_by_the_first_record_it_hides() {
    let len = record::encode(&created(1)).len(); // the same length for 1-9
    let frame = 12 + len;
    type Change = Box<dyn Fn(&mut Vec<u8>)>;
    // (what is changed, how, the record named)
    let cases: Vec<(&str, Change, u64)> = vec![
        (
            "third frame's number",
            Box::new(move |v| v[5 + 2 * frame + 7] ^= 1),
            3,
        ),
        (
            "second frame's length, longer",
            Box::new(move |v| v[5 + frame + 8] ^= 0x40),
            2,
        ),
        (
            "second frame's length, shorter",
            Box::new(move |v| v[5 + frame + 8] ^= 1),
            2,
        ),
        ("count, larger", Box::new(|v| v[1] = 5), 5),
        ("count, smaller", Box::new(|v| v[1] = 2), 3),
        ("format byte", Box::new(|v| v[0] = 0x01), 1),
        (
            "value cut short",
            Box::new(move |v| v.truncate(5 + 3 * frame + 4)),
            4,
        ),
    ];
    for (what, change, named) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write_batches(&dir, &[4, 3], 100); // keys 1 (1-4), 5 (5-7)
        rewrite_value(&dir, 1, change);
        assert_eq!(first_damage(&dir), named, "{what}");
        let log = Log::open(&dir).unwrap();
        log.truncate_from(named).unwrap();
        drop(log);
        check_all(&dir, named - 1);
        write_batches(&dir, &[2], 100);
        check_all(&dir, named + 1);
    }
}

/// sled 0.34.7 writes an item over ~128 KiB (a value, or a whole leaf node of up to 17
/// of them) to a file under `blobs/` that it never fsyncs: batch values stay small, so a
/// large group commit takes several keys, and no blob is ever written.
#[test]
fn a_large_group_commit_takes_several_small_keys_and_no_sled_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    // What the bound is for: sled puts a large value in a blob file.
    let probe = open_sled(&tmp.path().join("probe")).unwrap();
    probe.insert(b"k", vec![0u8; 200_000]).unwrap();
    probe.flush().unwrap();
    drop(probe);
    let blobs = |dir: &Path| -> usize {
        fs::read_dir(dir.join("blobs")).map_or(0, |entries| entries.count())
    };
    assert_eq!(blobs(&tmp.path().join("probe")), 1);

    write_batches(&dir, &[4000, 4000], SEGMENT_RECORDS_DEFAULT);
    let keys = &keys(&dir)[0].1;
    assert!(keys.len() > 2 * 10, "{} keys", keys.len());
    // A value reaches the target with its last record, never by more.
    let largest_frame = 12 + record::encode(&created(8000)).len();
    {
        let log = Log::open(&dir).unwrap();
        let slot = log.segments.list()[0].clone();
        let segment = open_segment(&slot).unwrap().unwrap();
        for value in segment.db().iter().values() {
            let len = value.unwrap().len();
            assert!(
                len < batch::BATCH_VALUE_BYTES_TARGET + largest_frame,
                "{len}"
            );
        }
    }
    check_all(&dir, 8000);
    for segment in segment_dirs(&dir) {
        assert_eq!(blobs(&dir.join(&segment)), 0, "{segment}");
    }
}

/// A record large enough for sled to put in a blob file (which sled never fsyncs) is
/// acknowledged only once the writer has fsynced that file and the blob directory; it reads
/// back whole, and records of ordinary size never make one.
#[test]
fn a_record_sled_puts_in_a_blob_file_is_synced_before_it_is_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap();
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let huge = Record::Adjusted {
        sku: "A".into(),
        delta: 1,
        reason: Some("x".repeat(300_000)),
        at: 1,
        by: None,
    };
    let stats = runtime.block_on(async {
        handle.append(created(1)).durable().await.unwrap();
        assert_eq!(
            handle.stats().blob_files_synced,
            0,
            "a small record: no blob"
        );
        handle.append(huge.clone()).durable().await.unwrap();
        let stats = handle.stats();
        handle.shutdown().await.unwrap();
        stats
    });
    join.join().unwrap();
    assert!(stats.blob_files_synced >= 1, "{stats:?}");
    let segment = dir.join(&segment_dirs(&dir)[0]);
    assert!(fs::read_dir(segment.join("blobs")).unwrap().count() >= 1);
    let log = Log::open(&dir).unwrap();
    let records: Vec<Record> = log.reader().records().map(|r| r.unwrap().1).collect();
    assert_eq!(records, vec![created(1), huge]);
}

// --- Batches of Raft entries (a cluster node's log). ---

/// Stores `entries` (term, payload) as one batch of Raft entries under `first`, in the
/// segment that holds `first`, as a cluster node's writer will.
fn write_entry_batch(dir: &Path, first: u64, entries: &[(u64, Vec<u8>)]) {
    let log = Log::open(dir).unwrap();
    let slot = log
        .segments
        .list()
        .into_iter()
        .rev()
        .find(|slot| slot.first <= first)
        .expect("a segment holds it");
    let segment = open_segment(&slot).unwrap().unwrap();
    let value = batch::entry_batch(first, entries);
    segment.db().insert(first.to_be_bytes(), value).unwrap();
    segment.db().flush().unwrap();
}

/// The payload of entry `seq` in these tests: a proposal of `created(seq)`, or a blank.
fn entry_payload(seq: u64) -> Vec<u8> {
    use crate::storage::entry::{encode_blank, encode_proposal, Epoch};
    let mut out = Vec::new();
    if seq.is_multiple_of(4) {
        encode_blank(&mut out);
    } else {
        let record = record::encode(&created(seq));
        encode_proposal(Epoch { term: 1, k: 0 }, seq, &record, &mut out);
    }
    out
}

/// Every entry stored under `key`, decoded and verified.
fn stored_entries(dir: &Path, key: u64) -> Vec<crate::storage::entry::Entry> {
    let log = Log::open(dir).unwrap();
    let slot = log.segments.list().remove(0);
    let segment = open_segment(&slot).unwrap().unwrap();
    let value = segment.db().get(key.to_be_bytes()).unwrap().unwrap();
    let mut frames = batch::FrameCursor::new(key, &value);
    std::iter::from_fn(|| frames.next(&value))
        .map(|frame| {
            let frame = frame.unwrap();
            let (term, crc) = frame.entry.expect("an entry");
            crate::storage::entry::decode_entry(
                frame.seq,
                term,
                &value[frame.start..frame.end],
                crc,
            )
            .unwrap()
        })
        .collect()
}

/// A segment of record batches followed by batches of Raft entries: the log's end is
/// found across them, a cut inside an entry batch keeps its entries before the cut (still
/// an entry batch, still verifying), and the readers of records refuse the first entry
/// by its sequence instead of decoding it as a record, so a single server never folds a
/// cluster node's log.
#[test]
fn batches_of_raft_entries_are_walked_cut_and_refused_by_the_record_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_batches(&dir, &[5], 100); // records 1-5, one key
    let entries = |seqs: std::ops::RangeInclusive<u64>, term: u64| -> Vec<(u64, Vec<u8>)> {
        seqs.map(|seq| (term, entry_payload(seq))).collect()
    };
    write_entry_batch(&dir, 6, &entries(6..=9, 1));
    write_entry_batch(&dir, 10, &entries(10..=12, 2));
    assert_eq!(keys(&dir), vec![(1, vec![(1, 5), (6, 4), (10, 3)])]);
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.last_seq().unwrap(), 12);
    let reader = log.reader();
    let read: Vec<_> = reader.records().collect();
    assert_eq!(read.len(), 6, "1-5, then the refusal, then nothing");
    assert!(read[..5].iter().all(Result::is_ok));
    assert!(
        matches!(read[5], Err(OpenError::RaftEntry { seq: 6 })),
        "{:?}",
        read[5]
    );
    let from_inside: Vec<_> = reader.records_after(7).collect();
    assert!(matches!(
        from_inside[..],
        [Err(OpenError::RaftEntry { seq: 8 })]
    ));
    assert!(matches!(
        reader.summary(),
        Err(OpenError::RaftEntry { seq: 6 })
    ));
    // So a single server's start-up stops there, saying why (and no truncation of
    // damaged records applies: nothing is damaged).
    let recovered =
        crate::storage::recovery::recover(&reader, &tmp.path().join("snapshots"), u64::MAX);
    let err = recovered.expect_err("recovery refuses a cluster node's log");
    assert!(
        matches!(
            err,
            crate::storage::recovery::RecoveryError::Open(OpenError::RaftEntry { seq: 6 })
        ),
        "{err}"
    );
    assert_eq!(err.damaged_seq(), None);
    assert!(
        err.to_string().contains("log entry 6 is a Raft entry"),
        "{err}"
    );
    drop((reader, log));
    let decoded = stored_entries(&dir, 6);
    assert_eq!(
        decoded
            .iter()
            .map(|e| (e.pos.seq, e.pos.term))
            .collect::<Vec<_>>(),
        vec![(6, 1), (7, 1), (8, 1), (9, 1)]
    );
    assert_eq!(decoded[2].payload, crate::storage::entry::Payload::Blank);

    // Damaged framing in an entry batch is named by the first entry it hides.
    let second_frame = 5 + 24 + entry_payload(10).len();
    rewrite_value(&dir, 10, |value| value[second_frame + 7] ^= 0x01);
    let log = Log::open(&dir).unwrap();
    assert!(matches!(
        log.last_seq(),
        Err(OpenError::Damaged { seq: 11, .. })
    ));
    // Cut there: entry 10 stays, alone in its batch.
    assert_eq!(log.truncate_from(11).unwrap(), 2);
    assert_eq!(log.last_seq().unwrap(), 10);
    // A cut inside the first entry batch keeps 6 and 7, still entries that verify.
    assert_eq!(log.truncate_from(8).unwrap(), 3);
    assert_eq!(log.last_seq().unwrap(), 7);
    drop(log);
    assert_eq!(keys(&dir), vec![(1, vec![(1, 5), (6, 2)])]);
    let kept = stored_entries(&dir, 6);
    assert_eq!(kept, decoded[..2].to_vec());
    // Cutting at the first entry leaves the records alone, which read as before.
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.truncate_from(6).unwrap(), 2);
    drop(log);
    check_all(&dir, 5);
}

/// Raft entries read back from any point, in order, with their terms and payloads
/// verified: a damaged entry is named by its sequence, and the records of a single
/// server's log are refused by the reader of entries.
#[test]
fn raft_entries_are_read_back_in_order_and_verified() {
    use crate::storage::entry::{Epoch, Payload};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_batches(&dir, &[5], 100);
    let entries = |seqs: std::ops::RangeInclusive<u64>, term: u64| -> Vec<(u64, Vec<u8>)> {
        seqs.map(|seq| (term, entry_payload(seq))).collect()
    };
    write_entry_batch(&dir, 6, &entries(6..=9, 1));
    write_entry_batch(&dir, 10, &entries(10..=12, 2));
    let log = Log::open(&dir).unwrap();
    let reader = log.reader();
    let read: Vec<_> = reader.entries_after(5).map(Result::unwrap).collect();
    assert_eq!(
        read.iter()
            .map(|e| (e.pos.seq, e.pos.term))
            .collect::<Vec<_>>(),
        vec![(6, 1), (7, 1), (8, 1), (9, 1), (10, 2), (11, 2), (12, 2)]
    );
    for entry in &read {
        let seq = entry.pos.seq;
        let expected = if seq.is_multiple_of(4) {
            Payload::Blank
        } else {
            Payload::Normal {
                epoch: Epoch { term: 1, k: 0 },
                n: seq,
                record: created(seq),
            }
        };
        assert_eq!(entry.payload, expected, "entry {seq}");
    }
    let from_inside: Vec<u64> = reader
        .entries_after(8)
        .map(|e| e.unwrap().pos.seq)
        .collect();
    assert_eq!(from_inside, vec![9, 10, 11, 12]);
    let from_start: Vec<_> = reader.entries_after(0).collect();
    assert!(
        matches!(from_start[..], [Err(OpenError::NotAnEntry { seq: 1 })]),
        "{from_start:?}"
    );
    drop((reader, log));
    damage_record(&dir, 10).unwrap();
    let log = Log::open(&dir).unwrap();
    let read: Vec<_> = log.reader().entries_after(5).collect();
    assert!(read[..4].iter().all(Result::is_ok));
    assert!(
        matches!(
            read[4],
            Err(OpenError::Damaged {
                seq: 10,
                source: record::DecodeError::Checksum
            })
        ),
        "{:?}",
        read[4]
    );
}

// --- A cluster node's vote. ---

/// A vote is saved after every record queued before it is flushed, and before any record
/// queued after it is written; it is read back after a restart, the newest one, with no
/// temporary file left behind.
#[test]
fn a_vote_is_saved_in_order_with_the_records_and_read_back() {
    use crate::storage::entry::Vote;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.vote().unwrap(), None);
    let first = Vote {
        term: 3,
        voted_for: Some(2),
        committed: false,
    };
    let second = Vote {
        term: 4,
        voted_for: Some(1),
        committed: true,
    };
    let (handle, join) = log
        .with_flush_interval(Duration::from_millis(5))
        .start_writer(1)
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let before: Vec<_> = (1..=50).map(|i| handle.append(created(i))).collect();
        let saved = handle.save_vote(first);
        let after = handle.append(created(51));
        assert_eq!(saved.durable().await.unwrap(), 50);
        assert!(
            handle.durable_seq() >= 50,
            "the records before it are durable"
        );
        assert_eq!(read_vote(&dir).unwrap(), Some(first));
        for (i, ticket) in before.into_iter().enumerate() {
            assert_eq!(ticket.durable().await.unwrap(), i as u64 + 1);
        }
        assert_eq!(after.durable().await.unwrap(), 51);
        assert_eq!(handle.save_vote(second).durable().await.unwrap(), 51);
        handle.shutdown().await.unwrap();
    });
    join.join().unwrap();
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.vote().unwrap(), Some(second));
    assert_eq!(log.last_seq().unwrap(), 51);
    assert!(!dir.join(format!("{VOTE_FILE}.tmp")).exists());
}

/// A vote file that does not verify (a flipped byte, cut short, empty) is an error, never
/// "no vote"; and a log that has failed saves no vote.
#[test]
fn a_damaged_vote_is_an_error_and_a_failed_log_saves_no_vote() {
    use crate::storage::entry::Vote;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    drop(Log::open(&dir).unwrap());
    let vote = Vote {
        term: 9,
        voted_for: None,
        committed: false,
    };
    write_vote(&dir, &vote).unwrap();
    let good = fs::read(dir.join(VOTE_FILE)).unwrap();
    let mut damaged: Vec<Vec<u8>> = (0..good.len())
        .map(|at| {
            let mut bytes = good.clone();
            bytes[at] ^= 0x04;
            bytes
        })
        .collect();
    damaged.push(good[..good.len() - 1].to_vec());
    damaged.push(Vec::new());
    damaged.push([good.clone(), vec![0]].concat());
    for bytes in damaged {
        fs::write(dir.join(VOTE_FILE), &bytes).unwrap();
        let log = Log::open(&dir).unwrap();
        assert!(
            matches!(log.vote(), Err(OpenError::BadVote { .. })),
            "{bytes:?}"
        );
    }
    fs::write(dir.join(VOTE_FILE), &good).unwrap();

    let log = Log::open(&dir).unwrap();
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        handle.inject_write_failure();
        assert!(handle.append(created(1)).durable().await.is_err());
        let newer = Vote {
            term: 10,
            voted_for: Some(3),
            committed: false,
        };
        assert!(handle.save_vote(newer).durable().await.is_err());
        let _ = handle.shutdown().await;
    });
    join.join().unwrap();
    assert_eq!(Log::open(&dir).unwrap().vote().unwrap(), Some(vote));
}

// --- The writer storing Raft entries (`append_entries`) and cutting them (`truncate_after`). ---

/// Entry `seq` as these tests append it: `entry_payload(seq)` in `term`.
fn new_entry(seq: u64, term: u64) -> NewEntry {
    NewEntry {
        term,
        payload: entry_payload(seq).into(),
    }
}

/// Queues entries `seqs` in `term`; the returned channel gets what the callback is told.
fn queue_entries(
    handle: &LogHandle,
    seqs: std::ops::RangeInclusive<u64>,
    term: u64,
) -> std::sync::mpsc::Receiver<Result<u64, LogError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let first = *seqs.start();
    let entries = seqs.map(|seq| new_entry(seq, term)).collect();
    handle.append_entries(
        first,
        entries,
        Box::new(move |result| tx.send(result).unwrap()),
    );
    rx
}

/// Appends entries `seqs` in `term` and waits for the callback.
fn append_entries_now(
    handle: &LogHandle,
    seqs: std::ops::RangeInclusive<u64>,
    term: u64,
) -> Result<u64, LogError> {
    queue_entries(handle, seqs, term)
        .recv_timeout(Duration::from_secs(30))
        .expect("the callback is called")
}

/// Every entry of the log from its start, as (seq, term), checking each payload is the
/// one `new_entry` made for its sequence.
fn all_entries(dir: &Path) -> Vec<(u64, u64)> {
    let log = Log::open(dir).unwrap();
    let read: Vec<_> = log.reader().entries_after(0).map(Result::unwrap).collect();
    let last = log.last_seq().unwrap();
    let seqs: Vec<u64> = read.iter().map(|e| e.pos.seq).collect();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "no hole, up to the end"
    );
    for entry in &read {
        let seq = entry.pos.seq;
        let expected = entry_payload(seq);
        let decoded = crate::storage::entry::decode_entry(seq, entry.pos.term, &expected, 0).err();
        assert_eq!(decoded, Some(record::DecodeError::Checksum)); // (only the term matters)
        let crc = crate::storage::entry::frame_crc(entry.pos.term, &expected);
        let again =
            crate::storage::entry::decode_entry(seq, entry.pos.term, &expected, crc).unwrap();
        assert_eq!(entry.payload, again.payload, "entry {seq}");
    }
    read.iter().map(|e| (e.pos.seq, e.pos.term)).collect()
}

/// The writer calls an append's callback only after sled's flush and `sync_blobs` of
/// every segment its entries went to (the engine's "flushed" must never come early), with
/// the last entry's sequence; appends queued together share one group commit; and the
/// entries read back in order, verified, across segment rolls.
#[test]
fn appended_entries_are_reported_flushed_only_after_the_flush_and_the_blob_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let trace: writer::Trace = Default::default();
    let mut log = Log::open(&dir)
        .unwrap()
        .with_segment_records(10)
        .with_flush_interval(Duration::from_millis(20));
    log.trace = Some(trace.clone());
    let (handle, join) = log.start_writer(1).unwrap();
    let mut waiting = Vec::new();
    let mut first = 1;
    // Held, the writer cannot take part of the appends before the rest is queued.
    let release = handle.hold();
    for size in [3, 1, 8, 12, 2, 30] {
        let last = first + size - 1;
        let (tx, rx) = std::sync::mpsc::channel();
        let seen = trace.clone();
        handle.append_entries(
            first,
            (first..=last).map(|seq| new_entry(seq, 2)).collect(),
            Box::new(move |result| {
                if let Ok(last) = &result {
                    seen.lock().unwrap().push(writer::Step::Acknowledged(*last));
                }
                tx.send(result).unwrap();
            }),
        );
        waiting.push((last, rx));
        first = last + 1;
    }
    drop(release);
    for (last, rx) in waiting {
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), Ok(last));
    }
    let steps = trace.lock().unwrap().clone();
    let durable = handle.durable_seq();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    let mut flushed = 0;
    let mut synced = 0;
    let mut acknowledged = 0;
    for step in &steps {
        match *step {
            writer::Step::Flushed(through) => {
                assert!(through > flushed, "{steps:?}");
                flushed = through;
            }
            writer::Step::BlobsSynced(through) => {
                assert_eq!(through, flushed, "synced after that flush: {steps:?}");
                synced = through;
            }
            writer::Step::Acknowledged(through) => {
                assert!(
                    through <= synced && synced <= flushed,
                    "{through} reported before its flush and blob sync: {steps:?}"
                );
                acknowledged += 1;
            }
        }
    }
    assert_eq!(acknowledged, 6);
    assert_eq!(durable, 56);
    let stats = handle.stats();
    assert_eq!(stats.records, 56);
    assert_eq!(
        stats.batches, 1,
        "appends queued together share a commit: {stats:?}"
    );
    assert!(segment_dirs(&dir).len() >= 6, "{:?}", segment_dirs(&dir));
    let read = all_entries(&dir);
    assert_eq!(read, (1..=56).map(|seq| (seq, 2)).collect::<Vec<_>>());
    // Stored as batches of entries, one key per segment a commit touches (or more).
    for (segment, keys) in keys(&dir) {
        assert_eq!(
            keys[0].0, segment,
            "each segment starts with its first entry"
        );
    }
}

/// An append after an injected write failure is reported `Err`, and so is every later
/// one (records, cuts and votes too); what was reported flushed before is all there after
/// a restart. An append that does not continue the log fails it too.
#[test]
fn appending_entries_fails_after_an_injected_write_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap().with_segment_records(10);
    let (handle, join) = log.start_writer(1).unwrap();
    assert_eq!(append_entries_now(&handle, 1..=12, 1), Ok(12));
    handle.inject_write_failure();
    assert!(append_entries_now(&handle, 13..=14, 1).is_err());
    assert!(!handle.is_healthy());
    assert!(append_entries_now(&handle, 13..=13, 1).is_err());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert!(handle.append(created(13)).durable().await.is_err());
        assert!(handle.truncate_after(5).durable().await.is_err());
        let _ = handle.shutdown().await;
    });
    join.join().unwrap();
    assert_eq!(
        all_entries(&dir),
        (1..=12).map(|seq| (seq, 1)).collect::<Vec<_>>()
    );

    // Entries numbered other than where the log goes on: refused, and the log fails.
    let log = Log::open(&dir).unwrap();
    let (handle, join) = log.start_writer(13).unwrap();
    let err = append_entries_now(&handle, 15..=16, 1).unwrap_err();
    assert!(err.to_string().contains("appended at 15"), "{err}");
    assert!(append_entries_now(&handle, 13..=13, 1).is_err());
    let _ = runtime.block_on(handle.shutdown());
    join.join().unwrap();
    assert_eq!(Log::open(&dir).unwrap().last_seq().unwrap(), 12);
}

/// Records and entries queued one after another, without waiting, are numbered in queue
/// order, each kind in batch values of its own, in segments that mix both; each reader
/// reads its kind in order across the segment rolls and stops at the other kind.
#[test]
fn records_and_entries_mixed_in_segments_read_back_in_order_across_a_segment_roll() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir)
        .unwrap()
        .with_segment_records(10)
        .with_flush_interval(Duration::from_millis(20));
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let release = handle.hold();
        let early: Vec<_> = (1..=7).map(|i| handle.append(created(i))).collect();
        let entries = queue_entries(&handle, 8..=23, 3);
        let barrier = handle.barrier();
        let late: Vec<_> = (24..=26).map(|i| handle.append(created(i))).collect();
        let more = queue_entries(&handle, 27..=31, 4);
        drop(release);
        for (i, ticket) in early.into_iter().enumerate() {
            assert_eq!(ticket.durable().await.unwrap(), i as u64 + 1);
        }
        assert_eq!(entries.recv().unwrap(), Ok(23));
        assert_eq!(barrier.durable().await.unwrap(), 23);
        for (i, ticket) in late.into_iter().enumerate() {
            assert_eq!(ticket.durable().await.unwrap(), 24 + i as u64);
        }
        assert_eq!(more.recv().unwrap(), Ok(31));
        handle.shutdown().await.unwrap();
    });
    join.join().unwrap();
    // Which keys hold entries (0x82) and which records (0x81), by segment.
    let log = Log::open(&dir).unwrap();
    let kinds: Vec<(u64, Vec<(u64, u8)>)> = log
        .segments
        .list()
        .iter()
        .map(|slot| {
            let segment = open_segment(slot).unwrap().unwrap();
            let keys = segment.db().iter().map(|item| {
                let (key, value) = item.unwrap();
                (seq_of(&key).unwrap(), value[0])
            });
            (slot.first, keys.collect())
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, vec![(1, 0x81), (8, 0x82)]),
            (11, vec![(11, 0x82)]),
            (21, vec![(21, 0x82), (24, 0x81), (27, 0x82)]),
            (31, vec![(31, 0x82)]),
        ]
    );
    assert_eq!(log.last_seq().unwrap(), 31);
    let reader = log.reader();
    let records: Vec<_> = reader.records().collect();
    assert_eq!(records.len(), 8);
    assert!(matches!(records[7], Err(OpenError::RaftEntry { seq: 8 })));
    let entries: Vec<_> = reader.entries_after(7).collect();
    assert_eq!(entries.len(), 17);
    let seqs: Vec<(u64, u64)> = entries[..16]
        .iter()
        .map(|e| e.as_ref().map(|e| (e.pos.seq, e.pos.term)).unwrap())
        .collect();
    assert_eq!(seqs, (8..=23).map(|seq| (seq, 3)).collect::<Vec<_>>());
    assert!(matches!(
        entries[16],
        Err(OpenError::NotAnEntry { seq: 24 })
    ));
    let records: Vec<u64> = reader
        .records_after(23)
        .map_while(Result::ok)
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(records, vec![24, 25, 26]);
    let tail: Vec<(u64, u64)> = reader
        .entries_after(26)
        .map(|e| e.map(|e| (e.pos.seq, e.pos.term)).unwrap())
        .collect();
    assert_eq!(tail, (27..=31).map(|seq| (seq, 4)).collect::<Vec<_>>());
}

/// `truncate_after` drops an uncommitted tail: inside a batch, inside the current segment,
/// and back into an earlier segment (the later ones go); entries appended after it are
/// numbered from the cut and read back after a restart, with no segment left ahead.
#[test]
fn truncate_after_drops_the_tail_inside_a_batch_and_appends_continue_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap().with_segment_records(10);
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for first in (1..=25).step_by(5) {
        assert_eq!(
            append_entries_now(&handle, first..=first + 4, 1),
            Ok(first + 4)
        );
    }
    // Past the end: nothing to drop.
    assert_eq!(
        runtime.block_on(handle.truncate_after(40).durable()),
        Ok(25)
    );
    // Inside the batch 21-25 of the current segment.
    assert_eq!(
        runtime.block_on(handle.truncate_after(23).durable()),
        Ok(23)
    );
    assert_eq!(handle.durable_seq(), 23);
    assert_eq!(append_entries_now(&handle, 24..=27, 2), Ok(27));
    // Back inside the batch 11-15 of an earlier segment: 21-27 go, their segment too.
    assert_eq!(
        runtime.block_on(handle.truncate_after(12).durable()),
        Ok(12)
    );
    assert_eq!(append_entries_now(&handle, 13..=22, 3), Ok(22));
    // A cut queued right behind an append waits for it, and one behind the cut follows.
    let queued = queue_entries(&handle, 23..=24, 3);
    let cut = handle.truncate_after(20);
    let after = queue_entries(&handle, 21..=21, 4);
    assert_eq!(queued.recv().unwrap(), Ok(24));
    assert_eq!(runtime.block_on(cut.durable()), Ok(20));
    assert_eq!(after.recv().unwrap(), Ok(21));
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    let expected: Vec<(u64, u64)> = (1..=21)
        .map(|seq| {
            (
                seq,
                if seq <= 12 {
                    1
                } else if seq <= 20 {
                    3
                } else {
                    4
                },
            )
        })
        .collect();
    assert_eq!(all_entries(&dir), expected);
    assert_eq!(
        segment_dirs(&dir).len(),
        3,
        "segments 1, 11, 21: {:?}",
        segment_dirs(&dir)
    );
    // And the writer goes on after a restart. A cut before the front of the log (truncated
    // through 10, which a snapshot covers) is refused without harm.
    let log = Log::open(&dir).unwrap().with_segment_records(10);
    let reader = log.reader();
    assert_eq!(reader.truncate_through(10).unwrap(), 10);
    let (handle, join) = log.start_writer(22).unwrap();
    let refused = runtime.block_on(handle.truncate_after(9).durable());
    assert!(refused.is_err(), "{refused:?}");
    assert!(handle.is_healthy());
    assert_eq!(append_entries_now(&handle, 22..=22, 4), Ok(22));
    drop(reader);
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    let log = Log::open(&dir).unwrap();
    let read: Vec<u64> = log
        .reader()
        .entries_after(10)
        .map(|e| e.unwrap().pos.seq)
        .collect();
    assert_eq!(read, (11..=22).collect::<Vec<_>>());
    assert_eq!(log.last_seq().unwrap(), 22);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A cut of the tail (`truncate_after`'s, which is `truncate_from`'s) interrupted after
/// any number of its steps leaves a log without a hole: a prefix of the entries, at least
/// up to the cut, which reopens and reads in order.
#[test]
fn a_cut_interrupted_at_any_step_leaves_no_hole() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let log = Log::open(&pristine).unwrap().with_segment_records(10);
    let (handle, join) = log.start_writer(1).unwrap();
    for first in (1..=33).step_by(4) {
        assert_eq!(
            append_entries_now(&handle, first..=first + 3, 1),
            Ok(first + 3)
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    assert_eq!(all_entries(&pristine).len(), 36);
    // Cut at 15, inside the batch 13-16 (segment 11-20); segments 21 and 31 go first.
    let mut lasts = Vec::new();
    for steps in 0.. {
        let dir = tmp.path().join(format!("crash-{steps}"));
        copy_dir(&pristine, &dir);
        let log = Log::open(&dir).unwrap();
        log.truncate_from_crashing(15, steps).unwrap();
        drop(log);
        let read = all_entries(&dir);
        let last = read.len() as u64;
        assert!((14..=36).contains(&last), "after {steps} steps: {last}");
        lasts.push(last);
        if last == 14 {
            break;
        }
        assert!(steps < 10, "the cut never ends: {lasts:?}");
    }
    // Each step shortened the log (segments 31, 21, then keys 17-20, then the batch).
    assert_eq!(lasts, vec![36, 30, 20, 16, 14]);
}

// --- A cluster node's committed mark. ---

/// The committed mark is written with the batches after `save_committed`, never past the
/// durable log (nor past a cut), never lowered by a smaller value, and read back after a
/// restart; a file a crash left damaged reads as 0, which is as safe.
#[test]
fn the_committed_mark_is_a_lower_bound_written_with_each_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.committed().unwrap(), 0);
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(append_entries_now(&handle, 1..=10, 1), Ok(10));
    assert!(
        !dir.join(COMMITTED_FILE).exists(),
        "nothing said committed yet"
    );
    handle.save_committed(5);
    assert_eq!(runtime.block_on(handle.barrier().durable()), Ok(10));
    assert_eq!(read_committed(&dir).unwrap(), 5);
    // Told more than is durable: the mark stops at the durable log.
    handle.save_committed(20);
    assert_eq!(append_entries_now(&handle, 11..=12, 1), Ok(12));
    assert_eq!(read_committed(&dir).unwrap(), 12);
    handle.save_committed(3);
    assert_eq!(append_entries_now(&handle, 13..=16, 1), Ok(16));
    assert_eq!(
        read_committed(&dir).unwrap(),
        16,
        "up to 20 now, never lowered"
    );
    // A cut below it (which the engine never makes) brings it back to the log's end.
    assert_eq!(
        runtime.block_on(handle.truncate_after(14).durable()),
        Ok(14)
    );
    assert_eq!(read_committed(&dir).unwrap(), 14);
    assert_eq!(append_entries_now(&handle, 15..=18, 2), Ok(18));
    assert_eq!(
        read_committed(&dir).unwrap(),
        14,
        "told 14 at most since the cut"
    );
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    assert!(!dir.join(format!("{COMMITTED_FILE}.tmp")).exists());
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.committed().unwrap(), 14);
    // The writer starts from the file: a smaller value is not written over it.
    let (handle, join) = log.start_writer(19).unwrap();
    handle.save_committed(2);
    assert_eq!(append_entries_now(&handle, 19..=19, 2), Ok(19));
    assert_eq!(read_committed(&dir).unwrap(), 14);
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    let good = fs::read(dir.join(COMMITTED_FILE)).unwrap();
    for at in 0..good.len() {
        let mut bytes = good.clone();
        bytes[at] ^= 0x08;
        fs::write(dir.join(COMMITTED_FILE), &bytes).unwrap();
        assert_eq!(
            Log::open(&dir).unwrap().committed().unwrap(),
            0,
            "byte {at}"
        );
    }
    fs::write(dir.join(COMMITTED_FILE), &good[..5]).unwrap();
    assert_eq!(Log::open(&dir).unwrap().committed().unwrap(), 0);
}

/// Stores `records` in a new log in `dir` as a build of record format 2 did: one key per
/// record, from sequence 1.
fn store_format_2_records(dir: &Path, records: &[crate::storage::legacy::RecordV2]) {
    let log = Log::open(dir).unwrap();
    let segment = log.segments.create(1).unwrap();
    for (seq, old) in (1u64..).zip(records) {
        segment
            .db()
            .insert(seq.to_be_bytes(), record::encode_v2(old))
            .unwrap();
    }
    segment.db().flush().unwrap();
}

/// Appends `record` to the log in `dir` with today's writer, after record `last`.
fn append_one(dir: &Path, last: u64, record: Record) {
    let log = Log::open(dir).unwrap();
    let (handle, join) = log.start_writer(last + 1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        handle.append(record).durable().await.unwrap();
        handle.shutdown().await.unwrap();
    });
    join.join().unwrap();
}

/// A log written by a build of record format 2 (before the low-stock threshold), one key
/// per record as those builds stored them, reads as today's records with no threshold;
/// records of today's format appended after them read as written.
#[test]
fn a_log_of_format_2_records_reads_with_no_threshold() {
    use crate::storage::legacy::RecordV2;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let old: Vec<RecordV2> = (1..=3u64)
        .map(|seq| RecordV2::ProductCreated {
            sku: format!("SKU-{seq}"),
            name: "n".into(),
            price: None,
            on_hand: seq,
            rules: Default::default(),
            at: 1,
            by: None,
        })
        .collect();
    store_format_2_records(&dir, &old);
    let with_threshold = Record::ProductPatched {
        sku: "SKU-1".into(),
        name: None,
        price: None,
        rules: Default::default(),
        low_stock_threshold: Some(Some(2)),
        at: 2,
        by: None,
    };
    append_one(&dir, 3, with_threshold.clone());
    let log = Log::open(&dir).unwrap();
    let read: Vec<(u64, Record)> = log.reader().records().map(|r| r.unwrap()).collect();
    let mut expected: Vec<(u64, Record)> = (1..=3).map(|seq| (seq, created(seq))).collect();
    expected.push((4, with_threshold));
    assert_eq!(read, expected);
    let mut state = crate::storage::fold::State::default();
    for (_, record) in &read {
        crate::storage::fold::apply(&mut state, record).unwrap();
    }
    assert_eq!(state.products["SKU-1"].low_stock_threshold(), Some(2));
    assert_eq!(state.products["SKU-2"].low_stock_threshold(), None);
}

/// A data directory of an older build (a format-2 snapshot after record 2, and the log of
/// format-2 records around it), upgraded: recovery starts from the old snapshot, folds the
/// old records after it and today's after those, and only today's carry a threshold.
#[test]
fn recovery_reads_an_old_snapshot_and_old_records_then_new_ones() {
    use crate::storage::legacy::RecordV2;
    use crate::storage::recovery;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let snapshots = tmp.path().join("snapshots");
    let old = |seq: u64| match seq {
        3 => RecordV2::ProductPatched {
            sku: "SKU-1".into(),
            name: Some("renamed".into()),
            price: None,
            rules: crate::domain::RulesPatch {
                max_per_customer: Some(Some(2)),
                ..Default::default()
            },
            at: 3,
            by: None,
        },
        _ => RecordV2::ProductCreated {
            sku: format!("SKU-{seq}"),
            name: "n".into(),
            price: None,
            on_hand: seq,
            rules: Default::default(),
            at: 1,
            by: None,
        },
    };
    store_format_2_records(&dir, &(1..=3).map(old).collect::<Vec<_>>());
    let mut at_2 = crate::storage::fold::State::default();
    for seq in 1..=2 {
        crate::storage::fold::apply(&mut at_2, &Record::from(old(seq))).unwrap();
    }
    crate::storage::snapshot::write_format_2(&snapshots, 2, &at_2);
    let threshold = Record::ProductPatched {
        sku: "SKU-1".into(),
        name: None,
        price: None,
        rules: Default::default(),
        low_stock_threshold: Some(Some(1)),
        at: 4,
        by: None,
    };
    append_one(&dir, 3, threshold);
    let log = Log::open(&dir).unwrap();
    let recovered = recovery::recover(&log.reader(), &snapshots, u64::MAX).unwrap();
    let snapshot = recovered
        .snapshot
        .as_ref()
        .expect("the old snapshot was used");
    assert_eq!((snapshot.seq, snapshot.format_version), (2, 2));
    assert_eq!((recovered.records, recovered.last_seq), (2, 4));
    let p = &recovered.state.products["SKU-1"];
    assert_eq!(p.name, "renamed");
    assert_eq!(p.rules.max_per_customer, Some(2));
    assert_eq!(p.low_stock_threshold(), Some(1));
    assert!(p.is_low(), "1 unit, at the threshold");
    assert_eq!(
        recovered.state.products["SKU-2"].low_stock_threshold(),
        None
    );
}

/// `restart` numbers the next entries past a purge that passed the log's end (a snapshot
/// installed): refused without harm before the purge or at the log's own next sequence,
/// then entries continue from it, inside the current segment or in a new one, and read
/// back after a restart with nothing of the purged front.
#[test]
fn restart_numbers_the_next_entries_past_a_purge_beyond_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap().with_segment_records(10);
    let reader = log.reader();
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(append_entries_now(&handle, 1..=3, 1), Ok(3));
    // Not purged yet: a restart would leave a hole.
    assert!(runtime.block_on(handle.restart(8).durable()).is_err());
    assert!(handle.is_healthy());
    reader
        .purge_through(crate::storage::entry::LogPos { term: 2, seq: 7 })
        .unwrap();
    // Past the mark, or not past the log's end: refused.
    assert!(runtime.block_on(handle.restart(9).durable()).is_err());
    assert!(runtime.block_on(handle.restart(4).durable()).is_err());
    assert!(handle.is_healthy());
    assert_eq!(runtime.block_on(handle.restart(8).durable()), Ok(7));
    assert_eq!(handle.durable_seq(), 7);
    // Into the current segment (1-10), then on into the next.
    assert_eq!(append_entries_now(&handle, 8..=9, 2), Ok(9));
    reader
        .purge_through(crate::storage::entry::LogPos { term: 3, seq: 40 })
        .unwrap();
    assert_eq!(runtime.block_on(handle.restart(41).durable()), Ok(40));
    assert_eq!(append_entries_now(&handle, 41..=43, 3), Ok(43));
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    drop(reader);
    let log = Log::open(&dir).unwrap();
    assert_eq!(log.last_seq().unwrap(), 43);
    let read: Vec<(u64, u64)> = log
        .reader()
        .entries_after(40)
        .map(|e| e.map(|e| (e.pos.seq, e.pos.term)))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(read, vec![(41, 3), (42, 3), (43, 3)]);
    // The writer started again continues after the last entry.
    let (handle, join) = log.start_writer(44).unwrap();
    assert_eq!(append_entries_now(&handle, 44..=44, 3), Ok(44));
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
}

/// A reader of Raft entries leaves the segments it read open on the segment thread for a
/// moment: the engine's consecutive short reads (a replay, a follower's catch-up) open a
/// sealed segment once, not once per read. A truncation still deletes such a segment, and
/// the writer's shutdown closes them.
#[test]
fn short_reads_of_entries_open_a_sealed_segment_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let log = Log::open(&dir).unwrap().with_segment_records(10);
    let reader = log.reader();
    let (handle, join) = log.start_writer(1).unwrap();
    assert_eq!(append_entries_now(&handle, 1..=25, 2), Ok(25));
    let opened = || {
        let opened = &reader.segments.guard.opened;
        opened.load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = opened();
    // 16 reads of two entries each from the sealed segments 1 and 11 (each read opens
    // the segment after its own ahead as well): 32 opens if every read closed them.
    for after in 0..16 {
        let read: Vec<u64> = reader
            .entries_after(after)
            .take(2)
            .map(|e| e.unwrap().pos.seq)
            .collect();
        assert_eq!(read, vec![after + 1, after + 2]);
    }
    let opens = opened() - before;
    assert!(
        opens <= 8,
        "{opens} opens of sealed segments for 16 short reads"
    );

    // Segment 1 is open (kept), and truncated: its directory goes all the same.
    assert_eq!(reader.truncate_through(10).unwrap(), 10);
    let leftovers = || {
        fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(TRASH_PREFIX) || name == &segment_dir_name(1))
            .collect::<Vec<_>>()
    };
    wait_until(|| leftovers().is_empty());
    assert_eq!(leftovers(), Vec::<String>::new());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(handle.shutdown()).unwrap();
    join.join().unwrap();
    assert!(
        reader.segments.guard.wait_closed(Duration::ZERO),
        "a segment is still open after the writer's shutdown"
    );
    drop(reader);
    let read: Vec<u64> = Log::open(&dir)
        .unwrap()
        .reader()
        .entries_after(10)
        .map(|e| e.unwrap().pos.seq)
        .collect();
    assert_eq!(read, (11..=25).collect::<Vec<_>>());
}
