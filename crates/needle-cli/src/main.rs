//! The `needle` binary: see the library's `run`.

// A decode step allocates many small, short-lived buffers; mimalloc serves them from
// thread-local pages instead of glibc's shared arenas.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    needle_cli::run()
}
