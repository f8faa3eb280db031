#!/usr/bin/env python3
"""Gemma 3 270M at long context: llama.cpp's logits against needle's on the same passkey prompt.

    /root/.cache/needle/refenv/bin/python tests/reference/gemma_long_compare.py \
        --tokens 16384 --depth 0.25 --at 1024,4096,8192,-1 --out /tmp/gemma-long \
        [--needle target/release/needle]

Builds a passkey prompt of needle-tasks' form (its header, the Landmark filler cycled, the
needle "The pass key is 97682. ..." at the given depth, the question), as text, so both sides
tokenize it themselves (needle's ids are checked equal to llama.cpp's). llama.cpp
(llama-cpp-python 0.3.36, CPU, 2 threads, F32 K/V cache, flash attention off, n_batch 512)
evaluates the ids in segments ending at each --at position and keeps that position's logits;
needle runs `needle logits --weights f32 --at …` on the same text in one prefill. Prints, per
position, max |Δlogit| over llama.cpp's top-20, both top-1s and the greedy answers, and writes
everything to OUT/compare-N.json. Weights: the F32 GGUF (gemma-3-270m.F32.gguf, written by
tests/reference/dequantize_gguf.py), so only arithmetic differs. Not a fixture writer: for
reading by hand (docs/benchmarks.md §23).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

F32_PATH = os.path.join(C.MODELS_DIR, "gemma-3-270m.F32.gguf")
HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
          "them. I will quiz you about the important information there.")
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
QUESTION = "What is the pass key? The pass key is"


def prompt_text(units: int, depth: float, key: str) -> str:
    texts = [FILLER[i % len(FILLER)] for i in range(units)]
    texts.insert(round(depth * units), f"The pass key is {key}. Remember it. {key} is the pass key.")
    return f"{HEADER}\n\n{' '.join(texts)}\n\n{QUESTION}"


def build(llm, tokens: int, depth: float, key: str) -> tuple[str, list[int]]:
    """The longest prompt of whole filler units with at most `tokens` ids (BOS included)."""
    bos = llm.token_bos()
    ids_of = lambda s: [bos] + llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)  # noqa: E731
    lo, hi = 1, tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(ids_of(prompt_text(mid, depth, key))) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    text = prompt_text(lo, depth, key)
    return text, ids_of(text)


def top(row: np.ndarray, k: int = 20) -> list[tuple[int, float]]:
    idx = np.argsort(-row)[:k]
    return [(int(i), float(row[i])) for i in idx]


def greedy(llm, n: int) -> tuple[list[int], list[float]]:
    """n argmax tokens and each step's top-1 minus top-2 logit."""
    out, margins = [], []
    for _ in range(n):
        row = C.last_logits(llm)
        top2 = np.argsort(-row, kind="stable")[:2]
        out.append(int(top2[0]))
        margins.append(round(float(row[top2[0]] - row[top2[1]]), 5))
        llm.eval([int(top2[0])])
    return out, margins


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--depth", type=float, default=0.25)
    ap.add_argument("--key", default="97682")
    ap.add_argument("--at", default="-1", help="positions (0-based, BOS included); -1 is the last")
    ap.add_argument("--model", default=F32_PATH)
    ap.add_argument("--out", default="/tmp/gemma-long")
    ap.add_argument("--needle", help="a needle binary: also run `needle logits` and compare")
    ap.add_argument("--greedy", type=int, default=6)
    ap.add_argument("--reuse", action="store_true", help="take llama.cpp's side from an earlier OUT/compare-*.json")
    ap.add_argument("--fixture", help="also write llama.cpp's side as a fixture in gemma3_logits_f32.json's "
                                      "form (tests/fixtures/gemma3_long_f32.json)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    llm, _ = C.load_llama(a.model, n_ctx=a.tokens + a.greedy + 8, kv_f32=True)
    text, ids = build(llm, a.tokens, a.depth, a.key)
    at = sorted({(len(ids) + p if p < 0 else p) for p in map(int, a.at.split(","))})
    name = f"{len(ids)}-d{a.depth}"
    text_path = os.path.join(a.out, f"prompt-{name}.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{len(ids)} ids, logits at {at}; prompt in {text_path}", flush=True)

    out_path = os.path.join(a.out, f"compare-{name}.json")
    if a.reuse and os.path.exists(out_path):
        with open(out_path) as f:
            result = json.load(f)
        assert result["n_ids"] == len(ids) and sorted(map(int, result["positions"])) == at, "another prompt"
    else:
        result = llama_side(llm, ids, at, a, out_path)
    del llm
    if a.fixture:
        write_fixture(a, text, ids, result)
    if a.needle:
        compare(a, text_path, ids, at, result)
    with open(out_path, "w") as f:
        json.dump(result, f)


def write_fixture(a, text: str, ids: list[int], result: dict) -> None:
    """The prompt's ids, top-20 at each position and the greedy answer with its margins, in
    the form crates/needle-model/tests/gemma3.rs reads (gemma3_logits_f32.json's)."""
    prompt = {
        "name": f"d_passkey_{len(ids)}", "text_rule": "tests/reference/gemma_long_compare.py "
        f"--tokens {a.tokens} --depth {a.depth} --key {a.key} (BOS first)", "ids": ids,
        "positions": [{"pos": int(p), "top_ids": [i for i, _ in r["llama_top20"]],
                       "top_logits": [l for _, l in r["llama_top20"]]} for p, r in result["positions"].items()],
        "greedy_ids": result["llama_greedy"], "greedy_text": result["llama_greedy_text"],
        "greedy_top1_margins": result["llama_greedy_top1_margins"],
    }
    header = {
        "description": "llama.cpp logits on a long passkey prompt (the needle at depth "
                       f"{a.depth}), {os.path.basename(a.model)}: top-20 ids and logits at each position "
                       "(evaluated in one segment per position), then the greedy answer.",
        "generator": "tests/reference/gemma_long_compare.py", "versions": result["versions"],
        "model": result["model"],
        "settings": {"n_ctx": a.tokens + a.greedy + 8, "n_batch": 512, "n_ubatch": 512, "n_threads": 2,
                     "flash_attn": False, "type_k": "f32", "type_v": "f32"},
    }
    with open(a.fixture, "w") as f:
        json.dump({"header": header, "prompts": [prompt]}, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {a.fixture}", flush=True)


def llama_side(llm, ids: list[int], at: list[int], a, out_path: str) -> dict:
    result = {
        "model": C.model_info(a.model), "versions": C.versions(), "depth": a.depth, "key": a.key,
        "n_ids": len(ids), "positions": {},
    }
    done, t0 = 0, time.time()
    for p in at:
        llm.eval(ids[done:p + 1])
        done = p + 1
        result["positions"][str(p)] = {"llama_top20": top(C.last_logits(llm))}
        print(f"llama.cpp: position {p} after {time.time() - t0:.0f} s, top-1 "
              f"{result['positions'][str(p)]['llama_top20'][0]}", flush=True)
        with open(out_path + ".partial", "w") as f:  # a long run's positions so far
            json.dump(result, f)
    if done < len(ids):
        llm.eval(ids[done:])
    ref_greedy, margins = greedy(llm, a.greedy)
    result["llama_greedy"] = ref_greedy
    result["llama_greedy_top1_margins"] = margins
    result["llama_greedy_text"] = llm.detokenize(ref_greedy).decode("utf-8", "replace")
    print(f"llama.cpp greedy: {result['llama_greedy_text']!r}", flush=True)
    return result


def compare(a, text_path: str, ids: list[int], at: list[int], result: dict) -> None:
    cmd = [a.needle, "logits", "--model", a.model, "--weights", "f32", "--prompt-file", text_path,
           "--top", "40", "--at", ",".join(map(str, at)), "--json"]
    t0 = time.time()
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"needle logits: {time.time() - t0:.0f} s", flush=True)
    result["ids_equal"] = out["prompt_ids"] == ids
    if not result["ids_equal"]:
        diff = next(i for i, (x, y) in enumerate(zip(out["prompt_ids"], ids)) if x != y) \
            if len(out["prompt_ids"]) == len(ids) else None
        print(f"token ids differ (needle {len(out['prompt_ids'])}, llama.cpp {len(ids)}, first at {diff})")
    for row in out["at"]:
        p = row["position"]
        mine = {t["id"]: t["logit"] for t in row["top"]}
        r = result["positions"][str(p)]
        r["needle_top40"] = [(t["id"], t["logit"]) for t in row["top"]]
        # needle's top-40 covers llama.cpp's top-20 whenever they are close.
        deltas = [abs(mine[i] - l) for i, l in r["llama_top20"] if i in mine]
        r["max_abs_delta_top20"] = max(deltas) if deltas else None
        r["missing_from_needle_top40"] = sum(i not in mine for i, _ in r["llama_top20"])
        r["top1_equal"] = row["top"][0]["id"] == r["llama_top20"][0][0]
        print(f"position {p}: max |Δlogit| {r['max_abs_delta_top20']}, top-1 llama.cpp "
              f"{r['llama_top20'][0]} needle {(row['top'][0]['id'], row['top'][0]['logit'])}", flush=True)


if __name__ == "__main__":
    main()
