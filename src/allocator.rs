//! The binary's allocator: mimalloc, its arenas committed as they are used.
//!
//! Why mimalloc (counted by callgrind, `bench/README.md`): 7-8% fewer
//! instructions per request in the sidecar when each client connection is
//! new, about 1% at keep-alive, and half the filter's last-level cache
//! misses per write spread over 100,000 locks, where glibc's bins hand out
//! and merge blocks across a heap that many locks make large. The library
//! leaves the allocator to whoever links it: the in-process tests run on
//! glibc's, the tests that start the binary on this one.
//!
//! Why the option: on Linux mimalloc commits each arena whole when it
//! reserves it, and the sidecar then idled at 20 MiB against glibc's 10
//! (the filter at 17 against 9): the reason it was dropped twice before.
//! Committed as used, the resident memory is glibc's within about 1 MiB,
//! idle and under load.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit`: its place in mimalloc's `mi_option_e`
/// (the same in its v2 and v3), which libmimalloc-sys does not name.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Turns eager commit off unless `MIMALLOC_ARENA_EAGER_COMMIT` says
/// otherwise. It must run before mimalloc's own start-up, which reserves
/// the first arena (a constructor of priority 101, before `main`: set from
/// `main`, the option came too late and changed nothing). So it is a
/// constructor of priority 99, the slot std uses for its own `argv` set-up
/// on glibc: it reads no argument and allocates nothing.
extern "C" fn commit_lazily() {
    // SAFETY: a NUL-terminated name; no thread exists yet to change the
    // environment.
    let from_env = unsafe { !libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() };
    if !from_env {
        // SAFETY: stores one of mimalloc's integer options; it touches no
        // memory that mimalloc hands out.
        unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
    }
}

#[used]
#[unsafe(link_section = ".init_array.00099")]
static COMMIT_LAZILY: extern "C" fn() = commit_lazily;

#[cfg(test)]
mod tests {
    /// The constructor ran in this binary (its unit tests link it too),
    /// before anything read the option.
    #[test]
    fn arenas_are_committed_lazily() {
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            // SAFETY: reads one of mimalloc's integer options.
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(super::ARENA_EAGER_COMMIT) }, 0);
        }
    }
}
