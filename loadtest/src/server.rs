//! A `stockd` child process on `127.0.0.1:0` with a fresh data directory, stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    child: Option<Child>,
    pub base_url: String,
    binary: PathBuf,
    durability: String,
    /// Kept so the data directory outlives the server (and is removed after it).
    dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `binary` and waits for its `listening on ADDR` line (at most 30 s).
    pub fn start(binary: &Path, durability: &str) -> Result<ServerProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let (child, base_url) = spawn(binary, durability, dir.path())?;
        Ok(ServerProcess {
            child: Some(child),
            base_url,
            binary: binary.to_path_buf(),
            durability: durability.to_string(),
            dir,
        })
    }

    /// SIGKILL: no shutdown code runs in the server.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory; answers how long it took
    /// from exec to `listening on`.
    pub fn restart(&mut self) -> Result<Duration, String> {
        self.kill9();
        let started = Instant::now();
        let (child, base_url) = spawn(&self.binary, &self.durability, self.dir.path())?;
        let took = started.elapsed();
        self.child = Some(child);
        self.base_url = base_url;
        Ok(took)
    }
}

fn spawn(binary: &Path, durability: &str, dir: &Path) -> Result<(Child, String), String> {
    {
        let data: PathBuf = dir.join("data");
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--durability",
                durability,
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--snapshot-dir")
            .arg(dir.join("snapshots"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let (false, Some(addr)) = (sent, line.strip_prefix("listening on ")) {
                    let _ = tx.send(addr.trim().to_string());
                    sent = true;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(50)) {
                break addr;
            }
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                return Err("stockd did not start listening".into());
            }
        };
        Ok((child, format!("http://{addr}")))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
