//! `needle` with `strided-rerank` registered: everything the needle CLI does, plus the
//! custom-selector example's selector by name, e.g.
//!
//! ```sh
//! cargo run --release -- generate --document default --context-tokens 4000 \
//!   --question "Who built the ark?" --chat --selector strided-rerank:stride=8,k=64
//! ```

fn main() -> anyhow::Result<()> {
    custom_selector::register()?;
    needle_cli::run()
}
