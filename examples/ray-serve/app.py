"""needle on Ray Serve: replicas that each hold a model, OpenAI-style routes, and prefilled
contexts on storage every replica reads.

    POST /v1/contexts     {"document": "...", "selector": "auto", "context_tokens": 8000, "chat": true}
                          → {"id": "...", "tokens": N, "replica": i}   (prefill once, save the file)
    POST /v1/completions  {"prompt": "...", "max_tokens": 64, "temperature": 0, "stop": [...],
                           "context": "<id>"}                          (OpenAI's completion object)
    GET  /v1/models       the model served

A context is a file in CONTEXT_DIR (a shared directory or network filesystem), named by its
id. The router sends a request about a context to the replica that already holds it loaded,
else to the replica its id hashes to (the same answer from every router), so each context is
loaded once per replica that serves it; any replica can load any context, and answers the
same tokens. Header `x-needle-replica: N` pins a request to replica N (draining, tests).

    serve run examples.ray-serve.app:app   # or: python examples/ray-serve/app.py
Settings: NEEDLE_MODEL (default "default"), NEEDLE_REPLICAS (2), NEEDLE_CONTEXT_DIR.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

import needle

# A context id is hex: it names a file, never a path.
_ID_CHARS = set("0123456789abcdef")


def context_id(body: dict[str, Any]) -> str:
    """The same document and settings give the same id (a second prefill is skipped)."""
    key = json.dumps(
        {k: body.get(k) for k in ["document", "selector", "context_tokens", "chat", "system", "kv"]},
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
class NeedleReplica:
    """One replica: one model, the contexts it has loaded (read from the shared directory)."""

    def __init__(self, model: str, context_dir: str, index: int, max_contexts: int = 16):
        self.model_name = model
        self.model = needle.Model.load(model)
        self.dir = Path(context_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.max_contexts = max_contexts
        self.contexts: dict[str, needle.Context] = {}

    def _context(self, cid: str) -> needle.Context:
        if not cid or not set(cid) <= _ID_CHARS:
            raise ValueError(f"context {cid!r}: not a context id")
        ctx = self.contexts.pop(cid, None)
        if ctx is None:
            path = self.dir / f"{cid}.needle"
            if not path.exists():
                raise FileNotFoundError(f"context {cid}: no such context (POST /v1/contexts first)")
            ctx = needle.Context.load(path, self.model)
        self.contexts[cid] = ctx  # most recently used last
        while len(self.contexts) > self.max_contexts:
            self.contexts.pop(next(iter(self.contexts)))
        return ctx

    def prefill(self, body: dict[str, Any]) -> dict[str, Any]:
        cid = context_id(body)
        path = self.dir / f"{cid}.needle"
        if not path.exists():
            ctx = self.model.prefill(
                body["document"],
                selector=body.get("selector", "auto"),
                chat=bool(body.get("chat", False)),
                system=body.get("system"),
                context_tokens=body.get("context_tokens"),
                kv=body.get("kv"),
            )
            try:
                ctx.save(path)  # atomic; a replica that raced us to it already wrote the same
            except needle.NeedleError:
                if not path.exists():
                    raise
        ctx = self._context(cid)
        return {"id": cid, "object": "context", "tokens": ctx.tokens, "selector": ctx.selector, "replica": self.index}

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        opts = dict(
            max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 0.0)),
            top_p=body.get("top_p"),
            seed=int(body.get("seed", 0)),
            stop=[body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop"),
        )
        cid = body.get("context")
        if cid:
            out = self._context(cid).ask(body.get("prompt") or None, **opts).result()
        else:
            out = self.model.generate(body["prompt"], chat=bool(body.get("chat", False)), **opts).result()
        n = len(out["token_ids"])
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": out["text"],
                    "logprobs": None,
                    "finish_reason": "length" if out["stop_reason"] == "max_tokens" else "stop",
                }
            ],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": n, "total_tokens": out["prompt_tokens"] + n},
            "needle": {
                "replica": self.index,
                "context": cid,
                "token_ids": out["token_ids"],
                "selector": out["selector"],
                "share_of_keys_touched": out["share_of_keys_touched"],
                "context_load_seconds": out["context_load_seconds"],
                "decode_tokens_per_second": out["decode_tokens_per_second"],
            },
        }

    def loaded(self) -> dict[str, Any]:
        return {"replica": self.index, "pid": os.getpid(), "contexts": sorted(self.contexts)}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Router:
    """The HTTP ingress: sends each request about a context to the replica that holds it."""

    def __init__(self, model: str, *replicas):
        self.model_name = model
        self.replicas = list(replicas)
        self.holder: dict[str, int] = {}
        self.turn = itertools.cycle(range(len(self.replicas)))

    def route(self, request: Request, cid: str | None) -> int:
        pinned = request.headers.get("x-needle-replica")
        if pinned is not None:
            i = int(pinned)
            if not 0 <= i < len(self.replicas):
                raise ValueError(f"x-needle-replica {i}: there are {len(self.replicas)} replicas")
            return i
        if cid is None:
            return next(self.turn)
        if cid in self.holder:
            return self.holder[cid]
        return int(cid[:8], 16) % len(self.replicas) if set(cid) <= _ID_CHARS else 0

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        try:
            if request.method == "GET" and path.endswith("/v1/models"):
                return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model"}]})
            if request.method == "GET" and path.endswith("/v1/replicas"):
                return JSONResponse([await r.loaded.remote() for r in self.replicas])
            body = await request.json()
            if request.method == "POST" and path.endswith("/v1/contexts"):
                i = self.route(request, None)
                out = await self.replicas[i].prefill.remote(body)
                self.holder.setdefault(out["id"], i)
                return JSONResponse(out)
            if request.method == "POST" and path.endswith("/v1/completions"):
                cid = body.get("context")
                i = self.route(request, cid)
                out = await self.replicas[i].complete.remote(body)
                if cid:
                    self.holder.setdefault(cid, i)
                return JSONResponse(out)
            return JSONResponse({"error": {"message": f"no route {request.method} {path}"}}, status_code=404)
        except FileNotFoundError as e:
            return JSONResponse({"error": {"message": str(e), "type": "not_found"}}, status_code=404)
        except (ValueError, KeyError, needle.NeedleError) as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)


def build(model: str = "default", replicas: int = 2, context_dir: str | None = None):
    """The application: `replicas` NeedleReplica deployments behind one Router."""
    context_dir = context_dir or os.path.expanduser("~/.cache/needle/contexts")
    handles = [
        NeedleReplica.options(name=f"needle-{i}").bind(model, context_dir, i) for i in range(replicas)
    ]
    return Router.bind(model, *handles)


app = build(
    os.environ.get("NEEDLE_MODEL", "default"),
    int(os.environ.get("NEEDLE_REPLICAS", "2")),
    os.environ.get("NEEDLE_CONTEXT_DIR"),
)

if __name__ == "__main__":
    serve.run(app, route_prefix="/")
    print("needle on Ray Serve: http://127.0.0.1:8000/v1/completions (Ctrl-C to stop)")
    while True:
        time.sleep(3600)
