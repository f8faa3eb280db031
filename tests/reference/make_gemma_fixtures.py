#!/usr/bin/env python3
"""Write the llama.cpp reference fixtures of Gemma 3 270M under tests/fixtures/.

    /root/.cache/needle/refenv/bin/python tests/reference/make_gemma_fixtures.py

Input: /root/.cache/needle/models/gemma-3-270m-q4_k_m.gguf (`cargo xtask fetch-model`), and for prompt (c) ../shared/data/pride-and-prejudice.txt
(NEEDLE_DATA overrides the folder). The fixture stores the ids, so the tests read no text.

Outputs (JSON with a "header": versions, model sha256, settings):
  gemma3_tokenizer.json  llama.cpp's tokenizer on the strings of make_fixtures.py plus a Gemma
                         chat prompt (add_bos=False; special=False unless "special": true)
  gemma3_logits_f32.json the same on the weights dequantised to F32 (gemma-3-270m.F32.gguf, written
                         by tests/reference/dequantize_gguf.py), when that file exists
  gemma3_logits.json     prompts (a) plain text, (b) the Gemma chat prompt, (c) 700 tokens of
                         prose (past the 512-token window of the local layers): ids (BOS first,
                         as the GGUF's add_bos_token says), top-20 logits and the log-sum-exp at
                         chosen positions, an 8-token greedy continuation with its top-1 margins

Settings as make_fixtures.py: n_ctx 4096, n_batch = n_ubatch = 512, 2 threads, CPU, flash
attention off, F32 K/V cache, logits_all.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import make_fixtures as M  # noqa: E402

GEMMA_PATH = os.path.join(C.MODELS_DIR, "gemma-3-270m-q4_k_m.gguf")
F32_PATH = os.path.join(C.MODELS_DIR, "gemma-3-270m.F32.gguf")
N_GREEDY = 8
WEIGHTS = {
    "gemma3_logits.json": "Q4_K/Q5_0/Q6_K/Q8_0 weights; llama.cpp quantises activations to 8 bits for them",
    "gemma3_logits_f32.json": "the same weights dequantised to F32 by tests/reference/dequantize_gguf.py: "
                              "f32 matmuls, the tight reference",
}
CHAT = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
if os.environ.get("NEEDLE_DATA"):
    C.DATA_DIR = os.environ["NEEDLE_DATA"]
elif not os.path.isdir(C.DATA_DIR):
    C.DATA_DIR = "/work/shared/data"


def make_tokenizer(vers: dict) -> None:
    llm, _ = C.load_llama(GEMMA_PATH, n_ctx=512, vocab_only=True)
    cases = []
    for text, special in M.TOKENIZER_CASES[:-1] + [(CHAT, True), ("<start_of_turn>user", False)]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        case = {"text": text, "ids": ids}
        if special:
            case["special"] = True
        cases.append(case)
    header = {
        "description": "llama.cpp tokenizer on the gemma-3-270m GGUF vocab (SentencePiece, 262144 pieces). "
                       "Every case: llama_tokenize(text, add_bos=False, special=False) unless it has "
                       "\"special\": true.",
        "generator": "tests/reference/make_gemma_fixtures.py",
        "versions": vers,
        "model": C.model_info(GEMMA_PATH),
        "bos_id": llm.token_bos(),
        "tokenize_Hello_with_add_bos_true": llm.tokenize(b"Hello", add_bos=True, special=False),
    }
    del llm
    path = M.write_json("gemma3_tokenizer.json", {"header": header, "cases": cases})
    M.compact_lists(path)


def make_logits(vers: dict, path: str, out_name: str) -> None:
    llm, log = C.load_llama(path, n_ctx=4096, logits_all=True, kv_f32=True, capture_log=True)
    bos = llm.token_bos()
    tok = lambda s, special: [bos] + llm.tokenize(s.encode("utf-8"), add_bos=False, special=special)  # noqa: E731
    prose = C.text_tokens(llm, C.PRIDE, C.PRIDE_ANCHOR, 699)
    plist = [
        {"name": "a_capital_plain", "text": "The capital of France is", "ids": tok("The capital of France is", False)},
        {"name": "b_chat_capital", "text": CHAT, "special": True, "ids": tok(CHAT, True)},
        {"name": "c_pride_700", "source": f"../shared/data/{C.PRIDE}", "anchor": C.PRIDE_ANCHOR,
         "text_rule": C.TEXT_RULE + ", then put BOS before them", "ids": [bos] + prose},
    ]
    for p in plist:
        n = len(p["ids"])
        p["positions"] = sorted({n - 1} | ({300, 511, 512, 600} if n > 600 else set()))
    out = []
    for p in plist:
        t0 = time.time()
        llm.reset()
        llm.eval(p["ids"])
        pos_out = []
        for pos in p["positions"]:
            row = np.array(llm.scores[pos], dtype=np.float32)
            top = np.argsort(-row, kind="stable")[:M.TOP_K]
            pos_out.append({"pos": pos, "top_ids": [int(i) for i in top],
                            "top_logits": [float(row[i]) for i in top], "logsumexp": M.logsumexp(row)})
        greedy, margins = [], []
        for step in range(N_GREEDY):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top2 = np.argsort(-row, kind="stable")[:2]
            greedy.append(int(top2[0]))
            margins.append(float(row[top2[0]] - row[top2[1]]))
            if step + 1 < N_GREEDY:
                llm.eval([int(top2[0])])
        text = llm.detokenize(greedy, special=True).decode("utf-8", errors="replace")
        entry = {k: v for k, v in p.items() if k != "positions"}
        entry.update({"positions": pos_out, "greedy_ids": greedy, "greedy_text": text,
                      "greedy_top1_margins": [round(m, 5) for m in margins]})
        out.append(entry)
        print(f"  {p['name']}: {len(p['ids'])} tokens, {time.time() - t0:.1f}s, greedy {text!r}", flush=True)
    info = [l.rstrip() for l in log.splitlines() if any(k in l for k in ("swa", "n_ctx", "type_k", "file type"))]
    header = {
        "description": f"llama.cpp logits on {os.path.basename(path)} ({WEIGHTS[out_name]}). For each prompt: "
                       "its ids (BOS first), then at "
                       "each listed position the top-20 ids with their logits and the log-sum-exp of all "
                       "262144 logits, and the greedy continuation.",
        "generator": "tests/reference/make_gemma_fixtures.py",
        "versions": vers,
        "model": C.model_info(path),
        "settings": {"n_ctx": 4096, "n_batch": 512, "n_ubatch": 512, "n_threads": 2, "flash_attn": False,
                     "type_k": "f32", "type_v": "f32", "logits_all": True,
                     "greedy": f"argmax of raw logits (lowest id on ties), {N_GREEDY} tokens"},
        "llama_cpp_context_log": info[:20],
    }
    del llm
    written = M.write_json(out_name, {"header": header, "prompts": out})
    M.compact_lists(written)


def main() -> int:
    if not os.path.exists(GEMMA_PATH):
        sys.exit(f"missing {GEMMA_PATH}; run `cargo xtask fetch-model` first")
    vers = C.versions()
    make_tokenizer(vers)
    make_logits(vers, GEMMA_PATH, "gemma3_logits.json")
    if os.path.exists(F32_PATH):
        make_logits(vers, F32_PATH, "gemma3_logits_f32.json")
    else:
        print(f"skipping gemma3_logits_f32.json: no {F32_PATH} (tests/reference/dequantize_gguf.py --src "
              f"{GEMMA_PATH} --dst {F32_PATH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
