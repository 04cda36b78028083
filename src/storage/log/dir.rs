//! The log directory's own files: the `LOCK` that keeps a second process off it, the
//! truncation mark `truncated_through`, and a cluster node's `vote`.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::storage::entry::Vote;
use crate::storage::snapshot::sync_dir;

use super::*;

/// The truncation mark: the highest sequence number that may have been removed from the
/// front of the log because a kept snapshot covers it. Format 1 (a single server's):
/// big-endian `u64`, then its CRC32 (LE). Format 2 (a cluster node's purge, which the
/// engine asks for by log id, and must be told back as `last_purged_log_id`): the
/// sequence (`u64` BE), the term of the entry at it (`u64` LE), then the CRC32 (LE) of
/// both. Told apart by length; both are read.
pub(super) const MARK_FILE: &str = "truncated_through";
pub(super) const LOCK_FILE: &str = "LOCK";
/// A cluster node's vote (`entry::Vote`): its CRC32 (`u32` LE), then bincode 2 of the vote.
pub(super) const VOTE_FILE: &str = "vote";

/// A cluster node's committed mark: a sequence through which its log is known committed
/// (big-endian `u64`, then its CRC32, as the truncation mark). Written without fsync: a
/// lower bound only, and a file a crash left damaged reads as 0.
pub(super) const COMMITTED_FILE: &str = "committed";

/// The held `LOCK` file. Dropping it unlocks explicitly before closing: a `flock` belongs
/// to the open file description, which a child process forked by any thread of this
/// process shares until it execs (the descriptor is close-on-exec, but the fork comes
/// first). Closing our descriptor alone would leave the lock held through that window, and
/// a server restarted in-process at that moment would find its own directory locked.
pub(super) struct DirLock(#[allow(dead_code)] fs::File);

#[cfg(unix)]
impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor this value owns; no memory is involved.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(unix)]
pub(super) fn lock_dir(dir: &Path) -> Result<DirLock, OpenError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.kind() == io::ErrorKind::WouldBlock {
            OpenError::Locked {
                path: dir.display().to_string(),
            }
        } else {
            OpenError::Io {
                path: path.display().to_string(),
                source: err,
            }
        });
    }
    Ok(DirLock(file))
}

#[cfg(not(unix))]
pub(super) fn lock_dir(dir: &Path) -> Result<DirLock, OpenError> {
    let path = dir.join(LOCK_FILE);
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map(DirLock)
        .map_err(io_err(&path))
}

/// The truncation mark: a position of the log (`term` is `None` in a format-1 mark).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) seq: u64,
    pub(super) term: Option<u64>,
}

pub(super) fn read_mark(dir: &Path) -> Result<Mark, OpenError> {
    let path = dir.join(MARK_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Mark::default()),
        Err(err) => return Err(io_err(&path)(err)),
    };
    let bad = || OpenError::BadMark {
        path: path.display().to_string(),
    };
    let body_len = match bytes.len() {
        12 => 8,
        20 => 16,
        _ => return Err(bad()),
    };
    let (body, crc) = bytes.split_at(body_len);
    let crc: [u8; 4] = crc.try_into().map_err(|_| bad())?;
    if crc32fast::hash(body) != u32::from_le_bytes(crc) {
        return Err(bad());
    }
    let seq = u64::from_be_bytes(body[..8].try_into().map_err(|_| bad())?);
    let term = match body.get(8..16) {
        Some(term) => Some(u64::from_le_bytes(term.try_into().map_err(|_| bad())?)),
        None => None,
    };
    Ok(Mark { seq, term })
}

/// Written to a temporary file, synced, renamed into place, directory synced: format 2
/// when the mark has a term, else format 1 (what a single server has always written).
pub(super) fn write_mark(dir: &Path, mark: Mark) -> io::Result<()> {
    let tmp = dir.join(format!("{MARK_FILE}.tmp"));
    let mut bytes = mark.seq.to_be_bytes().to_vec();
    if let Some(term) = mark.term {
        bytes.extend(term.to_le_bytes());
    }
    bytes.extend(crc32fast::hash(&bytes).to_le_bytes());
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(MARK_FILE))?;
    sync_dir(dir)
}

/// The committed mark (0: none, or a file a crash left damaged, which is as safe: the
/// mark is only a lower bound).
pub(super) fn read_committed(dir: &Path) -> Result<u64, OpenError> {
    let path = dir.join(COMMITTED_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(io_err(&path)(err)),
    };
    let seq = bytes
        .split_at_checked(8)
        .filter(|(seq, crc)| crc.len() == 4 && crc32fast::hash(seq).to_le_bytes() == **crc)
        .map(|(seq, _)| u64::from_be_bytes(seq.try_into().expect("8 bytes")));
    if seq.is_none() {
        tracing::warn!(path = %path.display(), "the log's committed mark is damaged; reading it as 0");
    }
    Ok(seq.unwrap_or(0))
}

/// Writes the committed mark: a temporary file, renamed into place, neither synced.
pub(super) fn write_committed(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{COMMITTED_FILE}.tmp"));
    let mut bytes = seq.to_be_bytes().to_vec();
    bytes.extend(crc32fast::hash(&seq.to_be_bytes()).to_le_bytes());
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, dir.join(COMMITTED_FILE))
}

/// The vote saved last (`None`: none ever). A file that does not verify is an error, never
/// "no vote": a node that forgot its vote could vote twice in one term.
pub(super) fn read_vote(dir: &Path) -> Result<Option<Vote>, OpenError> {
    let path = dir.join(VOTE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_err(&path)(err)),
    };
    let bad = || OpenError::BadVote {
        path: path.display().to_string(),
    };
    let (crc, body) = bytes.split_at_checked(4).ok_or_else(bad)?;
    let crc: [u8; 4] = crc.try_into().map_err(|_| bad())?;
    if crc32fast::hash(body) != u32::from_le_bytes(crc) {
        return Err(bad());
    }
    let (vote, used) =
        bincode::serde::decode_from_slice(body, bincode::config::standard()).map_err(|_| bad())?;
    if used != body.len() {
        return Err(bad());
    }
    Ok(Some(vote))
}

/// Saves `vote` as the mark is saved: a temporary file, synced, renamed into place, the
/// directory synced. A crash at any point leaves the old vote or the new one, whole.
pub(super) fn write_vote(dir: &Path, vote: &Vote) -> io::Result<()> {
    let tmp = dir.join(format!("{VOTE_FILE}.tmp"));
    let body = bincode::serde::encode_to_vec(vote, bincode::config::standard())
        .map_err(|e| io::Error::other(format!("encoding the vote: {e}")))?;
    let mut bytes = crc32fast::hash(&body).to_le_bytes().to_vec();
    bytes.extend_from_slice(&body);
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(VOTE_FILE))?;
    sync_dir(dir)
}
