//! The queries a cache keeps: the prefill sample the selectors train on, and the trace of chosen layers (`needle trace`).

use super::*;

/// Post-RoPE queries recorded for chosen layers (for `needle trace` and fidelity checks).
#[derive(Debug, Clone, Default)]
pub struct QueryTrace {
    /// The layers recorded, ascending.
    pub layers: Vec<usize>,
    /// Per recorded layer: prefill queries, row-major `positions × n_q_heads × dim`.
    pub prefill: Vec<Vec<f32>>,
    /// Per recorded layer: decode queries, row-major `steps × n_q_heads × dim`.
    pub decode: Vec<Vec<f32>>,
}

impl QueryTrace {
    fn slot(&self, layer: usize) -> Option<usize> {
        self.layers.binary_search(&layer).ok()
    }
}

impl<M> KvCache<M> {
    /// Records every query of `layers` from now on (prefill and decode).
    pub fn trace_queries(&mut self, mut layers: Vec<usize>) -> Result<()> {
        layers.sort_unstable();
        layers.dedup();
        if let Some(&bad) = layers.iter().find(|&&l| l >= self.heads.len()) {
            return Err(Error::invalid("layers", format!("layer {bad} does not exist ({} layers)", self.heads.len())));
        }
        let n = layers.len();
        self.trace = Some(QueryTrace { layers, prefill: vec![Vec::new(); n], decode: vec![Vec::new(); n] });
        Ok(())
    }

    /// The queries recorded so far, if tracing.
    pub fn query_trace(&self) -> Option<&QueryTrace> {
        self.trace.as_ref()
    }

    /// True when queries of `layer` must be read back (training sample or trace).
    pub fn wants_queries(&self, layer: usize) -> bool {
        !self.built || self.trace.as_ref().is_some_and(|t| t.slot(layer).is_some())
    }

    /// Records queries of `layer` (`t × n_q_heads × dim`) for the trace and, during prefill,
    /// the training sample.
    pub fn observe_queries(&mut self, layer: usize, first_pos: usize, queries: &[f32]) {
        let built = self.built;
        if let Some(t) = self.trace.as_mut()
            && let Some(i) = t.slot(layer)
        {
            if built { &mut t.decode[i] } else { &mut t.prefill[i] }.extend_from_slice(queries);
        }
        if !built {
            self.record_queries(layer, first_pos, queries);
        }
    }

    /// Keeps the queries of sampled prefill positions (`first_pos..first_pos + t`, row-major
    /// `t × n_q_heads × dim`) as training queries of their KV heads.
    pub(super) fn record_queries(&mut self, layer: usize, first_pos: usize, queries: &[f32]) {
        if self.config.train_positions == 0 {
            return;
        }
        let d = self.head_dim;
        let row = self.gqa.n_q_heads * d;
        for (i, q) in queries.chunks_exact(row).enumerate() {
            if !(first_pos + i).is_multiple_of(self.train_stride) {
                continue;
            }
            for (j, h) in self.heads[layer].iter_mut().enumerate() {
                h.train_queries.extend_from_slice(&q[self.gqa.group(j).start * d..self.gqa.group(j).end * d]);
            }
        }
    }
}
