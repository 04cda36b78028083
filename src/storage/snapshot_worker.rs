//! Building a snapshot in a child process (the *snapshot worker*), so that the server's
//! own address space never holds the second copy of the state a snapshot needs.
//!
//! Building a snapshot decodes the previous one and folds the log onto it: at a million
//! products that is ~0.9 GB allocated, touched and freed again. Done inside the server,
//! those page faults, frees and the TLB shootdowns that returning memory causes all land
//! in the process that answers requests, and its resident memory peaks at twice the
//! steady state. In a child process they do not. The child is the same `stockd` binary
//! (`stockd snapshot-worker`, hidden), started from the snapshot job's thread, so it
//! inherits that thread's scheduling class (`SCHED_IDLE` for a single server's background
//! snapshots; nice 10 for a cluster node's, and for a single server's overdue ones).
//!
//! The protocol, over the child's stdin and stdout:
//! 1. The child loads the newest snapshot at or before `--upto` that verifies (and that
//!    the log continues: not older than `--truncated-through`) and prints one JSON line,
//!    `{"base": S}` (0: no snapshot, the log from its start).
//! 2. The server sends the log records after S up to `--upto`, as stored: frames of
//!    `[sequence: u64 BE][length: u32 BE][record bytes]`, then closes the pipe.
//! 3. The child verifies and folds them with the one fold (`recovery::fold_stream`: a
//!    damaged record, a gap or a log short of `--upto` is an error), writes the snapshot
//!    (temporary file, fsync, rename, directory fsync) and prints one JSON line
//!    describing it. Anything else it has to say goes to stderr, which the server reads
//!    and reports if the child fails.
//!
//! For a cluster node (`--entries`) the log holds Raft entries: step 2's frames are
//! `[sequence: u64 BE][term: u64 BE][frame checksum: u32 BE][length: u32 BE][payload]`,
//! as stored; the child verifies each (`entry::decode_entry`) and folds them with
//! `recovery::fold_entries`; and with `--expect-raft` (JSON) it writes the snapshot only if
//! the state's Raft metadata is exactly that (what the node's state machine had applied),
//! so a state that differs is never put in place.
//!
//! The log stays the server's alone (it holds the log's lock); the child only reads
//! snapshots and writes one. A child left behind by a server killed with SIGKILL is
//! killed too (`PR_SET_PDEATHSIG`), and its temporary file is removed at the next start.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::storage::entry::{decode_entry, Entry, RaftMeta};
use crate::storage::log::{LogReader, OpenError, RawEntry};
use crate::storage::record::Record;
use crate::storage::recovery;
use crate::storage::snapshot::{self, WriteHooks};

/// A frame longer than this is a broken stream, not a record (a record comes from a request
/// body of at most 64 KiB).
const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The subcommand the server starts its worker with.
pub const SUBCOMMAND: &str = "snapshot-worker";

/// What the child is asked to build.
#[derive(Clone, Debug)]
pub struct Job {
    pub snapshot_dir: PathBuf,
    pub upto: u64,
    pub truncated_through: u64,
    pub now: Millis,
    pub pause_before_rename: Option<Duration>,
    /// A cluster node's snapshot: the log holds Raft entries, sent as entry frames and
    /// folded with `fold::apply_entry` (`recovery::fold_entries`).
    pub entries: bool,
    /// The Raft metadata the folded state must hold, checked before the snapshot is
    /// written (a cluster node's: what its state machine had applied). A state that
    /// differs is never put in place.
    pub expect_raft: Option<RaftMeta>,
}

impl Job {
    /// The child's command-line arguments after the subcommand (`--name=value`, so that
    /// a negative number is never taken for a flag; the directory as an `OsString`).
    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut dir = std::ffi::OsString::from("--snapshot-dir=");
        dir.push(&self.snapshot_dir);
        let mut args = vec![
            dir,
            format!("--upto={}", self.upto).into(),
            format!("--truncated-through={}", self.truncated_through).into(),
            format!("--now={}", self.now).into(),
        ];
        if let Some(pause) = self.pause_before_rename {
            args.push(format!("--pause-before-rename-ms={}", pause.as_millis()).into());
        }
        if self.entries {
            args.push("--entries".into());
        }
        if let Some(raft) = &self.expect_raft {
            let json = serde_json::to_string(raft).expect("Raft metadata serializes");
            args.push(format!("--expect-raft={json}").into());
        }
        args
    }
}

