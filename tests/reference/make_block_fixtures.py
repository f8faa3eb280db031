#!/usr/bin/env python3
"""Write crates/needle-quant/tests/fixtures/blocks_{q5_0,q5_1,iq4_nl}.json from the `gguf` package.

    python3 tests/reference/make_block_fixtures.py      # needs: pip install gguf numpy

An implementation independent of needle (gguf-py's numpy `gguf.quants`) quantizes seeded random
floats (Q5_0, Q5_1) and dequantizes the bytes; gguf-py has no IQ4_NL quantizer, so IQ4_NL blocks
are seeded random nibbles under a random finite f16 scale. Each file holds:

  header   versions and settings
  input    the f32 inputs as u32 bit patterns (Q5_0 / Q5_1 only; null for IQ4_NL)
  bytes    the quantized blocks, hex
  output   gguf's dequantized floats as u32 bit patterns (exact comparison)

Rows: 8 blocks per type at four scales (1e-3, 0.05, 1, 30), one block all zero and one block
with a single nonzero element, so the edge cases of the quantizers are covered.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parents[2] / "crates" / "needle-quant" / "tests" / "fixtures"
SEED = 23
BLOCKS = 8


def inputs(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((BLOCKS, 32)).astype(np.float32)
    x *= np.array([1e-3, 0.05, 1.0, 30.0, 1.0, 0.05, 1.0, 1.0], dtype=np.float32)[:, None]
    x[4] = 0.0
    x[5] = 0.0
    x[5, 7] = -0.75
    return x.reshape(-1)


def bits(a: np.ndarray) -> list[int]:
    return [int(v) for v in np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for name, qt in [("q5_0", T.Q5_0), ("q5_1", T.Q5_1), ("iq4_nl", T.IQ4_NL)]:
        if qt == T.IQ4_NL:
            x = None
            b = rng.integers(0, 256, size=(BLOCKS, 18), dtype=np.uint8)
            d = (rng.standard_normal(BLOCKS) * 0.01).astype(np.float16)
            d[4] = 0.0
            b[:, 0:2] = d.view(np.uint8).reshape(BLOCKS, 2)
            q = b.reshape(-1)
        else:
            x = inputs(rng)
            q = quantize(x, qt)
        y = dequantize(q, qt)
        doc = {
            "header": {
                "type": name.upper(),
                "made_by": "tests/reference/make_block_fixtures.py",
                "gguf": version("gguf"),
                "numpy": np.__version__,
                "seed": SEED,
                "blocks": BLOCKS,
            },
            "input": None if x is None else bits(x),
            "bytes": bytes(q.astype(np.uint8)).hex(),
            "output": bits(y.reshape(-1)),
        }
        (OUT / f"blocks_{name}.json").write_text(json.dumps(doc) + "\n")


if __name__ == "__main__":
    main()
