#!/usr/bin/env python3
"""Write K-quant files of each supported family, quantized by llama.cpp, with its logits on them.

Run with the reference venv (needs llama-cpp-python, gguf, numpy, jinja2):

    /root/.cache/needle/refenv/bin/python tests/reference/make_quant_family_fixtures.py

make_family_fixtures.py's families (llama3 with Llama 3.1 RoPE scaling, qwen2, qwen3, mistral)
are 32 wide, too narrow for K-quants (256 values a block, along a row). Here each family is
built at a width where they fit, written as F32 by the same code (a temporary file), and
quantized by llama.cpp's own quantizer (`llama_model_quantize`, no imatrix) with the recipes of
real files, so each file has the tensor types llama.cpp gives a real model, fallbacks included:

  Q4_K_M   Q4_K, Q6_K where the recipe wants more bits (output, half of attn_v / ffn_down);
           rows that are not a multiple of 256 fall back to Q5_0 (Q4_K) and Q8_0 (Q6_K)
  Q5_K_M   Q5_K, Q6_K; fallbacks Q5_1 (Q5_K) and Q8_0          (llama3 only)

(IQ4_XS is not among them: needle reads IQ4_NL blocks, IQ4_XS's fallback, but not IQ4_XS.)

Shapes: 2 layers, hidden 256, 4 query heads, 2 KV heads, head_dim 64 (qwen3: 96, so its
attn_output rows are 384 wide and fall back), FFN 288 (ffn_down rows fall back in every file),
the same tiny vocabularies. Query and key weights are scaled so attention scores are a few
units, as in a trained model, rather than the F32 fixtures' sharper ones; qwen2's tied
embeddings are scaled by 0.1 so that its output head does not just repeat the input token.

Each file gets tests/fixtures/families/<family>-<type>.gguf and .json: llama.cpp's logit rows
(F32 K/V cache, no flash attention) in make_family_fixtures.py's form, and the tensor types the
quantizer chose (`tensor_types`). crates/needle-model/tests/families.rs compares them.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import make_family_fixtures as F  # noqa: E402

# The shapes of these fixtures, set on make_family_fixtures' module globals, which its writers read.
F.LAYERS, F.HIDDEN, F.HEADS, F.KV_HEADS, F.FFN = 2, 256, 4, 2, 288
HEAD_DIM = {"llama3": 64, "qwen2": 64, "qwen3": 96, "mistral": 64}
QK_SCALE = 2.0  # standard deviation of a query/key weight times sqrt(hidden)
TIED_EMBED_SCALE = 0.1
SEED = 20261206

# (family, llama_ftype name); the ftype values are llama.h's.
FILES = [("llama3", "Q4_K_M"), ("qwen2", "Q4_K_M"), ("qwen3", "Q4_K_M"), ("mistral", "Q4_K_M"),
         ("llama3", "Q5_K_M")]
FTYPES = {"Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17}


def quantize(src: str, dst: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} → {ftype}) returned {rc}")


def tensor_types(path: str) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def vocab_of(fam: dict) -> dict:
    if fam["vocab"] == "bpe":
        tokens, types, merges = F.bpe_vocab(fam["specials"])
        vocab = {"kind": "bpe", "tokens": tokens, "types": types, "merges": merges}
    else:
        tokens, scores, types = F.spm_vocab()
        vocab = {"kind": "spm", "tokens": tokens, "scores": scores, "types": types}
    vocab["n"] = len(tokens)
    vocab["bos"] = tokens.index(fam["bos"]) if fam["bos"] else None
    vocab["eos"] = tokens.index(fam["eos"])
    return vocab


def main() -> None:
    vers = C.versions()
    os.makedirs(F.OUT_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, ftype in FILES:
            fam = dict(F.FAMILIES[name], head_dim=HEAD_DIM[name])
            vocab = vocab_of(fam)
            rng = np.random.default_rng(SEED + sum(map(ord, name)))
            tensors = F.make_weights(fam, vocab["n"], rng)
            for k in tensors:
                if k.endswith(("q_proj.weight", "k_proj.weight")):
                    tensors[k] *= QK_SCALE / np.sqrt(F.HIDDEN)  # make_weights draws them with std 1
            if fam["tied"]:
                tensors["model.embed_tokens.weight"] *= TIED_EMBED_SCALE
            f32 = os.path.join(tmp, f"{name}.gguf")
            F.write_gguf(f32, fam, tensors, vocab)
            stem = f"{name}-{ftype.lower()}"
            path = os.path.join(F.OUT_DIR, f"{stem}.gguf")
            quantize(f32, path, ftype)
            types = tensor_types(path)
            prng = np.random.default_rng(SEED)
            prompts = [[int(x) for x in prng.integers(0, vocab["n"], n)] for n in (5, 37, 150)]
            runs, meta = F.run_llama_cpp(path, prompts)
            assert meta["n_vocab"] == vocab["n"]
            header = {
                "description": f"llama.cpp on tests/fixtures/families/{stem}.gguf (random weights, quantized to "
                               f"{ftype} by llama_model_quantize): full logit rows at positions 0, n/2, n-1 of each "
                               "prompt (ids, no BOS), then greedy argmax decoding: greedy_ids[i] is the argmax "
                               "after the prompt plus greedy_ids[..i]; decode_logits[i] is the row that chose "
                               "greedy_ids[i+1].",
                "generator": "tests/reference/make_quant_family_fixtures.py",
                "versions": vers,
                "model": C.model_info(path),
                "ftype": ftype,
                "shapes": {"layers": F.LAYERS, "hidden": F.HIDDEN, "heads": F.HEADS, "kv_heads": F.KV_HEADS,
                           "head_dim": HEAD_DIM[name], "ffn": F.FFN, "vocab": vocab["n"], "qk_scale": QK_SCALE,
                           "tied_embed_scale": TIED_EMBED_SCALE if fam["tied"] else None},
                "settings": {"n_ctx": F.N_CTX, "n_batch": F.N_CTX, "n_threads": 2, "kv": "f32",
                             "flash_attn": False, "logits_all": True},
                "tensor_types": types,
            }
            obj = {"header": header, "prompts": runs}
            with open(os.path.join(F.OUT_DIR, f"{stem}.json"), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
                f.write("\n")
            counts = collections.Counter(types.values())
            print(f"{stem}: {os.path.getsize(path)} bytes, types {dict(counts)}, "
                  f"greedy {[r['greedy_ids'] for r in runs]}", flush=True)


if __name__ == "__main__":
    main()
