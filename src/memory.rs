//! Process-wide memory: settings applied once at the start of `main` (transparent huge
//! pages), and returning freed memory to the OS (mimalloc keeps it otherwise).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// Turns off transparent huge pages for this process and the processes it starts.
///
/// The log's storage engine (sled) allocates a fresh 512 KiB, 8 KiB-aligned I/O buffer for
/// every flush. With the kernel's THP set to `always`, mimalloc serves it from new memory
/// in a 2 MiB-aligned region and the first write faults in a whole huge page, which the
/// kernel zeroes: ~2 MiB of `clear_page` per flush, 2.5–4.3 % of a sync flash sale's CPU
/// (perf, docs/PERFORMANCE.md#decision-thp-off). With 4 KiB pages only the bytes a batch
/// touches are faulted in. The flag (`PR_SET_THP_DISABLE`) is checked at fault time, so it covers
/// memory mapped before the call too, and it is inherited by the snapshot worker.
///
/// Returns whether the setting took; a kernel without the call leaves THP as it was.
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_THP_DISABLE reads only its integer arguments.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// What `main` calls: turns THP off unless `STOCKD_TRANSPARENT_HUGE_PAGES=on` asks to keep
/// the kernel's setting (for a kernel or workload where huge pages pay). Any other value
/// than `on` or `off` is refused, so a typo cannot silently change the setting.
pub fn apply_transparent_huge_pages_setting() -> Result<(), String> {
    match std::env::var(THP_ENV).as_deref() {
        Ok("on") => Ok(()),
        Ok("off") | Err(std::env::VarError::NotPresent) => {
            disable_transparent_huge_pages();
            Ok(())
        }
        Ok(other) => Err(format!("{THP_ENV} must be on or off, not {other:?}")),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{THP_ENV} must be on or off")),
    }
}

