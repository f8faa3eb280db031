"""The Ray Serve application on a local Ray cluster this test starts: two replicas, a context
saved by one and answered by the other with the same tokens, and routing to the holder.

Needs `ray[serve]` and the needle package in the running Python (`cargo xtask ray` sets both up).
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (cargo xtask ray installs it)")
from ray import serve  # noqa: E402

import needle  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import app as needle_app  # noqa: E402

QUESTION = "Who is called the father of all such as dwell in tents?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, replica: int | None = None) -> dict:
    headers = {"content-type": "application/json"}
    if replica is not None:
        headers["x-needle-replica"] = str(replica)
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    contexts = tmp_path_factory.mktemp("contexts")
    port = free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        runtime_env={"working_dir": str(Path(__file__).parent)},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(needle_app.build("default", 2, str(contexts)), route_prefix="/", name="needle")
        yield f"http://127.0.0.1:{port}", contexts
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_context_saved_by_one_replica_is_answered_by_the_other(server):
    url, contexts = server
    document = needle.default_document()[:9000]
    made = post(
        f"{url}/v1/contexts",
        {"document": document, "context_tokens": 1200, "chat": True, "selector": "retrieval:k=32,sinks=16,window=64"},
        replica=0,
    )
    assert made["replica"] == 0 and made["tokens"] > 1000
    assert (contexts / f"{made['id']}.needle").is_file()  # on the shared storage

    ask = {"context": made["id"], "prompt": QUESTION, "max_tokens": 10}
    by_other = post(f"{url}/v1/completions", ask, replica=1)
    assert by_other["needle"]["replica"] == 1
    by_holder = post(f"{url}/v1/completions", ask)  # routed to the replica that holds it
    assert by_holder["needle"]["replica"] == 0
    assert by_other["needle"]["token_ids"] == by_holder["needle"]["token_ids"]
    assert by_other["choices"][0]["text"] == by_holder["choices"][0]["text"]
    assert by_other["usage"]["completion_tokens"] == len(by_other["needle"]["token_ids"]) > 0
    assert by_other["object"] == "text_completion"

    # And the package in this process, from the same file, agrees.
    model = needle.Model.load("default")
    local = needle.Context.load(contexts / f"{made['id']}.needle", model).ask(QUESTION, max_tokens=10)
    assert local.token_ids == by_other["needle"]["token_ids"]

    # Both replicas now hold it; a prompt without a context works on either.
    plain = post(f"{url}/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8})
    assert plain["choices"][0]["text"]
    with urllib.request.urlopen(f"{url}/v1/replicas", timeout=60) as r:
        held = json.loads(r.read())
    assert all(made["id"] in h["contexts"] for h in held), held


def test_unknown_context_is_a_404(server):
    url, _ = server
    try:
        post(f"{url}/v1/completions", {"context": "0" * 24, "prompt": "hi", "max_tokens": 2})
    except urllib.error.HTTPError as e:
        assert e.code == 404
        assert "no such context" in json.loads(e.read())["error"]["message"]
    else:
        raise AssertionError("expected a 404")