#[derive(Serialize, Deserialize)]
struct BaseLine {
    base: u64,
}

/// The child's last line: the snapshot it wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Built {
    pub sequence: u64,
    pub size_bytes: u64,
    pub records_folded: u64,
    /// Newer snapshots the child skipped because they do not verify.
    pub skipped: Vec<String>,
    pub build_ms: u64,
    pub write_ms: u64,
    /// A cluster node's snapshot: the Raft metadata of the state it holds (the node checks
    /// it is what its state machine had applied when it asked).
    #[serde(default)]
    pub raft: Option<RaftMeta>,
}

/// Why the server could not build a snapshot in a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The child could not be started (the binary moved, no processes left...): the
    /// server builds the snapshot itself instead.
    #[error("cannot start the snapshot worker {program}: {source}")]
    Spawn { program: String, source: io::Error },
    /// What the child reported (its error crosses the process boundary as text).
    #[error("the snapshot worker failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Recovery(#[from] recovery::RecoveryError),
    #[error("cannot answer the server: {0}")]
    Answer(io::Error),
    #[error("cannot write a snapshot in {dir}: {source}")]
    Write { dir: String, source: io::Error },
    /// The state folded is not the one asked for (`Job::expect_raft`): nothing written.
    #[error("the state folded through {upto} holds {found:?}, not the Raft metadata asked for ({expected:?})")]
    NotExpected {
        upto: u64,
        found: Box<Option<RaftMeta>>,
        expected: Box<RaftMeta>,
    },
    /// The server could not read the log records to send (its side, not the child's).
    #[error(transparent)]
    Log(#[from] OpenError),
}

/// The child's side: runs one job, reading records from `input`, answering on `output`.
pub fn run(
    job: &Job,
    input: impl Read + Send,
    mut output: impl Write,
) -> Result<Built, WorkerError> {
    let started = Instant::now();
    let base = recovery::base_snapshot(&job.snapshot_dir, job.upto, job.truncated_through)?;
    let after = base.snapshot.as_ref().map_or(0, |s| s.seq);
    if job.entries && base.snapshot.is_some() && base.state.raft.is_none() {
        return Err(recovery::RecoveryError::NotReplicated { seq: after }.into());
    }
    answer(&mut output, &BaseLine { base: after })?;
    let frames = Frames {
        input: BufReader::with_capacity(1 << 20, input),
    };
    let folded = match job.entries {
        true => recovery::fold_entries(frames.entries(), base.state, after, job.upto)?,
        false => recovery::fold_stream(frames.records(), base.state, after, job.upto)?,
    };
    let recovered = recovery::finish(
        base.snapshot,
        base.skipped,
        folded,
        job.upto,
        started.elapsed(),
    )?;
    let done = write(job, recovered, started)?;
    answer(&mut output, &done)?;
    Ok(done)
}

/// One line of JSON to the server.
fn answer(output: &mut impl Write, line: &impl Serialize) -> Result<(), WorkerError> {
    let line = serde_json::to_string(line).map_err(|e| WorkerError::Answer(e.into()))?;
    writeln!(output, "{line}")
        .and_then(|()| output.flush())
        .map_err(WorkerError::Answer)
}

/// Writes the recovered state as the snapshot `job` asks for, and describes it; `started`
/// is when building began. The worker and a server building in-process both end here.
pub fn write(
    job: &Job,
    recovered: recovery::Recovered,
    started: Instant,
) -> Result<Built, WorkerError> {
    let built = started.elapsed();
    if let Some(expected) = &job.expect_raft {
        if recovered.state.raft.as_ref() != Some(expected) {
            return Err(WorkerError::NotExpected {
                upto: job.upto,
                found: Box::new(recovered.state.raft),
                expected: Box::new(expected.clone()),
            });
        }
    }
    let hooks = WriteHooks {
        pause_before_rename: job.pause_before_rename,
    };
    let info = snapshot::write(
        &job.snapshot_dir,
        recovered.last_seq,
        &recovered.state,
        job.now,
        hooks,
    )
    .map_err(|source| WorkerError::Write {
        dir: job.snapshot_dir.display().to_string(),
        source,
    })?;
    Ok(Built {
        sequence: recovered.last_seq,
        size_bytes: info.size_bytes,
        records_folded: recovered.records,
        skipped: recovered.skipped,
        build_ms: built.as_millis() as u64,
        write_ms: (started.elapsed() - built).as_millis() as u64,
        raft: recovered.state.raft,
    })
}

