//! How the C allocator (glibc's malloc, which librdkafka and Rust share here) holds memory
//! in a long-running process with many threads.
//!
//! glibc gives threads their own arenas, up to eight per core, and a block freed on another
//! thread goes back to the arena that allocated it. librdkafka allocates fetch buffers on
//! its broker threads and the stages free them on theirs, so each arena grows to its own
//! high-water mark and keeps it. glibc also raises its mmap threshold (up to 32 MiB) each
//! time a large mmapped block is freed, after which fetch and decompression buffers of a
//! few MiB come from the arenas instead of mmap and are never returned to the system.
//! Both are bounded here, once, before any thread starts.
//!
//! Operators can still choose otherwise: with `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`
//! or `GLIBC_TUNABLES` in the environment glibc's own reading of them stands.

/// Arenas for the whole process (glibc default: 8 × cores). Two: the stage threads and
/// librdkafka's threads contend on them only for the moment of a malloc or free, which
/// costs nothing measurable at these rates (README "Benchmarks"), while every arena beyond
/// keeps its own high-water mark of buffers.
pub const ARENA_MAX: i32 = 2;

/// Blocks of this size and more are mmapped and given back to the system when freed (glibc
/// default 128 KiB, raised dynamically up to 32 MiB). Fixing it turns the dynamic raise off,
/// so the consumers' fetch buffers (up to a partition fetch, 1 MiB) and decompression
/// buffers never settle in an arena after a burst.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Applies [`ARENA_MAX`] and [`MMAP_THRESHOLD`] unless the environment sets glibc's
/// allocator itself. Call first thing in `main`, before any thread starts.
pub fn bound() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set_by_operator = [
            "MALLOC_ARENA_MAX",
            "MALLOC_MMAP_THRESHOLD_",
            "GLIBC_TUNABLES",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
        if !set_by_operator {
            // SAFETY: mallopt only changes allocator parameters; called before other threads.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
        }
    }
}

/// Free memory the arenas may hold before [`trim_when_idle`] gives it back: 32 MiB, about
/// a third of a million sessions' state, and far below the tens of MiB a backlog's burst of
/// small librdkafka allocations leaves behind.
pub const FREE_HELD_MAX: usize = 32 * 1024 * 1024;

/// How often [`trim_when_idle`] looks (one `mallinfo2`, microseconds); a trim, when due,
/// takes a few ms with the arenas locked, so at most once per period.
pub const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Gives free memory at the top of every arena, and whole free pages inside them, back to
/// the system (glibc `malloc_trim(0)`).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes free inside the arenas (glibc `mallinfo2().fordblks`); 0 elsewhere.
pub fn free_held() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads glibc's own statistics.
    unsafe {
        libc::mallinfo2().fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// Bytes allocated and not freed yet, in the arenas and in blocks of their own (glibc
/// `mallinfo2().uordblks + hblkhd`); 0 elsewhere. The heap the process uses: resident
/// memory above it is code, thread stacks and free memory the allocator still holds (free
/// bytes are not a measure of that: a trim gives their pages back but they stay counted).
pub fn allocated() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads glibc's own statistics.
    unsafe {
        let m = libc::mallinfo2();
        m.uordblks + m.hblkhd
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// A thread that, every [`TRIM_PERIOD`], gives free arena memory back once more than
/// [`FREE_HELD_MAX`] of it is held: after a burst (a drained backlog, a restore) the
/// process's resident memory falls back to what it uses.
pub fn trim_when_idle() {
    let spawned = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(TRIM_PERIOD);
            if free_held() > FREE_HELD_MAX {
                release_free_memory();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the allocator's trim thread; memory freed after bursts stays with the process");
    }
}
