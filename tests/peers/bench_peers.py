#!/usr/bin/env python3
"""Peer indexes on a `needle trace` file: faiss HNSW, faiss IVF-PQ and hnswlib.

Same protocol as `needle bench index`: per traced layer and KV head, the head's keys are the
database, the GQA group's decode queries are the test set, exact top-k (numpy) is the ground
truth, and each index is built once and searched at each effort of the sweep with one
thread (so latency is per query). Writes {"rows": [...]} with the field names of needle's
JSON, so `needle bench index --peers` merges the rows into one table.

"% scanned" (scanned_frac) is full-precision inner products per query over the keys:
  faiss HNSW        faiss.cvar.hnsw_stats.ndis (exact count)
  faiss IVF-PQ      0 full-precision; codes_frac = faiss.cvar.indexIVF_stats.ndis
                    (= codes in the nprobe lists visited)
  faiss IVF-PQ+RFlat  the same codes plus k_factor * k exact re-scores (as needle's rerank=8)
  hnswlib           no distance counter is exposed in Python; the proxy is
                    latency / brute-force latency on the same keys (hnswlib.BFIndex, same
                    thread), i.e. the share of a full scan's time. It counts heap and
                    bookkeeping too, so it overstates the distances hnswlib computes.
"""
import argparse
import json
import sys
import time

import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open


def group_queries(q, kv_head, group):
    """[pos, n_q_heads, d] -> [(pos*group), d] for the query heads of one KV head."""
    return np.ascontiguousarray(q[:, kv_head * group:(kv_head + 1) * group, :].reshape(-1, q.shape[2]))


def exact_topk(keys, queries, k):
    s = queries @ keys.T
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return idx


def recalls(found, truth):
    out = []
    for f, t in zip(found, truth):
        t = set(int(x) for x in t)
        out.append(len(t.intersection(int(x) for x in f if x >= 0)) / len(t))
    return np.array(out)


def row(engine, index, layer, head, effort, rec, scanned, codes, lat_us, build_s, bpk, n_keys, nq, note=None):
    r = dict(engine=engine, index=index, layer=layer, kv_head=head, effort=effort,
             recall=float(rec.mean()), min_query_recall=float(rec.min()),
             scanned_frac=float(scanned), codes_frac=float(codes), latency_us=float(lat_us),
             build_s=float(build_s), bytes_per_key=float(bpk), n_keys=int(n_keys), n_queries=int(nq))
    if note:
        r["scanned_note"] = note
    return r


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def bench_head(keys, test, k, layer, head, args, faiss, hnswlib):
    truth = exact_topk(keys, test, k)
    rows = []
    threads = faiss.omp_get_max_threads()
    if "faiss-hnsw" in args.engines:
        rows += bench_faiss_hnsw(keys, test, truth, k, layer, head, args, faiss, threads)
    if "faiss-ivfpq" in args.engines:
        rows += bench_faiss_ivfpq(keys, test, truth, k, layer, head, args, faiss, threads)
    if "hnswlib" in args.engines:
        rows += bench_hnswlib(keys, test, truth, k, layer, head, args, hnswlib, threads)
    return rows


