"""Indexes and selectors on numpy arrays: against numpy, against the Rust API, errors, no
copies, the GIL released."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest

import needle
from conftest import attention_like, run_reference, write_safetensors


def exact_top_k(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def test_flat_index_equals_numpy_top_k():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1500, 48)).astype(np.float32)
    queries = rng.standard_normal((40, 48)).astype(np.float32)
    index = needle.Index.build(keys, None, "Flat")
    ids, scores = index.search(queries, 10)
    want_ids, want_scores = exact_top_k(keys, queries, 10)
    assert ids.shape == (40, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    assert len(index) == 1500 and index.dim == 48
    assert index.build_stats["vectors"] == 1500
    assert index.search_stats["full_scored"] == 40 * 1500


def test_roargraph_recall_against_numpy():
    rng = np.random.default_rng(2)
    keys = attention_like(rng, 4000, 64)
    train = attention_like(rng, 800, 64)
    queries = np.ascontiguousarray(train[:50] + 0.1 * rng.standard_normal((50, 64)).astype(np.float32))
    index = needle.Index.build(keys, train, "RoarGraph32")
    ids, scores = index.search(queries, 20)
    want, _ = exact_top_k(keys, queries, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, want)])
    assert recall >= 0.9, recall
    # The scores are the exact inner products of the ids returned.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, keys[ids]), rtol=1e-4, atol=1e-3)
    assert index.search_stats["full_scored"] < 50 * 4000  # it did not scan everything


@pytest.mark.parametrize(
    "index_spec,selector_spec",
    [
        ("RoarGraph32", "quest:k=48,sinks=8,window=32"),
        ("HNSW16", "retrieval:index=graph,k=40,sinks=4,window=16"),
        ("IVF16,PQ8", "oracle:k=30,sinks=4,window=16"),
    ],
)
def test_same_results_as_the_rust_api(tmp_path, index_spec, selector_spec):
    rng = np.random.default_rng(3)
    keys = attention_like(rng, 3000, 32)
    train = attention_like(rng, 512, 32)
    queries = attention_like(rng, 4, 32)
    write_safetensors(tmp_path / "in.safetensors", {"keys": keys, "train_queries": train, "queries": queries})
    ref = run_reference(tmp_path / "in.safetensors", tmp_path / "out.safetensors", index_spec, 10, selector_spec)

    ids, scores = needle.Index.build(keys, train, index_spec).search(queries, 10)
    np.testing.assert_array_equal(ids, ref["index_ids"])
    np.testing.assert_array_equal(scores, ref["index_scores"])

    sel = needle.Selector.from_spec(selector_spec)
    sel.build(keys, train)
    sel_ids, _ = sel.select(queries, keys)
    np.testing.assert_array_equal(sel_ids, ref["selector_ids"])


def test_oracle_selector_equals_numpy_top_k_of_the_dynamic_part():
    rng = np.random.default_rng(4)
    keys = attention_like(rng, 1000, 32)
    q = attention_like(rng, 1, 32)
    sel = needle.Selector.from_spec("oracle:k=25,sinks=8,window=64")
    assert sel.budget == 25 and sel.dynamic_range(1000) == (8, 936)
    np.testing.assert_array_equal(sel.static_ids(1000), np.r_[np.arange(8), np.arange(936, 1000)])
    sel.build(keys)
    ids, log_weights = sel.select(q, keys)
    scores = keys[8:936] @ q[0]
    want = 8 + np.argsort(-scores)[:25]
    assert set(ids.tolist()) == set(want.tolist())
    assert log_weights.size == 0


def quest_reference(keys: np.ndarray, q: np.ndarray, lo: int, hi: int, k: int, page: int = 16) -> set[int]:
    """Quest in numpy: pages aligned on absolute positions, each page's bound over its dynamic
    keys is sum_d max(q_d min_d, q_d max_d), the group's score its largest over the queries,
    the ceil(k / page) best pages."""
    bounds = []
    for p0 in range(lo // page * page, hi, page):
        a, b = max(p0, lo), min(p0 + page, hi)
        mn, mx = keys[a:b].min(axis=0), keys[a:b].max(axis=0)
        bound = np.maximum(q * mn, q * mx).sum(axis=1).max()
        bounds.append((bound, a, b))
    best = sorted(bounds, key=lambda t: -t[0])[: -(-k // page)]
    return {i for _, a, b in best for i in range(a, b)}


def test_quest_selector_equals_numpy_after_inserts():
    rng = np.random.default_rng(5)
    keys = attention_like(rng, 1200, 32)
    sel = needle.Selector.from_spec("quest:k=64,sinks=4,window=32")
    sel.build(keys[:1000])
    sel.insert(keys, 968, 1168)  # what left the window as the context grew to 1200
    q = attention_like(rng, 2, 32)
    ids, _ = sel.select(q, keys)
    lo, hi = sel.dynamic_range(1200)
    assert (lo, hi) == (4, 1168)
    assert set(ids.tolist()) == quest_reference(keys, q, lo, hi, 64)
    assert sel.memory_bytes > 0


def test_errors_are_needle_errors_with_needle_messages():
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((100, 16)).astype(np.float32)
    with pytest.raises(needle.NeedleError, match=r"annoy.*valid"):
        needle.Index.build(keys, None, "annoy")
    with pytest.raises(needle.NeedleError, match="C-contiguous"):
        needle.Index.build(np.asfortranarray(keys), None, "Flat")
    with pytest.raises(TypeError):
        needle.Index.build(keys.astype(np.float64), None, "Flat")  # never a silent conversion
    index = needle.Index.build(keys, None, "Flat")
    with pytest.raises(needle.NeedleError, match="rows of 8 floats"):
        index.search(np.zeros((2, 8), np.float32), 5)
    with pytest.raises(needle.NeedleError, match="search k"):
        index.search(keys[:2], 101)
    with pytest.raises(needle.NeedleError, match="train_queries"):
        needle.Index.build(keys, np.zeros((4, 8), np.float32), "RoarGraph32")
    with pytest.raises(needle.NeedleError, match="bogus"):
        needle.Selector.from_spec("quest:bogus=1")
    with pytest.raises(needle.NeedleError, match="nosuch"):
        needle.Selector.from_spec("nosuch")
    sel = needle.Selector.from_spec("quest:k=8")
    with pytest.raises(needle.NeedleError, match="before build"):
        sel.select(keys[:1], keys)
    bad = keys.copy()
    bad[3, 3] = np.nan
    with pytest.raises(needle.NeedleError):
        needle.Index.build(bad, None, "Flat")


def test_arrays_are_read_in_place():
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((4000, 64)).astype(np.float32)
    # The buffer needle reads is the array's own.
    assert needle._needle._view_address(keys) == keys.ctypes.data
    view = keys[1000:3000]  # a contiguous slice: still no copy
    assert needle._needle._view_address(view) == view.ctypes.data
    # No allocation proportional to the queries: numpy's allocations are traced, and a copy
    # of the 16 MB batch (ascontiguousarray, astype) would show in the peak.
    index = needle.Index.build(keys[:64], None, "Flat")
    queries = rng.standard_normal((64_000, 64)).astype(np.float32)
    tracemalloc.start()
    try:
        ids, _ = index.search(queries, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids.shape == (64_000, 1)
    assert peak < queries.nbytes / 20, (peak, queries.nbytes)


def test_searches_run_in_parallel_threads():
    """While one thread is inside a long index search, another completes selector searches all
    through it: the GIL is released during both calls (were it held by the long search, the
    second thread would stall for its whole length). The second thread's searches are a
    selector's (serial) so that they do not queue behind the first's in rayon's pool."""
    rng = np.random.default_rng(8)
    keys = rng.standard_normal((10_000, 64)).astype(np.float32)
    index = needle.Index.build(keys, None, "Flat")
    sel = needle.Selector.from_spec("quest:k=64")
    sel.build(keys)
    big = rng.standard_normal((600, 64)).astype(np.float32)
    group = rng.standard_normal((3, 64)).astype(np.float32)
    sel.select(group, keys)

    span: list[float] = []
    done: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def long_search():
        started.wait()
        time.sleep(0.05)
        t0 = time.perf_counter()
        index.search(big, 5)
        span.extend([t0, time.perf_counter()])
        stop.set()

    def selections():
        started.set()
        while not stop.is_set():
            sel.select(group, keys)
            done.append(time.perf_counter())

    threads = [threading.Thread(target=long_search), threading.Thread(target=selections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lo, hi = span
    inside = [t for t in done if lo < t < hi]
    assert len(inside) >= 10, (len(inside), hi - lo)
    # No long stall anywhere in the long search: the largest gap between the other thread's
    # completions is a small part of it.
    gaps = np.diff([lo, *inside, hi])
    assert gaps.max() < 0.25 * (hi - lo), (gaps.max(), hi - lo)


def test_a_python_thread_runs_during_a_search():
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((10_000, 64)).astype(np.float32)
    index = needle.Index.build(keys, None, "Flat")
    big = rng.standard_normal((600, 64)).astype(np.float32)
    ticks: list[float] = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    try:
        time.sleep(0.05)
        lo = time.perf_counter()
        index.search(big, 5)
        hi = time.perf_counter()
    finally:
        stop.set()
        t.join()
    gaps = np.diff([lo, *[x for x in ticks if lo < x < hi], hi])
    assert gaps.max() < 0.25 * (hi - lo), (gaps.max(), hi - lo)