/// The environment variable that keeps transparent huge pages on.
pub const THP_ENV: &str = "STOCKD_TRANSPARENT_HUGE_PAGES";

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Whether transparent huge pages are off for this process (`PR_GET_THP_DISABLE`).
    fn transparent_huge_pages_disabled() -> bool {
        // SAFETY: PR_GET_THP_DISABLE takes no pointers.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }

    #[test]
    fn the_setting_is_inherited_by_a_started_process() {
        assert!(disable_transparent_huge_pages());
        assert!(transparent_huge_pages_disabled());
        // What the snapshot worker will see: the kernel's view of a child process.
        let out = std::process::Command::new("grep")
            .args(["THP_enabled", "/proc/self/status"])
            .output()
            .expect("grep runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), "THP_enabled:\t0", "the child's status");
    }
}

/// Returns freed memory to the OS now, from the calling thread: a snapshot job (which,
/// building in the server rather than in a worker, frees a second copy of the whole
/// state, ~1 GB at a million products) and start-up after recovery. Left to mimalloc's
/// delayed purge, that work lands on whichever thread allocates next, a request thread,
/// and showed as a 48 ms stall in reserves right after a 1M-product snapshot
/// (docs/performance-history.md, "Reserve latency during a snapshot"). A no-op where
/// mimalloc is not the allocator in use.
pub fn release_freed_memory() {
    // SAFETY: mimalloc's documented API, callable from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// mimalloc's `mi_option_purge_delay`: its number in the C enum of the mimalloc 3 that
/// libmimalloc-sys builds (the crate names the constant only for mimalloc 2, where the
/// options are numbered otherwise). The test `the_purge_delay_option_is_the_one_set` holds
/// it to mimalloc's default delay, so a mimalloc that renumbers it fails there.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// No purge delay saved (`return_freed_pages_at_once`).
const NO_DELAY_SAVED: i64 = i64::MIN;

/// The purge delay `return_freed_pages_at_once` replaced, until `restore_purge_delay`.
static SAVED_PURGE_DELAY: AtomicI64 = AtomicI64::new(NO_DELAY_SAVED);

/// From now on, a page freed to mimalloc's arena goes back to the OS at once rather than
/// after mimalloc's purge delay (1 s by default; `MIMALLOC_PURGE_DELAY`), until
/// `restore_purge_delay`: for half a second after each release that follows a large
/// passivation sweep (`SupervisorMsg::EndReleaseWindow`), when the stopped actors' pages
/// are freed. Not for all the time: with `MIMALLOC_PURGE_DELAY=0` a
/// flash sale measured 0.95× the default's throughput ratio (3 alternated runs each, within
/// the noise of this machine but on the side of a cost). Nothing is changed if the delay is
/// already 0 or purging is off (negative).
pub fn return_freed_pages_at_once() {
    // SAFETY: mimalloc's documented API; the option exists (see `MI_OPTION_PURGE_DELAY`).
    let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    if delay <= 0 {
        return;
    }
    SAVED_PURGE_DELAY.store(delay as i64, Ordering::Relaxed);
    // SAFETY: as above. The store is not synchronized with mimalloc's readers (the C API
    // says so): the option is one aligned machine word, read where mimalloc decides
    // whether to purge, so on the targets built for a thread reading it meanwhile sees the
    // old delay or the new one, and either is a valid setting.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// Puts back the purge delay `return_freed_pages_at_once` replaced, if it did.
pub fn restore_purge_delay() {
    let delay = SAVED_PURGE_DELAY.swap(NO_DELAY_SAVED, Ordering::Relaxed);
    if delay != NO_DELAY_SAVED {
        // SAFETY: as in `return_freed_pages_at_once`.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay as _) };
    }
}

/// Bumped to ask every runtime worker thread to return its freed memory
/// (`release_freed_memory_if_asked`).
static RELEASE_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The `RELEASE_EPOCH` this thread last released memory for.
    static RELEASED_FOR: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Asks every runtime worker thread to return its freed memory the next time it is idle
/// (and see `wake_idle_workers`, which makes an idle one idle again).
/// `mi_collect` only collects the calling thread's heap: memory freed by (or to) another
/// thread stays in that thread's heap until that thread collects it, and a worker that
/// never again allocates that size of block never does. After a large passivation sweep
/// the stopped actors' pages were all free, yet RSS did not fall (docs/PERFORMANCE.md,
/// "Catalogue import over HTTP").
pub fn ask_threads_to_release_freed_memory() {
    RELEASE_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Returns this thread's freed memory to the OS if that was asked since it last did; a
/// load and a comparison otherwise. The server's runtime calls it when a worker thread
/// parks (it has nothing to do), so the collection never delays a request.
pub fn release_freed_memory_if_asked() {
    let asked = RELEASE_EPOCH.load(Ordering::Relaxed);
    RELEASED_FOR.with(|released| {
        if released.get() != asked {
            released.set(asked);
            release_freed_memory();
            let mut collected = COLLECTED.lock().unwrap_or_else(|e| e.into_inner());
            if collected.0 < asked {
                *collected = (asked, 0);
            }
            if collected.0 == asked {
                collected.1 += 1;
            }
        }
    });
}

/// The newest `RELEASE_EPOCH` a thread collected for, and how many threads have for it.
static COLLECTED: std::sync::Mutex<(u64, usize)> = std::sync::Mutex::new((0, 0));

/// How many threads have collected since `epoch` was asked for.
fn collected_for(epoch: u64) -> usize {
    let collected = COLLECTED.lock().unwrap_or_else(|e| e.into_inner());
    match collected.0.cmp(&epoch) {
        std::cmp::Ordering::Equal => collected.1,
        // A newer release was asked for: this one's work is done by its wakes.
        std::cmp::Ordering::Greater => usize::MAX,
        std::cmp::Ordering::Less => 0,
    }
}

/// Makes every worker thread of `runtime` that has not collected since the last release
/// was asked for park again, which runs the park hook and its collection. Without it, a
/// worker idle through a passivation drain kept the blocks other threads freed into its
/// heap's pages until traffic next woke it (8–20 MiB after draining 100,000
/// passivations, docs/PERFORMANCE.md).
///
/// Called from a thread outside the workers (the blocking thread of a release), it gives
/// the runtime one small task per worker. The runtime wakes a parked worker for a new task
/// only while no other worker is looking for work, and picks the worker that parked last,
/// so tasks that finish at once all go to the same one or two workers and the others
/// sleep on (seen with 4 and 8 workers). So each task holds its worker until every task
/// has started (at most `WAKE_HOLD`): with the workers already woken busy, the runtime
/// wakes the next sleeper for the next task, and each task gets a worker of its own. Each
/// worker then parks again and collects. Rounds repeat until every worker has collected
/// (the park hook counts them) or `WAKE_ROUNDS` have passed; a worker busy meanwhile
/// collects when it next parks. Runs only after a large passivation sweep, never on a
/// request's path.
pub fn wake_idle_workers(runtime: &tokio::runtime::Handle) {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    let epoch = RELEASE_EPOCH.load(Ordering::Relaxed);
    let workers = runtime.metrics().num_workers();
    for _ in 0..WAKE_ROUNDS {
        if collected_for(epoch) >= workers {
            return;
        }
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..workers {
            let started = started.clone();
            drop(runtime.spawn(async move {
                started.fetch_add(1, Ordering::AcqRel);
                let until = Instant::now() + WAKE_HOLD;
                while started.load(Ordering::Acquire) < workers && Instant::now() < until {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }));
        }
        std::thread::sleep(WAKE_HOLD);
    }
}

/// How long a task of `wake_idle_workers` holds its worker waiting for the others.
const WAKE_HOLD: std::time::Duration = std::time::Duration::from_millis(10);

/// Rounds of `wake_idle_workers` before it leaves the rest to traffic (~0.2 s of its
/// blocking thread at most).
const WAKE_ROUNDS: usize = 20;

#[cfg(test)]
mod purge_tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads an option.
        let delay = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(delay(), 1000, "mimalloc 3's default purge delay, in ms");
        }
        let before = delay();
        return_freed_pages_at_once();
        let expected = if before > 0 { 0 } else { before };
        assert_eq!(
            delay(),
            expected,
            "the delay while pages are returned at once"
        );
        restore_purge_delay();
        assert_eq!(delay(), before);
    }

    /// What a passivation drain's release relies on: every worker of the runtime, parked
    /// since before the release was asked for, parks again (and so runs the park hook,
    /// which collects) after `wake_idle_workers` is called from a thread that is not one of
    /// them; with more workers than cores too, where one round of wakes may not reach
    /// them all.
    #[test]
    fn waking_the_idle_workers_makes_each_park_again() {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};
        use std::thread::ThreadId;
        use std::time::{Duration, Instant};

        for workers in [2, 4, 8] {
            let parks: Arc<Mutex<HashMap<ThreadId, u64>>> = Arc::default();
            let counted = parks.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .on_thread_park(move || {
                    release_freed_memory_if_asked();
                    *counted
                        .lock()
                        .unwrap()
                        .entry(std::thread::current().id())
                        .or_default() += 1;
                })
                .build()
                .unwrap();
            let wait_for = |what: &str, done: &dyn Fn(&HashMap<ThreadId, u64>) -> bool| {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !done(&parks.lock().unwrap()) {
                    assert!(Instant::now() < deadline, "timed out waiting: {what}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            wait_for("every worker parked", &|p| p.len() == workers);
            // Idle now: a worker parks again only when woken.
            std::thread::sleep(Duration::from_millis(100));
            let before = parks.lock().unwrap().clone();
            ask_threads_to_release_freed_memory();
            wake_idle_workers(runtime.handle());
            wait_for(&format!("each of {workers} workers to park again"), &|p| {
                before.iter().all(|(thread, n)| p[thread] > *n)
            });
        }
    }
}
