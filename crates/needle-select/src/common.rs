//! The static part as spec options, and the selector kit of needle-core (public there, for
//! selectors written outside this crate too) brought into scope.

use std::ops::Range;

use needle_core::{Result, RowSource, StaticPart, check_len};

use crate::state::{Reader, Writer};

pub(crate) use needle_core::kit::dot;
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

/// Starts a selector's state: its tag and format version, then its spec (what it was made
/// from), so that a state loads only into a selector of the same configuration.
pub(crate) fn begin_state<'a>(out: &'a mut Vec<u8>, tag: &[u8; 8], version: u32, describe: &str) -> Writer<'a> {
    let mut w = Writer::new(out, tag, version);
    w.str(describe);
    w
}

/// Opens a state written after [`begin_state`] by a selector described as `describe`, over
/// keys of `dim` floats.
pub(crate) fn open_state<'a>(
    kind: &'static str,
    state: &'a [u8],
    tag: &[u8; 8],
    version: u32,
    describe: &str,
    keys: &dyn RowSource,
    dim: usize,
) -> Result<Reader<'a>> {
    open_state_versions(kind, state, tag, version..=version, describe, keys, dim).map(|(r, _)| r)
}

/// [`open_state`] for a selector whose format reads older versions too: any in `versions`;
/// returns the version found.
pub(crate) fn open_state_versions<'a>(
    kind: &'static str,
    state: &'a [u8],
    tag: &[u8; 8],
    versions: std::ops::RangeInclusive<u32>,
    describe: &str,
    keys: &dyn RowSource,
    dim: usize,
) -> Result<(Reader<'a>, u32)> {
    let (mut r, version) = Reader::with_versions(kind, state, tag, versions)?;
    let saved = r.str("spec", 4096)?;
    if saved != describe {
        return Err(r.fail("spec", format!("saved by `{saved}`, loading into `{describe}`")));
    }
    check_len("keys dim", dim, keys.dim())?;
    Ok((r, version))
}

/// Writes a range of positions.
pub(crate) fn write_range(w: &mut Writer<'_>, r: &Range<u32>) {
    w.u32(r.start);
    w.u32(r.end);
}

/// Reads a range of positions inside `0..len`.
pub(crate) fn read_range(r: &mut Reader<'_>, field: &str, len: usize) -> Result<Range<u32>> {
    let (start, end) = (r.u32(field)?, r.u32(field)?);
    if start > end || end as usize > len {
        return Err(r.fail(field, format!("{start}..{end} is not a range inside the {len} keys")));
    }
    Ok(start..end)
}

/// The rows at `positions`, row-major (ids the caller has checked).
pub(crate) fn gather(keys: &dyn RowSource, positions: impl Iterator<Item = u32>) -> Vec<f32> {
    let mut rows = Vec::new();
    for p in positions {
        keys.row(p as usize).extend_into(&mut rows);
    }
    rows
}
