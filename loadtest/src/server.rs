//! A `stockd` child process: started, waited for until it prints `listening on ADDR`, and
//! stopped (SIGKILL) when dropped, so that a server is stopped even when whoever started it
//! panics. The one harness of the load test, the integration tests (`tests/common`) and the
//! benches that run the real binary.
//!
//! `Launch` says what to start: `stockd serve` on `127.0.0.1:0` with a data directory
//! (`Launch::serve`), or any command that ends up serving (`Launch::command`); then extra
//! flags, environment variables, the durability, how long to wait for `listening on`, and
//! whether to keep the server's stderr. `ServerProcess` is the running server: its address,
//! the time from exec to `listening on`, SIGKILL, SIGTERM and restart.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long `Launch::start` waits for `listening on` unless told otherwise.
pub const START_TIMEOUT_DEFAULT: Duration = Duration::from_secs(120);
/// How long `ServerProcess::terminate` waits for the exit after SIGTERM (then SIGKILL).
pub const TERMINATE_WAIT: Duration = Duration::from_secs(20);

/// The variables that configure `stockd serve`'s admin key, which a server started here
/// gets only when its command sets them.
pub const ADMIN_KEY_VARIABLES: [&str; 2] = ["STOCKD_ADMIN_KEY", "STOCKD_ADMIN_KEY_FILE"];

/// What to start, and how to wait for it.
pub struct Launch {
    command: Command,
    capture_stderr: bool,
    /// Where the first start sends stderr instead (a file, `/dev/full`); a restart
    /// inherits this process's.
    stderr_to: Option<Stdio>,
    /// Close the read ends of stdout and stderr once the server listens, as a supervisor
    /// that died would.
    close_output: bool,
    timeout: Duration,
}

impl Launch {
    /// `binary serve` on `127.0.0.1:0` with its log in `dir/data` and its snapshots in
    /// `dir/snapshots`, logging warnings and errors (`RUST_LOG=warn`).
    pub fn serve(binary: impl AsRef<OsStr>, dir: &Path) -> Launch {
        let mut command = Command::new(binary);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--snapshot-dir")
            .arg(dir.join("snapshots"))
            .env("RUST_LOG", "warn");
        Launch::command(command)
    }

    /// Any command that ends up serving and printing `listening on ADDR` on its stdout (for
    /// instance a bare `stockd` configured by its environment). Its stdout and stderr are
    /// set by `start`.
    pub fn command(mut command: Command) -> Launch {
        // An admin key in the environment of whoever runs the tests or the load test would
        // turn authentication on in every server started here: only one set on the command
        // itself is passed on.
        for var in ADMIN_KEY_VARIABLES {
            if !command.get_envs().any(|(key, _)| key == var) {
                command.env_remove(var);
            }
        }
        Launch {
            command,
            capture_stderr: false,
            stderr_to: None,
            close_output: false,
            timeout: START_TIMEOUT_DEFAULT,
        }
    }

    /// More flags, after those already given.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// An environment variable of the server (replacing one set before).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.command.env(key, value);
        self
    }

    /// Environment variables of the server.
    pub fn envs<I, K, V>(mut self, vars: I) -> Launch
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.command.envs(vars);
        self
    }

    /// `--durability sync` or `--durability async`.
    pub fn durability(self, durability: &str) -> Launch {
        self.args(["--durability", durability])
    }

    /// How long to wait for `listening on` before the start counts as failed.
    pub fn timeout(mut self, timeout: Duration) -> Launch {
        self.timeout = timeout;
        self
    }

    /// Keeps the server's stderr for `ServerProcess::find_in_stderr` instead of passing it
    /// through to this process's stderr.
    pub fn capture_stderr(mut self) -> Launch {
        self.capture_stderr = true;
        self
    }

    /// Sends the server's stderr to `stderr` (a file, `/dev/full`) at its first start.
    pub fn stderr_to(mut self, stderr: Stdio) -> Launch {
        self.stderr_to = Some(stderr);
        self
    }

    /// Once the server listens, closes the read ends of its stdout and stderr, as a
    /// supervisor that died would: its later writes there fail (EPIPE).
    pub fn close_output_once_listening(mut self) -> Launch {
        self.close_output = true;
        self
    }

    /// The command as set up so far, to start it some other way.
    pub fn into_command(self) -> Command {
        self.command
    }

    /// Starts the server and waits for its `listening on ADDR` line. A server that exits
    /// first, or does not listen within the timeout, is an error (and is not left running).
    pub fn start(self) -> Result<ServerProcess, String> {
        let mut server = ServerProcess {
            launch: self,
            child: None,
            stderr: None,
            base_url: String::new(),
            started_in: Duration::ZERO,
            dir: None,
        };
        server.spawn()?;
        Ok(server)
    }
}

