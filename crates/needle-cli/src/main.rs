//! The `needle` binary: see the library's `run`.

fn main() -> anyhow::Result<()> {
    needle_cli::run()
}
