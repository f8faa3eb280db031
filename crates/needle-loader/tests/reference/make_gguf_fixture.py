"""Reference values for needle-loader's GGUF tests, computed with gguf-py (pip install gguf numpy).

Writes tests/fixtures/gguf_reference.json with
  * `model`: header facts and dequantised samples of SmolLM2-135M-Instruct.Q4_1.gguf
    (file layout, plus q/k in Hugging Face layout via the inverse of convert_hf_to_gguf's permute);
  * `blocks`: random raw blocks of each supported ggml type and gguf-py's dequantisation of them.

Usage: python make_gguf_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import collections
import json
import os
import sys

import numpy as np
import gguf
from gguf.quants import dequantize
from gguf.constants import GGMLQuantizationType as T, GGML_QUANT_SIZES

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "gguf_reference.json")
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/needle/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def samples(flat, n=24, seed=0):
    rng = np.random.default_rng(seed)
    idx = sorted(set([0, 1, 2, 31, 32, 33, len(flat) - 1] + rng.integers(0, len(flat), n).tolist()))
    return [[int(i), float(flat[i])] for i in idx]


def hf_from_gguf(w, n_head):
    # convert_hf_to_gguf permute: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2); this is its inverse.
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def model_part():
    r = gguf.GGUFReader(MODEL)
    types = collections.Counter(t.tensor_type.name for t in r.tensors)
    out = {
        "file": os.path.basename(MODEL),
        "version": int(r.fields["GGUF.version"].contents()),
        "tensor_count": len(r.tensors),
        "type_counts": dict(types),
        "metadata": {k: r.fields[k].contents() for k in [
            "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
            "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]},
        "tokens": {str(i): r.fields["tokenizer.ggml.tokens"].contents(i) for i in [0, 1, 2, 17, 100, 1000, 49151]},
        "tensors": {},
    }
    n_head = out["metadata"]["llama.attention.head_count"]
    n_kv = out["metadata"]["llama.attention.head_count_kv"]
    want = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
            "blk.0.attn_norm.weight", "blk.7.ffn_down.weight", "blk.29.attn_output.weight", "output_norm.weight"]
    by_name = {t.name: t for t in r.tensors}
    for name in want:
        t = by_name[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape)]
        w = w.reshape(shape)
        entry = {"type": t.tensor_type.name, "shape": shape, "file_layout": samples(w.ravel()),
                 "sum": float(w.astype(np.float64).sum())}
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            hf = hf_from_gguf(w, n_head if "attn_q" in name else n_kv)
            entry["hf_layout"] = samples(hf.ravel(), seed=1)
        out["tensors"][name] = entry
    return out


def random_blocks(ty, n_blocks, rng):
    elems, nbytes = GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    # Put sane f16 scales where the layout has them, so values stay finite.
    def f16(a, off):
        a[:, off:off + 2] = np.frombuffer(rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16).tobytes(), np.uint8).reshape(n_blocks, 2)
    if ty in (T.Q4_0, T.Q8_0):
        f16(raw, 0)
    elif ty in (T.Q4_1, T.Q4_K):
        f16(raw, 0); f16(raw, 2)
    elif ty == T.Q6_K:
        f16(raw, 208)
    elif ty == T.F16:
        raw = np.frombuffer(rng.standard_normal(n_blocks).astype(np.float16).tobytes(), np.uint8).reshape(n_blocks, 2)
    elif ty == T.BF16:
        f = rng.standard_normal(n_blocks).astype(np.float32)
        raw = (np.frombuffer(f.tobytes(), np.uint32) >> 16).astype(np.uint16)
        raw = np.frombuffer(raw.tobytes(), np.uint8).reshape(n_blocks, 2)
    elif ty == T.F32:
        raw = np.frombuffer(rng.standard_normal(n_blocks).astype(np.float32).tobytes(), np.uint8).reshape(n_blocks, 4)
    return raw


def blocks_part():
    rng = np.random.default_rng(1234)
    out = {}
    for ty, n in [(T.F32, 64), (T.F16, 64), (T.BF16, 64), (T.Q8_0, 3), (T.Q4_0, 3), (T.Q4_1, 3), (T.Q4_K, 2), (T.Q6_K, 2)]:
        raw = random_blocks(ty, n, rng)
        vals = dequantize(raw.reshape(-1), ty).astype(np.float32).ravel()
        out[ty.name] = {"hex": raw.tobytes().hex(), "values": [float(v) for v in vals]}
    return out


if __name__ == "__main__":
    data = {"generated_by": "tests/reference/make_gguf_fixture.py with gguf-py " + getattr(gguf, "__version__", "?"),
            "model": model_part(), "blocks": blocks_part()}
    with open(OUT, "w") as f:
        json.dump(data, f, indent=1)
    print("wrote", OUT)