/// A running `stockd`; killed (SIGKILL) when dropped.
pub struct ServerProcess {
    launch: Launch,
    child: Option<Child>,
    /// The server's stderr lines, as they come (`Launch::capture_stderr`).
    stderr: Option<mpsc::Receiver<String>>,
    /// `http://ADDR`, from the server's `listening on ADDR`.
    pub base_url: String,
    started_in: Duration,
    /// A directory removed once the server is stopped (`ServerProcess::fresh`).
    dir: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// `binary serve` with this durability on a fresh data directory (removed after the
    /// server stopped), waiting 30 s at most for it to listen: the load test's server.
    pub fn fresh(binary: &Path, durability: &str) -> Result<ServerProcess, String> {
        ServerProcess::fresh_with(binary, durability, &[])
    }

    /// `fresh`, with more arguments to `stockd serve`.
    pub fn fresh_with(
        binary: &Path,
        durability: &str,
        args: &[&str],
    ) -> Result<ServerProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let mut server = Launch::serve(binary, dir.path())
            .durability(durability)
            .args(args.iter().copied())
            .timeout(Duration::from_secs(30))
            .start()?;
        server.dir = Some(dir);
        Ok(server)
    }

    /// From exec to `listening on`, at the last start.
    pub fn startup_time(&self) -> Duration {
        self.started_in
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown code runs in the server.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit status (SIGKILL after `TERMINATE_WAIT`).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + TERMINATE_WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and starts it again the same way (so on the same data
    /// directory); answers how long it took from exec to `listening on`.
    pub fn restart(&mut self) -> Result<Duration, String> {
        self.kill9();
        self.spawn()
    }

    /// The first line of the server's stderr (since its last start) for which `pick`
    /// answers something, waiting for it up to `limit`. Only with
    /// `Launch::capture_stderr`; lines read meanwhile are dropped, and so are the lines
    /// that come after this call (until then they are kept in memory).
    pub fn find_in_stderr<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let lines = self.stderr.take()?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = lines.recv_timeout(left).ok()?;
            if let Some(found) = pick(&line) {
                return Some(found);
            }
        }
    }

    fn spawn(&mut self) -> Result<Duration, String> {
        let launch = &mut self.launch;
        let started = Instant::now();
        let stderr = match launch.stderr_to.take() {
            Some(to) => to,
            None if launch.capture_stderr || launch.close_output => Stdio::piped(),
            None => Stdio::inherit(),
        };
        let close_output = launch.close_output;
        let mut child = launch
            .command
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", launch.command.get_program()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // Reads stdout to its end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                    if close_output {
                        return; // drops the read end
                    }
                }
            }
        });
        let stderr = child.stderr.take();
        let (stderr, closing) = if close_output {
            (None, stderr)
        } else {
            (stderr, None)
        };
        self.stderr = stderr.map(|stderr| {
            let (tx, rx) = mpsc::channel();
            // Reads stderr to its end; the lines go to `find_in_stderr` while it wants them.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        });
        let failed = |mut child: Child, why: String| {
            let _ = child.kill();
            let status = child.wait();
            Err(format!("stockd {why} (status {status:?})"))
        };
        let addr = match rx.recv_timeout(launch.timeout) {
            Ok(addr) => addr,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return failed(child, "exited before listening".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = format!("did not start listening within {:?}", launch.timeout);
                return failed(child, why);
            }
        };
        drop(closing);
        self.started_in = started.elapsed();
        self.child = Some(child);
        self.base_url = format!("http://{addr}");
        Ok(self.started_in)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What a command that was run to its end did.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` (a `stockd` expected to exit by itself: a refused start, `--help`, an
/// offline command) to its end, collecting its stdout and stderr. One that is still running
/// after `limit` (it started serving instead) is killed, and that is an error.
pub fn run_to_exit(mut command: Command, limit: Duration) -> Result<Exited, String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait();
            return Err(format!(
                "it did not exit by itself within {limit:?} ({status:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Exited {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}
