#!/usr/bin/env python3
"""Bounded load runs against `needle serve` (standard library only; loopback only).

Starts `needle serve` on a free loopback port (or uses --base), then runs what is asked:

  --load        N requests (--requests, default 64), C at a time (--concurrency, default 8),
                streaming: throughput, time to first token and latency percentiles, the
                server's peak RSS and KV bytes per tier from /metrics, the spill directory
                after shutdown.
  --prefix      two questions about one long document (--doc-tokens words of the default
                document, default 6000 ≈ 8K tokens): time to first token of each, and the
                second answer against a fresh server's (no cache) answer to it.
  --streams     throughput of 1 stream against --parallel streams at once (--stream-tokens
                each, default 64), in --rounds turns (default 3): over whole requests, and decode
                only (while every stream decodes, their prefills left out).

Every loop is bounded in count and time and stops by itself.

    python tests/bench/serve_load.py --needle target/release/needle --load --prefix --streams
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, needle, extra, spill):
        self.port = free_port()
        self.spill = spill
        args = [needle, "serve", "--port", str(self.port), "--model-id", "m", "--kv-spill-dir", spill] + extra
        self.proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        t = time.time()
        while time.time() - t < 180:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit("needle serve exited at start")
                time.sleep(0.2)
        raise SystemExit("needle serve did not start")

    def rss_mib(self):
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return float("nan")

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            out = {}
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    k, v = line.rsplit(" ", 1)
                    out[k] = float(v)
            return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)
        return os.listdir(self.spill)


def stream(port, body, timeout=600):
    """One streamed request: (time to first text, total time, completion tokens, text, usage,
    the clock time of each chunk with a choice)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {r.read()[:300]}")
    ttft, text, usage, times = None, [], None, []
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices"):
            times.append(time.perf_counter())
        for ch in chunk.get("choices", []):
            piece = ch.get("delta", {}).get("content") or ch.get("text") or ""
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(piece)
    total = time.perf_counter() - t0
    c.close()
    tokens = (usage or {}).get("completion_tokens", 0)
    return ttft if ttft is not None else total, total, tokens, "".join(text), usage, times


def decode_rate(runs):
    """Tokens per second while every stream of `runs` decodes: the chunks all of them received
    between the last first chunk and the first last chunk (prefill and stragglers left out)."""
    start, end = max(r[5][0] for r in runs), min(r[5][-1] for r in runs)
    inside = sum(sum(1 for t in r[5] if start < t <= end) for r in runs)
    return inside / (end - start) if end > start else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def document(words):
    path = os.path.join(os.path.expanduser("~/.cache/needle"), "data", "king-james-bible.txt")
    text = open(path, encoding="utf-8").read()
    return " ".join(text[text.find("In the beginning"):].split()[:words])


def run_load(a, spill):
    s = Server(a.needle, ["--parallel", str(a.parallel), "--kv-budget", a.kv_budget], spill)
    prompts = [f"Write a short note number {i} about rivers, stones and lamps:" for i in range(a.requests)]
    results, lock, peak = [], threading.Lock(), [0.0]
    idx = iter(range(a.requests))
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            m = s.metrics()
            peak[0] = max(peak[0], m.get('needle_kv_bytes{tier="host"}', 0))

    def worker():
        while True:
            with lock:
                i = next(idx, None)
            if i is None:
                return
            r = stream(s.port, {"prompt": prompts[i], "max_tokens": a.max_tokens, "temperature": 0})
            with lock:
                results.append(r)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    m = s.metrics()
    rss = s.rss_mib()
    left = s.stop()
    toks = sum(r[2] for r in results)
    ttft, lat = [r[0] for r in results], [r[1] for r in results]
    print(json.dumps({
        "load": {"requests": len(results), "concurrency": a.concurrency, "parallel": a.parallel, "wall_s": round(wall, 2),
                 "completion_tokens": toks, "throughput_tok_s": round(toks / wall, 1),
                 "requests_per_s": round(len(results) / wall, 2),
                 "ttft_s": {p: round(pct(ttft, p), 3) for p in (50, 90, 99)},
                 "latency_s": {p: round(pct(lat, p), 3) for p in (50, 90, 99)},
                 "kv_budget": a.kv_budget, "peak_kv_host_bytes_sampled": peak[0],
                 "server_peak_rss_mib": round(rss, 1),
                 "status": {k: v for k, v in m.items() if k.startswith("needle_requests_total")},
                 "spill_dir_after_shutdown": left}}, indent=1))


