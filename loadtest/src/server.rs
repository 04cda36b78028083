//! A `stockd` child process on `127.0.0.1:0` with a fresh data directory, stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    child: Option<Child>,
    pub base_url: String,
    /// Kept so the data directory outlives the server (and is removed after it).
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `binary` and waits for its `listening on ADDR` line (at most 30 s).
    pub fn start(binary: &Path, durability: &str) -> Result<ServerProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let data: PathBuf = dir.path().join("data");
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
            .arg(dir.path().join("snapshots"))
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
        Ok(ServerProcess {
            child: Some(child),
            base_url: format!("http://{addr}"),
            _dir: dir,
        })
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
