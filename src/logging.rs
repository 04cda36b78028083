//! Diagnostics on stderr, written so that stderr can never take a request down.
//!
//! The server's log lines (`tracing`) go through a bounded queue to a thread of their own,
//! which writes them to stderr. Whatever stderr does, a thread that logs (a request, the
//! log writer, an actor) neither waits nor fails:
//!
//! - a write that fails (a full disk: `ENOSPC`; `/dev/full`; a pipe whose reader is gone:
//!   `EPIPE`) loses that line, counted in [`lines_lost`], and nothing else happens;
//! - a stderr that blocks (a pipe nobody reads) stalls only the writing thread; once the
//!   queue is full, further lines are lost (counted) instead of making anyone wait.
//!
//! Why it matters: tracing-subscriber's fmt layer reports a failed write with `eprintln!`,
//! which panics when stderr cannot be written, so every task that logged while stderr was
//! unwritable (a disk filled by logs) panicked, and warp closed its connection without an
//! answer. Here the writer never reports an error to the fmt layer, and the fmt layer's own
//! reports are off as well.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Log lines queued for stderr at most; past that, lines are lost rather than waited for.
pub const QUEUE_LINES: usize = 16_384;

/// How long [`Guard`]'s drop waits for the queued lines to be written, at most.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Log lines not written to stderr since start: stderr failed, or the queue was full.
static LOST: AtomicU64 = AtomicU64::new(0);

/// Log lines not written to stderr since start (a failed write, or a full queue).
pub fn lines_lost() -> u64 {
    LOST.load(Ordering::Relaxed)
}

fn lose_one() {
    LOST.fetch_add(1, Ordering::Relaxed);
}

/// The format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line of text per event.
    Text,
    /// One JSON object per line.
    Json,
}

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it was handed to stderr.
    Flush(SyncSender<()>),
}

/// Keeps nothing alive by itself (the writing thread lives as long as the process); when
/// dropped, waits up to [`FLUSH_TIMEOUT`] for the lines queued so far to be written. Hold
/// it for as long as the server runs.
#[must_use = "dropping the guard flushes the log: hold it until the process ends"]
pub struct Guard {
    queue: Option<SyncSender<Msg>>,
}

impl Guard {
    /// Waits up to `timeout` until every line queued so far was handed to stderr; false if
    /// that did not happen in time (stderr blocks). Never prints anything.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(queue) = &self.queue else {
            return true;
        };
        flush_queue(queue, timeout)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.flush(FLUSH_TIMEOUT);
    }
}

fn flush_queue(queue: &SyncSender<Msg>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let (done, answer) = mpsc::sync_channel(1);
    let mut msg = Msg::Flush(done);
    loop {
        match queue.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    return false;
                }
                msg = back;
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    answer
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}

/// The writer the fmt layer formats each event into: one `write` per event, queued.
#[derive(Clone)]
pub struct QueueWriter {
    /// `None`: no writing thread could be started; lines are written in place, their
    /// errors ignored.
    queue: Option<SyncSender<Msg>>,
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.queue {
            Some(queue) => {
                if queue.try_send(Msg::Line(buf.to_vec())).is_err() {
                    lose_one();
                }
            }
            None => {
                if io::stderr().write_all(buf).is_err() {
                    lose_one();
                }
            }
        }
        // Never an error: the fmt layer would report it (see the module's doc).
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = QueueWriter;

    fn make_writer(&'a self) -> QueueWriter {
        self.clone()
    }
}

/// Writes what is queued to `out`; a line that cannot be written is counted and dropped.
fn write_lines(rx: Receiver<Msg>, mut out: impl Write) {
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                if out.write_all(&line).is_err() {
                    lose_one();
                }
            }
            Msg::Flush(done) => {
                let _ = out.flush();
                let _ = done.try_send(());
            }
        }
    }
}

/// A writer whose lines go to `out` on a thread of its own, and the guard that flushes it.
pub fn queue_to(out: impl Write + Send + 'static, lines: usize) -> (QueueWriter, Guard) {
    let (tx, rx) = mpsc::sync_channel(lines);
    let queue = thread::Builder::new()
        .name("stockd-stderr".into())
        .spawn(move || write_lines(rx, out))
        .ok()
        .map(|_| tx);
    (
        QueueWriter {
            queue: queue.clone(),
        },
        Guard { queue },
    )
}

