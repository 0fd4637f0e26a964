"""The methods an evaluation compares: one registry entry each, read by the CLI, the dashboard and the Ray sweep.

A method is a way to make the target prompt's initialisation; every method is then tuned by
:func:`core.tuning.tune.tune_prompt` with the same recipe, on the same split and seed. Three kinds:

- ``fixed``: made without the sources (VPT's random initialisation; no prompt at all, a linear probe);
- ``weights``: mixing weights over the sources computed on the target's train sample (the uniform average,
  H-proportional weights, HGPrompt and its ablations: a fit of :class:`core.method.ensemble.HGPromptEnsemble` with
  some parameters overridden);
- ``select``: one single source, chosen from the single-source tunes (by H-score, by validation accuracy, or by test
  accuracy: the last one an upper bound, not a method);
- ``decide``: one of other methods' initial prompts (its ``candidates``), chosen by the validation accuracy of a
  short tune of each (:mod:`core.evaluation.decision`); its full tune is the chosen candidate's.

Adding a method is adding one entry to :data:`METHODS` (a :class:`core.registry.Registry`); it then appears in
``python -m core baselines --methods``, in the dashboard's Tuning tab and in ``bench/quality.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from ..errors import UserInputError
from ..registry import Registry

Kind = Literal["fixed", "weights", "select", "decide"]


@dataclass(frozen=True)
class WeightsContext:
    """What a weights method sees on one (target, seed): the sources' names and H-scores on the fit's sample,
    ``fit(overrides)``, which fits HGPrompt on that sample with the given parameters changed (the fits share one
    source pass), and whether the bank records its shared start (task arithmetic and TIES need it)."""

    names: list[str]
    source_hscores: np.ndarray  # (K,)
    fit: Callable[[dict[str, Any]], Any]
    has_start: bool = False


#: An initial prompt, as a weights method gives it: the paper's average (a list of weights over the sources), or a
#: rule ``{"rule": "task_arithmetic", "coef": [...]}`` / ``{"rule": "ties", "density": d}`` (core.method.mixing).
Init = list | dict


@dataclass(frozen=True)
class Method:
    """One method of the comparison."""

    name: str
    help: str
    kind: Kind
    init: Literal["random", "none"] | None = None  # fixed methods: the initial prompt
    weights: Callable[[WeightsContext], Init] | None = None  # weights methods: the initial prompt
    needs: frozenset[str] = field(default_factory=frozenset)  # "start": the bank must record its shared start
    choose: Literal["hscore", "val", "test"] | None = None  # select methods: the single source with the best of these
    all_singles: bool = False  # select methods: chosen among every single source (not only the best by H-score)
    upper_bound: bool = False  # chosen on test: a bound to compare with, not a method
    candidates: tuple[str, ...] = ()  # decide methods: the methods whose initial prompts it chooses among, safest first
    # decide methods: TuneConfig overrides of the short tunes (None: decision.SHORT)
    short: dict[str, Any] | None = None
    margin: float = 0.0  # decide methods: how much a candidate's short-tune val accuracy must beat the first one's
    fit: dict[str, Any] | None = None  # weights methods that fit HGPrompt: the parameters they change

    def __post_init__(self) -> None:
        if self.fit is not None and self.weights is None:
            object.__setattr__(self, "weights", _hgprompt(self.fit))


def _uniform(ctx: WeightsContext) -> list[float]:
    k = len(ctx.names)
    return [1.0 / k] * k


def _h_proportional(ctx: WeightsContext) -> list[float]:
    pos = np.clip(ctx.source_hscores, 0, None)
    k = len(pos)
    return (pos / pos.sum() if pos.sum() > 0 else np.full(k, 1.0 / k)).tolist()


def _hgprompt(overrides: dict[str, Any]) -> Callable[[WeightsContext], Init]:
    def weights(ctx: WeightsContext) -> Init:
        ens = ctx.fit(overrides)
        w = ens.weights_.tolist()
        return w if ens.mixing == "average" else {"rule": ens.mixing, "coef": w}

    return weights


def _task_arithmetic_sum(ctx: WeightsContext) -> Init:
    return {"rule": "task_arithmetic", "coef": [1.0] * len(ctx.names)}


def _ties(ctx: WeightsContext) -> Init:
    return {"rule": "ties", "density": 0.2}


METHODS: Registry = Registry("method")
for _m in (
    Method("random", "VPT from its random initialisation (no transfer)", "fixed", init="random"),
    Method("linear_probe", "no prompt: a linear head on the frozen features", "fixed", init="none"),
    Method("uniform", "the uniform average of the source prompts (naive aggregation)", "weights", weights=_uniform),
    Method("h_proportional", "weights proportional to each source's target H-score (H-ensemble)", "weights",
           weights=_h_proportional),
    Method("best_hscore", "the single source with the highest target H-score (SPoT-style selection)", "select",
           choose="hscore"),
    Method("oracle", "the single source with the best validation accuracy after tuning", "select", choose="val",
           all_singles=True),
    Method("oracle_test", "the single source with the best test accuracy (an upper bound, chosen on test)", "select",
           choose="test", all_singles=True, upper_bound=True),
    Method("hgprompt_h_only", "HGPrompt with lambda = 0 (the H-score alone)", "weights", fit={"lam": 0.0}),
    Method("hgprompt", "HGPrompt with the settings given (default: the fishr regulariser, lambda 1)", "weights",
           fit={}),
    Method("hgprompt_conflict", "HGPrompt with the raw gradient-conflict regulariser", "weights",
           fit={"regularizer": "conflict"}),
    Method("hgprompt_interference", "HGPrompt with the measured mixing-loss regulariser", "weights",
           fit={"regularizer": "interference"}),
    Method("task_arithmetic_sum", "the full-strength sum of the task vectors, P0 + sum_k (P_k - P0) (Ilharco et al.)",
           "weights", weights=_task_arithmetic_sum, needs=frozenset({"start"})),
    Method("ties", "TIES-Merging of the task vectors: trim to 20 %, elect signs, disjoint mean (Yadav et al.)",
           "weights", weights=_ties, needs=frozenset({"start"})),
    Method("hgprompt_ta", "HGPrompt with the task-arithmetic rule: weights in [0, 1] on the task vectors", "weights",
           fit={"mixing": "task_arithmetic"}, needs=frozenset({"start"})),
    Method("hgprompt_ta_h_only", "HGPrompt with the task-arithmetic rule and lambda = 0 (the H-score alone)", "weights",
           fit={"mixing": "task_arithmetic", "lam": 0.0}, needs=frozenset({"start"})),
    Method("hgprompt_logme", "HGPrompt maximising LogME instead of the H-score", "weights", fit={"objective": "logme"}),
    Method("hgprompt_transrate", "HGPrompt maximising TransRate instead of the H-score", "weights",
           fit={"objective": "transrate"}),
    Method("hgprompt_probe_ll", "HGPrompt maximising a cross-validated probe log-likelihood", "weights",
           fit={"objective": "probe_ll"}),
    Method("hgprompt_ta_probe_ll", "HGPrompt with the task-arithmetic rule and the probe log-likelihood", "weights",
           fit={"mixing": "task_arithmetic", "objective": "probe_ll"}, needs=frozenset({"start"})),
    Method("hgprompt_decide", "the best single source by H-score, the mixture task arithmetic learns at lambda 0, the "
           "uniform point or the full task-arithmetic sum, whichever a short tune (1 epoch) makes best on validation",
           "decide", candidates=("best_hscore", "hgprompt_ta_h_only", "uniform", "task_arithmetic_sum"),
           needs=frozenset({"start"})),
):
    METHODS.add(_m.name, _m, help=_m.help, kind=_m.kind)
#: What ``python -m core baselines``, the dashboard and ``bench/quality.py`` compare unless told otherwise.
DEFAULT_METHODS = ("random", "linear_probe", "uniform", "h_proportional", "best_hscore", "oracle", "oracle_test",
                   "hgprompt_h_only", "hgprompt")
#: The method every other is compared with in the paired summaries.
REFERENCE = "hgprompt"


def check_methods(methods) -> list[str]:
    """Method names in the registry's order; ``None`` or ``"all"`` for every method."""
    if methods is None or methods == "all" or list(methods) == ["all"]:
        return list(METHODS)
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserInputError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} or 'all'.")
    return [m for m in METHODS if m in methods]


def describe() -> str:
    """One line per method, for a help text."""
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
