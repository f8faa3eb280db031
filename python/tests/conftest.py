"""Shared fixtures of the needle Python tests: the default model, the Rust references.

The Rust side is run as programs: the `needle` CLI (`NEEDLE_BIN`, else `cargo run -p
needle-cli`) and the `reference` example of this crate (`NEEDLE_REFERENCE_BIN`, else `cargo run
-p needle-python --example reference`), so each comparison is against the Rust API computing
on the same inputs now, not against stored numbers.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import needle

ROOT = Path(__file__).resolve().parents[2]


def _command(env: str, package: str, extra: list[str]) -> list[str]:
    if os.environ.get(env):
        return [os.environ[env]]
    return ["cargo", "run", "--quiet", "-p", package, *extra, "--"]


def run_needle_cli(*args: str) -> dict:
    """`needle ARGS --json`, parsed."""
    cmd = _command("NEEDLE_BIN", "needle-cli", []) + list(args) + ["--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout)


def run_reference(inp: Path, out: Path, index_spec: str, k: int, selector_spec: str) -> dict:
    cmd = _command("NEEDLE_REFERENCE_BIN", "needle-python", ["--example", "reference"])
    cmd += [str(inp), str(out), index_spec, str(k), selector_spec]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stderr[-3000:]}"
    return read_safetensors(out)


_DTYPES = {"F32": np.float32, "I64": np.int64}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format by hand (an 8-byte header length, a JSON header, the data)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]
        b = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        dt = np.dtype(_DTYPES[t["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data[lo:hi], dtype=dt).reshape(t["shape"]).astype(_DTYPES[t["dtype"]])
    return out


def attention_like(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Keys with a shared offset and a few strong directions, as post-RoPE keys have."""
    base = rng.standard_normal(dim).astype(np.float32) * 2.0
    dirs = rng.standard_normal((8, dim)).astype(np.float32)
    mix = rng.standard_normal((n, 8)).astype(np.float32)
    return np.ascontiguousarray(base + mix @ dirs + 0.5 * rng.standard_normal((n, dim)).astype(np.float32))


@pytest.fixture(scope="session")
def model() -> needle.Model:
    return needle.Model.load("default")
