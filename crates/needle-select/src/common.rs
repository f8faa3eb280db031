//! The static part as spec options, and the selector kit of needle-core (public there, for
//! selectors written outside this crate too) brought into scope.

use needle_core::StaticPart;

pub(crate) use needle_core::decode::dot;
pub use needle_core::kit::{DEFAULT_SINKS, DEFAULT_WINDOW};
pub(crate) use needle_core::kit::{
    SelectStep, apply_budget, begin_select, dedup_ids, default_scale, full_cost, group_max, keep_top,
};

/// Sinks and window of a selector, as spec options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub sinks: usize,
    pub window: usize,
}

impl Default for Frame {
    fn default() -> Self {
        Self { sinks: DEFAULT_SINKS, window: DEFAULT_WINDOW }
    }
}

impl Frame {
    pub fn static_part(&self) -> StaticPart {
        StaticPart { sinks: self.sinks, window: self.window }
    }
    pub fn describe(&self) -> String {
        self.static_part().describe()
    }
}