/// What the server sends: frames of records or of Raft entries, decoded and verified.
struct Frames<R> {
    input: BufReader<R>,
}

impl<R: Read + Send> Frames<R> {
    /// Fills `header`; false at the end of the stream (only allowed between frames).
    fn header(&mut self, header: &mut [u8]) -> io::Result<bool> {
        if self.input.fill_buf()?.is_empty() {
            return Ok(false);
        }
        self.input.read_exact(header)?;
        Ok(true)
    }

    /// The `len` bytes after a header (`seq` names the frame in an error).
    fn body(&mut self, seq: u64, len: [u8; 4]) -> io::Result<Vec<u8>> {
        let len = u32::from_be_bytes(len) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(io::Error::other(format!(
                "frame {seq} is said to be {len} bytes long"
            )));
        }
        let mut bytes = vec![0; len];
        self.input.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    /// `[seq u64 BE][len u32 BE][record bytes]`
    fn read_record(&mut self) -> Result<Option<(u64, Record)>, OpenError> {
        let mut header = [0u8; 12];
        if !self.header(&mut header).map_err(pipe_err)? {
            return Ok(None);
        }
        let seq = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let bytes = self
            .body(seq, header[8..].try_into().expect("4 bytes"))
            .map_err(pipe_err)?;
        crate::storage::log::decode_at(seq, &bytes).map(|record| Some((seq, record)))
    }

    /// `[seq u64 BE][term u64 BE][crc u32 BE][len u32 BE][payload]`
    fn read_entry(&mut self) -> Result<Option<Entry>, OpenError> {
        let mut header = [0u8; 24];
        if !self.header(&mut header).map_err(pipe_err)? {
            return Ok(None);
        }
        let seq = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let term = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        let payload = self
            .body(seq, header[20..].try_into().expect("4 bytes"))
            .map_err(pipe_err)?;
        decode_entry(seq, term, &payload, crc)
            .map(Some)
            .map_err(|source| OpenError::Damaged { seq, source })
    }

    fn records(self) -> impl Iterator<Item = Result<(u64, Record), OpenError>> + Send {
        self.until_error(Frames::read_record)
    }

    fn entries(self) -> impl Iterator<Item = Result<Entry, OpenError>> + Send {
        self.until_error(Frames::read_entry)
    }

    /// The items `read` returns, until the end of the stream or the first error.
    fn until_error<T>(
        mut self,
        read: fn(&mut Self) -> Result<Option<T>, OpenError>,
    ) -> impl Iterator<Item = Result<T, OpenError>> + Send
    where
        T: Send,
    {
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let item = read(&mut self).transpose()?;
            failed = item.is_err();
            Some(item)
        })
    }
}

fn pipe_err(source: io::Error) -> OpenError {
    OpenError::Io {
        path: "the server's pipe".to_string(),
        source,
    }
}

/// Kills and reaps the child unless it was waited for (an error on the server's side).
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The worker's first step: it dies with the thread that started it (the snapshot job,
/// which waits for it), so no worker outlives a killed server; and if the server is
/// already gone (`parent` is no longer its parent), it stops at once.
pub fn die_with_parent(parent: u32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl and getppid take no pointers.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The server may have died before that took effect.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the server that started it is gone"));
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
    Ok(())
}

/// Writes one frame of the stream a worker reads: `[seq u64 BE][len u32 BE][bytes]`.
fn write_frame(out: &mut impl Write, seq: u64, bytes: &[u8]) -> Result<(), String> {
    let len =
        u32::try_from(bytes.len()).map_err(|_| format!("log record {seq} is too large to send"))?;
    out.write_all(&seq.to_be_bytes())
        .and_then(|()| out.write_all(&len.to_be_bytes()))
        .and_then(|()| out.write_all(bytes))
        .map_err(|e| format!("sending log record {seq}: {e}"))
}

/// Writes one entry frame: `[seq u64 BE][term u64 BE][crc u32 BE][len u32 BE][payload]`.
fn write_entry_frame(out: &mut impl Write, entry: &RawEntry) -> Result<(), String> {
    let seq = entry.seq;
    let len = u32::try_from(entry.payload.len())
        .map_err(|_| format!("log entry {seq} is too large to send"))?;
    out.write_all(&seq.to_be_bytes())
        .and_then(|()| out.write_all(&entry.term.to_be_bytes()))
        .and_then(|()| out.write_all(&entry.crc.to_be_bytes()))
        .and_then(|()| out.write_all(&len.to_be_bytes()))
        .and_then(|()| out.write_all(&entry.payload))
        .map_err(|e| format!("sending log entry {seq}: {e}"))
}

