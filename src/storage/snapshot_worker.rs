//! Building a snapshot in a child process (the *snapshot worker*), so that the server's
//! own address space never holds the second copy of the state a snapshot needs.
//!
//! Building a snapshot decodes the previous one and folds the log onto it: at a million
//! products that is ~0.9 GB allocated, touched and freed again. Done inside the server,
//! those page faults, frees and the TLB shootdowns that returning memory causes all land
//! in the process that answers requests, and its resident memory peaks at twice the
//! steady state. In a child process they do not. The child is the same `stockd` binary
//! (`stockd snapshot-worker`, hidden), started from the snapshot job's thread, so it
//! inherits that thread's scheduling class (`SCHED_IDLE` for background snapshots).
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
//! The log stays the server's alone (it holds the log's lock); the child only reads
//! snapshots and writes one. A child left behind by a server killed with SIGKILL is
//! killed too (`PR_SET_PDEATHSIG`), and its temporary file is removed at the next start.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::storage::log::{LogReader, OpenError};
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
    answer(&mut output, &BaseLine { base: after })?;
    let frames = Frames {
        input: BufReader::with_capacity(1 << 20, input),
        failed: false,
    };
    let folded = recovery::fold_stream(frames, base.state, after, job.upto)?;
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
    })
}

/// The records the server sends, decoded and verified.
struct Frames<R> {
    input: BufReader<R>,
    failed: bool,
}

impl<R: Read> Frames<R> {
    fn read_frame(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        let mut header = [0u8; 12];
        // The end of the stream is only allowed between frames.
        if self.input.fill_buf()?.is_empty() {
            return Ok(None);
        }
        self.input.read_exact(&mut header)?;
        let seq = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(header[8..].try_into().expect("4 bytes")) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(io::Error::other(format!(
                "record {seq} is said to be {len} bytes long"
            )));
        }
        let mut bytes = vec![0; len];
        self.input.read_exact(&mut bytes)?;
        Ok(Some((seq, bytes)))
    }
}

impl<R: Read> Iterator for Frames<R> {
    type Item = Result<(u64, Record), OpenError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = match self.read_frame() {
            Ok(None) => return None,
            Ok(Some((seq, bytes))) => {
                crate::storage::log::decode_at(seq, &bytes).map(|record| (seq, record))
            }
            Err(source) => Err(OpenError::Io {
                path: "the server's pipe".to_string(),
                source,
            }),
        };
        self.failed = item.is_err();
        Some(item)
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
    for item in reader.raw_records_after(base.base) {
        let (seq, bytes) = match item {
            Ok(record) => record,
            // Damaged batch framing past `upto` is not this job's to report (the records
            // themselves are verified by the worker).
            Err(OpenError::Damaged { seq, .. }) if seq > job.upto => break,
            Err(err) => return Err(Exchange::Log(err)),
        };
        if seq > job.upto {
            break;
        }
        write_frame(&mut input, seq, &bytes)?;
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
        }
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
