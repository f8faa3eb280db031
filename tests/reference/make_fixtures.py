#!/usr/bin/env python3
"""Write the llama.cpp reference fixtures under tests/fixtures/.

Run from anywhere (paths are resolved from this file), after building the venv and
the F32 model (see tests/reference/README.md):

    /root/.cache/needle/refenv/bin/python tests/reference/make_fixtures.py [--only tokenizer|logits]

Inputs: /root/.cache/needle/models/SmolLM2-135M-Instruct.Q4_1.gguf, its all-F32 copy
SmolLM2-135M-Instruct.F32.gguf (tests/reference/dequantize_gguf.py), and the texts in
../shared/data/ relative to the repo root. Takes about 2 minutes on 2 CPU cores.

Outputs (each a JSON object with a "header" recording versions, model sha256 and settings):
  tokenizer_cases.json  llama.cpp's tokenizer on ~50 strings (add_bos=False; special=False
                        unless the case says "special": true)
  logits_f32.json       prompts (a)-(e) on the F32 file: prompt ids, top-20 logits and the
                        full-vocabulary logsumexp at chosen positions, 16-token greedy
                        continuation
  logits_q4_1.json      the same on the Q4_1 file, plus "vs_f32": how far it is from F32

Settings: n_ctx 4096, n_batch = n_ubatch = 512, 2 threads, CPU only, flash attention off,
F32 K/V cache (llama.cpp's default is F16; F32 keeps the F32 file a near-exact f32
reference), logits_all=True, greedy = argmax over the raw logits (lowest id on ties),
no stop on EOS, seed 1234 (unused by argmax).

Versions used to generate the committed fixtures: llama-cpp-python 0.3.36 (vendoring
llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f), gguf 0.19.0, numpy 2.4.6, Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

N_CTX = 4096
N_GREEDY = 16
TOP_K = 20
SEED = 1234

CHATML_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

# (text, special) -- special=True only where stated.
TOKENIZER_CASES: list[tuple[str, bool]] = [
    # plain English
    ("Hello world", False),
    ("Hello, world!", False),
    ("The quick brown fox jumps over the lazy dog.", False),
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
     "must be in want of a wife.", False),
    ("ALL CAPS SENTENCE and MiXeD CaSe", False),
    ("don't can't I'm we'll they've she'd it's O'Neil", False),
    ("a", False),
    ("", False),
    # spaces, whitespace runs, newlines, tabs
    (" leading space", False),
    ("trailing space ", False),
    ("  two leading spaces", False),
    ("multiple   spaces   between    words", False),
    (" ", False),
    ("   ", False),
    ("\n", False),
    ("line one\nline two", False),
    ("\n\nleading newlines and trailing\n\n\n", False),
    ("paragraph one.\n\nParagraph two.", False),
    ("tabs\tand\t\ttabs", False),
    ("mixed \t \n whitespace \r\n end", False),
    ("\u00a0non-breaking\u00a0space and\u2003em space", False),
    # digits and numbers
    ("1234567890", False),
    ("3.14159265358979323846", False),
    ("The year 2024 had 366 days; 1/3 = 0.333.", False),
    ("123,456,789.00 and 1e-10 and -42 and +7", False),
    ("99999999999999999999999999999999", False),
    # punctuation and symbols
    ("Hello!!! What??? ...okay.", False),
    ("\"quoted\" 'single' (parens) [brackets] {braces} <angles>", False),
    ("a-b_c/d\\e|f@g#h$i%j^k&l*m~n`o", False),
    ("\u201csmart quotes\u201d \u2014 em dash \u2026 ellipsis", False),
    ("https://example.com/path?q=1&r=2#frag", False),
    # code
    ("def foo(x):\n    return x * 2\n", False),
    ("fn main() {\n\tprintln!(\"hi {}\", 1 + 2);\n}", False),
    ("<html><body class=\"x\">Hi</body></html>", False),
    ("    indented line\n        more indented", False),
    # accented Latin and other alphabets
    ("caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade", False),
    ("\u00c5ngstr\u00f6m \u00d8re Stra\u00dfe \u0141\u00f3d\u017a", False),
    ("\u00c7a va? Tr\u00e8s bien, merci.", False),
    ("e\u0301 (e + combining acute) vs \u00e9", False),
    ("\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440", False),
    ("\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5", False),
    # CJK
    ("\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", False),
    ("\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5", False),
    ("\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", False),
    # emoji
    ("\U0001f600 emoji \U0001f389\U0001f680", False),
    ("\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family (ZWJ sequence)", False),
    # mixed scripts
    ("mixed: English, \u4e2d\u6587, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, \U0001f600, "
     "\u0627\u0644\u0639\u0631\u0628\u064a\u0629, 123", False),
    # special-token text encoded as plain text (special=False)
    ("<|im_start|>user\nHi<|im_end|>", False),
    ("<|endoftext|>", False),
    # one ChatML prompt with special tokens parsed (special=True)
    ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
     "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", True),
]

# vocab lines of llama.cpp's load log (the per-token "control token ... not marked as EOG" lines are dropped)
LOG_KEEP = re.compile(r"^(print_info: (?!file format|vocab_only|no_alloc)|load: (?!control token)|init_tokenizer)")


def write_json(name: str, obj) -> str:
    os.makedirs(C.FIXTURES_DIR, exist_ok=True)
    path = os.path.join(C.FIXTURES_DIR, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    return path


def compact_lists(path: str) -> None:
    """Put lists of numbers on one line (indent=1 puts one number per line)."""
    with open(path, encoding="utf-8") as f:
        s = f.read()
    s = re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", s)
    with open(path, "w", encoding="utf-8") as f:
        f.write(s)
    json.loads(s)


# ---------------------------------------------------------------- tokenizer --

def make_tokenizer(vers: dict) -> None:
    llm, log = C.load_llama(C.Q4_1_PATH, n_ctx=512, vocab_only=True, capture_log=True)
    meta = llm.metadata
    cases = []
    for text, special in TOKENIZER_CASES:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        back = llm.detokenize(ids, special=special).decode("utf-8", errors="replace")
        case = {"text": text, "ids": ids}
        if special:
            case["special"] = True
        if back != text:
            case["detokenized"] = back
        cases.append(case)
    # How llama.cpp's own default (add_bos=True argument) behaves for this vocab.
    default_ids = llm.tokenize(b"Hello", add_bos=True, special=False)
    header = {
        "description": "llama.cpp tokenizer on the SmolLM2-135M-Instruct GGUF vocab. Every case: "
                       "llama_tokenize(text, add_bos=False, special=False) unless it has \"special\": true "
                       "(then special=True: <|im_start|> etc. are parsed as control tokens). "
                       "\"detokenized\" appears only where llama_detokenize(ids) != text.",
        "generator": "tests/reference/make_fixtures.py",
        "versions": vers,
        "model": C.model_info(C.Q4_1_PATH),
        "n_vocab": llm.n_vocab(),
        "add_bos_metadata": meta.get("tokenizer.ggml.add_bos_token"),
        "llama_vocab_get_add_bos": bool(llm._model.add_bos_token()),
        "llama_vocab_get_add_eos": bool(llm._model.add_eos_token()),
        "tokenize_Hello_with_add_bos_true": default_ids,
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        "llama_cpp_load_log": [l.rstrip() for l in log.splitlines() if LOG_KEEP.search(l)],
    }
    del llm
    path = write_json("tokenizer_cases.json", {"header": header, "cases": cases})
    compact_lists(path)


# ------------------------------------------------------------------- logits --

def prompts(llm) -> list[dict]:
    tok = lambda s, special: llm.tokenize(s.encode("utf-8"), add_bos=False, special=special)  # noqa: E731
    out = [
        {"name": "a_capital_plain", "source": "text", "text": "The capital of France is",
         "ids": tok("The capital of France is", False)},
        {"name": "b_chatml_capital", "source": "text (special=True)", "text": CHATML_PROMPT,
         "ids": tok(CHATML_PROMPT, True)},
    ]
    for name, file, anchor, n in [
        ("c_pride_500", C.PRIDE, C.PRIDE_ANCHOR, 500),
        ("d_pride_2000", C.PRIDE, C.PRIDE_ANCHOR, 2000),
        ("e_sherlock_1000", C.SHERLOCK, C.SHERLOCK_ANCHOR, 1000),
    ]:
        out.append({"name": name, "source": f"../shared/data/{file}", "anchor": anchor, "n_tokens": n,
                    "ids": C.text_tokens(llm, file, anchor, n)})
    for p in out:
        n = len(p["ids"])
        p["positions"] = sorted({n - 1} | ({511, 1023} if p["name"].startswith("d_") else set()))
    return out


def logsumexp(row: np.ndarray) -> float:
    r = row.astype(np.float64)
    m = r.max()
    return float(m + np.log(np.exp(r - m).sum()))


def run_model(path: str, plist: list[dict]) -> tuple[dict, dict]:
    """Returns (per-prompt results for JSON, per-prompt full logit rows for comparison)."""
    llm, log = C.load_llama(path, n_ctx=N_CTX, logits_all=True, kv_f32=True, seed=SEED, capture_log=True)
    results, rows = {}, {}
    for p in plist:
        ids = C.text_tokens(llm, p["source"].split("/")[-1], p["anchor"], p["n_tokens"]) if "anchor" in p else \
            llm.tokenize(p["text"].encode("utf-8"), add_bos=False, special=p["source"].endswith("(special=True)"))
        assert ids == p["ids"], f"{p['name']}: tokenisation differs between model files"
        t0 = time.time()
        llm.reset()
        llm.eval(p["ids"])
        pos_out, pos_rows = [], {}
        for pos in p["positions"]:
            row = np.array(llm.scores[pos], dtype=np.float32)
            top = np.argsort(-row, kind="stable")[:TOP_K]
            pos_out.append({"pos": pos, "top_ids": [int(i) for i in top],
                            "top_logits": [float(row[i]) for i in top], "logsumexp": logsumexp(row)})
            pos_rows[pos] = row
        greedy, margins = [], []
        for step in range(N_GREEDY):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top2 = np.argsort(-row, kind="stable")[:2]
            greedy.append(int(top2[0]))
            margins.append(float(row[top2[0]] - row[top2[1]]))
            if step + 1 < N_GREEDY:
                llm.eval([int(top2[0])])
        text = llm.detokenize(greedy, special=True).decode("utf-8", errors="replace")
        results[p["name"]] = {"positions": pos_out, "greedy_ids": greedy, "greedy_text": text,
                              "greedy_top1_margins": [round(m, 5) for m in margins]}
        rows[p["name"]] = (pos_rows, greedy)
        print(f"  {os.path.basename(path)} {p['name']}: {len(p['ids'])} tokens, {time.time() - t0:.1f}s, "
              f"greedy {text!r}", flush=True)
    info = [l.rstrip() for l in log.splitlines() if re.search(r"(file type|type_k|type_v|flash_attn|n_ctx|"
                                                             r"n_batch|n_ubatch|CPU_REPACK|repack|KV|system_info)",
                                                             l)][:40]
    del llm
    return results, rows, info


def compare(f32_rows: dict, q_rows: dict) -> dict:
    out = {}
    for name, (frows, fgreedy) in f32_rows.items():
        qrows, qgreedy = q_rows[name]
        per_pos = []
        for pos, f in frows.items():
            q = qrows[pos]
            ftop = np.argsort(-f, kind="stable")[:TOP_K]
            lf = f.astype(np.float64) - logsumexp(f)
            lq = q.astype(np.float64) - logsumexp(q)
            pf = np.exp(lf)
            per_pos.append({
                "pos": pos,
                "max_abs_logit_diff": round(float(np.max(np.abs(f - q))), 5),
                "max_abs_logit_diff_on_f32_top20": round(float(np.max(np.abs(f[ftop] - q[ftop]))), 5),
                "max_abs_logprob_diff_on_f32_top20": round(float(np.max(np.abs(lf[ftop] - lq[ftop]))), 5),
                "kl_f32_to_q4_1": float(f"{float(np.sum(pf * (lf - lq))):.3g}"),
                "top1_agree": bool(np.argmax(f) == np.argmax(q)),
                "top20_overlap": len(set(ftop.tolist()) & set(np.argsort(-q, kind="stable")[:TOP_K].tolist())),
            })
        agree = 0
        while agree < len(fgreedy) and fgreedy[agree] == qgreedy[agree]:
            agree += 1
        out[name] = {"positions": per_pos, "greedy_common_prefix": agree}
    return out


def make_logits(vers: dict) -> None:
    for path in (C.F32_PATH, C.Q4_1_PATH):
        if not os.path.exists(path):
            sys.exit(f"missing {path}; run tests/reference/dequantize_gguf.py first")
    vocab, _ = C.load_llama(C.Q4_1_PATH, n_ctx=512, vocab_only=True)
    plist = prompts(vocab)
    del vocab
    settings = {"n_ctx": N_CTX, "n_batch": 512, "n_ubatch": 512, "n_threads": 2, "n_gpu_layers": 0,
                "flash_attn": False, "type_k": "f32", "type_v": "f32", "logits_all": True, "seed": SEED,
                "bos_prepended": False,
                "greedy": f"argmax of raw logits (lowest id on ties), {N_GREEDY} tokens, no stop on EOS (id 2)"}
    prompt_json = []
    for p in plist:
        q = {k: v for k, v in p.items() if k not in ("positions",)}
        if "anchor" in q:
            q["text_rule"] = C.TEXT_RULE
        q["positions"] = p["positions"]
        prompt_json.append(q)

    all_rows = {}
    for tag, path in (("f32", C.F32_PATH), ("q4_1", C.Q4_1_PATH)):
        results, rows, info = run_model(path, plist)
        all_rows[tag] = rows
        header = {
            "description": f"llama.cpp logits on the {tag.upper()} SmolLM2-135M-Instruct GGUF. For each prompt: "
                           "its token ids (no BOS: tokenizer.ggml.add_bos_token is false), then at each listed "
                           "position (0-based index into the prompt) the top-20 token ids by logit with their "
                           "logits and the log-sum-exp of all 49152 logits, and the greedy continuation.",
            "generator": "tests/reference/make_fixtures.py",
            "versions": vers,
            "model": C.model_info(path),
            "settings": settings,
            "llama_cpp_context_log": info,
        }
        if tag == "f32":
            header["note"] = ("tight reference: weights dequantised to F32 (tests/reference/dequantize_gguf.py), "
                              "so matmuls and the KV cache are f32; differences from an exact f32 forward pass "
                              "are summation-order rounding only")
        else:
            header["note"] = ("loose reference: llama.cpp multiplies Q4_1/Q8_0 weights against activations "
                              "quantised to 8 bits, so these logits differ from an f32 forward pass over the "
                              "dequantised weights; vs_f32 says by how much")
        obj = {"header": header, "prompts": []}
        cmp = compare(all_rows["f32"], rows) if tag == "q4_1" else None
        for p in prompt_json:
            entry = dict(p)
            entry.update(results[p["name"]])
            if cmp is not None:
                entry["vs_f32"] = cmp[p["name"]]
            obj["prompts"].append(entry)
        path_out = write_json(f"logits_{tag}.json", obj)
        compact_lists(path_out)
        if cmp is not None:
            print("\nQ4_1 vs F32:")
            for name, c in cmp.items():
                for pp in c["positions"]:
                    print(f"  {name:18s} pos {pp['pos']:5d}: max|dlogit| {pp['max_abs_logit_diff']:.4f} "
                          f"top20 {pp['max_abs_logit_diff_on_f32_top20']:.4f} "
                          f"logprob-top20 {pp['max_abs_logprob_diff_on_f32_top20']:.4f} "
                          f"KL {pp['kl_f32_to_q4_1']:.2e} top1 {pp['top1_agree']} overlap {pp['top20_overlap']}")
                print(f"  {name:18s} greedy common prefix {c['greedy_common_prefix']}/{N_GREEDY}")


def main() -> int:
    ap = argparse.ArgumentParser(description="write tests/fixtures/*.json from llama.cpp")
    ap.add_argument("--only", choices=["tokenizer", "logits"])
    args = ap.parse_args()
    vers = C.versions()
    if args.only in (None, "tokenizer"):
        make_tokenizer(vers)
    if args.only in (None, "logits"):
        make_logits(vers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
