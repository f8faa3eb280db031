#!/usr/bin/env python3
"""Benchmark llama.cpp (through llama-cpp-python) prefill and decode speed on CPU.

    /root/.cache/needle/refenv/bin/python tests/reference/bench_llama_cpp.py [OUT.json]
        [--contexts 512,2048,8192] [--decode 64] [--runs 3] [--threads 2]
        [--models q4_1,f32] [--kv f16|f32] [--flash-attn on|off]

For each model file and context length N: the prompt is the first N tokens of Pride and
Prejudice from "It is a truth universally acknowledged" (same text rule as the fixtures),
one context per model with n_ctx = max N + decode tokens (rounded up to 256). One warm-up
pass per model (shortest prompt, prefill + decode), then `--runs` timed passes per N (fewer
at long contexts, see RUNS_CAP); each pass clears the KV cache,
prefills the N-token prompt in 512-token batches (timed: prefill tok/s = N / seconds), then
decodes greedily one token at a time (timed: decode tok/s = decode tokens / seconds;
includes llama-cpp-python's per-call Python overhead and the argmax). Medians and bests are
reported, with the 1-minute load average: on a shared machine other processes slow both,
and decode (many small thread-synchronised ops per token) suffers most.

Defaults follow llama.cpp's own defaults on CPU: F16 K/V cache and flash attention on
(llama.cpp's "auto" resolves to on for CPU). Decode at 8K context is dominated by attention
over the cache, not by the weights.

Prints a markdown table and writes JSON (default /tmp/llama_cpp_bench.json).
Versions: llama-cpp-python 0.3.36 (llama.cpp 0c1e5709), 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

RUNS_CAP = {8192: 2}  # timed runs at long contexts (an 8K prefill takes a minute or more on 2 cores)
MODELS = {"q4_1": C.Q4_1_PATH, "f32": C.F32_PATH}


def one_pass(llm, prompt: list[int], n_decode: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(C.last_logits(llm)))
    t1 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(C.last_logits(llm)))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="/tmp/llama_cpp_bench.json")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="q4_1,f32")
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on")
    args = ap.parse_args()

    contexts = [int(x) for x in args.contexts.split(",")]
    vers = C.versions()
    vocab, _ = C.load_llama(C.Q4_1_PATH, n_ctx=512, vocab_only=True)
    prompt_all = C.text_tokens(vocab, C.PRIDE, C.PRIDE_ANCHOR, max(contexts))
    del vocab

    rows = []
    for mname in args.models.split(","):
        path = MODELS[mname]
        # One context sized for the longest prompt; llama.cpp only attends over the used cells.
        n_ctx = -(-(max(contexts) + args.decode + 1) // 256) * 256
        llm, _ = C.load_llama(path, n_ctx=n_ctx, n_threads=args.threads, kv_f32=args.kv == "f32",
                              flash_attn=args.flash_attn == "on")
        one_pass(llm, prompt_all[:min(contexts)], args.decode)  # warm-up (page in weights, allocate)
        for n in contexts:
            prompt = prompt_all[:n]
            runs = min(args.runs, RUNS_CAP.get(n, args.runs))
            pre, dec = [], []
            for _ in range(runs):
                tp, td = one_pass(llm, prompt, args.decode)
                pre.append(n / tp)
                dec.append(args.decode / td)
            row = {"model": mname, "file": os.path.basename(path), "context": n, "n_ctx": n_ctx,
                   "decode_tokens": args.decode, "runs": runs,
                   "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
                   "prefill_tok_s_best": max(pre), "decode_tok_s_best": max(dec),
                   "load_avg_1min_after": round(os.getloadavg()[0], 2),
                   "prefill_tok_s_all": [round(x, 2) for x in pre], "decode_tok_s_all": [round(x, 2) for x in dec]}
            rows.append(row)
            print(f"{mname:5s} ctx {n:5d}: prefill {row['prefill_tok_s']:8.1f} tok/s {row['prefill_tok_s_all']}, "
                  f"decode {row['decode_tok_s']:6.1f} tok/s {row['decode_tok_s_all']}", flush=True)
        del llm

    settings = {"threads": args.threads, "n_batch": 512, "n_ubatch": 512, "kv_cache": args.kv,
                "flash_attn": args.flash_attn, "decode_tokens": args.decode, "warmup": "one pass per model at the shortest context", "runs_cap": RUNS_CAP,
                "prompt": f"first N tokens of {C.PRIDE} from {C.PRIDE_ANCHOR!r}", "statistic": "median"}
    out = {"header": {"generator": "tests/reference/bench_llama_cpp.py", "versions": vers,
                      "machine": {"cpu": _cpu_name(), "os_cpu_count": os.cpu_count(),
                                  "load_avg_at_end": os.getloadavg(), "python": platform.python_version()},
                      "models": {m: C.model_info(MODELS[m]) for m in args.models.split(",")},
                      "settings": settings},
           "results": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")

    print(f"\nllama.cpp {C.LLAMA_CPP_COMMIT[:8]} via llama-cpp-python {vers['llama_cpp_python']}, "
          f"{args.threads} threads, KV {args.kv}, flash-attn {args.flash_attn}, decode {args.decode} tokens\n")
    print("| model | context | prefill tok/s (median / best) | decode tok/s (median / best) | runs | load avg |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model'].upper()} | {r['context']} | {r['prefill_tok_s']:.1f} / {r['prefill_tok_s_best']:.1f} "
              f"| {r['decode_tok_s']:.1f} / {r['decode_tok_s_best']:.1f} | {r['runs']} | {r['load_avg_1min_after']:.1f} |")
    print(f"\nwrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
