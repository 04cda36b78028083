//! Locking that a panic elsewhere does not turn into a panic here.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, even if a thread panicked while holding it: what the mutexes it is used
/// for guard stays whole between statements (a map, a position, a file handle), and the
/// server keeps answering rather than fail every later caller.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
