//! glibc malloc settings for a training process.
//!
//! By default glibc serves large blocks with fresh `mmap`s and returns freed heap to the
//! kernel eagerly, adapting its thresholds only after it sees a large mmapped block freed.
//! A training step allocates and frees the same activations every step, so with the default
//! thresholds each step can fault its working set in again from zeroed pages: the quickstart
//! model fed from a `shards:` dataset took 3x the page faults and 8x the system time of the
//! same model fed from memory, where an early 60 MB free happened to raise the thresholds.
//! Fixed thresholds keep freed activations in the heap for the next step.

/// Blocks below this are served from the heap and reused.
pub const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free heap kept before any is returned to the kernel.
pub const TRIM_THRESHOLD: i32 = 256 << 20;

/// Sets glibc's mmap and trim thresholds for a training process. Call it once at the start
/// of `main`, before other threads allocate. Returns false when glibc refused them (or on
/// platforms without glibc, where it does nothing).
pub fn tune_for_training() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters, and it runs before other
        // threads exist; invalid values are refused by returning 0.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 0
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 0
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
