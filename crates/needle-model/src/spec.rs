//! The model composes the selectors it is handed: a parsed [`SelectorSpec`] (needle-core's
//! type) becomes the factory and [`SelectionConfig`] the cache runs. Resolving a spec string to
//! a selector is the caller's job (`needle_select::parse`, which knows the built-ins and every
//! registered plugin), so this crate depends on no selector or index crate.

use needle_core::{SelectorFactory, SelectorSpec};

use crate::cache::SelectionConfig;

impl SelectionConfig {
    /// The configuration a parsed spec describes: its budget, dense layers and training
    /// positions, every other setting at its default.
    pub fn from_spec(spec: &SelectorSpec) -> Self {
        Self {
            budget: spec.budget,
            dense_layers: spec.dense_layers,
            train_positions: spec.train_positions,
            ..Self::default()
        }
    }
}

/// Splits a parsed spec into the factory and the configuration a [`KvCache`](crate::KvCache)
/// is made with.
pub fn compose(spec: SelectorSpec) -> (Box<dyn SelectorFactory>, SelectionConfig) {
    let config = SelectionConfig::from_spec(&spec);
    (spec.factory, config)
}

#[cfg(test)]
mod tests {
    use needle_core::{Budget, FullSelector};

    use super::*;

    #[test]
    fn a_spec_sets_budget_dense_layers_and_training_only() {
        let spec = SelectorSpec {
            factory: Box::new(FullSelector),
            budget: Budget::Mass { target: 0.5, max: 64 },
            dense_layers: 2,
            train_positions: 7,
        };
        let (f, c) = compose(spec);
        assert_eq!(f.describe(), FullSelector.describe());
        assert_eq!((c.budget, c.dense_layers, c.train_positions), (Budget::Mass { target: 0.5, max: 64 }, 2, 7));
        let d = SelectionConfig::default();
        assert_eq!((c.kv, c.prefill), (d.kv, d.prefill));
    }
}
