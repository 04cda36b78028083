//! Tests of the log: segments, truncation, the directory lock, the migration.

use std::fs;
use std::thread;
use std::time::Instant;

use super::*;

fn created(i: u64) -> Record {
    Record::ProductCreated {
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

#[test]
fn a_single_database_log_is_moved_to_a_database_per_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    write_single_database(&dir, 100_000, 40_000, 3);
    let log = Log::open(&dir).unwrap();
    assert!(!dir.join("db").exists() && !dir.join("conf").exists());
    assert_eq!(segment_dirs(&dir).len(), 2); // 65,536 records per segment
    let reader = log.reader();
    assert_eq!(reader.truncated_through(), 3);
    let read: Vec<(u64, Record)> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(read.len(), 100_000);
    assert!(read.iter().all(|(seq, record)| *record == created(*seq)));
    drop((reader, log));
    write(&dir, 5, SEGMENT_RECORDS_DEFAULT);
    assert_eq!(Log::open(&dir).unwrap().last_seq().unwrap(), 100_005);
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
