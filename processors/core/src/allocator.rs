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

/// Free memory the process may hold beyond its heap before [`trim_when_idle`] gives it back:
/// 32 MiB, about a third of a million sessions' state, and far below the tens of MiB a
/// backlog's burst of small librdkafka allocations leaves behind.
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

/// When the trim thread gives memory back. It watches what the process holds beyond its
/// heap (resident bytes minus [`allocated`]: code, stacks, and free pages the allocator kept)
/// and trims once that grew [`FREE_HELD_MAX`] past where the last trim left it.
///
/// It does not watch glibc's free bytes (`fordblks`): a trim gives their pages back but they
/// stay counted, so after a restore left 100 MiB free a rule on them trimmed every period
/// forever, each time locking the arenas for nothing.
#[derive(Debug)]
pub struct TrimRule {
    /// Bytes held beyond the heap where the last trim (or the start) left them; follows them
    /// down.
    base: usize,
}

impl TrimRule {
    /// Starting from `held` bytes beyond the heap.
    pub fn new(held: usize) -> TrimRule {
        TrimRule { base: held }
    }

    /// Whether a trim is due now that `held` bytes are held beyond the heap.
    pub fn due(&mut self, held: usize) -> bool {
        self.base = self.base.min(held);
        held - self.base > FREE_HELD_MAX
    }

    /// A trim left `held` bytes beyond the heap: what it could not give back (pages still
    /// partly in use, code and stacks) is the new base.
    pub fn trimmed(&mut self, held: usize) {
        self.base = held;
    }
}

/// Trims done by [`trim_when_idle`] in this process (`presence_allocator_trims_total`).
static TRIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times [`trim_when_idle`] gave memory back.
pub fn trims() -> u64 {
    TRIMS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Resident bytes beyond the heap in use (`/proc/self/statm` resident pages minus
/// [`allocated`]); `None` without `/proc`.
fn held_beyond_heap() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    Some((pages * page).saturating_sub(allocated()))
}

/// A thread that, every [`TRIM_PERIOD`], gives free arena memory back when [`TrimRule`] says
/// so: after a burst (a drained backlog, a restore) the process's resident memory falls back
/// to what it uses, once, not at every period after.
pub fn trim_when_idle() {
    let Some(held) = held_beyond_heap() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(move || {
            let mut rule = TrimRule::new(held);
            loop {
                std::thread::sleep(TRIM_PERIOD);
                let Some(held) = held_beyond_heap() else {
                    continue;
                };
                if rule.due(held) {
                    release_free_memory();
                    TRIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    rule.trimmed(held_beyond_heap().unwrap_or(held));
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the allocator's trim thread; memory freed after bursts stays with the process");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn trims_once_after_a_burst_not_at_every_period_after() {
        let mut rule = TrimRule::new(20 * MIB);
        assert!(!rule.due(40 * MIB), "20 MiB more is within the bound");
        assert!(rule.due(140 * MIB), "a restore left 120 MiB free");
        // The trim gave back all but 10 MiB of pages still partly in use.
        rule.trimmed(30 * MIB);
        for _ in 0..10 {
            assert!(!rule.due(30 * MIB), "nothing more to give back");
        }
    }

    #[test]
    fn trims_again_when_freed_memory_comes_back() {
        let mut rule = TrimRule::new(20 * MIB);
        assert!(rule.due(100 * MIB));
        rule.trimmed(22 * MIB);
        // The trimmed pages are used and freed again by the next burst.
        assert!(!rule.due(50 * MIB));
        assert!(rule.due(60 * MIB));
    }

    #[test]
    fn the_base_follows_what_is_held_down() {
        let mut rule = TrimRule::new(60 * MIB);
        assert!(!rule.due(10 * MIB));
        assert!(rule.due(10 * MIB + FREE_HELD_MAX + 1));
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_heap_and_what_is_held_beyond_it_are_read_here() {
        let v = vec![1u8; 8 * MIB];
        assert!(
            allocated() >= 8 * MIB,
            "the 8 MiB vector is in the heap in use"
        );
        assert!(held_beyond_heap().is_some());
        drop(v);
    }
}
