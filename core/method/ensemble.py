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

The fit reads as its stages, each a function of its inputs that returns its outputs: the target sample
(:func:`core.model.tokens.target_tokens`), the source pass (:func:`core.method.source_pass.measure_sources`), the
candidates (every single source and the uniform point, :func:`score_candidates`), the optimisation from the best
candidate (:func:`optimise`, :mod:`core.method.optimizers`); the fitted attributes are set once, at the end. ``J`` is
non-convex on the simplex; the fit keeps the best point it has evaluated, vertices included, so the result is never
worse than the best single source or the uniform average. A stop request, polled between steps or raised as
:class:`core.errors.StopRequested` from inside any stage, ends the fit with the best point known so far.
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
from ..metrics.h_score import H_VARIANTS, ledoit_wolf_shrinkage, resolve_n_samples, sample_size_warning
from ..metrics.transferability import OBJECTIVES, transferability
from ..model.cost import Work, fit_work, tune_work
from ..model.device import PRECISIONS, runs_at_own_precision
from ..model.features import check_finite_features
from ..model.tokens import Target, target_tokens
from ..model.watch import watched
from ..options import Params, check, choice, option, seed_option
from ..registry import Registry
from .mixing import MIXING_RULES, Rule, make_rule
from .objective import Objective, Point, PointMemo, combine_prompts
from .optimizers import OPTIMIZERS, make_optimizer
from .regularizers import REGULARIZERS
from .source_pass import GRAD_LOSSES, SourcePass, measure_sources, needs

Callback = Callable[[dict[str, Any]], None]
Start = Literal["best", "uniform"]
__all__ = ["CHOOSERS", "HGPromptEnsemble", "combine_prompts"]

#: How the fit keeps one prompt among its rule's candidates once the weights are learned (docs/METHOD_NOTES.md,
#: "Fourth edition"). An entry other than "objective" is ``chooser(model, task, prompts, *, seed, precision,
#: should_stop) -> core.evaluation.decision.Decision`` over ``prompts`` (name -> prompt, safest first). "short_tune"
#: tunes, a layer above this one: core.evaluation.decision registers it (importing ``core`` does).
CHOOSERS: Registry = Registry("choose_by", default="objective")
CHOOSERS.add("objective", None, help="keep the point the objective ranks best (the paper's)")


