//! Process-wide memory settings, applied once at the start of `main`.

/// Turns off transparent huge pages for this process and the processes it starts.
///
/// The log's storage engine (sled) allocates a fresh 512 KiB, 8 KiB-aligned I/O buffer for
/// every flush. With the kernel's THP set to `always`, mimalloc serves it from new memory
/// in a 2 MiB-aligned region and the first write faults in a whole huge page, which the
/// kernel zeroes: ~2 MiB of `clear_page` per flush, 2.5–4.3 % of a sync flash sale's CPU
/// (perf, docs/PERFORMANCE.md#decision-thp-off). With 4 KiB pages only the bytes a batch touches are
/// faulted in. The flag (`PR_SET_THP_DISABLE`) is checked at fault time, so it covers
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
