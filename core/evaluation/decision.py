"""The decision (fourth edition): choose the initial prompt among candidates by what a short tune makes of each.

A frozen-feature objective (the H-score) ranks mixtures differently from what tuning makes of them on targets the
method was not designed on (docs/METHOD_NOTES.md, "Fourth edition"). So the candidates a rule produces (the best
single source by the objective, the learned mixture, the uniform point, the task-arithmetic sum, ...) are each
tuned briefly on the target's train split (the full recipe's settings, a few epochs of their own schedule) and
judged on its validation split; the chosen candidate is then tuned in full. This optimises what is judged, not a
proxy, as AdaMerging (Yang et al., ICLR 2024: coefficients learned by a loss on target data) and LoraHub (Huang et
al., 2023: few-shot loss, no gradients) do. **Ours**: the candidates, the short schedule and the tie rule.

Two ways to run it, one rule (:func:`choose`):

- :func:`decide` on the objects in hand (one target, one split): short-tunes every distinct candidate in this
  process;
- the evaluation protocol (:mod:`core.evaluation.protocol`): a ``decide`` method of the registry names its
  candidates (other methods) and its short schedule; the short tunes are jobs like any tune, deduplicated by their
  initial prompt and settings (:func:`short_jobs`), and the decision's full tune is the chosen candidate's full tune:
  the same initial prompt, so the same job (:func:`with_choices`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import StopRequested, UserInputError
from ..io.digest import settings_digest, tensor_digest
from ..method.ensemble import CHOOSERS
from ..tuning.tune import TuneConfig, tune_prompt
from .methods import METHODS
from .protocol import init_id, setup_key
from .sweep import Job

#: The full tuning recipe the decision is measured with (``bench/quality.py --full``: 20 epochs, prompt lr 1e-2, the
#: last epoch), key for key as bench/decision.py runs it.
FULL_RECIPE = {"epochs": 20, "optimizer": "adamw", "lr": 1e-2, "head_lr": 1e-3, "weight_decay": 1e-4,
               "head_init": "probe", "batch_size": 64, "warmup": 0.1, "select": "last"}
#: The short schedule a ``decide`` method uses unless it names another: one epoch of the full recipe's settings,
#: judged at its end. Chosen among 1, 2, 3 and 5 epochs by bench/decision.py (docs/METHOD_NOTES.md, "Fourth
#: edition"): one epoch ranked the candidates closest to their full tunes and chose best on the seeds below; the
#: other seeds are its held-out check (bench/report.py prints it).
SHORT = {"epochs": 1, "select": "last"}
SHORT_CHOSEN_ON_SEEDS = (0, 1, 2)


def choose(scores: dict[str, float], order: Sequence[str], margin: float = 0.0) -> str:
    """The candidate to keep: the one with the highest score (validation accuracy after the short tune), unless it
    beats the first candidate of ``order`` (the safe choice: the best single source by the objective) by no more
    than ``margin``; equal scores keep the earlier candidate. ``scores`` may lack candidates (not tuned), never the
    first."""
    if not order or order[0] not in scores:
        raise UserInputError(f"the decision needs a score for its first candidate {order[0] if order else None!r}; "
                             f"got scores for {sorted(scores)}.")
    ranked = [c for c in order if c in scores]
    best = max(ranked, key=lambda c: (scores[c], -ranked.index(c)))
    return best if scores[best] > scores[order[0]] + margin else order[0]


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` returns: the chosen candidate, every candidate's short-tune validation (and test, for the
    record: the decision never reads it) accuracy, and the seconds the short tunes took."""

    chosen: str
    val_acc: dict[str, float]
    test_acc: dict[str, float] = field(default_factory=dict)
    same_as: dict[str, str] = field(default_factory=dict)  # candidate -> the earlier candidate with the same prompt
    seconds: float = 0.0


def decide(model, task, candidates: dict[str, torch.Tensor | str | None], config, margin: float = 0.0,
           callback: Callable[[dict[str, Any]], None] | None = None, should_stop: Any = None) -> Decision:
    """Short-tune every distinct candidate on ``task``'s train split and choose by its validation split.

    ``candidates``: name -> initial prompt ``(T, D)`` / ``(depth, T, D)`` (or ``"random"``, or None for a linear
    probe), in order of preference: the first is kept unless another scores higher by more than ``margin``.
    Candidates with equal prompts are tuned once. ``config``: the short schedule, a
    :class:`core.tuning.tune.TuneConfig` (for example the full recipe with ``epochs=2, select="last"``)."""
    if not candidates:
        raise UserInputError("give at least one candidate initial prompt to decide among.")
    t0 = time.perf_counter()
    seen: dict[str, str] = {}
    same_as: dict[str, str] = {}
    val, test = {}, {}
    for name, prompt in candidates.items():
        ident = prompt if isinstance(prompt, str) or prompt is None else tensor_digest(prompt)
        ident = str(ident)
        if ident in seen:
            same_as[name] = seen[ident]
            val[name], test[name] = val[seen[ident]], test[seen[ident]]
            continue
        seen[ident] = name
        cb = None if callback is None else (lambda info, n=name: callback({"candidate": n, **info}))
        r = tune_prompt(model, task, prompt, config, callback=cb, should_stop=should_stop, train_accuracy=False)
        if r.stopped:
            raise StopRequested()
        val[name], test[name] = r.val_acc, r.test_acc
    order = list(candidates)
    return Decision(choose(val, order, margin), val, test, same_as, time.perf_counter() - t0)