@dataclass(eq=False)
class HGPromptEnsemble(Params):
    """Learn ensemble weights on the simplex over K source prompts for a target task.

    The parameters are stored as given and checked in :meth:`fit` (scikit-learn's convention); each is an option
    of the one options table (:mod:`core.options`), which the CLI and the dashboard read, help texts included.

    After :meth:`fit`: ``weights_`` ``(K,)`` (``(K, depth)`` for layer-wise mixing), ``history_`` (one dict per step:
    ``step``, ``weights``, ``hscore``, ``regularizer``, ``objective``, ``accepted``, ``step_size``; the last row is the
    returned point, marked ``final``; when that is not where the optimiser ended, a row marked ``kept`` at the last
    step holds it: a candidate or a proposal the optimiser moved on from; ``regularizer`` is NaN at lambda 0 when
    nothing measured it), ``n_steps_`` (the optimiser's steps), ``rule_`` (the mixing rule), ``candidates_``
    (objective of each single source and of the uniform point), ``start_`` (the candidate the optimiser started
    from), ``converged_``, ``stopped_``, ``source_pass_`` (:class:`SourcePass`; None when a stop came before it
    ended), ``memo_`` (:class:`PointMemo`), ``source_hscores_``, ``names_``, ``prompt_`` (the ensembled prompt),
    ``ensemble_hscore_``, ``objective_``, ``shrinkage_`` (the Ledoit-Wolf coefficient of the H-score at the returned
    point), ``n_target_samples_``, ``warnings_``, ``fit_seconds_``.

    With ``choose_by="short_tune"`` the fit then tunes each distinct candidate of its rule (the best single source by
    the objective, the fitted point, the uniform point; the full sum for task arithmetic) for one epoch of the full
    recipe on ``task``'s train split and keeps the best on its validation split (the best single source on ties):
    ``weights_`` and ``prompt_`` are the kept candidate's, ``fitted_weights_`` the optimiser's point (whose
    ``objective_`` and ``ensemble_hscore_`` these stay), ``decision_`` what the choice saw
    (:class:`core.evaluation.decision.Decision`; None with ``choose_by="objective"``).
    """

    lam: float = option(1.0, "weight of the regulariser (0: the H-score-only ablation)", low=0, high=1e6, ui=True,
                        label="lambda (0 = H-score only)", ui_range=(0.0, 100.0), ui_step=0.1,
                        fix="use 0 for the H-score-only ablation")
    regularizer: str = choice(REGULARIZERS, "the penalty on mixing (docs/METHOD_NOTES.md)", ui=True,
                              label="Regulariser")
    h_variant: str = choice(H_VARIANTS, "H-score variant", ui=True, label="H-score variant")
    grad_loss: str = choice(GRAD_LOSSES, "target loss of the gradients whose cosines are reported")
    optimizer: str = choice(OPTIMIZERS, "how the weights move", ui=True, label="Optimiser")
    start: Start = option("best", "best: start from the best single source or the uniform point; uniform: from the "
                          "uniform point (to watch a whole trajectory); the best point evaluated is returned either "
                          "way",
                          ui=True, label="Start from")
    steps: int = option(30, "most optimisation steps (the fit ends earlier once converged)", low=0, high=100_000,
                        ui=True, label="Most steps (ends earlier once converged)", ui_range=(1, 200))
    lr: float | None = option(None, "step size of the weights (EG: the largest change of a log-weight per step; Adam: "
                              "its learning rate); None: the optimiser's own default", low=0,
                              low_open=True, high=100, cli="--ens-lr", ui=True,
                              label="Step size (EG: largest log-weight change per step)",
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
    mixing: str = choice(MIXING_RULES, "how the weights make the prompt (task arithmetic and layer-wise need the "
                         "bank's shared start)", ui=True, label="Mixing rule")
    objective: str = choice(OBJECTIVES, "the transferability the weights maximise (docs/METHOD_NOTES.md)", ui=True,
                            label="Objective")
    lambda_max: float = option(1.0, "task arithmetic's box: every weight in [0, lambda_max] (1: a source's full "
                               "change)",
                               low=0, low_open=True, high=10)
    precision: str = choice(PRECISIONS, "the frozen backbone's precision: fp32, or bf16 autocast (for GPUs; "
                                  "H-scores and probes stay in float64; docs/METHOD_NOTES.md, Precision)", ui=True,
                                  label="Precision")
    choose_by: str = choice(CHOOSERS, "the prompt kept among the rule's candidates (the best single source, the "
                            "fitted point, the uniform point; the full sum for task arithmetic): objective keeps the "
                            "fitted point; short_tune tunes each for one epoch on task='s train split and keeps the "
                            "best on its validation split (docs/METHOD_NOTES.md, Fourth edition)")

    # -------------------------------------------------------------------- fit
    def work(self, k: int, n: int, images: int = 0, shared: bool = False,
             splits: tuple[int, int, int] | None = None) -> Work:
        """The rows a fit with these options on ``k`` sources and ``n`` target samples runs, at most every step
        (:func:`core.model.cost.fit_work`): the source pass measures what this regulariser needs at this lambda (none
        when ``shared``: a source pass given to the fit), the rule's candidates beyond the single sources (the
        uniform point; the full sum on a box), the step off a start vertex (and the vertex's own evaluation when the
        source pass's gradient is not this objective's). ``images``: the sample's, when its split is not embedded.
        ``splits``: the task's (train, val, test) sizes, for the short tunes of a ``choose_by`` other than objective
        (every candidate counted, though equal ones are tuned once)."""
        need = needs(self.regularizer, self.lam)
        candidates = 1 + (MIXING_RULES.attr(self.mixing, "domain") == "box")
        own_gradient = self.objective == "hscore" and self.grad_loss == "hscore"
        work = fit_work(k, n, self.steps, **need, candidates=candidates, start=1 if own_gradient else 2,
                        images=images, shared=shared)
        if self.choose_by != "objective" and splits is not None:  # the best source, the fitted point, the rule's others
            work = work + tune_work(CHOOSERS.attr(self.choose_by, "epochs", 1), *splits, train_accuracy=False) * (
                2 + candidates)
        return work

    @runs_at_own_precision
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
        shared_start: torch.Tensor | None = None,
        target: Target | None = None,
    ) -> "HGPromptEnsemble":
        """Learn the weights of ``prompts`` (a :class:`PromptBank` or a stack ``(K, *S)``) on a target.

        The target is ``images: (N, C, H, W)`` with ``labels: (N,)``, a :class:`core.io.tasks.Task` (a
        class-stratified sample of its train split), or a ``target`` sample already drawn and checked
        (:func:`core.model.tokens.target_tokens`). ``callback(info)`` is called with every source's H-score as soon
        as the source pass's forward has them (stage ``"sources"``), after the source pass (``"conflicts"``), and
        after every step (``"step"``); ``should_stop()`` (or a ``threading.Event``) is polled before every step and at
        every block of every pass (:func:`core.model.watch.watched`): a :class:`core.errors.StopRequested` raised inside
        any stage stops too: the fit then keeps the best point known so far (``stopped_`` is True; the best single
        source by H-score when the stop came during the source pass) and re-raises only when no source's H-score was
        known yet. ``source_pass`` reuses the source pass (``source_pass_``) of an earlier fit on the same prompts and
        target sample, e.g. to compare several ``lam`` values; ``memo`` (that fit's ``memo_``) lets them share the
        points both evaluate. ``shared_start``: the prompt ``P0`` every source was tuned from, which task arithmetic
        needs (a :class:`PromptBank` that records its start gives it).
        """
        check(self)
        if self.choose_by != "objective" and not hasattr(task, "resplit"):
            raise UserInputError(
                f"choose_by={self.choose_by!r} tunes every candidate on the target's train split and judges it on its "
                "validation split, so it needs the target as task= (a core.io.tasks.Task with those splits), not "
                f"{'a target sample' if target is not None else 'images and labels'}; or use choose_by='objective'.")
        with watched(model, should_stop):  # polled at every block, forward and backward: a Stop is heard in any pass
            t0 = time.perf_counter()
            stop = stop_flag(should_stop)
            stack, names = prompt_stack(model, prompts, names)
            start = shared_start if shared_start is not None else getattr(prompts, "start", None)
            rule = make_rule(self.mixing, stack, start, self.lambda_max)
            if target is None:
                target = draw_target(model, images, labels, task, self.n_samples, self.seed)
            elif images is not None or task is not None:
                raise UserInputError("give the target once: as a target sample, a task, or images and labels.")
            notes = sample_warnings(len(target), model.embed_dim, self.h_variant)
            check_finite_features(model, target.tokens, stack, names)
            memo = memo if memo is not None else PointMemo()
            history = History(t0, self.steps, names, callback)
            sources = SourcesSeen(names, self.steps, callback)
            try:
                sp = self._sources(model, target, stack, source_pass, sources, stop)
            except StopRequested:
                if sources.hscores is None:  # nothing measured yet: the caller records "stopped before any result"
                    raise
                best = sources.best_point(rule, self.objective)
                return self._set_fitted(t0, names=names, rule=rule, target=target, notes=notes, sp=None, memo=memo,
                                        source_hscores=sources.hscores, candidates=sources.candidates(),
                                        start=names[int(best.weights.argmax())], history=history,
                                        trace=Trace(best, stopped=True))
            if callback:
                callback({"stage": "conflicts", "step": 0, "steps": self.steps, "cosine": sp.cosine.tolist(),
                          "source_hscores": sp.source_hscores.tolist(), "names": names,
                          "candidates": sources.candidates()})
            objective = Objective(model, target, rule, sp, self.lam, self.regularizer, self.h_variant, self.chunk_size,
                                  memo=memo, objective=self.objective,
                                  vertex_values=vertex_values(sp, target, self.objective, self.h_variant))
            cands = score_candidates(objective, names, self.start)
            lr = self.lr if self.lr is not None else OPTIMIZERS.attr(self.optimizer, "default_lr")
            trace = optimise(objective, cands, self.optimizer, lr, self.tol, self.steps, stop, history)
            self._set_fitted(t0, names=names, rule=rule, target=target, notes=notes, sp=sp, memo=memo,
                             source_hscores=sp.source_hscores, candidates=cands.values, start=cands.start,
                             history=history, trace=trace)
            if self.choose_by != "objective" and not self.stopped_:
                self._choose(model, task, should_stop)
                self.fit_seconds_ = time.perf_counter() - t0
            return self

    def _choose(self, model, task, should_stop) -> None:
        """Keep one of the rule's candidates by ``CHOOSERS[choose_by]`` (safest first: the best single source by the
        objective, then the fitted point, the uniform point, the full sum). A stop during the choice keeps the fitted
        point (``stopped_``)."""
        rule, names = self.rule_, self.names_
        points = rule.candidates(names)
        best = max(names, key=lambda n: self.candidates_[n])
        ordered = {best: points[best], "fitted": torch.as_tensor(self.weights_),
                   **{n: w for n, w in points.items() if n not in names}}
        prompts = {n: rule.prompt(torch.as_tensor(w, dtype=torch.float64)).cpu() for n, w in ordered.items()}
        try:
            decision = CHOOSERS[self.choose_by](model, task, prompts, seed=self.seed, precision=self.precision,
                                                should_stop=should_stop)
        except StopRequested:
            self.stopped_ = True
            return
        self.decision_ = decision
        self.weights_ = torch.as_tensor(ordered[decision.chosen]).numpy().astype(np.float64)
        self.prompt_ = prompts[decision.chosen]

    def _sources(self, model, target: Target, stack: torch.Tensor, given: SourcePass | None,
                     sources: "SourcesSeen", stop) -> SourcePass:
        """Gradients (and what the regulariser needs at this lambda) at every source prompt, in one batched pass;
        or ``given``, the source pass of an earlier fit on the same prompts and target sample."""
        need = needs(self.regularizer, self.lam)
        if given is None:
            return measure_sources(model, target, stack, loss=self.grad_loss, h_variant=self.h_variant,
                                   chunk_size=self.chunk_size, on_forward=sources.seen, should_stop=stop, **need)
        k = stack.shape[0]
        if given.grads.shape[0] != k:
            raise UserInputError(f"the given source pass is for {given.grads.shape[0]} prompts; this fit has {k}. "
                                 "Drop source_pass= to recompute.")
        held = {"fishr": given.grad_var is not None, "mixing": given.mixing_loss is not None}
        missing = next(((what, flag)
                        for what, flag in (("the Fisher vectors", "fishr"), ("the mixing losses", "mixing"))
                        if need[flag] and not held[flag]), None)
        if missing:
            raise UserInputError(
                f"regularizer={self.regularizer!r} needs {missing[0]}, which the given source pass did not measure (a "
                "fit at lambda 0, or with another regulariser, measures only what it uses). Share the pass of the fit "
                f"that needs most, measure it with measure_sources(..., {missing[1]}=True), or drop "
                "source_pass= to recompute."
            )
        sources.seen(given.source_hscores, given.features)
        return given

    def _set_fitted(self, t0: float, *, names: list[str], rule: Rule, target: Target, notes: list[str],
                    sp: SourcePass | None, memo: PointMemo, source_hscores: torch.Tensor, candidates: dict[str, float],
                    start: str, history: "History", trace: "Trace") -> "HGPromptEnsemble":
        """Every fitted attribute, set once, from the stages' outputs."""
        best = trace.best
        history.finish(best)
        self.names_, self.rule_, self.n_target_samples_, self.warnings_ = names, rule, len(target), notes
        self.source_pass_, self.memo_ = sp, memo
        self.source_hscores_ = source_hscores.numpy()
        self.candidates_, self.start_ = candidates, start
        self.history_ = history.rows
        self.n_steps_ = int(history.rows[-1]["step"])  # the optimiser's steps; never more than `steps`
        self.converged_, self.stopped_ = trace.converged, trace.stopped
        self.weights_ = best.weights.numpy().astype(np.float64)
        self.fitted_weights_, self.decision_ = self.weights_, None
        self.prompt_ = rule.prompt(torch.as_tensor(self.weights_)).cpu()
        self.ensemble_hscore_, self.objective_ = best.hscore, best.objective
        f = best.features.double()
        self.shrinkage_ = (float(ledoit_wolf_shrinkage(f - f.mean(0, keepdim=True)))
                           if self.h_variant == "shrinkage" else None)
        self.fit_seconds_ = time.perf_counter() - t0
        return self


