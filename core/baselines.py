"""The methods compared with HGPrompt, each run by name on the same split, seed and budget.

| name | initial target prompt |
|---|---|
| ``random`` | VPT random initialisation (no transfer) |
| ``linear_probe`` | no prompt; only a linear head on the frozen features |
| ``uniform`` | the uniform average of all source prompts (naive aggregation) |
| ``best_hscore`` | the single source with the highest target H-score (SPoT-style) |
| ``oracle`` | the single source with the best final *validation* accuracy (tunes from every source) |
| ``h_proportional`` | weights proportional to each source's target H-score (H-ensemble) |
| ``hgprompt_h_only`` | HGPrompt weights with lambda = 0 |
| ``hgprompt`` | HGPrompt weights, the default (``fishr``) regulariser |
| ``hgprompt_conflict`` | HGPrompt weights, raw gradient-conflict regulariser |
| ``hgprompt_interference`` | HGPrompt weights, measured mixing-loss regulariser |

Every method is then tuned by :func:`core.tuning.tune_prompt` with the same
:class:`TuneConfig`; only the initialisation differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .ensemble import HGPromptEnsemble, combine_prompts
from .errors import UserInputError
from .features import source_hscores
from .tuning import TuneConfig, tune_prompt

METHODS = (
    "random",
    "linear_probe",
    "uniform",
    "best_hscore",
    "oracle",
    "h_proportional",
    "hgprompt_h_only",
    "hgprompt",
    "hgprompt_conflict",
    "hgprompt_interference",
)
REGULARIZER_OF = {"hgprompt": "fishr", "hgprompt_h_only": "fishr", "hgprompt_conflict": "conflict",
                  "hgprompt_interference": "interference"}


@dataclass
class MethodResult:
    method: str
    seed: int
    test_acc: float
    val_acc: float
    weights: list[float] | None = None  # over the bank's sources, where the method has weights
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "test_acc": self.test_acc, "val_acc": self.val_acc,
                "weights": self.weights, **self.details}


def check_methods(methods) -> list[str]:
    methods = list(METHODS) if methods in (None, "all", ["all"]) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserInputError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} or 'all'.")
    return methods


def run_method(
    method: str,
    model,
    bank,
    task,
    tune_config: TuneConfig | None = None,
    ensemble_params: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Any = None,
) -> MethodResult:
    """Initialise the target prompt by ``method`` and tune it; the seed is ``tune_config.seed``."""
    check_methods([method])
    cfg = tune_config or TuneConfig()
    params = {**(ensemble_params or {}), "seed": cfg.seed}
    stack = bank.stack()
    weights: torch.Tensor | None = None
    details: dict[str, Any] = {}
    if method == "random":
        init: Any = "random"
        cfg = TuneConfig(**{**cfg.to_dict(), "num_tokens": stack.shape[-2], "deep": stack.dim() == 4})
    elif method == "linear_probe":
        init = None
    elif method == "uniform":
        weights = torch.full((len(bank),), 1.0 / len(bank))
    elif method in ("best_hscore", "h_proportional"):
        from .h_score import resolve_n_samples

        n = resolve_n_samples(params.get("n_samples", "auto"), model.embed_dim, len(task.splits["train"]))
        x, y = task.sample(model, "train", n, cfg.seed)
        hs = source_hscores(model, x, y, stack, params.get("h_variant", "shrinkage"))
        details["source_hscores"] = hs.tolist()
        if method == "best_hscore":
            weights = torch.zeros(len(bank))
            weights[int(np.argmax(hs))] = 1.0
            details["chosen"] = bank.names[int(np.argmax(hs))]
        else:
            pos = np.clip(hs, 0, None)
            weights = torch.as_tensor(pos / pos.sum() if pos.sum() > 0 else np.full(len(hs), 1 / len(hs)), dtype=torch.float32)
    elif method == "oracle":
        per_source = {}
        best = None
        for i, sp in enumerate(bank):
            res = tune_prompt(model, task, sp.prompt, cfg, callback=callback, should_stop=should_stop)
            per_source[sp.name] = {"test_acc": res.test_acc, "val_acc": res.val_acc}
            if best is None or res.val_acc > best[1].val_acc:  # selected on validation, never on test
                best = (i, res)
        i, res = best
        w = [0.0] * len(bank)
        w[i] = 1.0
        return MethodResult(method, cfg.seed, res.test_acc, res.val_acc, w,
                            {"chosen": bank.names[i], "per_source": per_source})
    else:
        lam = 0.0 if method == "hgprompt_h_only" else params.get("lam", 1.0)
        reg = params.get("regularizer", "fishr") if method == "hgprompt" else REGULARIZER_OF[method]
        ens_kw = {k: v for k, v in params.items() if k not in ("lam", "regularizer")}
        ens = HGPromptEnsemble(lam=lam, regularizer=reg, **ens_kw).fit(model, bank, task=task, should_stop=should_stop)
        weights = torch.as_tensor(ens.weights_, dtype=torch.float32)
        details["source_hscores"] = ens.source_hscores_.tolist()
        details["ensemble_hscore"] = ens.ensemble_hscore_
    if weights is not None:
        init = combine_prompts(weights, stack)
    res = tune_prompt(model, task, init, cfg, callback=callback, should_stop=should_stop)
    return MethodResult(method, cfg.seed, res.test_acc, res.val_acc,
                        None if weights is None else [float(w) for w in weights], details)


def run_baselines(
    model, bank, task, methods=None, seeds=(0,), tune_config: TuneConfig | None = None,
    ensemble_params: dict[str, Any] | None = None, progress: Callable[[str, int], None] | None = None,
    should_stop: Any = None,
) -> list[MethodResult]:
    """Run each of ``methods`` (default: all) for each seed; the same split and budget for all."""
    methods = check_methods(methods)
    cfg = tune_config or TuneConfig()
    results = []
    for seed in seeds:
        for m in methods:
            if progress:
                progress(m, seed)
            seeded = TuneConfig(**{**cfg.to_dict(), "seed": int(seed)})
            results.append(run_method(m, model, bank, task, seeded, ensemble_params, should_stop=should_stop))
    return results
