"""Watching a backbone's passes: stop within one block, and hear how far a pass has gone.

A long computation (a fit's source pass, an interference measurement, a plane of prompts) spends most of its time
inside a few very large forward and backward passes; a stop flag polled between them can leave a click unanswered
for a minute. :func:`watched` hooks the backbone instead (``torch.nn.Module.register_forward_hook`` on the patch
embedding and every block, and a tensor hook on each block's output when it requires grad, which fires during the
backward): at every block, forward or backward, it polls the stop flag and raises :class:`core.errors.StopRequested`,
and reports ``{"pass": "forward" | "backward" | "embed", "block": i, "depth": depth, "rows": B}`` to ``progress``.

The hooks act only on the thread that opened the context (the model is shared: a dashboard serves other sessions
from the same backbone while a job runs), and every hook is removed when the context ends, even on an error.
The last block of a class-token-pooled ViT runs as its class-token shortcut, not as a module call
(``PromptedViT.forward_rows``), so the final norm stands in for it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..control import stop_flag
from ..errors import StopRequested

Progress = Callable[[dict[str, Any]], None]


@contextmanager
def watched(model, should_stop: Any = None, progress: Progress | None = None) -> Iterator[None]:
    """Within the ``with`` body, every block of ``model`` (a :class:`PromptedViT`) polls ``should_stop`` (a callable
    or a ``threading.Event``) and reports to ``progress(info)``, forward and backward. Contexts nest: a fit that
    watches for its stop flag inside a job that watches for progress hears both. A model without a timm backbone is
    not watched."""
    stop = stop_flag(should_stop)
    vit = getattr(model, "backbone", None)
    if vit is None or not hasattr(vit, "blocks"):  # a stand-in model (tests): nothing to hook
        yield
        return
    blocks = list(vit.blocks)
    depth = len(blocks)
    owner = threading.get_ident()

    def tick(kind: str, block: int, rows: int) -> None:
        if stop():
            raise StopRequested()
        if progress is not None:
            progress({"pass": kind, "block": block, "depth": depth, "rows": rows})

    def on_backward(block: int):
        def hook(grad: torch.Tensor) -> None:  # runs on autograd's thread for the graph this context built
            tick("backward", block, int(grad.shape[0]) if grad.dim() else 1)
        return hook

    def on_forward(block: int, kind: str = "forward"):
        def hook(module, args, output) -> None:
            if threading.get_ident() != owner:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            rows = int(out.shape[0]) if isinstance(out, torch.Tensor) and out.dim() else 1
            tick(kind, block, rows)
            if kind == "forward" and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(on_backward(block))
        return hook

    modules = [(vit.patch_embed, 0, "embed")] + [(blk, i + 1, "forward") for i, blk in enumerate(blocks[:-1])]
    modules.append((vit.norm, depth, "forward"))  # after the last block, however it ran
    handles = [m.register_forward_hook(on_forward(i, kind)) for m, i, kind in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