# ------------------------------------------------------------------ the stages
def prompt_stack(model, prompts, names) -> tuple[torch.Tensor, list[str]]:
    """The sources as a float stack ``(K, *S)`` checked against ``model``, and their names."""
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
    names = list(names) if names is not None else [f"source_{i}" for i in range(k)]
    if len(names) != k:
        raise UserInputError(f"{len(names)} names for {k} prompts; give one name per prompt.")
    return prompts, names


def draw_target(model, images, labels, task, n_samples, seed: int) -> Target:
    """The fit's target sample, drawn and checked once: a class-stratified sample of ``n_samples`` (``"auto"``:
    :func:`core.metrics.h_score.default_n_samples`) of a task's train split or of the given images."""
    if task is not None:
        if images is not None:
            raise UserInputError("give the target either as a task or as images and labels, not both.")
        return target_tokens(model, task, None, n_samples, seed)
    if images is None or labels is None:
        raise UserInputError("give the target task, or the target images and their labels.")
    labels = torch.as_tensor(labels)
    if len(images) != len(labels):
        raise UserInputError(f"{len(images)} target images but {len(labels)} labels; give one label per image.")
    n = resolve_n_samples(n_samples, model.embed_dim, len(labels))
    idx = stratified_subset(labels.numpy(), n, seed)
    return target_tokens(model, images[idx], labels[idx], None, seed)


