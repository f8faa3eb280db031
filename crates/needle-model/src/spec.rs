//! Selectors named by spec strings, e.g. `full` or `retrieval:index=graph,k=100`.
//!
//! Parsing lives in `needle-select`; the index crates it can use are the ones this crate's
//! Cargo features (`graph`, `ivfpq`, `lsh`) compile in. Asking for one that is not compiled in
//! is an error naming the feature.

use needle_core::SelectorFactory;

use crate::cache::SelectionConfig;
use crate::error::Result;

pub use needle_select::SELECTORS;

/// Context length from which the spec `auto` means `retrieval`: below it the dynamic part
/// (beyond 128 sinks + 512 window) is too small for an index to pay, so `auto` means `full`.
pub const AUTO_RETRIEVAL_FROM: usize = 2048;

/// Resolves `auto` (the CLI's default selector) for a context of `context_len` tokens:
/// `retrieval` from [`AUTO_RETRIEVAL_FROM`] tokens on, `full` below. Any other spec is returned
/// as it is.
pub fn resolve_auto(spec: &str, context_len: usize) -> String {
    if !spec.trim().eq_ignore_ascii_case("auto") {
        return spec.to_string();
    }
    if context_len >= AUTO_RETRIEVAL_FROM { "retrieval" } else { "full" }.to_string()
}

/// Builds the selector factory and selection configuration a spec describes.
pub fn selector_from_spec(spec: &str) -> Result<(Box<dyn SelectorFactory>, SelectionConfig)> {
    let s = needle_select::parse(spec)?;
    let config = SelectionConfig {
        budget: s.budget,
        dense_layers: s.dense_layers,
        train_positions: s.train_positions,
        ..SelectionConfig::default()
    };
    Ok((s.factory, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_build_and_errors_list_valid_names() {
        assert!(selector_from_spec("full").is_ok());
        let (_, c) = selector_from_spec("retrieval:k=64,dense_layers=2").unwrap();
        assert_eq!(c.budget, needle_core::Budget::TopK(64));
        assert_eq!(c.dense_layers, 2);
        let e = selector_from_spec("nope").err().unwrap().to_string();
        assert!(e.contains("retrieval") && e.contains("full"), "{e}");
        assert!(selector_from_spec("full:bogus=3").is_err());
    }

    #[test]
    fn auto_picks_retrieval_for_long_contexts_only() {
        assert_eq!(resolve_auto("auto", AUTO_RETRIEVAL_FROM - 1), "full");
        assert_eq!(resolve_auto("Auto", AUTO_RETRIEVAL_FROM), "retrieval");
        assert_eq!(resolve_auto("quest:k=64", 10), "quest:k=64");
    }
}
