#!/usr/bin/env python3
"""Write an all-F32 copy of a GGUF model (the tight llama.cpp reference for needle).

llama.cpp multiplies Q4_1/Q8_0 weights against activations that it first quantises
to 8 bits (Q8_1/Q8_0), so its logits on the quantised file differ from an exact f32
forward pass over the dequantised weights, which is what needle computes. Running
llama.cpp on a file whose tensors are already dequantised to F32 removes that
difference: F32 x F32 matmuls in ggml use f32 activations.

Every tensor is dequantised with `gguf.quants.dequantize` (the numpy port of ggml's
dequantisers: Q4_1 -> d*q + m, Q8_0 -> d*q, with d, m the block's f16 scales) and
written as F32 in the same order under the same name and shape. Every metadata
key/value is copied byte-for-byte (tokenizer included) except `general.file_type`,
which is set to 0 (ALL_F32) so that llama.cpp does not report the file as Q4_1;
pass --keep-file-type to copy that key unchanged as well.

Usage (from the repo root, with the reference venv; see tests/reference/README.md):

    /root/.cache/needle/refenv/bin/python tests/reference/dequantize_gguf.py \
        [--src /root/.cache/needle/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--dst /root/.cache/needle/models/SmolLM2-135M-Instruct.F32.gguf]

The script re-reads the written file and checks metadata and tensor values before
exiting. Written with gguf 0.19.0 / numpy 2.x.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

MODELS = "/root/.cache/needle/models"
DEFAULT_SRC = os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_DST = os.path.join(MODELS, "SmolLM2-135M-Instruct.F32.gguf")

# Keys the reader synthesises from the file header; the writer writes them itself.
HEADER_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
FILE_TYPE_KEY = "general.file_type"
ALL_F32 = 0  # llama_ftype LLAMA_FTYPE_ALL_F32


def field_value(field):
    """(value, vtype, sub_type) of a reader field, strings kept as raw bytes."""
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise NotImplementedError(f"nested array in {field.name}")
        if sub == GGUFValueType.STRING:
            val = [bytes(field.parts[i]) for i in field.data]
        else:
            val = [field.parts[i].tolist()[0] for i in field.data]
        return val, vtype, sub
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    return field.parts[field.data[0]].tolist()[0], vtype, None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dequantize_tensor(t) -> np.ndarray:
    arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    # GGUF lists dims innermost-first (ne0, ne1, ...); numpy shape is the reverse.
    want = tuple(int(d) for d in reversed(t.shape.tolist()))
    if arr.shape != want:
        arr = arr.reshape(want)
    return np.ascontiguousarray(arr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=DEFAULT_SRC)
    ap.add_argument("--dst", default=DEFAULT_DST)
    ap.add_argument("--keep-file-type", action="store_true", help="copy general.file_type unchanged")
    args = ap.parse_args()

    src = GGUFReader(args.src)
    arch = field_value(src.fields["general.architecture"])[0].decode()
    tmp = args.dst + ".tmp"
    w = GGUFWriter(tmp, arch)  # writes general.architecture itself, first, as in the source

    for name, field in src.fields.items():
        if name in HEADER_KEYS or name == "general.architecture":
            continue
        val, vtype, sub = field_value(field)
        if name == FILE_TYPE_KEY and not args.keep_file_type:
            val = ALL_F32
        w.add_key_value(name, val, vtype, sub_type=sub)
    if "general.alignment" in src.fields:
        w.data_alignment = int(field_value(src.fields["general.alignment"])[0])

    counts: dict[str, int] = {}
    for t in src.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        w.add_tensor(t.name, dequantize_tensor(t), raw_dtype=GGMLQuantizationType.F32)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, args.dst)

    # ---- verify -------------------------------------------------------------
    dst = GGUFReader(args.dst)
    src_keys = [k for k in src.fields if k not in HEADER_KEYS]
    dst_keys = [k for k in dst.fields if k not in HEADER_KEYS]
    assert src_keys == dst_keys, (src_keys, dst_keys)
    for k in src_keys:
        a, b = field_value(src.fields[k]), field_value(dst.fields[k])
        if k == FILE_TYPE_KEY and not args.keep_file_type:
            assert b[0] == ALL_F32
            continue
        assert a == b, f"metadata mismatch for {k}"
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    for a, b in zip(src.tensors, dst.tensors):
        assert b.tensor_type == GGMLQuantizationType.F32, b.name
        assert a.shape.tolist() == b.shape.tolist(), (a.name, a.shape, b.shape)
        ref = dequantize_tensor(a)
        got = np.asarray(b.data, dtype=np.float32).reshape(ref.shape)
        assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), a.name

    print(f"source      {args.src}")
    print(f"  sha256    {sha256(args.src)}")
    print(f"  tensors   {len(src.tensors)} {counts}")
    print(f"written     {args.dst} ({os.path.getsize(args.dst) / 2**20:.1f} MiB)")
    print(f"  sha256    {sha256(args.dst)}")
    print(f"  verified  {len(src_keys)} metadata keys, {len(dst.tensors)} tensors, all F32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