def sample_warnings(n: int, d: int, h_variant: str) -> list[str]:
    """What the fit warns about its sample size (N <= D); with the pinv variant also a ``UserWarning``."""
    msg = sample_size_warning(n, d, h_variant)
    if not msg:
        return []
    if h_variant == "pinv":  # no signal at all; the shrinkage estimate is only less reliable
        warnings.warn(msg, stacklevel=3)
    return [msg]


def vertex_values(sp: SourcePass, target: Target, objective: str, h_variant: str) -> torch.Tensor:
    """The objective at every single source, from the source pass's features (no forward)."""
    if objective == "hscore" and sp.h_variant == h_variant:
        return sp.source_hscores
    y = target.labels
    return torch.stack([transferability(f, y, objective, h_variant, target.n_classes).detach().double()
                        for f in sp.features.to(y.device)]).cpu()


class SourcesSeen:
    """The sources' H-scores and features as soon as the source pass's forward gives them, announced to the
    callback (stage ``"sources"``: the best of them is the best point evaluated so far, reported as ``weights``) and
    kept: a stop during the rest of the pass still returns the best source."""

    def __init__(self, names: list[str], steps: int, callback: Callback | None):
        self.names, self.steps, self.callback = names, steps, callback
        self.hscores: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

    def seen(self, hscores: torch.Tensor, features: torch.Tensor) -> None:
        self.hscores, self.features = hscores, features
        if self.callback:
            best = int(hscores.argmax())
            self.callback({"stage": "sources", "step": 0, "steps": self.steps, "names": self.names,
                           "source_hscores": hscores.tolist(),
                           "weights": [float(i == best) for i in range(len(hscores))], "hscore": float(hscores[best])})

    def candidates(self) -> dict[str, float]:
        return {name: float(h) for name, h in zip(self.names, self.hscores, strict=True)}

    def best_point(self, rule: Rule, objective: str) -> Point:
        """The best source by H-score, as a point (every regulariser is 0 at a single source); its objective is
        unknown, NaN, unless the objective is the H-score."""
        i = int(self.hscores.argmax())
        h = float(self.hscores[i])
        return Point(rule.single(i), h, 0.0, h if objective == "hscore" else float("nan"), self.features[i].cpu())


