#!/usr/bin/env python3
"""Write tiny random-weight models of each supported family and llama.cpp's logits on them.

Run from anywhere (paths are resolved from this file):

    python3 tests/reference/make_family_fixtures.py

For each family (llama3, qwen2, qwen3, mistral) it writes under tests/fixtures/families/:
  <family>.gguf        the model as llama.cpp's converter would lay it out (gguf-py), all F32
  <family>-hf/         the same weights as a Hugging Face folder: config.json,
                       model.safetensors (written by hand: u64 header length, JSON header,
                       raw little-endian data), tokenizer_config.json with the chat template
  <family>.json        llama.cpp's logits on a few prompts, the chat template rendered by
                       jinja2 (what transformers uses) for fixed conversations, and llama.cpp's
                       tokenization of strings whose ids depend on the pre-tokenizer (digits,
                       contractions, unicode, whitespace runs; SentencePiece for mistral)

The families differ where the real ones do:
  llama3   Llama 3.1 RoPE scaling: config.json has rope_scaling {rope_type: llama3}; the GGUF
           has llama.cpp's precomputed rope_freqs.weight instead (its converter's formula,
           below). Q/K rows permuted as llama.cpp's converter permutes them. Untied output.
  qwen2    q/k/v biases, rope_theta 1e6, tied embeddings, NEOX RoPE (no permutation).
  qwen3    q/k RMSNorm per head before RoPE, head_dim 16 while hidden/heads = 8 (as Qwen3's
           small models have head_dim * heads != hidden), no biases.
  mistral  the llama layout; its GGUF says "llama" (as llama.cpp converts Mistral 7B) with a
           SentencePiece vocabulary; config.json says model_type "mistral" with sliding_window.

Shapes: 2 layers, hidden 32, 4 query heads, 2 KV heads, head_dim 8 (16 for qwen3), FFN 64,
vocab ~300 (byte-level BPE: 256 bytes, merges, special tokens; mistral: SentencePiece).
Weights: seeded normal, F32, so llama.cpp (F32 K/V cache, no flash attention) is an f32
reference of the same arithmetic.

Settings: n_ctx 256, n_batch 256, 2 threads, CPU, F32 K/V, logits_all. Each prompt stores the
full logit rows at a few positions and 8 greedy (argmax) continuation steps with their logit
rows. Versions: see the header of each JSON (llama-cpp-python 0.3.36, gguf 0.19).
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

OUT_DIR = os.path.join(C.FIXTURES_DIR, "families")
N_CTX = 256
N_GREEDY = 8
SEED = 20261202
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 2, 32, 4, 2, 8, 64
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# Chat templates of the released models, shortened where they handle tools (not exercised here).
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "Name a prime.\n"}],
]

FAMILIES = {
    "llama3": dict(gguf_arch="llama", model_type="llama", cls="LlamaForCausalLM", theta=10000.0, eps=1e-5,
                   tied=False, bias=False, qk_norm=False, head_dim=HEAD_DIM, permute=True, vocab="bpe",
                   pre="llama-bpe", rope=LLAMA3_ROPE, template=LLAMA31_TEMPLATE,
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "qwen2": dict(gguf_arch="qwen2", model_type="qwen2", cls="Qwen2ForCausalLM", theta=1e6, eps=1e-6,
                  tied=True, bias=True, qk_norm=False, head_dim=HEAD_DIM, permute=False, vocab="bpe", pre="qwen2",
                  rope=None, template=QWEN25_TEMPLATE, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  bos=None, eos="<|im_end|>", extra={"sliding_window": 4096, "use_sliding_window": False}),
    "qwen3": dict(gguf_arch="qwen3", model_type="qwen3", cls="Qwen3ForCausalLM", theta=1e6, eps=1e-6,
                  tied=False, bias=False, qk_norm=True, head_dim=2 * HEAD_DIM, permute=False, vocab="bpe",
                  pre="qwen2", rope=None, template=QWEN3_TEMPLATE,
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  extra={"attention_bias": False, "sliding_window": None, "use_sliding_window": False}),
    "mistral": dict(gguf_arch="llama", model_type="mistral", cls="MistralForCausalLM", theta=1e6, eps=1e-5,
                    tied=False, bias=False, qk_norm=False, head_dim=HEAD_DIM, permute=True, vocab="spm",
                    pre=None, rope=None, template=MISTRAL_TEMPLATE, specials=[], bos="<s>", eos="</s>",
                    extra={"sliding_window": 4096}),
}


# --------------------------------------------------------------------------- vocab --

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_vocab(specials: list[str]) -> tuple[list[str], list[int], list[str]]:
    alphabet = list(bytes_to_unicode().values())
    # Merges that only apply when the pre-tokenizer keeps their parts together, so the ids show
    # how text was split: digit runs (llama-bpe keeps up to 3 digits together, qwen2 one),
    # contractions, whitespace runs, and a two-byte character.
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "Ġ c", "e n", "o r", "Ġ w",
              "1 2", "12 3", "123 4", "4 5", "Ġ 1", "' s", "' t", "' re", "' ll", "' S", "l l", "Ġ Ġ", "ĠĠ Ġ",
              "ĠĠ ĠĠ", "Ċ Ċ", "Ġ Ċ", "Ã ©", "c af", "a f", "caf Ã©", "! !", "Ġ !", "d on", "Ġ d", "Ġd on"]
    tokens = alphabet + ["".join(m.split(" ")) for m in merges]
    types = [1] * len(tokens)
    tokens += specials
    types += [3] * len(specials)
    return tokens, types, merges


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "▁t", "he", "▁the", "in", "▁a", "er", "on", "▁s", "re", "e", "t", "a", "o", "n", "s", "h", "r",
              "i", "▁c", "c", "af", "f", "é", "▁caf", "▁café", "1", "2", "12", "'", "'s", "▁'", "▁▁", "▁▁▁▁"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


# ------------------------------------------------------------------------- weights --

def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py LlamaModel.permute): HF rotate-half rows →
    its interleaved RoPE order."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(rope: dict, head_dim: int, theta: float) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: 1/factor per frequency."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high, old = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], \
        rope["original_max_position_embeddings"]
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def make_weights(fam: dict, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-named F32 tensors."""
    d = fam["head_dim"]
    qd, kvd = HEADS * d, KV_HEADS * d
    w = lambda *shape, s=None: (rng.standard_normal(shape) * (s or shape[-1] ** -0.5)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(vocab, HIDDEN, s=1.0), "model.norm.weight": norm(HIDDEN)}
    if not fam["tied"]:
        t["lm_head.weight"] = w(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(HIDDEN)
        t[p + "self_attn.q_proj.weight"] = w(qd, HIDDEN, s=1.0)
        t[p + "self_attn.k_proj.weight"] = w(kvd, HIDDEN, s=1.0)
        t[p + "self_attn.v_proj.weight"] = w(kvd, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = w(HIDDEN, qd)
        if fam["bias"]:
            t[p + "self_attn.q_proj.bias"] = w(qd, s=0.5)
            t[p + "self_attn.k_proj.bias"] = w(kvd, s=0.5)
            t[p + "self_attn.v_proj.bias"] = w(kvd, s=0.5)
        if fam["qk_norm"]:
            t[p + "self_attn.q_norm.weight"] = norm(d)
            t[p + "self_attn.k_norm.weight"] = norm(d)
        t[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        t[p + "mlp.gate_proj.weight"] = w(FFN, HIDDEN)
        t[p + "mlp.up_proj.weight"] = w(FFN, HIDDEN)
        t[p + "mlp.down_proj.weight"] = w(HIDDEN, FFN)
    return t


GGUF_LEAVES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_GLOBAL:
        return GGUF_GLOBAL[hf]
    _, _, layer, leaf = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_LEAVES[leaf]}"


# ---------------------------------------------------------------------------- files --

def write_gguf(path: str, fam: dict, tensors: dict, vocab: dict) -> None:
    import gguf

    arch = fam["gguf_arch"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"needle tiny {os.path.basename(path)[:-5]}")
    w.add_block_count(LAYERS)
    w.add_context_length(N_CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(fam["head_dim"])
    w.add_value_length(fam["head_dim"])
    w.add_rope_dimension_count(fam["head_dim"])
    w.add_layer_norm_rms_eps(fam["eps"])
    w.add_rope_freq_base(fam["theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if vocab["kind"] == "bpe":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(fam["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_add_space_prefix(True)
    if vocab["bos"] is not None:
        w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(vocab["bos"] is not None)
    w.add_chat_template(fam["template"])
    if fam["rope"] is not None:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(fam["rope"], fam["head_dim"], fam["theta"]))
    for hf, t in tensors.items():
        if fam["permute"] and hf.endswith("q_proj.weight"):
            t = permute(t, HEADS)
        elif fam["permute"] and hf.endswith("k_proj.weight"):
            t = permute(t, KV_HEADS)
        w.add_tensor(gguf_name(hf), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_safetensors(path: str, tensors: dict) -> None:
    """The safetensors format by hand: u64 little-endian header length, JSON header (names →
    dtype, shape, [begin, end) data offsets), padded with spaces to 8 bytes, then the data."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        b = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_hf(folder: str, name: str, fam: dict, tensors: dict, vocab: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    cfg = {"architectures": [fam["cls"]], "model_type": fam["model_type"], "vocab_size": vocab["n"],
           "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": fam["head_dim"],
           "rms_norm_eps": fam["eps"], "rope_theta": fam["theta"], "max_position_embeddings": N_CTX,
           "tie_word_embeddings": fam["tied"], "eos_token_id": vocab["eos"], "torch_dtype": "float32"}
    if vocab["bos"] is not None:
        cfg["bos_token_id"] = vocab["bos"]
    if fam["rope"] is not None:
        cfg["rope_scaling"] = fam["rope"]
    cfg.update(fam.get("extra", {}))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tok_cfg = {"chat_template": fam["template"], "eos_token": vocab["tokens"][vocab["eos"]],
               "bos_token": vocab["tokens"][vocab["bos"]] if vocab["bos"] is not None else None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)


# --------------------------------------------------------------------------- runs --

TOKENIZER_CASES = [
    "1234567890", "12 345 6789", "x1234y", "3.14159", "in 2024, 1/3", "don't can't I'll we're SHE'S it's",
    "O'Neil's 'quoted'", "café Café CAFÉ", "naïve façade", "日本語 テキスト", "Привет мир", "🦀 emoji",
    "a  b   c    d", "  leading", "trailing  ", "\n\nnew\n\n\nlines\n", "tabs\tand \t spaces", "\r\n windows",
    "Hello!! World!!!", "the the  the   the", " ", "",
]


def tokenizer_cases(path: str) -> list[dict]:
    llm, _ = C.load_llama(path, n_ctx=64, vocab_only=True)
    out = [{"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)} for t in TOKENIZER_CASES]
    del llm
    return out


def run_llama_cpp(path: str, prompts: list[list[int]]) -> tuple[list[dict], dict]:
    llm, _ = C.load_llama(path, n_ctx=N_CTX, logits_all=True, kv_f32=True, n_batch=N_CTX, seed=SEED)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        positions = sorted({0, len(ids) // 2, len(ids) - 1})
        rows = [{"pos": p, "logits": [round(float(x), 6) for x in llm.scores[p]]} for p in positions]
        greedy, steps = [], []
        for step in range(N_GREEDY):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            nxt = int(np.argmax(row))
            greedy.append(nxt)
            if step > 0:
                steps.append([round(float(x), 6) for x in row])
            if step + 1 < N_GREEDY:
                llm.eval([nxt])
        out.append({"ids": ids, "positions": rows, "greedy_ids": greedy, "decode_logits": steps})
    meta = {"n_vocab": llm.n_vocab(), "metadata": {k: v for k, v in llm.metadata.items()
                                                    if not k.startswith("tokenizer.ggml.") and k != "tokenizer.chat_template"}}
    del llm
    return out, meta


def render_templates(fam: dict, vocab: dict) -> list[dict]:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    # transformers' settings (utils/chat_template_utils.py): trim_blocks, lstrip_blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    tpl = env.from_string(fam["template"])
    bos = vocab["tokens"][vocab["bos"]] if vocab["bos"] is not None else ""
    eos = vocab["tokens"][vocab["eos"]]
    return [{"messages": m, "add_generation_prompt": True,
             "rendered": tpl.render(messages=m, add_generation_prompt=True, bos_token=bos, eos_token=eos)}
            for m in CONVERSATIONS]


def main() -> None:
    vers = C.versions()
    import jinja2
    vers["jinja2"] = jinja2.__version__
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, fam in FAMILIES.items():
        rng = np.random.default_rng(SEED + sum(map(ord, name)))
        if fam["vocab"] == "bpe":
            tokens, types, merges = bpe_vocab(fam["specials"])
            vocab = {"kind": "bpe", "tokens": tokens, "types": types, "merges": merges}
        else:
            tokens, scores, types = spm_vocab()
            vocab = {"kind": "spm", "tokens": tokens, "scores": scores, "types": types}
        vocab["n"] = len(tokens)
        vocab["bos"] = tokens.index(fam["bos"]) if fam["bos"] else None
        vocab["eos"] = tokens.index(fam["eos"])
        tensors = make_weights(fam, len(tokens), rng)
        gguf_path = os.path.join(OUT_DIR, f"{name}.gguf")
        write_gguf(gguf_path, fam, tensors, vocab)
        write_hf(os.path.join(OUT_DIR, f"{name}-hf"), name, fam, tensors, vocab)
        prng = np.random.default_rng(SEED)
        prompts = [[int(x) for x in prng.integers(0, len(tokens), n)] for n in (5, 37, 150)]
        runs, meta = run_llama_cpp(gguf_path, prompts)
        assert meta["n_vocab"] == len(tokens)
        header = {
            "description": f"llama.cpp on tests/fixtures/families/{name}.gguf (random F32 weights): full logit rows "
                           "at positions 0, n/2, n-1 of each prompt (ids, no BOS), then greedy argmax decoding: "
                           "greedy_ids[i] is the argmax after the prompt plus greedy_ids[..i]; decode_logits[i] "
                           "is the row that chose greedy_ids[i+1]. chat: the GGUF's chat template rendered by "
                           "jinja2 with transformers' settings.",
            "generator": "tests/reference/make_family_fixtures.py",
            "versions": vers,
            "model": C.model_info(gguf_path),
            "settings": {"n_ctx": N_CTX, "n_batch": N_CTX, "n_threads": 2, "kv": "f32", "flash_attn": False,
                         "logits_all": True},
            "family": {k: v for k, v in fam.items() if k not in ("template",)},
            "llama_cpp_metadata": meta["metadata"],
        }
        obj = {"header": header, "prompts": runs, "chat": render_templates(fam, vocab)}
        # llama_tokenize(text, add_bos=False, special=False) on this vocab and pre-tokenizer.
        obj["tokenizer"] = tokenizer_cases(gguf_path)
        path = os.path.join(OUT_DIR, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        sizes = {p: os.path.getsize(os.path.join(OUT_DIR, p)) for p in (f"{name}.gguf", f"{name}.json")}
        print(f"{name}: {sizes}, greedy {[r['greedy_ids'] for r in runs]}", flush=True)


if __name__ == "__main__":
    main()