/// The server's side: builds the snapshot after `job.upto` in a child running `program`,
/// feeding it the log from `reader`.
pub fn build(program: &Path, reader: &LogReader, job: &Job) -> Result<Built, WorkerError> {
    let mut command = Command::new(program);
    command
        .arg(SUBCOMMAND)
        .args(job.args())
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // No `pre_exec`: with one, the standard library forks, and fork copies the page tables
    // of the whole server (a million products: ~1 GB mapped in 4 KiB pages) while every
    // other thread's page faults wait; reserves stalled for 30-40 ms at the start of each
    // snapshot. Without it the child is started with posix_spawn (vfork), and ties its
    // life to this thread itself (`die_with_parent`). Keep it that way: a `pre_exec`,
    // uid, gid, groups or process group set on this command would make std fork again.
    command.arg(format!("--parent-pid={}", std::process::id()));
    let child = command.spawn().map_err(|source| WorkerError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let mut child = Reaped(Some(child));
    let running = child.0.as_mut().expect("just started");
    let (Some(stdin), Some(stdout), Some(mut stderr)) = (
        running.stdin.take(),
        running.stdout.take(),
        running.stderr.take(),
    ) else {
        return Err(WorkerError::Failed("its pipes are missing".into()));
    };
    // Whatever the child says on stderr is read beside the exchange (so that it can never
    // block on a full pipe) and reported if it fails.
    let said = std::thread::Builder::new()
        .name("stockd-snapshot-worker-stderr".into())
        .spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        })
        .map_err(|e| WorkerError::Failed(format!("cannot read its stderr: {e}")))?;
    let exchanged = exchange(reader, job, stdin, stdout);
    let running = child.0.as_mut().expect("not reaped yet");
    let status = running.wait();
    child.0 = None;
    let said = said.join().unwrap_or_default();
    let failed = |what: String| {
        let said = said.trim();
        WorkerError::Failed(if said.is_empty() {
            what
        } else {
            format!("{said} ({what})")
        })
    };
    let status = status.map_err(|e| failed(format!("cannot wait for it: {e}")))?;
    match exchanged {
        Ok(built) if status.success() => Ok(built),
        Ok(_) => Err(failed(format!("it ended with {status}"))),
        Err(Exchange::Log(err)) => Err(WorkerError::Log(err)),
        Err(Exchange::Protocol(err)) => Err(failed(format!("{err}; it ended with {status}"))),
    }
}

/// What of the log to send the worker: `item` (`None`: past `upto`, the end of it).
/// Damaged batch framing past `upto` is not this job's to report (the records and entries
/// themselves are verified by the worker).
fn to_send<T>(
    item: Result<T, OpenError>,
    seq: impl Fn(&T) -> u64,
    upto: u64,
) -> Result<Option<T>, Exchange> {
    match item {
        Ok(item) if seq(&item) <= upto => Ok(Some(item)),
        Ok(_) => Ok(None),
        Err(OpenError::Damaged { seq, .. }) if seq > upto => Ok(None),
        Err(err) => Err(Exchange::Log(err)),
    }
}

/// Why an exchange with the child ended early.
enum Exchange {
    /// Reading the log on this side failed.
    Log(OpenError),
    /// The child broke the protocol (or its pipes did): reported with what it said.
    Protocol(String),
}

impl From<String> for Exchange {
    fn from(err: String) -> Self {
        Exchange::Protocol(err)
    }
}