@dataclass
class Candidates:
    """The points scored before optimising: their objectives by name, the best point, and the start."""

    values: dict[str, float]
    best: Point
    start: str
    start_weights: torch.Tensor
    start_point: Point | None  # None: the single source ``start_source``, whose gradient the source pass has
    start_source: int | None = None
    stopped: bool = False


def score_candidates(objective: Objective, names: list[str], start: Start) -> Candidates:
    """Score the rule's candidates beside the single sources (the uniform point; for task arithmetic also the
    full-strength sum): the best of them, and the one to start from (the best, or the uniform point). A stop
    request while scoring keeps the candidates scored so far."""
    rule, k = objective.rule, objective.k
    values = {name: float(v) for name, v in zip(names, objective.vertex_values, strict=True)}
    points, stopped = {}, False
    try:
        for name, w in rule.candidates(names).items():
            if name in values:
                continue
            points[name] = objective(w, share=True)
            values[name] = points[name].objective
    except StopRequested:
        stopped = True
    best = None
    for point in [objective.vertex(i) for i in range(k)] + list(points.values()):
        if best is None or point.objective > best.objective:
            best = point
    name = max(values, key=values.get) if start == "best" or stopped else "uniform"
    if name in points:
        return Candidates(values, best, name, points[name].weights, points[name], stopped=stopped)
    if k == 1 and "uniform" in points:
        return Candidates(values, best, name, points["uniform"].weights, points["uniform"], stopped=stopped)
    i = names.index(name)
    return Candidates(values, best, name, rule.single(i), None, i, stopped)


