// A decode step allocates many small, short-lived buffers; mimalloc serves them from
// thread-local free lists instead of the system allocator's locks.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    needle_cli::run()
}

/// mimalloc hands freed memory back to the OS after a delay (`purge_delay`); prefill and decode
/// free and reallocate their buffers all the time, so pages were faulted in (and zeroed) again
/// and again: 65,000 page faults in an 8K generate, 2,500 without purging (docs/benchmarks.md
/// §22). The process keeps what it freed instead; its peak memory is unchanged. A
/// `MIMALLOC_PURGE_DELAY` the user set is left alone.
fn keep_freed_memory() {
    use std::ffi::{c_int, c_long};
    // mimalloc.h's `mi_option_purge_delay` (the same index in the v2 and v3 sources that the
    // locked libmimalloc-sys builds; `MIMALLOC_VERBOSE=1` lists the options in order).
    const PURGE_DELAY: c_int = 15;
    unsafe extern "C" {
        fn mi_option_set(option: c_int, value: c_long);
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain call into the allocator's option table, which takes any index.
        unsafe { mi_option_set(PURGE_DELAY, -1) };
    }
}