def run_prefix(a, spill):
    doc = document(a.doc_words)
    ask = lambda q: {"messages": [{"role": "user", "content": f"{doc}\n\n{q}"}], "max_tokens": 24, "temperature": 0}
    s = Server(a.needle, [], spill)
    first = stream(s.port, ask("Who built the ark?"))
    second = stream(s.port, ask("What did God create in the beginning?"))
    s.stop()
    fresh_s = Server(a.needle, ["--cache-bytes", "0"], spill)
    fresh = stream(fresh_s.port, ask("What did God create in the beginning?"))
    fresh_s.stop()
    print(json.dumps({"prefix": {
        "prompt_tokens": second[4]["prompt_tokens"], "cached_tokens": second[4]["prompt_tokens_details"]["cached_tokens"],
        "ttft_first_s": round(first[0], 3), "ttft_second_s": round(second[0], 3),
        "ratio": round(second[0] / first[0], 4), "ttft_fresh_s": round(fresh[0], 3),
        "second_equals_fresh": second[3] == fresh[3], "second_answer": second[3]}}, indent=1))


def run_streams(a, spill):
    s = Server(a.needle, ["--parallel", str(a.parallel)], spill)
    body = lambda i: {"prompt": f"Story {i}: Once upon a time", "max_tokens": a.stream_tokens, "temperature": 0}
    stream(s.port, body(99))  # warm up
    # One stream, then all at once, in turns (--rounds), so a slow spell of the machine falls on
    # both; each figure is the median over the rounds, each speedup one round's own.
    rounds = []
    for r in range(a.rounds):
        t = time.perf_counter()
        one = stream(s.port, body(100 * r))
        one_tps = one[2] / (time.perf_counter() - t)
        out = [None] * a.parallel
        def go(i):
            out[i] = stream(s.port, body(100 * r + i + 1))
        t = time.perf_counter()
        th = [threading.Thread(target=go, args=(i,)) for i in range(a.parallel)]
        [x.start() for x in th]
        [x.join() for x in th]
        many_tps = sum(o[2] for o in out) / (time.perf_counter() - t)
        rounds.append((one_tps, many_tps, decode_rate([one]), decode_rate(out)))
    s.stop()
    med = lambda i: round(statistics.median(x[i] for x in rounds), 1)
    ratios = lambda i: [round(x[i + 1] / x[i], 2) for x in rounds]
    n = a.parallel
    print(json.dumps({"streams": {"rounds": a.rounds, "one_stream_tok_s": med(0), f"{n}_streams_tok_s": med(1),
                                  "speedup_per_round": ratios(0),
                                  "decode_only": {"one_stream_tok_s": med(2), f"{n}_streams_tok_s": med(3),
                                                  "speedup_per_round": ratios(2)}}}, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--needle", default="target/release/needle")
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--prefix", action="store_true")
    ap.add_argument("--streams", action="store_true")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-budget", default="host=64MiB,disk=4GiB")
    ap.add_argument("--doc-words", type=int, default=6000)
    a = ap.parse_args()
    spill = tempfile.mkdtemp(prefix="needle-serve-bench-")
    if a.load:
        run_load(a, spill)
    if a.prefix:
        run_prefix(a, spill)
    if a.streams:
        run_streams(a, spill)
    os.rmdir(spill)


if __name__ == "__main__":
    main()
