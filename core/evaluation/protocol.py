"""The evaluation protocol: every method against the others over targets and seeds, as independent jobs.

One protocol serves the CLI (``python -m core baselines``), the dashboard's Tuning tab and the Ray sweep
(``bench/quality.py``); they differ only in where the jobs run (:func:`evaluate`: in this process, or on Ray).

**A seed** of the protocol is a replicate: seed ``s`` redraws the train/val split from the pooled train + val images
(:meth:`core.io.tasks.Task.resplit`, test fixed), draws the weight fit's target sample, initialises the random
prompts and heads and orders the batches. So seeds vary the data, not only the batch order, and seed 0 is a redrawn
split too (never the task's own). A single fit or tune (``learn``, ``tune``, ``HGPromptEnsemble(seed=)``,
``TuneConfig(seed=)``) keeps the task's own split and uses its seed for the rest.

The jobs, per (target, seed):

1. ``weights``: the source pass on the fit's sample, the sources' H-scores, and the weights of every ``weights``
   method (:mod:`core.evaluation.methods`); the HGPrompt fits share one source pass and its evaluations.
2. ``tune`` per distinct initial prompt: the same recipe from each initialisation. Methods whose initial prompts
   are identical (HGPrompt often returns a single source, exactly) share one tune: the computation is the same, so
   its result is too. The ``select`` methods read the single-source tunes.

A ``decide`` method adds a step between the two: a short tune of each of its candidates (tune jobs with a short
schedule, deduplicated the same way), after which it is a method with an initial prompt, the chosen candidate's
(:mod:`core.evaluation.decision`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..control import stop_flag
from ..errors import StopRequested, UserInputError
from ..io.digest import settings_digest, tensor_digest
from ..method.ensemble import HGPromptEnsemble
from ..method.mixing import NO_START, make_rule, ties_merge
from ..method.objective import PointMemo, combine_prompts
from ..method.source_pass import needs
from ..model.cost import Work, source_pass_work, tune_work
from ..model.device import precision
from ..model.tokens import target_tokens
from ..options import check_seed
from ..tuning.tune import TuneConfig, tune_prompt
from .methods import METHODS, WeightsContext, check_methods
from .setups import load_setup
from .sweep import Job, MemoryStore, run_jobs

Callback = Callable[[dict[str, Any]], None]


@dataclass
class Protocol:
    """What an evaluation compares and how.

    ``methods``: names in :data:`core.evaluation.methods.METHODS`; ``seeds``: the replicates (each redraws the
    split); ``tune``: :class:`core.tuning.tune.TuneConfig` fields (its ``seed`` is set per seed); ``ensemble``:
    :class:`core.method.ensemble.HGPromptEnsemble` parameters (its ``seed`` too); ``singles``: which single sources
    the ``select`` methods that look at every source choose among, ``"all"`` or the ``n`` with the highest H-score.
    """

    methods: list[str]
    seeds: list[int]
    tune: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)
    singles: int | str = "all"

    def __post_init__(self) -> None:
        self.methods = check_methods(self.methods)
        if not self.seeds:
            raise UserInputError("give at least one seed.")
        self.seeds = [check_seed(s) for s in self.seeds]
        if len(set(self.seeds)) != len(self.seeds):
            raise UserInputError(f"seeds must be distinct, got {self.seeds}.")
        if not (self.singles == "all" or (isinstance(self.singles, int) and self.singles >= 1)):
            raise UserInputError(f"singles must be 'all' or an integer >= 1, got {self.singles!r}.")
        TuneConfig(**self.tune)  # checked here, before any job runs
        bad = sorted(set(self.ensemble) - set(_ensemble_params()))
        if bad:
            raise UserInputError(f"HGPromptEnsemble has no parameter {bad[0]!r}; its parameters are "
                                 f"{', '.join(_ensemble_params())}.")
        if self.ensemble.get("choose_by", "objective") != "objective":
            raise UserInputError(f"choose_by={self.ensemble['choose_by']!r} chooses for one fit on a task in hand; a "
                                 "comparison's fits run on the weights job's sample, and its decision is the method "
                                 "hgprompt_decide (the same candidates and short tunes, as jobs). Leave --choose-by "
                                 "out and add hgprompt_decide to --methods.")


def _ensemble_params() -> list[str]:
    return list(HGPromptEnsemble().get_params())


# ------------------------------------------------------------------- jobs
@dataclass
class Context:
    """What the jobs of one evaluation run on: the model, the bank, the targets by name; and, in this process, a
    callback and a stop flag (Ray's workers build a context from the job's setup and have neither)."""

    model: Any
    bank: Any
    tasks: dict[str, Any]
    callback: Callback | None = None
    should_stop: Any = None

    def task(self, target: str, seed: int):
        if target not in self.tasks:
            raise UserInputError(f"unknown target {target!r}; this setup has {sorted(self.tasks)}.")
        return self.tasks[target].resplit(seed)


def run_job(payload: dict[str, Any], context: Context | None = None) -> dict[str, Any]:
    """One job of an evaluation (a module-level function, so Ray ships it by reference)."""
    if context is None:  # a Ray worker: the setup named in the job, loaded once per worker process
        context = Context(*load_setup(payload["setup"]))
        torch.set_num_threads(int(payload.get("threads") or 1))  # one CPU per job, as Ray schedules them
    elif payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    t0 = time.perf_counter()
    if payload["kind"] == "weights":
        with precision(payload["ensemble"].get("precision")):  # its source pass at the fits' precision
            out = weights_job(payload, context)
    else:
        out = tune_job(payload, context)  # (the tune's precision is its TuneConfig's)
    out["seconds"] = time.perf_counter() - t0
    return out


def weights_job(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from ..method.source_pass import measure_sources  # looked up per call: tests count the passes by wrapping it

    model, bank, seed = ctx.model, ctx.bank, payload["seed"]
    task = ctx.task(payload["target"], seed)
    methods = [METHODS[m] for m in payload["methods"]]
    params = {**payload["ensemble"], "seed": seed}
    target = target_tokens(model, task, None, params.get("n_samples", "auto"), seed)  # drawn once: every fit takes it
    need = source_pass_needs(params, payload["methods"])
    base = HGPromptEnsemble(**params)
    sp = measure_sources(model, target, bank.stack(), loss=base.grad_loss, h_variant=base.h_variant,
                         chunk_size=base.chunk_size, **need)
    hs = sp.source_hscores.double().numpy()
    memo, fits, last = PointMemo(), {}, []

    def fit(overrides: dict[str, Any]):
        key = settings_digest(overrides)
        if key not in fits:
            fits[key] = HGPromptEnsemble(**{**params, **overrides}).fit(
                model, bank, target=target, source_pass=sp, memo=memo, should_stop=ctx.should_stop)
            if fits[key].stopped_:
                raise StopRequested()
        last.append(fits[key])
        return fits[key]

    needs_start = [m.name for m in methods if "start" in m.needs]
    if needs_start and getattr(bank, "start", None) is None:
        raise UserInputError(f"{needs_start[0]} needs the bank's shared start: " + NO_START)
    context = WeightsContext(list(bank.names), hs, fit, getattr(bank, "start", None) is not None)
    weights, summary = {}, {}
    for m in methods:
        if m.kind != "weights":
            continue
        last.clear()
        init = m.weights(context)
        weights[m.name] = [float(w) for w in init] if isinstance(init, list) else init
        if last:  # the method's weights came from an HGPrompt fit: how that fit went
            ens = last[-1]
            summary[m.name] = {"objective": ens.objective_, "start": ens.start_, "converged": ens.converged_,
                               "steps": ens.n_steps_, "seconds": ens.fit_seconds_}
    return {"source_hscores": dict(zip(bank.names, hs.tolist(), strict=True)), "weights": weights, "fits": summary}


def _fits(params: dict[str, Any], methods: list[str]) -> list:
    """The HGPrompt fits a weights job plans: one per ``weights`` method that fits, with its parameters."""
    return [HGPromptEnsemble(**{**params, **METHODS[m].fit}) for m in methods if METHODS[m].fit is not None]


def source_pass_needs(params: dict[str, Any], methods: list[str]) -> dict[str, bool]:
    """What a weights job's one source pass measures: what any of its fits needs (the Fisher vectors only where a
    fit's regulariser uses them at a lambda above 0), as :func:`core.method.source_pass.measure_sources`'s flags."""
    fits = _fits(params, methods)
    return {k: any(needs(e.regularizer, e.lam)[k] for e in fits) for k in ("fishr", "mixing")}


def weights_work(k: int, n: int, params: dict[str, Any], methods: list[str], images: int = 0) -> Work:
    """The rows of a weights job (:func:`weights_job`) of ``methods`` with ensemble ``params`` on ``k`` sources and
    ``n`` target samples, at most: ``images`` embedded (the sample, when not embedded yet), one source pass, and
    every fit on it (:meth:`HGPromptEnsemble.work`; the fits share their evaluations, so fewer run)."""
    fits = _fits(params, methods)
    return (Work(images=images) + source_pass_work(k, n, **source_pass_needs(params, methods))
            + sum((e.work(k, n, shared=True) for e in fits), Work()))


def seed_work(protocol: "Protocol", k: int, n: int, n_train: int, n_val: int, n_test: int, images: int = 0) -> Work:
    """The rows of one seed of ``protocol`` on a target (``n`` the fit's sample, ``n_train``, ``n_val``, ``n_test``
    the tunes' splits; ``images``: the task's, when not embedded yet): its weights job and its tune jobs, at most
    (tunes that share an initial prompt run once; a ``decide`` method's short tunes are not counted)."""
    methods = [METHODS[m] for m in protocol.methods]
    epochs = TuneConfig(**{**protocol.tune, "seed": 0}).epochs
    select = [m for m in methods if m.kind == "select"]
    singles = (k if protocol.singles == "all" else min(k, int(protocol.singles))) if any(
        m.all_singles for m in select) else (1 if select else 0)
    prompt_tunes = sum(m.kind == "weights" or (m.kind == "fixed" and m.init == "random") for m in methods) + singles
    probes = sum(m.kind == "fixed" and m.init == "none" for m in methods)
    return (Work(images=images) + weights_work(k, n, protocol.ensemble, protocol.methods)
            + prompt_tunes * tune_work(epochs, n_train, n_val, n_test)
            + probes * tune_work(epochs, n_train, n_val, n_test, prompt=False))


def tune_job(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    model, bank, seed = ctx.model, ctx.bank, payload["seed"]
    task = ctx.task(payload["target"], seed)
    stack = bank.stack()
    cfg = TuneConfig(**{**payload["tune"], "seed": seed, "num_tokens": stack.shape[-2], "deep": stack.dim() == 4})
    prompt = initial_prompt(payload["init"], stack, getattr(bank, "start", None))
    cb = None
    if ctx.callback is not None:
        where = {"stage": "epoch", "key": payload.get("key"), "methods": payload.get("methods"), "seed": seed}
        cb = lambda info: ctx.callback({**where, **info})
    r = tune_prompt(model, task, prompt, cfg, train_accuracy=False, callback=cb, should_stop=ctx.should_stop)
    if r.stopped:
        raise StopRequested()
    return {"test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch,
            "val_curve": [h["val_acc"] for h in r.history]}


def initial_prompt(init, stack: torch.Tensor, start: torch.Tensor | None = None):
    """A job's initial prompt: ``"random"``, None (a linear probe), the weighted average of the sources (a list of
    weights), or a rule's prompt (``{"rule": ..., ...}``, :mod:`core.method.mixing`)."""
    if init in ("random", None):
        return init
    if isinstance(init, dict):
        if init["rule"] == "ties":
            return ties_merge(stack, start, init.get("density", 0.2), init.get("scale", 1.0))
        rule = make_rule(init["rule"], stack, start)
        return rule.prompt(torch.tensor(init["coef"], dtype=torch.float64).reshape(rule.shape))
    return combine_prompts(torch.tensor(init, dtype=torch.float32), stack)


def init_id(init, stack: torch.Tensor, start: torch.Tensor | None = None) -> str:
    """A job key part for an initial prompt: ``random``, ``linear_probe``, or a digest of the prompt itself, so that
    methods whose initial prompts are equal (however they were made) share one tune."""
    if init == "random":
        return "random"
    if init is None:
        return "linear_probe"
    return "p" + tensor_digest(initial_prompt(init, stack, start)).rsplit(":", 1)[1][:12]


# ----------------------------------------------------------------- the plan
def setup_key(setup) -> Any:
    """What of a setup a job's key names: a workspace's bank by its digest (its prompts and start), not by the folder
    it was read from, so a study whose bank was built or copied elsewhere keys (and resumes) the same jobs."""
    if isinstance(setup, dict) and setup.get("bank_digest"):
        return {k: v for k, v in setup.items() if k != "bank"}
    return setup


def weight_jobs(setup, targets, protocol: Protocol) -> list[Job]:
    """One weights job per (target, seed), holding the weights of the protocol's ``weights`` methods (and of the
    ``weights`` methods a ``decide`` method chooses among)."""
    wanted = {c for m in protocol.methods for c in METHODS[m].candidates} | set(protocol.methods)
    methods = [m for m in METHODS if m in wanted and METHODS[m].kind == "weights"]
    d = settings_digest(setup_key(setup), protocol.ensemble, methods)
    return [Job(f"weights/{t}/{s}/{d}", {"kind": "weights", "setup": setup, "target": t, "seed": s,
                                          "ensemble": protocol.ensemble, "methods": methods})
            for t in targets for s in protocol.seeds]


def singles_needed(protocol: Protocol, names: list[str], source_hscores: dict[str, float]) -> list[str]:
    """The single sources to tune on one (target, seed): the best by H-score for ``best_hscore``, and for the
    methods that choose among every source, ``protocol.singles`` of them (all, or the best by H-score)."""
    ranked = sorted(names, key=lambda n: -source_hscores[n])
    chosen: list[str] = []
    for m in protocol.methods:
        method = METHODS[m]
        if method.kind != "select":
            continue
        if method.all_singles:
            chosen += names if protocol.singles == "all" else ranked[: int(protocol.singles)]
        else:
            chosen += ranked[:1]
    return [n for n in names if n in chosen] if protocol.singles == "all" else [n for n in ranked if n in chosen]


def method_inits(protocol: Protocol, names: list[str], weights_result: dict[str, Any]) -> dict[str, Any]:
    """The initial prompt of each tuned method on one (target, seed): ``"random"``, None (linear probe), weights;
    and ``single:NAME`` for every single source a ``select`` method needs."""
    k = len(names)
    inits: dict[str, Any] = {}
    for m in protocol.methods:
        method = METHODS[m]
        if method.kind == "fixed":
            inits[m] = "random" if method.init == "random" else None
        elif method.kind in ("weights", "decide") and m in weights_result["weights"]:
            inits[m] = weights_result["weights"][m]  # a decide method's: its chosen candidate's (decision.with_choices)
    for n in singles_needed(protocol, names, weights_result["source_hscores"]):
        inits[f"single:{n}"] = np.eye(k)[names.index(n)].tolist()
    return inits


def tune_jobs(setup, targets, protocol: Protocol, bank, weights: dict[tuple, dict]) -> tuple[list[Job], dict]:
    """The tune jobs (deduplicated by initial prompt) and, per (target, seed), which job each method reads.

    ``weights``: the weight job's result per ``(target, seed)``."""
    names, stack, start = list(bank.names), bank.stack(), getattr(bank, "start", None)
    jobs, plan = {}, {}
    digest = settings_digest(setup_key(setup), protocol.tune)
    for t in targets:
        for s in protocol.seeds:
            plan[(t, s)] = {}
            for method, init in method_inits(protocol, names, weights[(t, s)]).items():
                key = f"tune/{t}/{s}/{init_id(init, stack, start)}/{digest}"
                plan[(t, s)][method] = key
                job = jobs.setdefault(key, Job(key, {"kind": "tune", "setup": setup, "target": t, "seed": s,
                                                     "tune": protocol.tune, "init": init, "key": key, "methods": []}))
                job.payload["methods"].append(method)  # which methods read this tune (for progress reports)
    return list(jobs.values()), plan


# --------------------------------------------------------------- assembly
def assemble(targets, protocol: Protocol, names, weights: dict[tuple, dict], tunes: dict, plan: dict) -> dict[str, Any]:
    """Per target, one entry per seed: every method's result (``select`` methods read from the singles' tunes).

    A method whose job is missing (an evaluation stopped early) is left out of its seed's entry."""
    per_target = {}
    for t in targets:
        runs = []
        for s in protocol.seeds:
            w = weights.get((t, s))
            if w is None:
                continue
            methods = {m: {**tunes[key], "job": key} for m, key in plan.get((t, s), {}).items() if key in tunes}
            singles = {m.split(":", 1)[1]: v for m, v in methods.items() if m.startswith("single:")}
            needed = singles_needed(protocol, names, w["source_hscores"])
            for m in protocol.methods:
                method = METHODS[m]
                if method.kind in ("weights", "decide") and m in methods:
                    methods[m]["weights"] = w["weights"][m]
                if method.kind == "decide" and m in methods:
                    methods[m]["decision"] = w["decisions"][m]
                if method.kind != "select":
                    continue
                pool = needed if method.all_singles else [max(needed, key=lambda n: w["source_hscores"][n])]
                if not all(n in singles for n in pool):
                    continue
                methods[m] = _choose(method, {n: singles[n] for n in pool}, names, w["source_hscores"])
            runs.append({"seed": s, "source_hscores": w["source_hscores"], "fits": w["fits"], "methods": methods})
        per_target[t] = runs
    return per_target


def _choose(method, singles: dict[str, dict], names: list[str], hs: dict[str, float]) -> dict[str, Any]:
    if method.choose == "hscore":
        best = max(singles, key=lambda n: hs[n])
        return {**singles[best], "chosen": best}
    key = "val_acc" if method.choose == "val" else "test_acc"
    best = max(singles, key=lambda n: (singles[n][key], -names.index(n)))
    return {**singles[best], "chosen": best,
            "selected_on": "val" if method.choose == "val" else "test (upper bound)"}


# ---------------------------------------------------------------- running
@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the per-target results and how the jobs went."""

    protocol: Protocol
    targets: list[str]
    names: list[str]
    per_target: dict[str, list[dict[str, Any]]]
    weights: dict[tuple, dict]
    tunes: dict[str, dict]
    n_weight_jobs: int
    n_tune_jobs: int
    read_from_store: int
    stopped: bool = False
    seconds: float = 0.0
    shorts: dict[str, dict] = field(default_factory=dict)  # the decide methods' short tunes, by job key

    @property
    def job_seconds(self) -> float:
        """Every job's own time on its worker, whichever run computed it."""
        return sum(r["seconds"] for r in [*self.weights.values(), *self.tunes.values(),
                                          *[v for k, v in self.shorts.items() if k not in self.tunes]])

    def rows(self) -> list[dict[str, Any]]:
        """One row per (target, seed, method) with its accuracies (what a table or a chart needs)."""
        return [{"target": t, "seed": r["seed"], "method": m, "test_acc": v["test_acc"], "val_acc": v["val_acc"]}
                for t, runs in self.per_target.items() for r in runs for m, v in r["methods"].items()
                if not m.startswith("single:")]


def evaluate(protocol: Protocol, targets: list[str], *, context: Context | None = None, setup: dict | None = None,
             setups: dict[str, dict] | None = None, store=None, serial: bool = True,
             progress_for: Callable[[str], Any] | None = None, threads: int | None = None, **ray_kwargs) -> Evaluation:
    """Run ``protocol`` on ``targets``: in this process on ``context`` (``serial=True``, the CLI and the dashboard;
    a stop request ends it at the next epoch, keeping every job that finished), or on Ray (``serial=False``, the
    sweep: every worker loads ``setup``, see :mod:`core.evaluation.setups`).

    ``setups``: in place of ``setup``, one setup per target, for targets that each get their own bank (leave-one-out:
    the prompts of the suite's other tasks); every job loads its target's setup, here (``serial``) or on Ray.
    ``store``: a :class:`JobStore` of finished jobs (an interrupted run resumes from it), default in memory.
    ``progress_for(phase)`` (phase ``"weights"`` or ``"tunes"``) gives the ``progress(done, total, key)`` called
    after every job of that phase (:func:`core.evaluation.sweep.tqdm_progress` draws bars). ``ray_kwargs``:
    ``address``, ``num_cpus``, ``gpus_per_job``. ``threads``: torch threads per job (Ray's workers default to one,
    the CPU Ray gives a job; in this process the default is the process's own setting).
    """
    t0 = time.perf_counter()
    store = store if store is not None else MemoryStore()
    if setups is not None:  # a bank per target: (setup, its targets, its bank) for each
        context = None
        groups = [(setups[t], [t], load_setup(setups[t])[1]) for t in targets]
    else:
        if context is None and serial:
            context = Context(*load_setup(setup))
        setup = setup if setup is not None else {"kind": "in-process"}
        groups = [(setup, list(targets), context.bank if context is not None else load_setup(setup)[1])]
    names = list(dict.fromkeys(n for _, _, bank in groups for n in bank.names))
    here = serial and context is not None
    fn = (lambda payload: run_job(payload, context)) if here else run_job
    kw = {"serial": serial, "should_stop": stop_flag(context.should_stop if here else None), **ray_kwargs}
    w_jobs = _with_threads([j for s, ts, _ in groups for j in weight_jobs(s, ts, protocol)], threads)
    stored = sum(store.has(j.key) for j in w_jobs)
    done, stopped = _run(fn, w_jobs, store, kw, progress_for and progress_for("weights"))
    weights = {(j.payload["target"], j.payload["seed"]): done[j.key] for j in w_jobs if j.key in done}
    t_jobs, plan, tunes, shorts = [], {}, {}, {}
    if not stopped and any(METHODS[m].kind == "decide" for m in protocol.methods):
        from . import decision

        s_jobs, s_plan = [], {}
        for s, ts, bank in groups:  # (each target's own bank in a leave-one-out study)
            jobs, group_plan = decision.short_jobs(s, ts, protocol, bank, weights)
            s_jobs += jobs
            s_plan.update(group_plan)
        s_jobs = _with_threads(s_jobs, threads)
        stored += sum(store.has(j.key) for j in s_jobs)
        shorts, stopped = _run(fn, s_jobs, store, kw, progress_for and progress_for("short tunes"))
        weights = decision.with_choices(protocol, {t: list(bank.names) for _, ts, bank in groups for t in ts}, weights,
                                        shorts, s_plan)
    if not stopped:
        for s, ts, bank in groups:
            jobs, group_plan = tune_jobs(s, ts, protocol, bank, weights)
            t_jobs += jobs
            plan.update(group_plan)
        t_jobs = _with_threads(t_jobs, threads)
        stored += sum(store.has(j.key) for j in t_jobs)
        tunes, stopped = _run(fn, t_jobs, store, kw, progress_for and progress_for("tunes"))
    per_target = {}
    for _, ts, bank in groups:
        per_target.update(assemble(ts, protocol, list(bank.names), weights, tunes, plan))
    return Evaluation(protocol, list(targets), names, per_target, weights, tunes, len(w_jobs), len(t_jobs), stored,
                      stopped, time.perf_counter() - t0, shorts)


def _with_threads(jobs: list[Job], threads: int | None) -> list[Job]:
    return jobs if threads is None else [Job(j.key, {**j.payload, "threads": int(threads)}) for j in jobs]


def _run(fn, jobs: list[Job], store, kw: dict, progress) -> tuple[dict[str, dict], bool]:
    """The jobs' results and whether a stop request ended them early (then only the finished ones)."""
    try:
        return run_jobs(fn, jobs, store, progress=progress, **kw), False
    except StopRequested:
        return {j.key: store.get(j.key) for j in jobs if store.has(j.key)}, True