/// Reads the child's base, sends the records after it, reads what it built.
fn exchange(
    reader: &LogReader,
    job: &Job,
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
) -> Result<Built, Exchange> {
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = |what: &str| -> Result<String, String> {
        match lines.next() {
            Some(Ok(line)) => Ok(line),
            Some(Err(e)) => Err(format!("reading its {what}: {e}")),
            None => Err(format!("it stopped before it sent its {what}")),
        }
    };
    let base: BaseLine = serde_json::from_str(&next_line("base")?)
        .map_err(|e| format!("its base is not understood: {e}"))?;
    let mut input = BufWriter::with_capacity(1 << 20, stdin);
    if job.entries {
        for item in reader.raw_entries_after(base.base) {
            let Some(entry) = to_send(item, |entry| entry.seq, job.upto)? else {
                break;
            };
            write_entry_frame(&mut input, &entry)?;
        }
    } else {
        for item in reader.raw_records_after(base.base) {
            let Some((seq, bytes)) = to_send(item, |(seq, _)| *seq, job.upto)? else {
                break;
            };
            write_frame(&mut input, seq, &bytes)?;
        }
    }
    input
        .flush()
        .map_err(|e| format!("sending the log records: {e}"))?;
    drop(input); // the end of the records
    let built: Built = serde_json::from_str(&next_line("result")?)
        .map_err(|e| format!("its result is not understood: {e}"))?;
    if built.sequence != job.upto {
        return Err(Exchange::Protocol(format!(
            "it built the state after record {}, not {}",
            built.sequence, job.upto
        )));
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fold::{self, State};
    use crate::storage::record;

    fn records() -> Vec<Record> {
        let mut records = Vec::new();
        for i in 0..5u64 {
            records.push(Record::ProductCreated {
                by: None,
                rules: Default::default(),
                low_stock_threshold: None,
                sku: format!("SKU-{i}"),
                name: "n".into(),
                price: None,
                on_hand: i,
                at: 1,
            });
        }
        for i in 0..5u64 {
            records.push(Record::Replenished {
                by: None,
                sku: format!("SKU-{i}"),
                quantity: 10,
                at: 2,
            });
        }
        records
    }

    /// Frames for records `after + 1 ..= upto`, record `damaged` (if any) damaged.
    fn frames(records: &[Record], after: u64, upto: u64, damaged: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in after + 1..=upto {
            let mut bytes = record::encode(&records[seq as usize - 1]);
            if Some(seq) == damaged {
                *bytes.last_mut().unwrap() ^= 0x5a;
            }
            write_frame(&mut out, seq, &bytes).unwrap();
        }
        out
    }

    fn fold_of(records: &[Record]) -> State {
        let mut state = State::default();
        for record in records {
            fold::apply(&mut state, record).unwrap();
        }
        state
    }

    fn job(dir: &Path, upto: u64) -> Job {
        Job {
            snapshot_dir: dir.to_path_buf(),
            upto,
            truncated_through: 0,
            now: 7,
            pause_before_rename: None,
            entries: false,
            expect_raft: None,
        }
    }

    /// Entry frames for entries `after + 1 ..= upto` in term 1 (proposals of one epoch
    /// carrying `records`, every fourth a blank), entry `damaged` (if any) damaged.
    fn entry_frames(records: &[Record], after: u64, upto: u64, damaged: Option<u64>) -> Vec<u8> {
        use crate::storage::entry::{encode_blank, encode_proposal, frame_crc, Epoch};
        let mut out = Vec::new();
        let mut n = 0;
        for seq in 1..=upto {
            let mut payload = Vec::new();
            if seq % 4 == 0 {
                encode_blank(&mut payload);
            } else {
                n += 1;
                let record = record::encode(&records[n as usize - 1]);
                encode_proposal(Epoch { term: 1, k: 1 }, n, &record, &mut payload);
            }
            let crc = frame_crc(1, &payload);
            if Some(seq) == damaged {
                *payload.last_mut().unwrap() ^= 0x5a;
            }
            let entry = RawEntry {
                seq,
                term: 1,
                crc,
                payload: payload.into(),
            };
            if seq > after {
                write_entry_frame(&mut out, &entry).unwrap();
            }
        }
        out
    }

    /// A cluster node's worker folds Raft entries (blanks left out, proposals by their
    /// chain) onto its newest snapshot, reports the Raft metadata it reached, and writes
    /// nothing for a damaged entry.
    #[test]
    fn the_worker_folds_a_cluster_nodes_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let records = records();
        let entries_job = |upto| Job {
            entries: true,
            ..job(tmp.path(), upto)
        };
        let built = run(
            &entries_job(6),
            &entry_frames(&records, 0, 6, None)[..],
            Vec::new(),
        )
        .unwrap();
        assert_eq!((built.sequence, built.records_folded), (6, 6));
        let raft = built.raft.expect("Raft metadata");
        assert_eq!(raft.last_applied.map(|pos| pos.seq), Some(6));
        assert_eq!(raft.chain.next_n, 6, "five proposals, one blank");
        let mut out = Vec::new();
        let built = run(
            &entries_job(13),
            &entry_frames(&records, 6, 13, None)[..],
            &mut out,
        )
        .unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("{\"base\":6}\n"));
        assert_eq!((built.sequence, built.records_folded), (13, 7));
        let (_, state) = snapshot::read(&tmp.path().join(snapshot::file_name(13))).unwrap();
        assert_eq!(state.products, fold_of(&records).products);
        assert_eq!(state.raft, built.raft);

        let err = run(
            &entries_job(12),
            &entry_frames(&records, 6, 12, Some(9))[..],
            Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("9"), "{err}");
        // A state that is not the one asked for is never written.
        let mut expected = built.raft.clone().unwrap();
        expected.clock_floor += 1;
        let err = run(
            &Job {
                expect_raft: Some(expected),
                ..entries_job(13)
            },
            &entry_frames(&records, 13, 13, None)[..],
            Vec::new(),
        )
        .unwrap_err();
        assert!(
            matches!(err, WorkerError::NotExpected { upto: 13, .. }),
            "{err}"
        );
        let asked = Job {
            expect_raft: built.raft.clone(),
            ..entries_job(13)
        };
        let arg = asked.args().into_iter().find_map(|a| {
            let a = a.into_string().unwrap();
            a.strip_prefix("--expect-raft=").map(str::to_string)
        });
        let parsed: RaftMeta = serde_json::from_str(&arg.expect("the argument")).unwrap();
        assert_eq!(
            Some(parsed),
            built.raft,
            "the argument carries the metadata whole"
        );
        let kept: Vec<u64> = snapshot::list(tmp.path())
            .unwrap()
            .iter()
            .map(|(seq, _)| *seq)
            .collect();
        assert_eq!(kept, vec![13, 6]);
    }

    #[test]
    fn the_worker_folds_what_it_is_sent_onto_the_newest_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let records = records();
        // From no snapshot: everything is sent.
        let mut out = Vec::new();
        let built = run(
            &job(tmp.path(), 6),
            &frames(&records, 0, 6, None)[..],
            &mut out,
        )
        .unwrap();
        assert_eq!((built.sequence, built.records_folded), (6, 6));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("{\"base\":0}\n"), "{text}");
        // From that snapshot: only the tail.
        let mut out = Vec::new();
        let built = run(
            &job(tmp.path(), 10),
            &frames(&records, 6, 10, None)[..],
            &mut out,
        )
        .unwrap();
        assert_eq!((built.sequence, built.records_folded), (10, 4));
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("{\"base\":6}\n"));
        let (info, state) = snapshot::read(&tmp.path().join(snapshot::file_name(10))).unwrap();
        assert_eq!(info.seq, 10);
        assert!(state == fold_of(&records));
    }

    #[test]
    fn a_damaged_record_a_gap_or_a_short_stream_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let records = records();
        let err = run(
            &job(tmp.path(), 10),
            &frames(&records, 0, 10, Some(3))[..],
            Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("log record 3 is damaged"), "{err}");
        let mut gap = frames(&records, 0, 2, None);
        gap.extend(frames(&records, 3, 10, None));
        let err = run(&job(tmp.path(), 10), &gap[..], Vec::new()).unwrap_err();
        assert!(err.to_string().contains("log record 3 is missing"), "{err}");
        let err = run(
            &job(tmp.path(), 10),
            &frames(&records, 0, 8, None)[..],
            Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ends at record 8"), "{err}");
        let mut cut = frames(&records, 0, 10, None);
        cut.truncate(cut.len() - 3);
        let err = run(&job(tmp.path(), 10), &cut[..], Vec::new()).unwrap_err();
        assert!(err.to_string().contains("pipe"), "{err}");
        assert!(snapshot::list(tmp.path()).unwrap().is_empty());
    }

    #[test]
    fn a_worker_that_cannot_start_is_told_apart_from_one_that_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let log = crate::storage::log::Log::open(&tmp.path().join("log")).unwrap();
        let reader = log.reader();
        let err = build(
            Path::new("/nonexistent/stockd"),
            &reader,
            &job(tmp.path(), 1),
        )
        .unwrap_err();
        assert!(matches!(err, WorkerError::Spawn { .. }), "{err}");
        // A program that answers nothing the protocol expects.
        let err = build(Path::new("/bin/false"), &reader, &job(tmp.path(), 1)).unwrap_err();
        assert!(matches!(err, WorkerError::Failed(_)), "{err}");
    }
}
