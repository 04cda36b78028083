//! The `stockd` binary: the command line lives in the library (`stockd::cli`).

use std::process::ExitCode;

/// mimalloc rather than the system allocator: a request, a log record and a replayed
/// record each make many small allocations, and glibc's malloc/free were ~17 % of a
/// reserve's CPU and ~25 % of log replay's (perf; docs/PERFORMANCE.md#decision-mimalloc).
#[cfg(not(feature = "memory-probe"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With the `memory-probe` feature (a diagnostic build, never the shipped one): mimalloc
/// behind a counter of the bytes the program holds, printed with mimalloc's own figures
/// on SIGUSR1 (`probe`).
#[cfg(feature = "memory-probe")]
#[global_allocator]
static GLOBAL: probe::Counting = probe::Counting;

#[cfg(feature = "memory-probe")]
mod probe {
    use std::alloc::{GlobalAlloc, Layout};
    use std::io::Write;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// Bytes allocated and not freed (the sizes asked for).
    static LIVE: AtomicI64 = AtomicI64::new(0);

    pub struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }

    /// Prints, on each SIGUSR1, the bytes held, mimalloc's committed and resident bytes,
    /// and its statistics (stderr).
    pub fn start() {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("probe runtime");
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1");
                while usr1.recv().await.is_some() {
                    report();
                }
            });
        });
    }

    fn report() {
        let (mut elapsed, mut user, mut sys) = (0usize, 0usize, 0usize);
        let (mut rss, mut peak_rss, mut commit, mut peak_commit, mut faults) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        // SAFETY: mimalloc's documented API; every pointer is to a local.
        unsafe {
            libmimalloc_sys::mi_process_info(
                &mut elapsed,
                &mut user,
                &mut sys,
                &mut rss,
                &mut peak_rss,
                &mut commit,
                &mut peak_commit,
                &mut faults,
            )
        };
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let _ = writeln!(
            std::io::stderr(),
            "memory-probe: live {:.1} MiB; mimalloc committed {:.1} MiB (peak {:.1}); rss {:.1} MiB",
            mib(LIVE.load(Ordering::Relaxed) as f64),
            mib(commit as f64),
            mib(peak_commit as f64),
            mib(rss as f64),
        );
        pages();
    }

    /// Per block size: pages, bytes of their initialized blocks, bytes in use.
    #[derive(Default)]
    struct Pages {
        by_size: std::collections::BTreeMap<usize, (usize, usize, usize)>,
        /// Pages by the share of their initialized bytes in use: <10 %, <25 %, <50 %, <75 %, ≥75 %.
        by_use: [(usize, usize, usize); 5],
    }

    unsafe extern "C" fn visit(
        _heap: *const libmimalloc_sys::mi_heap_t,
        area: *const libmimalloc_sys::mi_heap_area_t,
        _block: *mut std::ffi::c_void,
        _size: usize,
        arg: *mut std::ffi::c_void,
    ) -> bool {
        // SAFETY: mimalloc passes a valid area, and `arg` is the `Pages` of `pages`.
        let (area, pages) = unsafe { (&*area, &mut *(arg as *mut Pages)) };
        let used = area.used * area.block_size;
        let entry = pages.by_size.entry(area.block_size).or_default();
        entry.0 += 1;
        entry.1 += area.committed;
        entry.2 += used;
        let share = used as f64 / area.committed.max(1) as f64;
        let bucket = [0.10, 0.25, 0.50, 0.75]
            .iter()
            .position(|&limit| share < limit)
            .unwrap_or(4);
        let b = &mut pages.by_use[bucket];
        b.0 += 1;
        b.1 += area.committed;
        b.2 += used;
        true
    }

    /// mimalloc's pages (every thread's): how much of what they hold is in use. Racy
    /// against running threads: for an idle server only.
    fn pages() {
        let mut pages = Pages::default();
        // SAFETY: mimalloc's documented API; `visit` reads the area it is given.
        unsafe {
            libmimalloc_sys::mi_heap_visit_blocks(
                std::ptr::null_mut(),
                false,
                Some(visit),
                &mut pages as *mut Pages as *mut std::ffi::c_void,
            )
        };
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let (n, committed, used) = pages
            .by_size
            .values()
            .fold((0, 0, 0), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2));
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "memory-probe: {n} pages, {:.1} MiB of blocks initialized, {:.1} MiB in use ({:.0} %)",
            mib(committed),
            mib(used),
            100.0 * used as f64 / committed.max(1) as f64
        );
        for (label, b) in ["<10%", "<25%", "<50%", "<75%", ">=75%"]
            .iter()
            .zip(pages.by_use)
        {
            let _ = writeln!(
                err,
                "  pages {label:>5} in use: {:6} pages, {:7.1} MiB initialized, {:6.1} MiB in use",
                b.0,
                mib(b.1),
                mib(b.2)
            );
        }
        let mut sizes: Vec<_> = pages.by_size.into_iter().collect();
        sizes.sort_by_key(|(_, v)| std::cmp::Reverse(v.1 - v.2));
        for (size, v) in sizes.into_iter().take(12) {
            let _ = writeln!(
                err,
                "  block {size:>8} B: {:6} pages, {:7.1} MiB initialized, {:6.1} MiB in use, {:6.1} MiB free",
                v.0,
                mib(v.1),
                mib(v.2),
                mib(v.1 - v.2)
            );
        }
    }
}

fn main() -> ExitCode {
    #[cfg(feature = "memory-probe")]
    probe::start();
    stockd::cli::main()
}
