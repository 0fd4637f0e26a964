"""An ensemble run as the dashboard shows it: the fit's record, read from its run folder, and where it came from.

Every run the views draw is read back from its folder by :meth:`RunResult.from_folder`: right after its fit, after a
reload, or copied from another session's identical run. So there is one way a run gets into the page, and what is
drawn is what is on disk.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from core import PromptBank
from core.io.digest import tensor_digest
from core.io.safe_io import SCHEMAS, load_json
from core.method.record import EnsembleRecord
from core.metrics.h_score import resolve_n_samples
from core.model.tokens import cached_tokens, sample_tokens
from dashboard.state import load_task


@dataclass(frozen=True)
class RunResult:
    """One ensemble run: its ``record`` and its context in this session."""

    id: str
    run_path: str
    record: EnsembleRecord
    target: str | None  # the target's name
    target_path: str | None  # the file or folder it was loaded from
    stack: torch.Tensor | None  # (K, *S) the sources' prompts; None when a source is no longer in this session
    n_classes: int | None
    served_from: str | None = None  # the run of another session this one is a copy of
    restored: bool = False  # read back after a reload
    tuning: dict[str, Any] | None = None  # the Tuning tab's results, saved in the run folder
    flags: tuple[str, ...] = ()  # the bank's notes on these sources: an untuned prompt, two that are the same tensor
    backbone_fingerprint: str | None = None  # the weights the run was fitted on (a page shows only its backbone's runs)
    # the sources, with their shared start when they record one; None when one is missing
    bank: PromptBank | None = None

    # The record's fields under the names the views use.
    @property
    def names(self) -> list[str]:
        return self.record.names

    @property
    def weights(self) -> list[float]:
        return self.record.weights

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record.history

    @property
    def source_hscores(self) -> list[float]:
        return self.record.source_hscores

    @property
    def ensemble_hscore(self) -> float:
        return self.record.ensemble_hscore

    @property
    def cosine(self) -> np.ndarray:
        return self.record.cosine

    @property
    def layer_cosine(self) -> np.ndarray | None:
        return self.record.layer_cosine

    @property
    def prompt(self) -> torch.Tensor:
        return self.record.prompt

    @property
    def params(self) -> dict[str, Any]:
        return self.record.params

    @property
    def stopped(self) -> bool:
        return self.record.stopped

    @property
    def converged(self) -> bool:
        return self.record.converged

    @property
    def start(self) -> str:
        return self.record.start

    @property
    def seconds(self) -> float:
        return self.record.seconds

    @property
    def candidates(self) -> dict[str, float]:
        return self.record.candidates

    @property
    def warnings(self) -> list[str]:
        return self.record.warnings

    @classmethod
    def from_folder(cls, path: str, banks: Callable[[list[str]], PromptBank | None] | None = None,
                    bank: PromptBank | None = None, n_classes: int | None = None, **context: Any) -> "RunResult":
        """The run in a complete run folder. ``bank``: the sources when the caller has them; else
        ``banks(names)`` (the prompts this session can see, by name, as a bank with their shared start where they have
        one); None when one of them is missing. ``n_classes``: the target's, else read from the target named in the
        run's config."""
        path = path.rstrip("/")
        record = EnsembleRecord.read(path)
        config = load_json(os.path.join(path, "config.json"), schema=SCHEMAS["config"])
        if bank is None and banks is not None:
            with warnings.catch_warnings():  # shown on the page, not in the server's log
                warnings.simplefilter("ignore")
                bank = banks(record.names)
            digests = config.get("source_digests")
            if bank is not None and isinstance(digests, list) and digests != [tensor_digest(p.prompt) for p in bank]:
                bank = None  # a source of that name that is not the prompt the run used is no source of the run
        target_path = config.get("target_path")
        if n_classes is None and target_path and os.path.exists(target_path):
            n_classes = load_task(target_path).num_classes
        tuning_file = os.path.join(path, "tuning.json")
        tuning = load_json(tuning_file) if os.path.isfile(tuning_file) else None
        return cls(id=os.path.basename(path), run_path=path, record=record, target=config.get("target"),
                   target_path=target_path, stack=None if bank is None else bank.stack(), n_classes=n_classes,
                   tuning=tuning, flags=tuple(bank.notes) if bank is not None else (), bank=bank,
                   backbone_fingerprint=config.get("backbone_fingerprint"), **context)

    def task(self):
        """The run's target task (loaded once per server process)."""
        return load_task(self.target_path)

    def sample_size(self, model, n: int | str | None = None) -> int:
        """The number of target images a sample of ``n`` (default: the fit's ``n_samples``) draws."""
        return resolve_n_samples(self.params["n_samples"] if n is None else n, model.embed_dim,
                                 len(self.task().splits["train"]))

    def embedded(self, model, split: str = "train") -> bool:
        """Whether the target's ``split`` is embedded for ``model`` already (a sample of it then costs no embedding)."""
        return cached_tokens(model, self.task(), split) is not None

    def sample(self, model, n: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Frozen tokens, labels and indices of a class-stratified sample of the target's train split with the
        run's seed: ``n`` images (default: the fit's own sample, same size and seed)."""
        return sample_tokens(model, self.task(), "train", self.sample_size(model, n), self.params["seed"])

    def copied(self, new_id: str, new_path: str) -> "RunResult":
        """This run as copied into another folder (a session served from another's identical run)."""
        return replace(self, id=new_id, run_path=new_path, served_from=self.id)