@CHOOSERS.register("short_tune", help="tune each candidate for one epoch of the full recipe on the task's train "
                   "split and keep the best on its validation split (the best single source on ties)",
                   epochs=SHORT["epochs"])
def short_tune_choice(model, task, prompts: dict[str, torch.Tensor], *, seed: int, precision: str,
                      should_stop: Any = None) -> Decision:
    """The estimator's ``choose_by="short_tune"``: :func:`decide` with the decision's short schedule (:data:`SHORT`
    of :data:`FULL_RECIPE`) at the fit's seed and precision."""
    config = TuneConfig(**{**FULL_RECIPE, **SHORT}, seed=seed, precision=precision)
    return decide(model, task, prompts, config, should_stop=should_stop)


# ------------------------------------------------------------- the protocol
def candidate_init(name: str, names: list[str], weights_result: dict[str, Any]):
    """The initial prompt of candidate method ``name`` on one (target, seed), as the protocol gives it: a weights
    method's weights (or rule), the single source with the highest H-score for ``best_hscore``, ``"random"`` or None
    for the fixed methods."""
    method = METHODS[name]
    if method.kind == "weights":
        return weights_result["weights"][name]
    if method.kind == "fixed":
        return "random" if method.init == "random" else None
    if method.kind == "select" and method.choose == "hscore":
        hs = weights_result["source_hscores"]
        return np.eye(len(names))[names.index(max(names, key=lambda n: hs[n]))].tolist()
    raise UserInputError(f"{name} cannot be a candidate of a decision: its prompt is chosen after tuning; use a "
                         "weights or fixed method, or best_hscore.")


def short_tune(protocol, method) -> dict[str, Any]:
    """The short schedule of a ``decide`` method: the protocol's recipe with the method's ``short`` overrides."""
    return {**protocol.tune, **(method.short or SHORT)}


def short_jobs(setup, targets, protocol, bank, weights: dict[tuple, dict],
               short: dict[str, Any] | None = None) -> tuple[list[Job], dict]:
    """The short tunes of the protocol's ``decide`` methods (deduplicated by initial prompt and settings, keyed as
    any tune, so a short schedule equal to the full recipe is the full tune's job) and, per (target, seed), which
    job each (decide method, candidate) reads. ``short``: TuneConfig overrides in place of each method's own (a
    benchmark comparing schedules)."""
    names, stack, start = list(bank.names), bank.stack(), getattr(bank, "start", None)
    jobs: dict[str, Job] = {}
    plan: dict[tuple, dict] = {}
    for m in [m for m in protocol.methods if METHODS[m].kind == "decide"]:
        method = METHODS[m]
        tune = {**protocol.tune, **short} if short is not None else short_tune(protocol, method)
        digest = settings_digest(setup_key(setup), tune)
        for t in targets:
            for s in protocol.seeds:
                if (t, s) not in weights:
                    continue
                for c in method.candidates:
                    init = candidate_init(c, names, weights[(t, s)])
                    key = f"tune/{t}/{s}/{init_id(init, stack, start)}/{digest}"
                    plan.setdefault((t, s), {}).setdefault(m, {})[c] = key
                    job = jobs.setdefault(key, Job(key, {"kind": "tune", "setup": setup, "target": t, "seed": s,
                                                         "tune": tune, "init": init, "key": key, "methods": []}))
                    job.payload["methods"].append(f"{m}:{c}")
    return list(jobs.values()), plan


def with_choices(protocol, names: list[str] | dict[str, list[str]], weights: dict[tuple, dict],
                 shorts: dict[str, dict], plan: dict[tuple, dict]) -> dict[tuple, dict]:
    """``weights`` with every ``decide`` method's choice added, per (target, seed): its initial prompt under
    ``weights`` (so its full tune is the chosen candidate's) and what it saw under ``decisions``. A (target, seed)
    whose short tunes did not all finish (a stopped evaluation) gets no choice. ``names``: the bank's sources, or
    each target's (a leave-one-out study gives every target its own bank)."""
    out = {}
    for ts, w in weights.items():
        w = {**w, "weights": dict(w["weights"]), "decisions": dict(w.get("decisions", {}))}
        for m, keys in plan.get(ts, {}).items():
            if not all(k in shorts for k in keys.values()):
                continue
            method = METHODS[m]
            val = {c: shorts[k]["val_acc"] for c, k in keys.items()}
            chosen = choose(val, list(method.candidates), method.margin)
            w["weights"][m] = candidate_init(chosen, names[ts[0]] if isinstance(names, dict) else names, w)
            w["decisions"][m] = {"chosen": chosen, "val_acc": val,
                                 "test_acc": {c: shorts[k]["test_acc"] for c, k in keys.items()},
                                 "jobs": keys, "seconds": sum(shorts[k]["seconds"] for k in set(keys.values()))}
        out[ts] = w
    return out
