"""Shared helpers for the llama.cpp reference scripts (see README.md in this folder)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from importlib import metadata as _md

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA_DIR = os.path.abspath(os.path.join(REPO_ROOT, "..", "shared", "data"))
FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
MODELS_DIR = "/root/.cache/needle/models"
Q4_1_PATH = os.path.join(MODELS_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
F32_PATH = os.path.join(MODELS_DIR, "SmolLM2-135M-Instruct.F32.gguf")

# llama-cpp-python does not expose the llama.cpp commit it vendors; this is the
# commit of vendor/llama.cpp in the llama-cpp-python 0.3.36 sdist from PyPI.
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

PRIDE = "pride-and-prejudice.txt"
PRIDE_ANCHOR = "It is a truth universally acknowledged"
SHERLOCK = "sherlock-holmes.txt"
SHERLOCK_ANCHOR = "To Sherlock Holmes she is always THE woman"
TEXT_RULE = (
    "read ../shared/data/<file> as UTF-8, drop a leading BOM, delete every '\\r' "
    "(the files use CRLF and CR CR LF line ends), start at the first occurrence of the anchor, "
    "tokenise with add_bos=False, special=False and keep the first n_tokens ids"
)

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import llama_cpp

    out = {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "gguf": _md.version("gguf"),
        "numpy": _md.version("numpy"),
    }
    assert out["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION, (
        f"expected llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}; update LLAMA_CPP_COMMIT too"
    )
    return out


def model_info(path: str) -> dict:
    return {"file": os.path.basename(path), "sha256": sha256(path), "bytes": os.path.getsize(path)}


def load_text(name: str, anchor: str) -> str:
    with open(os.path.join(DATA_DIR, name), "rb") as f:
        text = f.read().decode("utf-8")
    text = text.lstrip("\ufeff").replace("\r", "")
    i = text.find(anchor)
    if i < 0:
        raise ValueError(f"anchor {anchor!r} not in {name}")
    return text[i:]


def text_tokens(llm, name: str, anchor: str, n_tokens: int) -> list[int]:
    """First n_tokens ids of the text from `anchor` on (see TEXT_RULE)."""
    text = load_text(name, anchor)
    # ~4 chars/token for this tokenizer on English prose; take a generous prefix.
    n_chars = n_tokens * 8
    while True:
        ids = llm.tokenize(text[:n_chars].encode("utf-8"), add_bos=False, special=False)
        if len(ids) > n_tokens + 8 or n_chars >= len(text):
            break
        n_chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"{name} has fewer than {n_tokens} tokens after the anchor")
    return ids[:n_tokens]


def load_llama(path: str, *, n_ctx: int, logits_all: bool = False, n_threads: int = 2,
               kv_f32: bool = False, flash_attn: bool = False, vocab_only: bool = False,
               n_batch: int = 512, seed: int = 1234, capture_log: bool = False,
               swa_full: bool | None = None):
    """Load a model; returns (llm, log) where log is llama.cpp's load log if captured.

    swa_full: for models with sliding-window layers (Gemma 3), whether llama.cpp keeps every
    position in those layers' KV cache (libllama's default, True) or only the window (plus one
    batch), as needle does; None leaves libllama's default."""
    from llama_cpp import Llama

    kw = dict(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
              n_threads_batch=n_threads, logits_all=logits_all, seed=seed, n_gpu_layers=0,
              flash_attn=flash_attn, vocab_only=vocab_only, verbose=capture_log)
    if kv_f32:
        kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    if swa_full is not None:
        kw.update(swa_full=swa_full)
    if not capture_log:
        return Llama(**kw), ""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        llm = Llama(**kw)
    return llm, buf.getvalue()


def last_logits(llm):
    """Logits of the last evaluated token (works with logits_all False or True)."""
    import numpy as np
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()
