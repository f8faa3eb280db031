#!/usr/bin/env python3
"""Check that llama.cpp on the F32 file is a near-exact f32 reference.

Runs SmolLM2-135M (Llama architecture) in plain numpy, float64, from the weights of
SmolLM2-135M-Instruct.F32.gguf, on the short prompts of tests/fixtures/logits_f32.json
((a) and (b) by default), and compares the last position's logits with the fixture: top-20
ids, their logits, and the full-vocabulary logsumexp. The numpy forward is also a
readable statement of the model for needle developers:

  x = token_embd[ids]
  per layer: h = rmsnorm(x) * attn_norm; q,k,v = h W^T; RoPE (llama.cpp mode 0: rotate
             adjacent pairs (2i, 2i+1) of each 64-dim head, theta = pos * 100000^(-2i/64));
             causal softmax(q k^T / 8) v with query head j using KV head j // 3;
             x += attn W_o^T;  h = rmsnorm(x) * ffn_norm;  x += (silu(h W_g^T) * h W_u^T) W_d^T
  logits = (rmsnorm(x) * output_norm) token_embd^T      (tied embeddings; eps 1e-5)

    OMP_NUM_THREADS=1 /root/.cache/needle/refenv/bin/python tests/reference/check_f32_numpy.py [--prompts a,b,c]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from gguf import GGUFReader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def load_weights(path: str) -> tuple[dict, dict]:
    r = GGUFReader(path)
    w = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))) for t in r.tensors}
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    return w, meta


def rmsnorm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope(x, pos, base):  # x: (T, H, D); llama.cpp mode 0 (adjacent pairs)
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def forward(w, meta, ids):
    L = int(meta["llama.block_count"])
    nh, nkv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
    base = float(meta["llama.rope.freq_base"])
    f = lambda name: w[name].astype(np.float64)  # noqa: E731
    emb = f("token_embd.weight")
    x = emb[ids]
    T, D = x.shape
    hd = D // nh
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(L):
        p = f"blk.{l}."
        h = rmsnorm(x, f(p + "attn_norm.weight"), eps)
        q = rope((h @ f(p + "attn_q.weight").T).reshape(T, nh, hd), pos, base)
        k = rope((h @ f(p + "attn_k.weight").T).reshape(T, nkv, hd), pos, base)
        v = (h @ f(p + "attn_v.weight").T).reshape(T, nkv, hd)
        att = np.empty((T, nh, hd))
        for j in range(nh):
            kv = j // (nh // nkv)
            s = q[:, j, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            att[:, j, :] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv, :]
        x = x + att.reshape(T, D) @ f(p + "attn_output.weight").T
        h = rmsnorm(x, f(p + "ffn_norm.weight"), eps)
        g = h @ f(p + "ffn_gate.weight").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ f(p + "ffn_up.weight").T)) @ f(p + "ffn_down.weight").T
    out_w = f("output.weight") if "output.weight" in w else emb
    return rmsnorm(x[-1], f("output_norm.weight"), eps) @ out_w.T


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="a,b", help="prompt name prefixes from logits_f32.json")
    args = ap.parse_args()
    fx = json.load(open(os.path.join(C.FIXTURES_DIR, "logits_f32.json")))
    assert fx["header"]["model"]["sha256"] == C.sha256(C.F32_PATH), "F32 model differs from the fixture's"
    w, meta = load_weights(C.F32_PATH)
    worst = 0.0
    for p in fx["prompts"]:
        if not any(p["name"].startswith(s + "_") for s in args.prompts.split(",")):
            continue
        logits = forward(w, meta, np.array(p["ids"]))
        m = logits.max()
        lse = float(m + np.log(np.exp(logits - m).sum()))
        last = p["positions"][-1]
        assert last["pos"] == len(p["ids"]) - 1
        ref_ids, ref = np.array(last["top_ids"]), np.array(last["top_logits"])
        top = np.argsort(-logits, kind="stable")[:len(ref_ids)]
        d = np.abs(logits[ref_ids] - ref)
        worst = max(worst, float(d.max()))
        print(f"{p['name']:18s} T={len(p['ids']):4d}: max|numpy64 - llama.cpp F32| on top-20 {d.max():.2e} "
              f"(mean {d.mean():.1e}), logsumexp diff {abs(lse - last['logsumexp']):.1e}, "
              f"same top-20 order {np.array_equal(top, ref_ids)}, top-1 {int(top[0])} vs {int(ref_ids[0])}")
    print(f"worst top-20 logit difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
