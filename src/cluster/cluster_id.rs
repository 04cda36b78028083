//! The cluster id (docs/REPLICATION.md, "The cluster id"): a UUID made once, when a
//! cluster is initialized, by the one node that initializes it (the lowest id in
//! `--peers`), and kept in each node's log directory (`DIR/log/cluster-id`). Every Raft
//! request names it (header `Stockd-Cluster-Id`), and a node refuses a request of another
//! cluster before it reads the body: above all a snapshot, which the engine would install
//! over a log it has nothing to do with. A node without an id yet (brand new, never
//! reached) takes the id of the first leader that reaches it (an append or a snapshot),
//! and keeps it from then on.
//!
//! The file is the UUID in text and a newline, written by temp file, fsync, rename and a
//! fsync of the directory, once. A file that does not read back as a UUID stops the node
//! at start-up: a node that forgot its cluster would take the next one's.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::watch;
use uuid::Uuid;

/// The header naming the sender's cluster on every Raft request.
pub const ID_HEADER: &str = "stockd-cluster-id";

/// The file, in the node's log directory.
pub const FILE: &str = "cluster-id";

/// This node's cluster id, once it has one.
pub struct ClusterId {
    file: PathBuf,
    /// Taken under a lock so that two first requests cannot adopt two ids.
    id: Mutex<Option<Uuid>>,
    /// Tells whoever waits for the id (the initializing node) that one was adopted.
    known: watch::Sender<Option<Uuid>>,
}

/// Why an id was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("this node belongs to cluster {ours}")]
    Other { ours: Uuid },
    #[error("cannot keep the cluster id in {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl ClusterId {
    /// Reads the id kept in `log_dir`, if any.
    pub fn load(log_dir: &Path) -> io::Result<ClusterId> {
        let file = log_dir.join(FILE);
        let id = match std::fs::read_to_string(&file) {
            Ok(text) => Some(Uuid::parse_str(text.trim()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} holds no cluster id: {e}", file.display()),
                )
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(ClusterId {
            file,
            id: Mutex::new(id),
            known: watch::Sender::new(id),
        })
    }

    /// The file the id is kept in.
    pub fn path(&self) -> &Path {
        &self.file
    }

    pub fn get(&self) -> Option<Uuid> {
        *self.id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `id` if this node has none yet (kept on disk before this returns); `Ok` if
    /// it is this node's id, `AdoptError::Other` if this node belongs to another cluster.
    pub fn adopt(&self, id: Uuid) -> Result<Uuid, AdoptError> {
        let mut ours = self.id.lock().unwrap_or_else(|e| e.into_inner());
        match *ours {
            Some(ours) if ours == id => Ok(id),
            Some(ours) => Err(AdoptError::Other { ours }),
            None => {
                write_file(&self.file, id).map_err(|source| AdoptError::Io {
                    path: self.file.display().to_string(),
                    source,
                })?;
                *ours = Some(id);
                self.known.send_replace(Some(id));
                Ok(id)
            }
        }
    }

    /// Makes a new id and keeps it, unless this node has one already: the id of a
    /// cluster this node initializes. Returns the id the node has then.
    pub fn generate(&self) -> Result<Uuid, AdoptError> {
        match self.adopt(Uuid::now_v7()) {
            Err(AdoptError::Other { ours }) => Ok(ours),
            other => other,
        }
    }

    /// Waits until the node has an id, at most `timeout`; the id, if it has one then.
    pub async fn wait(&self, timeout: std::time::Duration) -> Option<Uuid> {
        let mut rx = self.known.subscribe();
        let got = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        match got {
            Ok(Ok(id)) => *id,
            _ => self.get(),
        }
    }
}

/// Writes `id` to `file` so that a crash leaves no file or the whole one.
fn write_file(file: &Path, id: Uuid) -> io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!("{FILE}.tmp"));
    {
        let mut out = std::fs::File::create(&temp)?;
        writeln!(out, "{id}")?;
        out.sync_all()?;
    }
    std::fs::rename(&temp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id is taken once and kept: a second one is refused, the first read back after
    /// a restart; a file that holds no id is an error, never "no id".
    #[test]
    fn an_id_is_adopted_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ClusterId::load(dir.path()).unwrap();
        assert_eq!(ids.get(), None);
        let first = Uuid::now_v7();
        assert_eq!(ids.adopt(first).unwrap(), first);
        assert_eq!(ids.adopt(first).unwrap(), first);
        let other = Uuid::now_v7();
        assert!(matches!(ids.adopt(other), Err(AdoptError::Other { ours }) if ours == first));
        assert_eq!(ids.generate().unwrap(), first);
        let again = ClusterId::load(dir.path()).unwrap();
        assert_eq!(again.get(), Some(first));
        std::fs::write(dir.path().join(FILE), "not an id\n").unwrap();
        assert!(ClusterId::load(dir.path()).is_err());
    }

    #[tokio::test]
    async fn a_waiter_hears_of_an_adopted_id() {
        let dir = tempfile::tempdir().unwrap();
        let ids = std::sync::Arc::new(ClusterId::load(dir.path()).unwrap());
        let short = std::time::Duration::from_millis(10);
        assert_eq!(ids.wait(short).await, None);
        let id = Uuid::now_v7();
        let waiter = {
            let ids = ids.clone();
            tokio::spawn(async move { ids.wait(std::time::Duration::from_secs(60)).await })
        };
        ids.adopt(id).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(id));
    }
}
