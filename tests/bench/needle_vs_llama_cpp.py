#!/usr/bin/env python3
"""Prefill and decode speed of needle and llama.cpp on the same GGUF, in one run.

    /root/.cache/needle/refenv/bin/python tests/bench/needle_vs_llama_cpp.py \
        --needle target/release/needle [--model default|gemma3-270m|FILE.gguf] [--contexts 512,2048,8192] \
        [--decode 64] [--selectors full,retrieval] [--repeat 3] [--llama-once] [--needle-args "--kv f16"] \
        [--out /tmp/needle_vs_llama_cpp.json]

--model: the GGUF both sides read (default: SmolLM2-135M-Instruct Q4_1; gemma3-270m: the Q4_K_M
file in ~/.cache/needle/models, fetched by `needle generate --model gemma3-270m` if absent).
A vocabulary that asks for BOS (Gemma's) gets it on both sides before the N text tokens
(needle's `--context-tokens N` counts text tokens).
Sliding-window layers (Gemma 3): llama.cpp is run with swa_full=False, so, like needle, it keeps
only the window (plus one batch) of those layers in its KV cache; --llama-swa-full gives it
libllama's default full-size cache instead.

Both read the first N tokens of Pride and Prejudice from "It is a truth universally
acknowledged" (llama.cpp's tokenization, passed to needle as ids through a temporary text
that needle re-tokenizes identically — its tokenizer matches llama.cpp's on the fixtures).
needle runs as a subprocess (`needle generate --json`, greedy, `--max-tokens` = decode);
llama.cpp runs in-process with 2 threads (tests/reference/bench_llama_cpp.py's pass).
After one warm-up (512 tokens), every (context, selector) row runs `--repeat` times, alternating
llama.cpp and needle (`--llama-once`: llama.cpp beside the first selector only), and keeps each
side's best prefill and decode speed: on a shared machine interference only slows a run down, so
the best of a few is the least disturbed. The load average is printed. The
ratio columns are needle / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import common as C  # noqa: E402
from bench_llama_cpp import one_pass  # noqa: E402


MODELS = {"default": C.Q4_1_PATH, "gemma3-270m": os.path.join(C.MODELS_DIR, "gemma-3-270m-q4_k_m.gguf")}


def needle_run(binary: str, model: str, text_path: str, n: int, decode: int, selector: str,
               extra: list[str]) -> dict:
    cmd = [binary, "generate", "--model", model, "--prompt-file", text_path, "--context-tokens", str(n),
           "--max-tokens", str(decode), "--selector", selector, "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--needle", required=True)
    ap.add_argument("--model", default="default", help="default, gemma3-270m or a GGUF path (both sides)")
    ap.add_argument("--llama-once", action="store_true",
                    help="run llama.cpp beside the first selector only (its figures do not depend on needle's "
                         "selector; saves its long prefills)")
    ap.add_argument("--llama-swa-full", action="store_true",
                    help="llama.cpp keeps every position of sliding-window layers (libllama's default)")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--selectors", default="full,retrieval")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--needle-args", default="", help="extra arguments for every needle run, e.g. '--kv f16'")
    ap.add_argument("--out", default="/tmp/needle_vs_llama_cpp.json")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    extra = args.needle_args.split()

    model = MODELS.get(args.model, args.model)
    if not os.path.isfile(model):
        raise SystemExit(f"--model {args.model}: {model} is not a file")
    vocab, _ = C.load_llama(model, n_ctx=512, vocab_only=True)
    # [BOS] where the vocabulary adds one (needle's generate does the same), then the text.
    bos = vocab.tokenize(b"", add_bos=True, special=False)
    text_all = C.text_tokens(vocab, C.PRIDE, C.PRIDE_ANCHOR, max(contexts))
    prompt = lambda n: bos + text_all[:n]  # noqa: E731
    text = C.load_text(C.PRIDE, C.PRIDE_ANCHOR)
    del vocab
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
        text_path = f.name

    n_ctx = -(-(max(contexts) + len(bos) + args.decode + 1) // 256) * 256
    llm, _ = C.load_llama(model, n_ctx=n_ctx, n_threads=2, flash_attn=True, swa_full=args.llama_swa_full)
    # Warm-up: page in the weights (512 tokens are enough; a long one would only cost time).
    warm = min(min(contexts), 512)
    one_pass(llm, prompt(warm), 4)
    needle_run(args.needle, model, text_path, warm, 4, "full", extra)
    rows = []
    for n in contexts:
        ref = {"prefill": 0.0, "decode": 0.0}
        for si, sel in enumerate(args.selectors.split(",")):
            best = None
            for _ in range(args.repeat):
                if si == 0 or not args.llama_once:
                    tp, td = one_pass(llm, prompt(n), args.decode)
                    ref = {"prefill": max(ref["prefill"], n / tp), "decode": max(ref["decode"], args.decode / td)}
                r = needle_run(args.needle, model, text_path, n, args.decode, sel, extra)
                if best is None:
                    best = r
                best["prefill_tokens_per_second"] = max(best["prefill_tokens_per_second"], r["prefill_tokens_per_second"])
                best["decode_tokens_per_second"] = max(best["decode_tokens_per_second"], r["decode_tokens_per_second"])
            row = {"context": n, "selector": sel, "needle_prefill": best["prefill_tokens_per_second"],
                   "needle_decode": best["decode_tokens_per_second"], "llama_prefill": ref["prefill"],
                   "llama_decode": ref["decode"], "keys_touched": best["share_of_keys_touched"],
                   "keys_touched_global": best.get("share_of_keys_touched_global"),
                   "kv_cache_mib": best["kv_cache_bytes"] / 2**20,
                   "peak_rss_mib": (best["peak_rss_bytes"] or 0) / 2**20, "repeat": args.repeat,
                   "load_avg": os.getloadavg()[0], "needle_args": args.needle_args, "model": args.model,
                   "llama_swa_full": args.llama_swa_full,
                   "decode_profile": best.get("decode_profile")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.unlink(text_path)
    with open(args.out, "w") as f:
        json.dump({"versions": C.versions(), "rows": rows}, f, indent=1)
    print("\n| context | needle selector | needle prefill tok/s | llama.cpp prefill tok/s | ratio | "
          "needle decode tok/s | llama.cpp decode tok/s | ratio | keys touched (global layers) | KV MiB | peak RSS MiB | load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['selector']} | {r['needle_prefill']:.1f} | {r['llama_prefill']:.1f} | "
              f"{r['needle_prefill'] / r['llama_prefill']:.2f} | {r['needle_decode']:.1f} | {r['llama_decode']:.1f} | "
              f"{r['needle_decode'] / r['llama_decode']:.2f} | {100 * r['keys_touched']:.1f}% "
              f"({100 * (r['keys_touched_global'] or 0):.1f}%) | {r['kv_cache_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['load_avg']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
