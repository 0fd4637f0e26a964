"""What a sweep's workers load: a setup spec names a backbone, a bank and targets, loaded once per process.

- ``{"kind": "embedded"}``: the embedded default (``assets/``), every shipped target;
- ``{"kind": "toy"}``: the tiny random ViT, its random bank and two synthetic targets (:mod:`core.model.toy`),
  the protocol in seconds, for the tests and ``bench/quality.py --quick``.
"""
from __future__ import annotations

from typing import Any

from ..errors import UserInputError

_LOADED: dict[str, Any] = {}


def load_setup(spec: dict[str, Any]):
    """``(model, bank, {target name: Task})`` for a setup spec, cached per process (Ray reuses its workers)."""
    key = repr(sorted(spec.items()))
    if key not in _LOADED:
        kind = spec.get("kind")
        if kind == "toy":
            _LOADED[key] = _toy()
        elif kind == "embedded":
            _LOADED[key] = _embedded()
        else:
            raise UserInputError(f"unknown setup kind {kind!r}; use 'embedded' or 'toy'.")
    return _LOADED[key]


def _embedded():
    from ..io import assets
    from ..io.prompt_bank import PromptBank
    from ..io.tasks import Task
    from ..model.prompted_vit import PromptedViT

    assets.require()
    model = PromptedViT.from_directory(assets.BACKBONE_DIR)
    bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
    return model, bank, {t: Task.load(assets.task_path(t)) for t in assets.shipped_tasks("target")}


def _toy():
    from ..model.toy import toy_bank, toy_model, toy_targets

    model = toy_model()
    return model, toy_bank(model), toy_targets()
