"""HGPrompt: learning ensemble weights over source prompts.

Zhang et al., "Learning Optimal Prompt Ensemble for Multi-source Visual Prompt Transfer" (arXiv 2504.12311, AAAI
2026). One weight per source prompt, ``alpha`` on the probability simplex, maximising

    J(alpha) = H_s( f(X; P(alpha)), y ) - lambda * R(alpha),   P(alpha) = sum_k alpha_k P_k

where ``H_s`` is the shrinkage H-score of the prompt-induced target features and ``R`` a regulariser from the
sources' gradients (:mod:`core.method.regularizers`). ``R`` depends only on quantities at the fixed source prompts,
so it is computed once, before the loop (the source pass); each step is then one forward-backward of the target
sample with ``P(alpha)`` (:class:`core.method.objective.Objective`). Beyond the paper (docs/METHOD_NOTES.md):
``mixing`` chooses the rule that makes ``P`` (:mod:`core.method.mixing`: task arithmetic keeps every source's full
change) and ``objective`` the transferability measure (:mod:`core.metrics.transferability`).

The fit reads as its stages: prepare the target, the source pass, the candidates (every single source and the
uniform point), optimise from the best candidate (:mod:`core.method.optimizers`), finish. ``J`` is non-convex on the
simplex; the fit keeps the best point it has evaluated, vertices included, so the result is never worse than the
best single source or the uniform average.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch

from ..control import stop_flag
from ..errors import StopRequested, UserInputError
from ..io.tasks import stratified_subset
from ..metrics.h_score import HScoreVariant, ledoit_wolf_shrinkage, resolve_n_samples, sample_size_warning
from ..metrics.transferability import OBJECTIVES, Transferability, transferability
from ..model.features import check_finite_features
from ..model.tokens import target_tokens
from ..model.watch import watched
from ..options import Params, check, option, seed_option
from . import mixing as mix_mod
from . import optimizers as opt_mod
from . import regularizers as reg_mod
from .mixing import Mixing, Rule, make_rule
from .objective import Objective, Point, PointMemo, combine_prompts
from .optimizers import Optimizer, make_optimizer
from .regularizers import Regularizer
from .scoring import hscores_at
from .source_pass import GradLoss, SourcePass, warn_renamed
from .source_pass import source_pass as run_source_pass

Callback = Callable[[dict[str, Any]], None]
Start = Literal["best", "uniform"]
__all__ = ["HGPromptEnsemble", "combine_prompts"]


@dataclass(eq=False)
class HGPromptEnsemble(Params):
    """Learn ensemble weights on the simplex over K source prompts for a target task.

    The parameters are stored as given and checked in :meth:`fit` (scikit-learn's convention); each is an option
    of the one options table (:mod:`core.options`), which the CLI and the dashboard read, help texts included.

    After :meth:`fit`: ``weights_`` ``(K,)`` (``(K, depth)`` for layer-wise mixing), ``history_`` (one dict per step:
    ``step``, ``weights``, ``hscore``, ``regularizer``, ``objective``, ``accepted``, ``step_size``; the last row is the
    returned point, marked ``final``; when that is not where the optimiser ended, a row marked ``kept`` at the last
    step holds it: a candidate or a proposal the optimiser moved on from), ``n_steps_`` (the optimiser's steps), ``rule_`` (the mixing rule),
    ``candidates_`` (objective of each single source and of the uniform point), ``start_`` (the candidate the
    optimiser started from), ``converged_``, ``source_pass_`` (:class:`SourcePass`), ``memo_``
    (:class:`PointMemo`), ``source_hscores_``, ``names_``, ``prompt_`` (the ensembled prompt), ``shrinkage_`` (the
    Ledoit-Wolf coefficient of the H-score at the returned point), ``warnings_``, ``stopped_``, ``n_steps_``,
    ``fit_seconds_``.
    """

    lam: float = option(1.0, "weight of the regulariser (0: the H-score-only ablation)", low=0, high=1e6, ui=True,
                        label="lambda (0 = H-score only)", ui_range=(0.0, 100.0), ui_step=0.1,
                        fix="use 0 for the H-score-only ablation")
    regularizer: Regularizer = option(
        "fishr", "the penalty on mixing: fishr (match the sources' per-sample gradient variances), conflict (raw "
        "gradient cosines), interference (measured mixing loss); docs/METHOD_NOTES.md", ui=True, label="Regulariser",
        choices_help=reg_mod.HELP, retired=reg_mod.RETIRED)
    h_variant: HScoreVariant = option("shrinkage", "H-score variant: shrinkage (Ledoit-Wolf), pinv (tllib) or "
                                      "trace_ratio (H-ensemble)", ui=True, label="H-score variant")
    grad_loss: GradLoss = option("hscore", "target loss of the gradients whose cosines are reported: hscore (-H) or "
                                 "ce (cross-entropy of a probe head)")
    optimizer: Optimizer = option("eg", "eg: exponentiated gradient on the simplex (monotone); adam: Adam on the "
                                  "weights' logits", ui=True, label="Optimiser", choices_help=opt_mod.HELP)
    start: Start = option("best", "best: start from the best single source or the uniform point; uniform: from the "
                          "uniform point (to watch a whole trajectory); the best point evaluated is returned either way",
                          ui=True, label="Start from")
    steps: int = option(30, "most optimisation steps (the fit ends earlier once converged)", low=0, high=100_000,
                        ui=True, label="Most steps (ends earlier once converged)", ui_range=(1, 200))
    lr: float | None = option(None, "step size of the weights (EG: the largest change of a log-weight per step; Adam: "
                              "its learning rate); None: the optimiser's default, 0.5 for EG and 0.1 for Adam", low=0,
                              low_open=True, high=100, cli="--ens-lr", ui=True, label="Step size (EG: largest log-weight change per step)",
                              ui_range=(0.001, 5.0), ui_step=0.05)
    tol: float = option(1e-4, "converged when a kept step raises the objective by less (0: run every step)", low=0,
                        high=1)
    n_samples: int | Literal["auto"] | None = option(
        "auto", "target samples for the weights (class-stratified); auto: max(256, 4D/3), so N > D; None: all", low=2,
        high=1_000_000,
        ui=True, label="Target samples", ui_range=(20, 2000), ui_step=4, ui_value=256,
        fix="the H-score needs at least two samples of two classes")
    chunk_size: int | None = option(None, "bound memory by running forward/backward in chunks of this many samples "
                                    "(same result)", low=1, high=1_000_000)
    seed: int = seed_option("seed of the target sample, and so of the result", cli="", ui=True, label="Seed",
                            ui_range=(0, 10_000))
    mixing: Mixing = option("average", "how the weights make the prompt: average (the paper's, on the simplex), "
                            "task_arithmetic (P0 + sum l_k tau_k, l in a box: keeps every source's change; needs the "
                            "bank's shared start), layerwise (one weight per source and block, deep prompts)", ui=True,
                            label="Mixing rule", choices_help=mix_mod.HELP)
    objective: Transferability = option("hscore", "the transferability the weights maximise: hscore (its variant: "
                                        "h_variant), logme, transrate or probe_ll (docs/METHOD_NOTES.md)", ui=True,
                                        label="Objective", choices_help=OBJECTIVES)
    lambda_max: float = option(1.0, "task arithmetic's box: every weight in [0, lambda_max] (1: a source's full change)",
                               low=0, low_open=True, high=10)

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        model,
        prompts,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task=None,
        callback: Callback | None = None,
        should_stop: Any = None,
        names: list[str] | None = None,
        source_pass: SourcePass | None = None,
        memo: PointMemo | None = None,
        conflicts: SourcePass | None = None,
        shared_start: torch.Tensor | None = None,
    ) -> "HGPromptEnsemble":
        """Learn the weights of ``prompts`` (a :class:`PromptBank` or a stack ``(K, *S)``) on a target.

        The target is either ``images: (N, C, H, W)`` with ``labels: (N,)``, or a :class:`core.io.tasks.Task` (a
        class-stratified sample of its train split). ``callback(info)`` is called with every source's H-score before
        the source pass (stage ``"sources"``), after it, and after every step; ``should_stop()`` (or a
        ``threading.Event``) is polled at every block of every pass (:func:`core.model.watch.watched`) and ends the
        fit early, keeping the best point so far, or the best single source when a Stop comes during the source pass
        (``stopped_`` is then True, ``source_pass_`` None); a Stop before the sources are scored raises
        :class:`core.errors.StopRequested`. ``source_pass`` reuses the source pass (``source_pass_``) of an earlier fit on
        the same prompts and target sample, e.g. to compare several ``lam`` values; ``memo`` (that fit's
        ``memo_``) lets them share the points both evaluate. ``shared_start``: the prompt ``P0`` every source was tuned
        from, which task arithmetic needs (a :class:`PromptBank` that records its start gives it).
        """
        if conflicts is not None:
            warn_renamed("fit(conflicts=...)", "fit(source_pass=...)")
            source_pass = conflicts if source_pass is None else source_pass
        self._validate()
        for leftover in ("_announced", "_objective", "_best", "history_"):  # of an earlier fit
            self.__dict__.pop(leftover, None)
        try:
            with watched(model, should_stop):  # polled at every block: a Stop is answered in every stage
                self._t0 = time.perf_counter()
                stop = stop_flag(should_stop)
                self.lr_ = self.lr if self.lr is not None else opt_mod.DEFAULT_LR[self.optimizer]
                bank = self._prepare_prompts(model, prompts, names)
                start = shared_start if shared_start is not None else getattr(prompts, "start", None)
                self.rule_ = make_rule(self.mixing, bank, start, self.lambda_max)
                tokens, y = self._prepare_target(model, images, labels, task)
                check_finite_features(model, tokens, bank, self.names_)
                if callback:
                    self._announce_sources(model, tokens, y, bank, callback)
                self._source_pass(model, tokens, y, bank, source_pass)
                if callback:
                    c = self.source_pass_
                    callback({"stage": "conflicts", "step": 0, "steps": self.steps, "cosine": c.cosine.tolist(),
                              "source_hscores": self.source_hscores_.tolist(), "names": self.names_, "candidates": self.candidates_})
                self.memo_ = memo if memo is not None else PointMemo()
                objective = Objective(model, tokens, y, self.rule_, self.source_pass_, self.lam, self.regularizer, self.h_variant,
                                      self.chunk_size, memo=self.memo_, objective=self.objective,
                                      vertex_values=self._vertex_values(y))
                self._objective = objective
                best, start = self._candidates(objective)
                self._optimise(objective, best, start, callback, stop)
                self._finish(objective)
        except StopRequested:
            self._stopped_early()
        finally:
            self.__dict__.pop("_announced", None)
            self.__dict__.pop("_objective", None)
        return self

    def _validate(self) -> None:
        check(self)

    def _vertex_values(self, y: torch.Tensor) -> torch.Tensor:
        """The objective at every single source, from the source pass's features (no forward)."""
        if self.objective == "hscore":
            return self.source_pass_.source_hscores
        return torch.stack([transferability(f, y, self.objective, self.h_variant).detach().double()
                            for f in self.source_pass_.features.to(y.device)]).cpu()

    # ------------------------------------------------------------ the stages
    def _prepare_prompts(self, model, prompts, names) -> torch.Tensor:
        if hasattr(prompts, "stack"):
            prompts.check_compatible(model)
            names = names or prompts.names
            prompts = prompts.stack()
        prompts = torch.as_tensor(prompts).float()
        if prompts.dim() not in (3, 4):
            raise UserInputError(f"prompts must be a stack (K, T, D) or (K, depth, T, D), got {tuple(prompts.shape)}.")
        k = prompts.shape[0]
        if k < 1:
            raise UserInputError("give at least one source prompt.")
        model.check_prompt(prompts[0], "prompts")
        self.names_ = list(names) if names is not None else [f"source_{i}" for i in range(k)]
        if len(self.names_) != k:
            raise UserInputError(f"{len(self.names_)} names for {k} prompts; give one name per prompt.")
        return prompts

    def _prepare_target(self, model, images, labels, task) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a class-stratified sample of the target once: every later pass starts from these tokens."""
        if task is not None:
            if images is not None:
                raise UserInputError("give the target either as a task or as images and labels, not both.")
            n = resolve_n_samples(self.n_samples, model.embed_dim, len(task.splits["train"]))
            tokens, y = target_tokens(model, task, None, n, self.seed)
        else:
            if images is None or labels is None:
                raise UserInputError("give the target task, or the target images and their labels.")
            labels = torch.as_tensor(labels)
            if len(images) != len(labels):
                raise UserInputError(f"{len(images)} target images but {len(labels)} labels; give one label per image.")
            n = resolve_n_samples(self.n_samples, model.embed_dim, len(labels))
            idx = stratified_subset(labels.numpy(), n, self.seed)
            tokens, y = target_tokens(model, images[idx], labels[idx], None, self.seed)
        self.n_target_samples_ = int(tokens.shape[0])
        self.warnings_: list[str] = []
        msg = sample_size_warning(self.n_target_samples_, model.embed_dim, self.h_variant)
        if msg:
            self.warnings_.append(msg)
            if self.h_variant == "pinv":  # no signal at all; the shrinkage estimate is only less reliable
                warnings.warn(msg, stacklevel=3)
        return tokens, y

    def _announce_sources(self, model, tokens, y, bank: torch.Tensor, callback) -> None:
        """For a live view: every source's H-score from one forward pass (no gradients), before the gradient pass.

        The best of them is the best point evaluated so far, reported as ``weights``. Only when a callback is given:
        it costs one batched forward of the K prompts (about a second for the embedded default on 2 CPU cores)."""
        h = hscores_at(model, tokens, y, bank.to(tokens.device), self.h_variant)
        best = int(h.argmax())
        self._announced = h  # what a Stop during the source pass keeps
        callback({"stage": "sources", "step": 0, "steps": self.steps, "names": self.names_,
                  "source_hscores": h.tolist(), "weights": [float(i == best) for i in range(len(h))],
                  "hscore": float(h[best])})

    def _source_pass(self, model, tokens, y, bank: torch.Tensor, given: SourcePass | None) -> None:
        """Gradients (and what the regulariser needs) at every source prompt, in one batched pass."""
        k = bank.shape[0]
        if given is not None:  # the source pass of an earlier fit on the same prompts and target sample
            if given.grads.shape[0] != k or not given.has(self.regularizer):
                raise UserInputError(
                    f"the given source pass is for {given.grads.shape[0]} prompts and may not hold what "
                    f"regularizer={self.regularizer!r} needs; this fit has {k} prompts. Drop source_pass= to recompute."
                )
            self.source_pass_ = given
        else:
            self.source_pass_ = run_source_pass(
                model, None, y, bank, loss=self.grad_loss, h_variant=self.h_variant,
                fishr=self.regularizer == "fishr", mixing=self.regularizer == "interference",
                chunk_size=self.chunk_size, tokens=tokens,
            )
        self.source_hscores_ = self.source_pass_.source_hscores.numpy()
        # Every regulariser is 0 at a vertex: a single source's objective is its H-score.
        self.candidates_ = {name: float(h) for name, h in zip(self.names_, self.source_hscores_)}

    def _candidates(self, objective: Objective) -> tuple[Point, tuple[str, torch.Tensor, Point]]:
        """Score the rule's candidates beside the single sources (the uniform point; for task arithmetic also the
        full-strength sum); the best of them, and the candidate to start from (its name, its weights, its point)."""
        rule, k = objective.rule, objective.k
        values = objective.vertex_values
        self.candidates_.update({name: float(v) for name, v in zip(self.names_, values)})  # (the dict the callback saw)
        points = {}
        for name, w in rule.candidates(self.names_).items():
            if name in self.candidates_:
                continue
            points[name] = objective(w, share=True)
            self.candidates_[name] = points[name].objective
        best = None
        for point in [objective.vertex(i) for i in range(k)] + list(points.values()):
            if best is None or point.objective > best.objective:
                best = point
        name = max(self.candidates_, key=self.candidates_.get) if self.start == "best" else "uniform"
        if name in points:
            return best, (name, points[name].weights, points[name])
        if k == 1:
            return best, (name, points["uniform"].weights, points["uniform"])
        return best, (name, rule.single(self.names_.index(name)), None)

    def _optimise(self, objective: Objective, best: Point, start: tuple[str, torch.Tensor, Point | None], callback, stop) -> None:
        self.start_, alpha, evaluated = start
        self._best = best
        k = objective.k
        rule = objective.rule
        self.history_: list[dict[str, Any]] = []
        self.stopped_ = self.converged_ = False
        cur = evaluated if evaluated is not None else objective(alpha, share=True)
        if evaluated is None and k > 1 and rule.domain == "simplex":
            # At a vertex e_i the objective's slope towards vertex j is g_j - g_i. When no slope is positive the
            # vertex is a first-order maximum on the simplex and the fit ends there; otherwise the optimiser starts
            # a little inside (EG cannot leave an exact vertex: zero weights stay zero).
            i = int(alpha.argmax())
            if float((cur.grad - cur.grad[i]).max()) <= 0:
                self.converged_ = True
                self._record(0, cur, True, self.lr_, callback)
                return
            # Step off the vertex towards the vertices the objective rises towards, in proportion to the slope
            # (EG then stays on their face: the others' weights stay zero).
            slope = (cur.grad - cur.grad[i]).clamp_min(0.0)
            cur = objective((1.0 - 0.05) * alpha + 0.05 * slope / slope.sum())
        self._keep(cur)
        self._record(0, cur, True, self.lr_, callback)
        if k == 1 or self.steps == 0:
            self.converged_ = k == 1
            return
        optimizer = make_optimizer(self.optimizer, self.lr_, self.tol, cur, rule.domain, rule.upper)
        for step in range(1, self.steps + 1):
            if stop():
                self.stopped_ = True
                break
            proposal = optimizer.propose(cur)
            if proposal is None:
                self.converged_ = True
                break
            new = objective(proposal)
            self._keep(new)
            cur, accepted = optimizer.update(cur, new)
            self.converged_ = optimizer.converged
            self._record(step, cur, accepted, optimizer.step_size, callback)
            if self.converged_:
                break

    def _finish(self, objective: Objective) -> None:
        best = self._best
        self.weights_ = best.weights.numpy().astype(np.float64)
        if not np.array_equal(self.weights_, np.asarray(self.history_[-1]["weights"])):
            # The best point evaluated is not where the optimiser ended (a candidate, or a proposal it rejected): it
            # is returned, and recorded as a marker at the last step, not as one more step.
            self._record(self.history_[-1]["step"], best, True, float("nan"), None, final=True, kept=True)
        self.history_[-1]["final"] = True
        self.n_steps_ = int(self.history_[-1]["step"])  # the optimiser's steps; never more than `steps`
        self.prompt_ = objective.prompt(torch.as_tensor(self.weights_)).cpu()
        self.ensemble_hscore_ = best.hscore
        self.objective_ = best.objective
        f = best.features.double()
        self.shrinkage_ = float(ledoit_wolf_shrinkage(f - f.mean(0, keepdim=True))) if self.h_variant == "shrinkage" else None
        self.theta_ = torch.log(best.weights.clamp_min(1e-30)).float() if objective.rule.domain == "simplex" else None
        self.fit_seconds_ = time.perf_counter() - self._t0
        del self._best

    def _stopped_early(self) -> None:
        """A Stop inside a pass (the hooks of :func:`core.model.watch.watched`): keep the best point evaluated so far,
        the best single source when only the sources' H-scores are known; re-raise when nothing was computed."""
        self.stopped_ = True
        if hasattr(self, "_best"):  # while optimising: the best point so far
            if not self.history_:
                self._record(0, self._best, True, self.lr_, None)
            return self._finish(self._objective)
        if hasattr(self, "_objective"):  # during the candidates: the best single source, from the source pass
            objective = self._objective
            values = objective.vertex_values
            i = int(torch.as_tensor(values).argmax())
            self._best, self.start_, self.history_, self.converged_ = objective.vertex(i), self.names_[i], [], False
            self._record(0, self._best, True, self.lr_, None)
            return self._finish(objective)
        if not hasattr(self, "_announced"):
            raise StopRequested()
        h = self._announced  # during the source pass: the best single source by its H-score
        i = int(h.argmax())
        w = self.rule_.single(i)
        self.source_pass_, self.source_hscores_ = None, h.numpy()
        self.candidates_ = {name: float(v) for name, v in zip(self.names_, h)}
        self.weights_, self.start_, self.converged_, self.n_steps_ = w.numpy(), self.names_[i], False, 0
        self.ensemble_hscore_ = float(h[i])
        self.objective_ = float(h[i]) if self.objective == "hscore" else float("nan")
        self.history_ = [{"step": 0, "weights": w.tolist(), "hscore": float(h[i]), "regularizer": 0.0,
                          "objective": self.objective_, "accepted": True, "step_size": float("nan"),
                          "seconds": time.perf_counter() - self._t0, "final": True}]
        self.prompt_ = self.rule_.prompt(w).detach().cpu()
        self.shrinkage_, self.theta_ = None, None
        self.fit_seconds_ = time.perf_counter() - self._t0

    # --------------------------------------------------------------- helpers
    def _keep(self, point: Point) -> None:
        if point.objective > self._best.objective:
            self._best = point

    def _record(self, step: int, point: Point, accepted: bool, step_size: float, callback, final: bool = False,
                kept: bool = False) -> None:
        entry = {"step": step, "weights": point.weights.tolist(), "hscore": point.hscore,
                 "regularizer": point.regularizer, "objective": point.objective, "accepted": bool(accepted),
                 "step_size": step_size, "seconds": time.perf_counter() - self._t0}
        if final:
            entry["final"] = True
        if kept:
            entry["kept"] = True
        self.history_.append(entry)
        if callback:
            callback({"stage": "step", "steps": self.steps, "names": self.names_, **entry})

    @property
    def conflicts_(self) -> SourcePass:
        """Deprecated name of ``source_pass_``."""
        warn_renamed("HGPromptEnsemble.conflicts_", "source_pass_")
        return self.source_pass_

    def ensemble_prompt(self) -> torch.Tensor:
        """The weighted prompt ``P(alpha*)``; the initialisation of the target prompt."""
        if not hasattr(self, "prompt_"):
            raise UserInputError("call fit() first.")
        return self.prompt_
