"""Type stubs of the Rust extension `needle._needle` (re-exported by `needle`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class NeedleError(Exception):
    """An error from needle: a bad argument, file, spec or model, with needle's message."""

F32Array = npt.NDArray[np.float32]
"""A C-contiguous float32 array of shape (n, dim), read in place (never copied)."""

class Index:
    """A maximum-inner-product vector index over float32 rows (RoarGraph, HNSW, IVF-PQ, LSH, flat)."""

    @staticmethod
    def build(keys: F32Array, train_queries: Optional[F32Array] = None, spec: str = "RoarGraph32") -> Index:
        """Builds the index `spec` names over `keys` (n × dim), trained on `train_queries` (m × dim)."""
    def search(
        self, queries: F32Array, k: int, effort: Optional[int] = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """`(ids, scores)` of shape (len(queries), k), best first; -1 / -inf pad short rows."""
    def insert(self, keys: F32Array) -> tuple[int, int]:
        """Adds rows after the build; returns their ids as (start, end)."""
    @property
    def dim(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def build_stats(self) -> dict[str, Any]:
        """{"vectors", "train_queries", "seconds", "bytes"}."""
    @property
    def search_stats(self) -> dict[str, Any]:
        """What the last search touched: {"full_scored", "codes_scored", "bytes_read"}."""
    def __len__(self) -> int: ...

class Selector:
    """An attention selector for one KV head (sinks + window static, a budget of dynamic ids)."""

    @staticmethod
    def from_spec(spec: str) -> Selector:
        """A selector from its spec, e.g. "quest:k=256", "retrieval:index=graph,k=100"."""
    def build(
        self,
        keys: F32Array,
        train_queries: Optional[F32Array] = None,
        scale: Optional[float] = None,
        layer: int = 0,
        kv_head: int = 0,
    ) -> dict[str, Any]:
        """Builds over the head's keys (n × dim) with a sample of prefill queries; returns build stats."""
    def insert(self, keys: F32Array, start: int, end: int) -> None:
        """Rows start..end of `keys` (all keys so far) have left the window."""
    def select(
        self, queries: F32Array, keys: F32Array
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """`(ids, log_weights)`: dynamic-part positions for the query group (g × dim) over `keys`."""
    def static_ids(self, n: int) -> npt.NDArray[np.int64]:
        """Positions attended densely when the context holds n tokens."""
    def dynamic_range(self, n: int) -> tuple[int, int]:
        """(start, end) of the dynamic part when the context holds n tokens."""
    @property
    def spec(self) -> str: ...
    @property
    def budget(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...

class Generation(Iterator[str]):
    """A generation in progress: iterate it for text pieces; `result()` waits for the report."""

    def __iter__(self) -> Generation: ...
    def __next__(self) -> str: ...
    def result(self) -> dict[str, Any]:
        """text, token_ids, stop_reason, timings, tokens/s, share_of_keys_touched, stats, memory."""
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...

class Model:
    """A Llama-family model on the CPU: "default" (SmolLM2-135M-Instruct), a .gguf file or an HF folder."""

    @staticmethod
    def load(model: str = "default", device: str = "cpu", weights: str = "native") -> Model: ...
    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        selector: str = "auto",
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
        system: Optional[str] = None,
        chunk: int = 512,
        kv: Optional[str] = None,
        kv_budget: Optional[str] = None,
        prefill: str = "dense",
    ) -> Generation:
        """Generates from `prompt`; greedy unless temperature > 0."""
    def prefill(
        self,
        document: str,
        selector: str = "auto",
        chat: bool = False,
        system: Optional[str] = None,
        context_tokens: Optional[int] = None,
        chunk: int = 512,
        kv: Optional[str] = None,
        kv_budget: Optional[str] = None,
        prefill: str = "dense",
    ) -> Context:
        """Prefills `document` once and builds its selectors."""
    def encode(self, text: str, add_special: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    @property
    def digest(self) -> str: ...

class Context:
    """A prefilled context in a context file (the format of `needle prefill --save`)."""

    @staticmethod
    def load(path: str | os.PathLike[str], model: Model) -> Context: ...
    def ask(
        self,
        question: Optional[str] = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chunk: int = 512,
    ) -> Generation:
        """Asks `question` of the context; each question starts from the saved state."""
    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Writes the context file atomically; an existing file only with overwrite=True."""
    @property
    def path(self) -> Path: ...
    @property
    def tokens(self) -> int: ...
    @property
    def selector(self) -> str: ...
    @property
    def info(self) -> dict[str, Any]: ...
    @property
    def stats(self) -> Optional[dict[str, Any]]: ...

def default_document() -> str:
    """The default document's text (the King James Bible, fetched into ~/.cache/needle)."""

def index_names() -> list[tuple[str, str]]: ...
def selector_names() -> list[tuple[str, str]]: ...
def _view_address(array: F32Array) -> int:
    """The buffer address needle reads for `array` (== array.ctypes.data when read in place)."""