def bench_faiss_hnsw(keys, test, truth, k, layer, head, args, faiss, threads):
    """faiss HNSW, inner product; efConstruction as needle's HNSW (200)."""
    n, d = keys.shape
    nq = test.shape[0]
    rows = []
    faiss.omp_set_num_threads(threads)
    idx = faiss.IndexHNSWFlat(d, args.m, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efConstruction = 200
    _, build = timed(lambda: idx.add(keys))
    bpk = (n * d * 4 + idx.hnsw.neighbors.size() * 4 + idx.hnsw.offsets.size() * 8) / n
    faiss.omp_set_num_threads(1)
    for ef in args.graph_efforts:
        faiss.cvar.hnsw_stats.reset()
        p = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        (_, labels), secs = timed(lambda: idx.search(test, k, params=p))
        ndis = faiss.cvar.hnsw_stats.ndis
        rows.append(row("faiss", f"HNSW{args.m}", layer, head, ef, recalls(labels, truth), ndis / (nq * n), 0.0,
                        1e6 * secs / nq, build, bpk, n, nq))

    return rows


def bench_faiss_ivfpq(keys, test, truth, k, layer, head, args, faiss, threads):
    """faiss IVF-PQ, inner product, plain and with exact re-scoring of k_factor * k candidates."""
    n, d = keys.shape
    nq = test.shape[0]
    rows = []
    nlist = args.nlist  # as needle's IVF256 (faiss warns below 39 keys per list)
    faiss.omp_set_num_threads(threads)
    quant = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQ(quant, d, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    refined = faiss.IndexRefineFlat(ivf)
    refined.k_factor = args.k_factor

    def build_ivf():
        ivf.train(keys)
        refined.is_trained = True  # built before the base was trained
        refined.add(keys)  # adds to the IVF lists and to the flat copy used for re-scoring

    _, build = timed(build_ivf)
    codes_bpk = args.pq_m + 8 + (nlist * d * 4 + 256 * d * 4) / n  # codes + ids + centroids + PQ tables
    faiss.omp_set_num_threads(1)
    name = f"IVF{nlist},PQ{args.pq_m}"
    for nprobe in args.ivf_nprobes:
        if nprobe > nlist:
            continue
        faiss.cvar.indexIVF_stats.reset()
        p = faiss.SearchParametersIVF(nprobe=nprobe)
        (_, labels), secs = timed(lambda: ivf.search(test, k, params=p))
        ndis = faiss.cvar.indexIVF_stats.ndis
        rows.append(row("faiss", name, layer, head, nprobe, recalls(labels, truth), 0.0, ndis / (nq * n),
                        1e6 * secs / nq, build, codes_bpk, n, nq))
        faiss.cvar.indexIVF_stats.reset()
        rp = faiss.IndexRefineSearchParameters(k_factor=args.k_factor, base_index_params=p)
        (_, labels), secs = timed(lambda: refined.search(test, k, params=rp))
        ndis = faiss.cvar.indexIVF_stats.ndis
        rows.append(row("faiss", name + ",RFlat", layer, head, nprobe, recalls(labels, truth),
                        min(1.0, args.k_factor * k / n), ndis / (nq * n), 1e6 * secs / nq, build,
                        codes_bpk + d * 4, n, nq))

    return rows


def bench_hnswlib(keys, test, truth, k, layer, head, args, hnswlib, threads):
    """hnswlib, inner product."""
    n, d = keys.shape
    nq = test.shape[0]
    rows = []
    h = hnswlib.Index(space="ip", dim=d)
    h.init_index(max_elements=n, ef_construction=200, M=args.m, random_seed=100)
    h.set_num_threads(threads)
    _, build = timed(lambda: h.add_items(keys, np.arange(n)))
    h.set_num_threads(1)
    bf = hnswlib.BFIndex(space="ip", dim=d)
    bf.init_index(max_elements=n)
    bf.add_items(keys, np.arange(n))
    _, bf_secs = timed(lambda: bf.knn_query(test, k=k))
    bpk = (n * d * 4 + n * (2 * args.m + 1) * 4 + n * 8) / n  # vectors + level-0 links + labels (upper levels omitted)
    for ef in args.graph_efforts:
        h.set_ef(max(ef, k))
        (labels, _), secs = timed(lambda: h.knn_query(test, k=k))
        rows.append(row("hnswlib", f"HNSW{args.m}", layer, head, ef, recalls(labels, truth),
                        min(1.0, secs / bf_secs), 0.0, 1e6 * secs / nq, build, bpk, n, nq,
                        note="timing proxy: latency / hnswlib.BFIndex latency"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--layers", default="")
    ap.add_argument("--graph-efforts", default="100,128,160,200,256,320,400,512,768,1024")
    ap.add_argument("--ivf-nprobes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--m", type=int, default=32, help="graph degree (HNSW32)")
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--k-factor", type=int, default=8, help="exact re-scores per result for RFlat (needle: rerank=8)")
    ap.add_argument("--engines", default="faiss-hnsw,faiss-ivfpq,hnswlib",
                    help="comma-separated subset of faiss-hnsw, faiss-ivfpq, hnswlib")
    ap.add_argument("--json")
    args = ap.parse_args()
    engines = {"faiss-hnsw", "faiss-ivfpq", "hnswlib"}
    args.engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    if not args.engines or not args.engines <= engines:
        sys.exit(f"bench_peers.py: --engines {sorted(args.engines)}: choose from {sorted(engines)}")
    args.graph_efforts = sorted({int(x) for x in args.graph_efforts.split(",") if x})
    args.ivf_nprobes = sorted({int(x) for x in args.ivf_nprobes.split(",") if x})
    try:
        import faiss
        import hnswlib
    except ImportError as e:
        sys.exit(f"bench_peers.py: {e}; see tests/peers/README.md for the venv")

    try:
        with safe_open(args.trace, framework="numpy") as f:
            meta = f.metadata() or {}
        t = load_file(args.trace)
    except Exception as e:  # noqa: BLE001 - report the file whatever went wrong
        sys.exit(f"bench_peers.py: cannot read trace {args.trace}: {e}")
    nq_heads, nkv = int(meta["n_q_heads"]), int(meta["n_kv_heads"])
    group = nq_heads // nkv
    traced = [int(x) for x in meta["layers"].split(",")]
    layers = [int(x) for x in args.layers.split(",") if x] or traced
    for L in layers:
        if L not in traced:
            sys.exit(f"bench_peers.py: layer {L} is not in {args.trace} (traced layers: {meta['layers']})")
    rows = []
    t0 = time.perf_counter()
    for L in layers:
        keys_all = t[f"layer.{L}.keys"].astype(np.float32)
        dec = t[f"layer.{L}.decode_queries"].astype(np.float32)
        if args.k > keys_all.shape[1]:
            sys.exit(f"bench_peers.py: --k {args.k} is larger than the {keys_all.shape[1]} keys per head in {args.trace}")
        for h in range(nkv):
            keys = np.ascontiguousarray(keys_all[h])
            test = group_queries(dec, h, group)
            rows += bench_head(keys, test, args.k, L, h, args, faiss, hnswlib)
            print(f"[peers] layer {L} head {h} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    # Summary over heads, as needle prints it.
    groups = {}
    for r in rows:
        groups.setdefault((r["engine"], r["index"], r["effort"]), []).append(r)
    print(f"{'index':<24} {'effort':>6} {'recall@' + str(args.k):>9} {'min head':>9} {'% keys':>9} {'% codes':>9} {'lat µs/q':>10} {'build s':>9} {'B/key':>8}")
    for (e, i, eff), g in sorted(groups.items()):
        m = lambda f: sum(x[f] for x in g) / len(g)  # noqa: E731
        print(f"{e + '/' + i:<24} {eff:>6} {m('recall'):>9.4f} {min(x['recall'] for x in g):>9.4f} "
              f"{100 * m('scanned_frac'):>9.3f} {100 * m('codes_frac'):>9.3f} {m('latency_us'):>10.1f} "
              f"{m('build_s'):>9.3f} {m('bytes_per_key'):>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trace": args.trace, "k": args.k, "layers": layers, "faiss": faiss.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
