"""Building source prompts: every source tuned from one shared start ``P0``, recorded with the bank.

The start is VPT's random initialisation drawn from a seed (:func:`shared_start`); the bank records how it was made
(``core.io.prompt_bank``), so each source's task vector ``P_k - P0`` is defined and :func:`verify_start` can make it
again and compare. A source prompt must be a *tuned* prompt: one that did not move from its start is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import UserInputError
from ..io.prompt_bank import SAME, PromptBank, SourcePrompt
from .tune import TuneConfig, random_prompt, tune_prompt

START_RULE = "vpt_uniform"


def shared_start(model, num_tokens: int, deep: bool, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """VPT's random initialisation for ``seed`` (what a tune from ``"random"`` with that seed starts from), and the
    record of how it was made."""
    start = random_prompt(model, num_tokens, deep, torch.Generator().manual_seed(int(seed)))
    return start, {"rule": START_RULE, "seed": int(seed), "num_tokens": int(num_tokens), "deep": bool(deep),
                   "backbone_fingerprint": model.fingerprint}


def verify_start(bank: PromptBank, model) -> None:
    """Refuse a bank whose recorded start is not what its recipe makes on ``model`` (a wrong ``P0``)."""
    info = bank.start_info
    if bank.start is None:
        return
    if info.get("rule") != START_RULE:
        raise UserInputError(f"the bank's start was made by {info.get('rule')!r}, which this version cannot remake.")
    again, _ = shared_start(model, info["num_tokens"], info["deep"], info["seed"])
    if not torch.equal(again, bank.start):
        raise UserInputError(f"the bank's start is not VPT's initialisation for seed {info['seed']} on this backbone "
                             f"(fingerprint {model.fingerprint}): its task vectors would be measured from the wrong "
                             "point. Rebuild the bank on this backbone.")


def build_source_prompt(model, task, config: TuneConfig | None = None, name: str | None = None, callback=None,
                        should_stop=None, start: torch.Tensor | None = None):
    """Tune a prompt on a source task, from ``start`` (default: VPT's random initialisation for ``config.seed``),
    and wrap it as a :class:`SourcePrompt`; refused when the tuned prompt did not move from its start (with
    ``select="val"`` validation can keep epoch 0; the bank builder reports each source at its last epoch)."""
    config = config or TuneConfig()
    init = "random" if start is None else start.detach().float().clone()
    res = tune_prompt(model, task, init, config, callback=callback, should_stop=should_stop)
    begin = start if start is not None else shared_start(model, config.num_tokens, config.deep, config.seed)[0]
    if res.stopped:
        raise UserInputError(f"tuning the source prompt of {task.name!r} was stopped; nothing was saved.")
    if float((res.prompt - begin).norm()) <= SAME * float(begin.norm()):
        raise UserInputError(
            f"the prompt tuned on {task.name!r} did not move from its start (selected epoch {res.best_epoch}"
            + (", the untuned start" if res.best_epoch == 0 else "") + "): it would carry nothing of its task. Tune "
            "longer or with a larger lr, and report the last epoch (select='last').")
    sp = SourcePrompt(
        name=name or task.name,
        prompt=res.prompt,
        source_task=task.name,
        backbone=model.name,
        backbone_fingerprint=model.fingerprint,
        source_accuracy=res.test_acc,
        train_config={**config.to_dict(), "val_acc": res.val_acc, "best_epoch": res.best_epoch},
    )
    return sp, res
