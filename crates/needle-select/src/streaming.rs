//! StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus a recent window; the
//! dynamic part is never attended.

use std::ops::Range;

use needle_core::{
    AttentionSelector, Budget, BuildContext, BuildStats, HeadId, Result, RowSource, Selection, SelectorFactory,
    StaticPart,
};

use crate::common::{Frame, begin_state, open_state};

/// Makes [`StreamingSelector`]s; spec `streaming:sinks=S,window=W`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamingFactory {
    frame: Frame,
}

impl StreamingFactory {
    /// Keeps the first `sinks` and the last `window` tokens.
    pub fn new(sinks: usize, window: usize) -> Self {
        Self { frame: Frame { sinks, window } }
    }
}

impl SelectorFactory for StreamingFactory {
    fn describe(&self) -> String {
        format!("streaming:{}", self.frame.describe())
    }
    fn create(&self, _head: HeadId, _dim: usize) -> Result<Box<dyn AttentionSelector>> {
        Ok(Box::new(StreamingSelector { frame: self.frame }))
    }
}

/// Sinks + window only: selects nothing from the dynamic part.
#[derive(Debug, Clone, Copy)]
pub struct StreamingSelector {
    frame: Frame,
}

impl AttentionSelector for StreamingSelector {
    fn describe(&self) -> String {
        format!("streaming:{}", self.frame.describe())
    }
    fn static_part(&self) -> StaticPart {
        self.frame.static_part()
    }
    fn build(&mut self, ctx: &BuildContext<'_>) -> Result<BuildStats> {
        Ok(BuildStats { vectors: ctx.keys.len(), ..Default::default() })
    }
    fn insert(&mut self, _keys: &dyn RowSource, _positions: Range<u32>) -> Result<()> {
        Ok(())
    }
    fn select(&mut self, _queries: &[f32], _keys: &dyn RowSource, _budget: &Budget, out: &mut Selection) -> Result<()> {
        out.clear();
        Ok(())
    }
    // Nothing is built: the state is the header alone.
    fn save_state(&self, out: &mut Vec<u8>) -> Result<()> {
        begin_state(out, TAG, VERSION, &self.describe());
        Ok(())
    }
    fn load_state(&mut self, state: &[u8], keys: &dyn RowSource) -> Result<()> {
        open_state("streaming selector", state, TAG, VERSION, &self.describe(), keys, keys.dim())?.finish()
    }
}

const TAG: &[u8; 8] = b"sel.strm";
const VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_dense, built, select, uniform};

    #[test]
    fn selects_nothing_and_is_dense_when_everything_is_static() {
        let data = uniform(200, 3, 8, 1);
        let mut sel = built(&StreamingFactory::new(4, 16), &data);
        assert!(select(sel.as_mut(), &data, &data.queries, Budget::TopK(10)).ids.is_empty());
        let short = uniform(20, 3, 8, 2);
        let mut sel = built(&StreamingFactory::new(4, 16), &short);
        let s = select(sel.as_mut(), &short, &short.queries, Budget::TopK(1));
        assert_dense(sel.as_ref(), &short, &short.queries, &s, 1e-9);
    }
}
