"""Models, generation and saved contexts on the default model, against the `needle` CLI."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import needle
from conftest import run_needle_cli

PROMPT = "The capital of France is"
QUESTION = "Who is called the father of all such as dwell in tents?"
SELECTOR = "retrieval:k=32,sinks=16,window=64"


@pytest.fixture(scope="module")
def document() -> str:
    # The start of Genesis: about 1,000 tokens of the default document.
    return needle.default_document()[:4500]


@pytest.fixture(scope="module")
def context(model, document) -> needle.Context:
    return model.prefill(document, selector=SELECTOR, context_tokens=500, chat=True)


def test_generate_gives_the_cli_greedy_tokens(model):
    gen = model.generate(PROMPT, max_tokens=12)
    pieces = list(gen)
    out = gen.result()
    cli = run_needle_cli("generate", "--model", "default", "--prompt", PROMPT, "--max-tokens", "12")
    assert out["token_ids"] == cli["token_ids"]
    assert "".join(pieces) == out["text"] == cli["text"]
    assert len(pieces) > 1  # streamed, not handed over at the end
    assert out["selector"] == cli["selector"] == "full"
    for key in ["prompt_tokens", "decode_tokens_per_second", "share_of_keys_touched", "stats", "kv_cache_bytes"]:
        assert key in out, key
    assert out["prompt_tokens"] == len(model.encode(PROMPT, add_special=True))


def test_chat_generation_gives_the_cli_tokens(model):
    gen = model.generate("Name a colour.", max_tokens=8, chat=True)
    cli = run_needle_cli(
        "generate", "--model", "default", "--prompt", "Name a colour.", "--chat", "--max-tokens", "8"
    )
    assert gen.token_ids == cli["token_ids"]


def test_context_asks_save_load_and_the_cli_agree(model, context, tmp_path: Path):
    assert context.tokens > 500 and context.selector == SELECTOR
    assert context.stats["tokens"] == context.tokens
    first = context.ask(QUESTION, max_tokens=10).token_ids
    # Each question starts from the saved state: asking again gives the same tokens.
    assert context.ask(QUESTION, max_tokens=10).token_ids == first
    path = tmp_path / "genesis.needle"
    context.save(path)
    loaded = needle.Context.load(path, model)
    assert loaded.tokens == context.tokens and loaded.info["selector"] == SELECTOR
    assert loaded.ask(QUESTION, max_tokens=10).token_ids == first
    cli = run_needle_cli(
        "generate", "--model", "default", "--context", str(path), "--question", QUESTION, "--max-tokens", "10"
    )
    assert cli["token_ids"] == first
    # A context saved by the CLI is asked the same way from Python.
    cli_path = tmp_path / "cli.needle"
    run_needle_cli_prefill(model, cli_path)
    assert needle.Context.load(cli_path, model).ask(QUESTION, max_tokens=10).token_ids == first


def run_needle_cli_prefill(model, path: Path) -> None:
    import subprocess

    from conftest import ROOT, _command

    doc = path.with_suffix(".txt")
    doc.write_text(needle.default_document()[:4500])
    cmd = _command("NEEDLE_BIN", "needle-cli", []) + [
        "prefill", "--model", "default", "--prompt-file", str(doc), "--context-tokens", "500", "--chat",
        "--selector", SELECTOR, "--save", str(path),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


def test_save_never_overwrites_silently(context, tmp_path: Path):
    path = tmp_path / "c.needle"
    path.write_text("mine")
    with pytest.raises(needle.NeedleError, match="exists"):
        context.save(path)
    assert path.read_text() == "mine"
    context.save(path, overwrite=True)
    assert path.stat().st_size > 1000


def test_errors_carry_needle_messages(model, tmp_path: Path):
    with pytest.raises(needle.NeedleError, match="not found"):
        needle.Model.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(needle.NeedleError, match="CPU backend"):
        needle.Model.load("default", device="cuda")
    with pytest.raises(needle.NeedleError, match="nosuch"):
        model.generate(PROMPT, selector="nosuch").result()
    with pytest.raises(needle.NeedleError, match="kv"):
        model.generate(PROMPT, kv="f8")
    bad = tmp_path / "bad.needle"
    bad.write_bytes(b"not a context file" * 100)
    with pytest.raises(needle.NeedleError, match="bad.needle"):
        needle.Context.load(bad, model)
    with pytest.raises(needle.NeedleError, match="empty"):
        model.prefill("")


def test_generation_releases_the_gil(model):
    """A Python thread keeps running while the model generates."""
    ticks = 0
    stop = threading.Event()

    def tick():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=tick)
    t.start()
    try:
        before = ticks
        model.generate(PROMPT, max_tokens=8).result()
        during = ticks - before
    finally:
        stop.set()
        t.join()
    assert during > 1000, during
