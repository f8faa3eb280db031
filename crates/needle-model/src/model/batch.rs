//! Batched decode: one step of several sequences in one pass over the weights.
//!
//! Each sequence keeps its own [`KvCache`] (pages, selectors, tiers); the step stacks the
//! sequences' new tokens into one `[n, hidden]` input, so every linear is one pass over the
//! weights for all `n` rows ([`NeedleBackend::qlinear_rows`]: on the CPU each weight row is read
//! once and met by every row, with the single-token kernel's arithmetic, so each row's bits are
//! those of a lone decode) instead of `n` GEMVs, while RoPE takes each row's own position and
//! each row attends through its own cache ([`NeedleBackend::decode_attention_rows`]: what
//! [`cached_attention`] does for a lone decode token; on the CPU the sequences in parallel),
//! exactly as [`Llama::decode`] does for one sequence. A batch gives every sequence the tokens
//! and logits it gets alone.
//!
//! [`cached_attention`]: crate::cached_attention

use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};

use super::{Linear, Llama, RopeTables, take};
use crate::backend::NeedleBackend;
use crate::cache::{DecodeStats, KvCache};
use crate::error::{Error, Result};
use crate::rope::Rope;

impl<B: NeedleBackend> Llama<B> {
    /// One decode step of `tokens.len()` sequences: `tokens[i]` is fed to `caches[i]`; returns
    /// each sequence's next-token logits. The linears run once over all rows; attention runs per
    /// row with its own cache (the same layer code as [`Llama::decode`], `Llama::layers`, with
    /// each row through the linears as a lone decode row goes). One sequence is [`Llama::decode`].
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache<B::KvMirror>]) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != caches.len() {
            return Err(Error::invalid(
                "caches",
                format!("{} tokens for {} caches: one token per sequence", tokens.len(), caches.len()),
            ));
        }
        if tokens.len() <= 1 {
            return tokens.iter().zip(caches.iter_mut()).map(|(&t, c)| self.decode(t, c)).collect();
        }
        if let Some(i) = caches.iter().position(|c| !c.is_built()) {
            return Err(Error::State(format!("decode before prefill (sequence {i}): prefill a prompt first")));
        }
        let before: Vec<DecodeStats> = caches.iter().map(|c| c.stats).collect();
        let t0 = Instant::now();
        let (hidden, weights, attention) = self.forward_rows(tokens, caches)?;
        for c in caches.iter_mut() {
            c.finish_step();
        }
        let t1 = Instant::now();
        let [logits] = take(rows_many(hidden, &[&self.lm_head])?)?;
        let weights = weights + t1.elapsed();
        let vocab = self.config.vocab_size;
        let mut logits: Vec<Vec<f32>> = B::with_host(logits, |l| l.chunks_exact(vocab).map(<[f32]>::to_vec).collect())?;
        if let Some(cap) = self.config.final_logit_softcapping {
            let cap = cap as f32;
            logits.iter_mut().flatten().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        // Each sequence's profile takes its share of the step: the step and the weights split
        // evenly, its own attention, walk and insert times scaled so that the shares add up to
        // the attention's wall time (the sequences attend in parallel).
        let (step, n) = (t0.elapsed(), caches.len() as u32);
        let own: Duration = caches.iter().zip(&before).map(|(c, b)| c.stats.attention_gain(b)).sum();
        let concurrency = (attention.as_secs_f64() / own.as_secs_f64().max(f64::MIN_POSITIVE)).min(1.0);
        for (c, b) in caches.iter_mut().zip(&before) {
            c.stats.account_shared_step(b, step / n, weights / n, concurrency);
        }
        Ok(logits)
    }

    /// [`Llama::forward`] of one decode token per sequence, each at its own cache's position;
    /// also returns the wall times of the linears and of the attention.
    fn forward_rows(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache<B::KvMirror>],
    ) -> Result<(Tensor<B, 2>, Duration, Duration)> {
        self.check_tokens(tokens)?;
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        if let Some(w) = self.config.sliding_window
            && let Some(&p) = positions.iter().find(|&&p| p + 1 > w)
        {
            return Err(Error::invalid(
                "sliding_window",
                format!("the model attends to its last {w} positions only: {} tokens is past the window", p + 1),
            ));
        }
        let kinds = self.layer_kinds();
        for c in caches.iter_mut() {
            c.set_layer_kinds(&kinds)?;
        }
        let device = self.device();
        let x = self.embed_scaled(tokens)?;
        let rope = row_rope(self.fused, &self.rope, &positions, self.config.head_dim, &device);
        let local =
            self.local_rope.as_ref().map(|r| row_rope(self.fused, r, &positions, self.config.head_dim, &device));
        let scale = self.scale();
        let mut attention = Duration::ZERO;
        let mut attend = |l: usize, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>| -> Result<Tensor<B, 2>> {
            let t0 = Instant::now();
            let out = B::decode_attention_rows(caches, l, q, k, v, scale);
            attention += t0.elapsed();
            out
        };
        let (hidden, weights) = self.layers(x, (&rope, local.as_ref()), true, &mut attend)?;
        Ok((hidden, weights, attention))
    }
}

/// RoPE tables of one row per position (the rows of a batch are at different positions).
fn row_rope<B: NeedleBackend>(
    fused: bool,
    rope: &Rope,
    positions: &[usize],
    d: usize,
    device: &B::Device,
) -> RopeTables<B> {
    let n = positions.len();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in positions {
        let (c, s) = if fused { rope.half_tables(p..p + 1) } else { rope.tables(p..p + 1) };
        cos.extend(c);
        sin.extend(s);
    }
    if fused {
        let table = |v| Tensor::<B, 2>::from_data(TensorData::new(v, [n, d / 2]), device);
        RopeTables::Half(table(cos), table(sin))
    } else {
        let table = |v| Tensor::<B, 3>::from_data(TensorData::new(v, [n, 1, d]), device);
        RopeTables::Full(table(cos), table(sin))
    }
}

/// `x` (one decode row per sequence) through linears sharing it, each row as a lone decode
/// computes it: [`NeedleBackend::qlinear_rows`] on stored blocks, else row by row.
pub(super) fn rows_many<B: NeedleBackend>(x: Tensor<B, 2>, ls: &[&Linear<B>]) -> Result<Vec<Tensor<B, 2>>> {
    match ls.iter().map(|l| l.native.0.as_ref()).collect::<Option<Vec<_>>>() {
        Some(ws) => B::qlinear_rows(x, &ws),
        None => {
            let n = x.dims()[0];
            let mut per: Vec<Vec<Tensor<B, 2>>> = vec![Vec::with_capacity(n); ls.len()];
            for i in 0..n {
                let row = x.clone().narrow(0, i, 1);
                for (p, l) in per.iter_mut().zip(ls) {
                    p.push(l.forward(row.clone())?);
                }
            }
            Ok(per.into_iter().map(|ys| Tensor::cat(ys, 0)).collect())
        }
    }
}