/// What is logged unless `RUST_LOG` says otherwise: `info`; `warn` for the cluster's
/// engine, openraft, whose `info` narrates every election and state change at length; and
/// `error` for the three places where the engine warns of each failed call to a peer: a
/// heartbeat (`core::heartbeat`, every 50 ms), a replication call (`replication`, and
/// the same failure again when the core hears of it, `engine::handler::
/// replication_handler`). With a peer down these were some 20 lines a second; stockd's
/// network client says instead, once, that the peer does not answer, reminds every minute,
/// and says when it answers again (`cluster::net::Reachability`). The replication
/// modules' other warnings (`replication::stream_state`, `replication_handle`,
/// `snapshot_transmitter`: the storage breaking the engine's contract, a snapshot that
/// cannot be read) stay at `warn`.
pub const DEFAULT_FILTER: &str = "info,openraft=warn,openraft::core::heartbeat=error,\
    openraft::replication=error,openraft::replication::stream_state=warn,\
    openraft::replication::replication_handle=warn,\
    openraft::replication::snapshot_transmitter=warn,\
    openraft::engine::handler::replication_handler=error";

/// Installs the global `tracing` subscriber: events at the level `RUST_LOG` asks for
/// (default [`DEFAULT_FILTER`]), in `format`, on stderr through [`queue_to`]; ANSI colours
/// only when stderr is a terminal. Returns the guard to hold while the server runs.
/// Calling it again installs nothing (the first subscriber stays).
pub fn init(format: Format) -> Guard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (writer, guard) = queue_to(io::stderr(), QUEUE_LINES);
    let ansi = io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    // An error here means a subscriber is already installed: that one stays.
    let _ = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
    guard
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The default filter drops the engine's warning for each failed call to a peer (its
    /// heartbeat and replication modules) and nothing else of it at `warn` or above: its
    /// errors, its other warnings (the replication modules' other files included), and
    /// stockd's own warnings and information still show.
    #[test]
    fn the_default_filter_drops_only_the_engines_per_call_warnings() {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        struct Record(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let m = event.metadata();
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", m.level(), m.target()));
            }
        }
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(DEFAULT_FILTER))
            .with(Record(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "openraft::core::heartbeat::worker", "failed to send a heartbeat");
            tracing::warn!(target: "openraft::replication", "ReplicationCore recv RPCError");
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "update progress error");
            tracing::info!(target: "openraft::core::raft_core", "an election");
            tracing::error!(target: "openraft::core::heartbeat::worker", "failed to send to RaftCore");
            tracing::warn!(target: "openraft::core::raft_core", "a higher vote");
            tracing::warn!(target: "openraft::replication::stream_state", "returned empty");
            tracing::error!(target: "openraft::replication::snapshot_transmitter", "storage");
            tracing::warn!(target: "stockd::cluster::net", "a peer does not answer");
            tracing::info!(target: "stockd::server", "serving");
            tracing::debug!(target: "stockd::server", "detail");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "ERROR openraft::core::heartbeat::worker",
                "WARN openraft::core::raft_core",
                "WARN openraft::replication::stream_state",
                "ERROR openraft::replication::snapshot_transmitter",
                "WARN stockd::cluster::net",
                "INFO stockd::server",
            ]
        );
    }

    /// Fails every write, like stderr on a full disk.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(28))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(28))
        }
    }

    /// Keeps what is written; blocks every write while `gate` is held.
    #[derive(Clone, Default)]
    struct Kept {
        text: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.text.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_output_is_never_an_error_to_the_logger() {
        let before = lines_lost();
        let (mut writer, guard) = queue_to(Full, 8);
        for _ in 0..3 {
            assert_eq!(writer.write(b"line\n").unwrap(), 5);
            writer.flush().unwrap();
        }
        assert!(guard.flush(Duration::from_secs(5)));
        assert!(lines_lost() >= before + 3, "the failed lines are counted");
    }

    #[test]
    fn lines_are_written_in_order_and_flushed_by_the_guard() {
        let out = Kept::default();
        let (mut writer, guard) = queue_to(out.clone(), 8);
        writer.write_all(b"one\n").unwrap();
        writer.write_all(b"two\n").unwrap();
        drop(guard);
        assert_eq!(&*out.text.lock().unwrap(), b"one\ntwo\n");
    }

    #[test]
    fn a_blocked_output_never_blocks_the_logger() {
        let out = Kept::default();
        let hold = out.gate.lock().unwrap();
        let (mut writer, guard) = queue_to(out.clone(), 4);
        let before = lines_lost();
        let started = Instant::now();
        for _ in 0..100 {
            writer.write_all(b"line\n").unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        // At most the queue and the line being written are kept; the rest is lost.
        assert!(lines_lost() >= before + 100 - 5);
        assert!(!guard.flush(Duration::from_millis(50)), "stderr is stuck");
        drop(hold);
        assert!(guard.flush(Duration::from_secs(5)));
    }
}
