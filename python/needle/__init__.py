"""needle for Python: long-context LLM inference with retrieval attention.

Models and saved contexts::

    import needle
    model = needle.Model.load("default")
    for piece in model.generate("The capital of France is", max_tokens=16):
        print(piece, end="")
    ctx = model.prefill(needle.default_document(), context_tokens=4000, chat=True)
    print(ctx.ask("Whom did God tell to build the ark?").text)
    ctx.save("bible.needle")

needle's retrieval on numpy arrays (read in place, the GIL released while it computes)::

    index = needle.Index.build(keys, train_queries, "RoarGraph32")
    ids, scores = index.search(queries, k=100)
    sel = needle.Selector.from_spec("quest:k=256")
    sel.build(keys)
    ids, log_weights = sel.select(queries, keys)

Errors are ``needle.NeedleError`` with needle's message. See docs/python.md.
"""

from ._needle import (
    Context,
    Generation,
    Index,
    Model,
    NeedleError,
    Selector,
    __version__,
    default_document,
    index_names,
    selector_names,
)

__all__ = [
    "Context",
    "Generation",
    "Index",
    "Model",
    "NeedleError",
    "Selector",
    "__version__",
    "default_document",
    "index_names",
    "selector_names",
]
