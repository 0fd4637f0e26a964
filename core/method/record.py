"""What a fit leaves behind: the record of an :class:`HGPromptEnsemble` fit, written into a run folder and read back.

The CLI writes it (``learn``, ``tune --init hgprompt``); the dashboard writes it and reads every run it shows back
from its folder with :meth:`EnsembleRecord.read`, so a run drawn right after its fit and one drawn after a reload
come from the same code and the same files.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.prompt_bank import SourcePrompt
from ..io.runs import RunWriter, history_csv, load_run
from .ensemble import HGPromptEnsemble

WEIGHTS_FILE = "weights.json"
PROMPT_NAME = "ensemble"


@dataclass
class EnsembleRecord:
    """One fit: the weights over the named sources, what the fit measured, and how it went."""

    names: list[str]
    weights: list[float]
    source_hscores: list[float]
    ensemble_hscore: float
    objective: float
    cosine: np.ndarray | None  # (K, K) raw gradient cosines; None when the fit stopped before its source pass ended
    layer_cosine: np.ndarray | None  # (depth, K, K), deep prompts only
    start: str  # the candidate the optimiser started from
    converged: bool
    stopped: bool
    n_steps: int
    candidates: dict[str, float]
    n_target_samples: int
    history: list[dict[str, Any]]
    prompt: torch.Tensor | None  # the ensembled prompt, (T, D) or (depth, T, D); None when not read
    params: dict[str, Any]  # the estimator's parameters
    seconds: float = 0.0
    shrinkage: float | None = None
    warnings: list[str] = field(default_factory=list)
    fishr_gram: np.ndarray | None = None
    mixing_loss: np.ndarray | None = None

    @classmethod
    def from_fit(cls, ens) -> "EnsembleRecord":
        """The record of a fitted :class:`core.method.ensemble.HGPromptEnsemble`."""
        c = ens.source_pass_  # None: stopped during the source pass
        return cls(
            names=list(ens.names_), weights=ens.weights_.tolist(), source_hscores=ens.source_hscores_.tolist(),
            ensemble_hscore=float(ens.ensemble_hscore_), objective=float(ens.objective_),
            cosine=None if c is None else c.cosine.numpy(),
            layer_cosine=None if c is None or c.layer_cosine is None else c.layer_cosine.numpy(), start=ens.start_,
            converged=bool(ens.converged_), stopped=bool(ens.stopped_), n_steps=int(ens.n_steps_),
            candidates=dict(ens.candidates_), n_target_samples=int(ens.n_target_samples_), history=list(ens.history_),
            prompt=ens.prompt_, params=ens.get_params(), seconds=float(ens.fit_seconds_), shrinkage=ens.shrinkage_,
            warnings=list(ens.warnings_),
            fishr_gram=None if c is None or c.grad_var is None else c.fishr_gram().numpy(),
            mixing_loss=None if c is None or c.mixing_loss is None else c.mixing_loss.numpy(),
        )

    def write(self, run: RunWriter, model) -> None:
        """Into a run folder: ``weights.json``, ``history.json`` / ``.csv`` and the prompt
        (``ensemble.safetensors``)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("history", "prompt", "params")}
        run.write_json(WEIGHTS_FILE, data)
        run.write_json("history.json", self.history)
        run.write_text("history.csv", history_csv(self.history, self.names))
        SourcePrompt(name=PROMPT_NAME, prompt=self.prompt, source_task="hgprompt-ensemble", backbone=model.name,
                     backbone_fingerprint=model.fingerprint, train_config=self.params).save(run.path)

    @classmethod
    def read(cls, path: str | os.PathLike, prompt: bool = True) -> "EnsembleRecord":
        """The record in a complete run folder (refused, by :func:`core.io.runs.load_run`, when incomplete).

        ``prompt=False`` skips the ensembled prompt (``prompt`` is then None), for a list of runs that only compares
        their weights; the parameters then come from the run's ``config.json``."""
        path = os.fspath(path)
        run = load_run(path)
        w = run[WEIGHTS_FILE[:-5]]
        sp = SourcePrompt.load(os.path.join(path, f"{PROMPT_NAME}.safetensors")) if prompt else None
        if sp is not None:
            params = sp.train_config
        else:
            params = {k: run["config"][k] for k in HGPromptEnsemble().get_params() if k in run.get("config", {})}
        seconds = float(w.get("seconds", run.get("metrics", {}).get("seconds", 0.0)))

        def arr(key):
            return None if w.get(key) is None else np.asarray(w[key])

        return cls(
            names=list(w["names"]), weights=list(w["weights"]), source_hscores=list(w["source_hscores"]),
            ensemble_hscore=float(w["ensemble_hscore"]), objective=float(w.get("objective", w["ensemble_hscore"])),
            cosine=arr("cosine"), layer_cosine=arr("layer_cosine"), start=w.get("start", "uniform"),
            converged=bool(w.get("converged", False)), stopped=bool(w.get("stopped", False)),
            n_steps=int(w.get("n_steps", len(run["history"]) - 1)), candidates=dict(w.get("candidates") or {}),
            n_target_samples=int(w.get("n_target_samples", 0)), history=run["history"],
            prompt=None if sp is None else sp.prompt, params=params, seconds=seconds, shrinkage=w.get("shrinkage"),
            warnings=list(w.get("warnings") or []),
            fishr_gram=arr("fishr_gram"), mixing_loss=arr("mixing_loss"),
        )
