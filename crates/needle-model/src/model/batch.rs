//! Batched decode: one step of several sequences in one pass over the weights.
//!
//! Each sequence keeps its own [`KvCache`] (pages, selectors, tiers); the step stacks the
//! sequences' new tokens into one `[n, hidden]` input, so every linear is one pass over the
//! weights for all `n` rows ([`NeedleBackend::qlinear_rows`]: on the CPU each weight row is read
//! once and met by every row, with the single-token kernel, so each row's bits are those of a
//! lone decode) instead of `n` GEMVs, while RoPE takes each row's own position and attention
//! runs row by row through that row's cache ([`cached_attention`] with
//! [`AttentionStep::Decode`]), exactly as [`Llama::decode`] does for one sequence. A batch gives
//! every sequence the tokens and logits it gets alone.

use burn::tensor::{Tensor, TensorData};
use needle_loader::Architecture;

use super::{Linear, Llama, RopeTables};
use crate::attention::{AttentionStep, cached_attention};
use crate::backend::{NeedleBackend, plain};
use crate::cache::KvCache;
use crate::error::{Error, Result};

impl<B: NeedleBackend> Llama<B> {
    /// One decode step of `tokens.len()` sequences: `tokens[i]` is fed to `caches[i]`; returns
    /// each sequence's next-token logits. The linears run once over all rows; attention runs per
    /// row with its own cache. One sequence is [`Llama::decode`]; an architecture whose layer the
    /// batched step does not spell out (one added after it) decodes the sequences one by one.
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache<B::KvMirror>]) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != caches.len() {
            return Err(Error::invalid(
                "caches",
                format!("{} tokens for {} caches: one token per sequence", tokens.len(), caches.len()),
            ));
        }
        let batched = matches!(
            self.config.architecture,
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3
        );
        if tokens.len() <= 1 || !batched {
            return tokens.iter().zip(caches.iter_mut()).map(|(&t, c)| self.decode(t, c)).collect();
        }
        if let Some(i) = caches.iter().position(|c| !c.is_built()) {
            return Err(Error::State(format!("decode before prefill (sequence {i}): prefill a prompt first")));
        }
        let hidden = self.forward_rows(tokens, caches)?;
        for c in caches.iter_mut() {
            c.finish_step();
        }
        let [logits] = rows_many(hidden, [&self.lm_head])?;
        let logits = B::with_host(logits, <[f32]>::to_vec)?;
        Ok(logits.chunks_exact(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// [`Llama::forward`] of one decode token per sequence, each at its own cache's position.
    fn forward_rows(&self, tokens: &[u32], caches: &mut [&mut KvCache<B::KvMirror>]) -> Result<Tensor<B, 2>> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        if let Some(w) = self.config.sliding_window
            && let Some(&p) = positions.iter().find(|&&p| p + 1 > w)
        {
            return Err(Error::invalid(
                "sliding_window",
                format!("the model attends to its last {w} positions only: {} tokens is past the window", p + 1),
            ));
        }
        let (nh, nkv, d) = (self.gqa.n_q_heads, self.gqa.n_kv_heads, self.config.head_dim);
        let device = self.device();
        let mut x = self.embed(tokens)?;
        let rope = self.row_rope(&positions, &device);
        for (l, b) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &b.attn_norm)?;
            let [q, k, v] = rows_many(h, [&b.wq, &b.wk, &b.wv])?;
            let bias = |x: Tensor<B, 2>, b: &Option<burn::module::Param<Tensor<B, 2>>>| match b {
                Some(b) => x + b.val(),
                None => x,
            };
            let (q, k, v) = (bias(q, &b.bias_q), bias(k, &b.bias_k), bias(v, &b.bias_v));
            let q = rope.apply(self.heads(q, nh, &b.q_norm)?)?;
            let k = rope.apply(self.heads(k, nkv, &b.k_norm)?)?;
            let v = v.reshape([n, nkv, d]);
            let mut outs = Vec::with_capacity(n);
            for (i, cache) in caches.iter_mut().enumerate() {
                let row = |t: &Tensor<B, 3>| t.clone().narrow(0, i, 1);
                outs.push(cached_attention(cache, l, AttentionStep::Decode, row(&q), row(&k), row(&v), self.scale())?);
            }
            let [o] = rows_many(Tensor::cat(outs, 0), [&b.wo])?;
            x = x + o;
            let h = self.rms_norm(x.clone(), &b.ffn_norm)?;
            let [gate, up] = rows_many(h, [&b.w_gate, &b.w_up])?;
            let ff = if self.fused { B::fused_silu_mul(gate, up)? } else { plain::silu_mul(gate, up) };
            let [down] = rows_many(ff, [&b.w_down])?;
            x = x + down;
        }
        self.rms_norm(x, &self.norm)
    }

    /// RoPE tables of one row per position (the rows of a batch are at different positions).
    fn row_rope(&self, positions: &[usize], device: &B::Device) -> RopeTables<B> {
        let (n, d) = (positions.len(), self.config.head_dim);
        if self.fused {
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for &p in positions {
                let (c, s) = self.rope.half_tables(p..p + 1);
                cos.extend(c);
                sin.extend(s);
            }
            let table = |v| Tensor::<B, 2>::from_data(TensorData::new(v, [n, d / 2]), device);
            RopeTables::Half(table(cos), table(sin))
        } else {
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for &p in positions {
                let (c, s) = self.rope.tables(p..p + 1);
                cos.extend(c);
                sin.extend(s);
            }
            let table = |v| Tensor::<B, 3>::from_data(TensorData::new(v, [n, 1, d]), device);
            RopeTables::Full(table(cos), table(sin))
        }
    }
}

/// `x` (one decode row per sequence) through linears sharing it, each row as a lone decode
/// computes it: [`NeedleBackend::qlinear_rows`] on stored blocks, else row by row.
fn rows_many<B: NeedleBackend, const N: usize>(x: Tensor<B, 2>, ls: [&Linear<B>; N]) -> Result<[Tensor<B, 2>; N]> {
    let outs = match ls.iter().map(|l| l.native.0.as_ref()).collect::<Option<Vec<_>>>() {
        Some(ws) => B::qlinear_rows(x, &ws)?,
        None => {
            let n = x.dims()[0];
            let mut per: Vec<Vec<Tensor<B, 2>>> = vec![Vec::with_capacity(n); N];
            for i in 0..n {
                let row = x.clone().narrow(0, i, 1);
                for (p, l) in per.iter_mut().zip(ls) {
                    p.push(l.forward(row.clone())?);
                }
            }
            per.into_iter().map(|ys| Tensor::cat(ys, 0)).collect()
        }
    };
    outs.try_into().map_err(|_| Error::State("a batched linear returned the wrong number of outputs".into()))
}