@dataclass
class Trace:
    """How the optimisation went: the best point evaluated, and whether it converged or was stopped."""

    best: Point
    converged: bool = False
    stopped: bool = False


def optimise(objective: Objective, cands: Candidates, optimizer: str, lr: float, tol: float, steps: int, stop,
             history: "History") -> Trace:
    """From the start candidate, ``optimizer.propose -> objective -> optimizer.update`` until converged, ``steps``
    or a stop; every point goes into ``history``. Returns the best point evaluated, candidates included."""
    best, k, rule = cands.best, objective.k, objective.rule
    if cands.stopped:
        return Trace(best, stopped=True)
    alpha = cands.start_weights
    try:
        cur = cands.start_point if cands.start_point is not None else objective.vertex_with_grad(cands.start_source)
        if cands.start_point is None and k > 1 and rule.domain == "simplex":
            # At a vertex e_i the objective's slope towards vertex j is g_j - g_i. When no slope is positive the
            # vertex is a first-order maximum on the simplex and the fit ends there; otherwise the optimiser starts
            # a little inside (EG cannot leave an exact vertex: zero weights stay zero).
            i = cands.start_source
            if float((cur.grad - cur.grad[i]).max()) <= 0:
                history.record(0, cur, True, lr)
                return Trace(best, converged=True)
            # Step off the vertex towards the vertices the objective rises towards, in proportion to the slope
            # (EG then stays on their face: the others' weights stay zero).
            slope = (cur.grad - cur.grad[i]).clamp_min(0.0)
            cur = objective((1.0 - 0.05) * alpha + 0.05 * slope / slope.sum())
        best = cur if cur.objective > best.objective else best
        history.record(0, cur, True, lr)
        if k == 1 or steps == 0:
            return Trace(best, converged=k == 1)
        opt = make_optimizer(optimizer, lr, tol, cur, rule.domain, rule.upper)
        for step in range(1, steps + 1):
            if stop():
                return Trace(best, stopped=True)
            proposal = opt.propose(cur)
            if proposal is None:
                return Trace(best, converged=True)
            new = objective(proposal)
            best = new if new.objective > best.objective else best
            cur, accepted = opt.update(cur, new)
            history.record(step, cur, accepted, opt.step_size)
            if opt.converged:
                return Trace(best, converged=True)
    except StopRequested:
        return Trace(best, stopped=True)
    return Trace(best)


class History:
    """The fit's rows, one per step (``seconds`` since the fit began), each reported to the callback (stage
    ``"step"``) as it is recorded."""

    def __init__(self, t0: float, steps: int, names: list[str], callback: Callback | None):
        self.t0, self.steps, self.names, self.callback = t0, steps, names, callback
        self.rows: list[dict[str, Any]] = []

    def record(self, step: int, point: Point, accepted: bool, step_size: float, report: bool = True,
               **marks: bool) -> None:
        entry = {"step": step, "weights": point.weights.tolist(), "hscore": point.hscore,
                 "regularizer": point.regularizer, "objective": point.objective, "accepted": bool(accepted),
                 "step_size": step_size, "seconds": time.perf_counter() - self.t0, **marks}
        self.rows.append(entry)
        if self.callback and report:
            self.callback({"stage": "step", "steps": self.steps, "names": self.names, **entry})

    def finish(self, best: Point) -> None:
        """Mark the returned point: the last row, or, when the best point evaluated is not where the optimiser
        ended (a candidate, or a proposal it rejected), a row marked ``kept`` at the last step, not one more step."""
        if not self.rows:  # stopped before the first step: the best candidate is the start
            self.record(0, best, True, float("nan"))
        if not np.array_equal(best.weights.numpy().astype(np.float64), np.asarray(self.rows[-1]["weights"])):
            self.record(self.rows[-1]["step"], best, True, float("nan"), report=False, final=True, kept=True)
        self.rows[-1]["final"] = True
