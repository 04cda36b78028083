//! Helpers shared by the benches that run the real binary (`catalogue`, `steady_disk`).

#![allow(dead_code)]

use std::path::Path;

/// What `/proc` says about processes, shared with the tests.
#[path = "../../tests/common/procfs.rs"]
pub mod procfs;

/// A number from the environment, or `default` when unset. A value that is not a number
/// stops the bench rather than silently measuring something else.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}")),
        Err(_) => default,
    }
}

/// Bytes of the files under `path`, recursively (0 if it is gone).
pub fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if let Ok(meta) = entry.metadata() {
                total += if meta.is_dir() {
                    dir_bytes(&entry.path())
                } else {
                    meta.len()
                };
            }
        }
    }
    total
}
