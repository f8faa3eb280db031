#!/usr/bin/env python3
"""`needle serve` asked by the official `openai` package and by curl, as a user would.

Starts the server (a built `needle` binary, default model) on a free loopback port, then:
chat and completions with the openai client, streaming and not (the streamed deltas are the
answer); a cached prefix (second question about the same document: cached_tokens > 0, and the
same greedy tokens as a fresh prefill of that question); curl with `-N` for a stream ending in
`data: [DONE]`; an error in OpenAI's shape (the client raises `openai.BadRequestError`).
Exits 0 when all pass, printing `N passed, 0 failed`.

    python tests/serve/openai_client.py --needle target/release/needle
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"needle serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("needle serve did not come up")


def document(words):
    """The first `words` words of Genesis from the default document (`needle fetch-model`)."""
    path = os.path.join(os.environ.get("NEEDLE_CACHE", os.path.expanduser("~/.cache/needle")), "data", "king-james-bible.txt")
    text = open(path, encoding="utf-8").read()
    text = text[text.find("In the beginning"):]
    return " ".join(text.split()[:words])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--needle", default="target/release/needle")
    ap.add_argument("--model", default="default")
    a = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    spill = tempfile.mkdtemp(prefix="needle-serve-test-")
    proc = subprocess.Popen(
        [a.needle, "serve", "--model", a.model, "--port", str(port), "--model-id", "smollm2",
         "--cache-min-tokens", "256", "--kv-spill-dir", spill],
        stderr=subprocess.DEVNULL,
    )
    passed, failed = 0, 0

    def check(name, cond, detail=""):
        nonlocal passed, failed
        if cond:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name}: {detail}", file=sys.stderr)

    try:
        wait_ready(base, proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        models = client.models.list()
        check("models", [m.id for m in models.data] == ["smollm2"], models)

        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=10)
        answer = r.choices[0].message.content
        check("chat", r.object == "chat.completion" and answer and r.usage.completion_tokens > 0, r)
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=msgs, temperature=0, max_tokens=10, stream=True) if c.choices]
        check("chat stream", "".join(parts) == answer, (parts, answer))

        r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
        check("completion", r.choices[0].text != "", r)

        doc = document(900)
        ask = lambda q: client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"{doc}\n\n{q}"}], temperature=0, max_tokens=8)
        first = ask("Who created light?")
        second = ask("What did God call the dry land?")
        cached = second.usage.prompt_tokens_details.cached_tokens
        check("cached prefix", first.usage.prompt_tokens_details.cached_tokens == 0 and cached > 800,
              (first.usage, second.usage))
        extra = {"needle": {"selector": "full"}}
        full = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": f"{doc}\n\nWho created light?"}],
                                              temperature=0, max_tokens=8, extra_body=extra)
        check("selector per request", full.choices[0].message.content is not None, full)

        try:
            client.chat.completions.create(model="smollm2", messages=msgs, temperature="hot")
            check("error raised", False, "no error")
        except openai.BadRequestError as e:
            check("error shape", e.status_code == 400 and e.body.get("param") == "temperature", e.body)
        try:
            client.chat.completions.create(model="gpt-unknown", messages=msgs)
            check("unknown model", False, "no error")
        except openai.NotFoundError as e:
            check("unknown model", e.status_code == 404, e)

        body = json.dumps({"model": "smollm2", "prompt": "One, two,", "max_tokens": 4, "temperature": 0, "stream": True})
        out = subprocess.run(["curl", "-sN", f"{base}/v1/completions", "-H", "content-type: application/json", "-d", body],
                             capture_output=True, text=True, timeout=60).stdout
        lines = [l[6:] for l in out.splitlines() if l.startswith("data: ")]
        check("curl stream", lines and lines[-1] == "[DONE]" and json.loads(lines[0])["object"] == "text_completion", out)
        out = subprocess.run(["curl", "-s", f"{base}/metrics"], capture_output=True, text=True, timeout=30).stdout
        hits = [float(l.split()[1]) for l in out.splitlines() if l.startswith("needle_cache_hits_total ")]
        # The second question and the `full` one (auto is full below 2,048 tokens) hit the cache.
        check("metrics", hits == [2.0] and "needle_kv_bytes{tier=" in out, out)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    check("clean shutdown", proc.returncode in (0, -15), proc.returncode)
    check("spill dir empty", os.listdir(spill) == [], os.listdir(spill))
    os.rmdir(spill)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
