"""The evaluation protocol: HGPrompt against its baselines over targets and seeds, as independent jobs.

A sweep is two phases of jobs (run on Ray by :func:`core.sweep.run_jobs`):

1. ``weights`` per (target, seed): the source pass on the fit's sample, the sources' H-scores, and the
   ensemble weights of every weight-based method (uniform, H-proportional, HGPrompt with lambda = 0 and
   HGPrompt).
2. ``tune`` per (target, seed, initial prompt): the same tuning recipe from each initialisation. Methods
   whose initial prompts are identical (HGPrompt often returns a single source, exactly) share one tune:
   the computation is the same, so its result is too.

Every seed redraws the train/val split from the pooled train + val images (:meth:`Task.resplit`; test
fixed), so seeds vary the data and not only the batch order. The oracle is the single source with the best
*validation* accuracy (``oracle_test``, chosen on test, is kept only as a labelled upper bound).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from .errors import UserInputError
from .stats import excludes_zero, paired
from .sweep import Job

_SETUPS: dict[str, Any] = {}
WEIGHT_METHODS = ("uniform", "h_proportional", "hgprompt_h_only", "hgprompt")
BASELINES = ("random", "linear_probe", "uniform", "h_proportional", "best_hscore", "oracle", "hgprompt_h_only")
METHOD_ORDER = ("random", "linear_probe", "uniform", "h_proportional", "best_hscore", "oracle", "oracle_test",
                "hgprompt_h_only", "hgprompt")


# ------------------------------------------------------------------ setups
def load_setup(spec: dict[str, Any]):
    """``(model, bank, {target name: Task})`` for a setup spec, cached per process (Ray reuses its workers)."""
    key = repr(sorted(spec.items()))
    if key not in _SETUPS:
        _SETUPS[key] = _toy() if spec["kind"] == "toy" else _embedded()
    return _SETUPS[key]


def _embedded():
    from . import assets
    from .data import Task
    from .prompt_bank import PromptBank
    from .prompted_vit import PromptedViT

    assets.require()
    model = PromptedViT.from_directory(assets.BACKBONE_DIR)
    bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
    return model, bank, {t: Task.load(assets.task_path(t)) for t in assets.shipped_tasks("target")}


def _toy():
    """A tiny random ViT, three random prompts and two synthetic targets: the protocol in seconds, for tests."""
    from .data import Task
    from .prompt_bank import PromptBank, SourcePrompt
    from .prompted_vit import PromptedViT

    torch.manual_seed(0)
    model = PromptedViT.create("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(1)
    bank = PromptBank([SourcePrompt(f"src{i}", torch.randn(4, 32, generator=g) * 0.5, source_task=f"t{i}",
                                    backbone=model.name, backbone_fingerprint=model.fingerprint) for i in range(3)])
    tasks = {}
    for t, name in enumerate(("toy_a", "toy_b")):
        parts = []
        for i, n in enumerate((48, 24, 40)):
            rng = np.random.default_rng([t, i])
            y = np.arange(n) % 3
            x = rng.integers(0, 60, size=(n, 16, 16, 3))
            for j, c in enumerate(y):
                x[j, (c % 2) * 6 : (c % 2) * 6 + 6, (c // 2) * 8 : (c // 2) * 8 + 6 + t, :] += 150
            parts.append((np.clip(x, 0, 255).astype(np.uint8), y))
        tasks[name] = Task.from_arrays(name, *parts, classes=["c0", "c1", "c2"])
    return model, bank, tasks


def _target(payload):
    model, bank, tasks = load_setup(payload["setup"])
    if payload["target"] not in tasks:
        raise UserInputError(f"unknown target {payload['target']!r}; this setup has {sorted(tasks)}.")
    key = ("resplit", payload["target"], payload["seed"])
    if key not in _SETUPS:
        _SETUPS[key] = _resplit(model, tasks[payload["target"]], payload["seed"])
    return model, bank, _SETUPS[key]


def _resplit(model, task, seed: int):
    """``task.resplit(seed)`` with its preprocessed images and frozen tokens taken from the parent's, embedded once
    per target (the images are the same, only their split changes): a worker embeds a target once, not per seed."""
    from .tuning import embed_split

    new = task.resplit(seed)
    fp, dev = model.fingerprint, str(model.device)
    parts = {s: embed_split(model, task, s) for s in ("train", "val", "test")}  # cached on the parent task
    images = {s: task.tensors(s, model.transform(), key=("model", fp))[0] for s in ("train", "val", "test")}
    pooled_tok = torch.cat([parts["train"][0], parts["val"][0]])
    pooled_img = torch.cat([images["train"], images["val"]])
    for s in ("train", "val"):
        idx = torch.as_tensor(new.pooled_index[s])
        new._cache[(s, ("model", fp))] = pooled_img[idx]
        new._cache[("tokens", s, fp, dev)] = pooled_tok[idx.to(pooled_tok.device)]
    new._cache[("test", ("model", fp))] = images["test"]
    new._cache[("tokens", "test", fp, dev)] = parts["test"][0]
    return new


# ------------------------------------------------------------------- jobs
def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """One job of a sweep (a module-level function, so Ray ships it by reference)."""
    torch.set_num_threads(int(payload.get("threads", 1)))
    t0 = time.perf_counter()
    out = weights_job(payload) if payload["kind"] == "weights" else tune_job(payload)
    out["seconds"] = time.perf_counter() - t0
    return out


def weights_job(payload) -> dict[str, Any]:
    from .conflicts import gradient_conflicts
    from .ensemble import HGPromptEnsemble
    from .h_score import resolve_n_samples
    from .interference import target_tokens

    model, bank, task = _target(payload)
    params = dict(payload["ensemble"])
    n = params["n_samples"] = resolve_n_samples(params.get("n_samples", "auto"), model.embed_dim, len(task.splits["train"]))
    tokens, y = target_tokens(model, task, None, n, payload["seed"])  # the fits below take the same sample
    conflicts = gradient_conflicts(model, None, y, bank.stack(), fishr=True, tokens=tokens)
    hs = conflicts.source_hscores.double().numpy()
    k = len(bank)
    pos = np.clip(hs, 0, None)
    weights = {"uniform": [1.0 / k] * k,
               "h_proportional": (pos / pos.sum() if pos.sum() > 0 else np.full(k, 1.0 / k)).tolist()}
    fits = {}
    for method, lam in (("hgprompt_h_only", 0.0), ("hgprompt", params.get("lam", 1.0))):
        ens = HGPromptEnsemble(**{**params, "lam": lam, "seed": payload["seed"]}).fit(model, bank, task=task, conflicts=conflicts)
        weights[method] = ens.weights_.tolist()
        fits[method] = {"objective": ens.objective_, "start": ens.start_, "converged": ens.converged_,
                        "steps": ens.n_steps_, "seconds": ens.fit_seconds_}
    return {"source_hscores": dict(zip(bank.names, hs.tolist())), "weights": weights, "fits": fits}


def tune_job(payload) -> dict[str, Any]:
    from .ensemble import combine_prompts
    from .tuning import TuneConfig, tune_prompt

    model, bank, task = _target(payload)
    stack = bank.stack()
    cfg = TuneConfig(**{**payload["tune"], "seed": payload["seed"], "num_tokens": stack.shape[-2], "deep": stack.dim() == 4})
    init = payload["init"]
    prompt = init if init in ("random", None) else combine_prompts(torch.tensor(init, dtype=torch.float32), stack)
    r = tune_prompt(model, task, prompt, cfg, train_accuracy=False)
    return {"test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch,
            "val_curve": [h["val_acc"] for h in r.history]}


def init_id(init) -> str:
    """A job key part for an initial prompt: ``random``, ``linear_probe`` or a digest of the weights."""
    if init == "random":
        return "random"
    if init is None:
        return "linear_probe"
    return "w" + hashlib.sha1(np.asarray(init, dtype=np.float64).round(12).tobytes()).hexdigest()[:12]


# ----------------------------------------------------------------- the plan
def settings_digest(*parts) -> str:
    """A short digest of the settings a job's result depends on: part of its key, so a sweep with other settings
    never reads this one's finished jobs."""
    import json

    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def weight_jobs(setup, targets, seeds, ensemble) -> list[Job]:
    d = settings_digest(setup, ensemble)
    return [Job(f"weights/{t}/{s}/{d}", {"kind": "weights", "setup": setup, "target": t, "seed": s, "ensemble": ensemble})
            for t in targets for s in seeds]


def method_inits(names: list[str], weights_result: dict[str, Any], singles: int | str) -> dict[str, Any]:
    """Initial prompt of each method for one (target, seed): ``"random"``, None (linear probe) or weights.

    ``singles``: ``"all"`` tunes every single source (the true oracle); an integer tunes that many, those with
    the highest H-score (the oracle is then chosen among them, and says so).
    """
    k = len(names)
    inits: dict[str, Any] = {"random": "random", "linear_probe": None}
    inits.update({m: weights_result["weights"][m] for m in WEIGHT_METHODS})
    hs = weights_result["source_hscores"]
    ranked = sorted(names, key=lambda n: -hs[n])
    chosen = names if singles == "all" else ranked[: int(singles)]
    for n in chosen:
        inits[f"single:{n}"] = np.eye(k)[names.index(n)].tolist()
    return inits


def tune_jobs(setup, targets, seeds, tune, names, weights: dict[tuple, dict], singles) -> tuple[list[Job], dict]:
    """The tune jobs (deduplicated by initial prompt) and, per (target, seed), which job each method reads.

    ``weights``: the weight job's result per ``(target, seed)``."""
    jobs, plan = {}, {}
    digest = settings_digest(setup, tune)
    for t in targets:
        for s in seeds:
            inits = method_inits(names, weights[(t, s)], singles)
            plan[(t, s)] = {}
            for method, init in inits.items():
                key = f"tune/{t}/{s}/{init_id(init)}/{digest}"
                plan[(t, s)][method] = key
                jobs.setdefault(key, Job(key, {"kind": "tune", "setup": setup, "target": t, "seed": s, "tune": tune,
                                               "init": init}))
    return list(jobs.values()), plan


# --------------------------------------------------------------- summaries
def assemble(targets, seeds, names, weights: dict[tuple, dict], tunes: dict, plan: dict) -> dict[str, Any]:
    """Per (target, seed): every method's result, the derived best_hscore / oracle / oracle_test."""
    per_target = {}
    for t in targets:
        runs = []
        for s in seeds:
            w = weights[(t, s)]
            methods = {m: {**tunes[key], "job": key} for m, key in plan[(t, s)].items()}
            singles = {m.split(":", 1)[1]: v for m, v in methods.items() if m.startswith("single:")}
            hs = w["source_hscores"]
            best_h = max(singles, key=lambda n: hs[n])
            methods["best_hscore"] = {**singles[best_h], "chosen": best_h}
            by_val = max(singles, key=lambda n: (singles[n]["val_acc"], -names.index(n)))
            methods["oracle"] = {**singles[by_val], "chosen": by_val, "selected_on": "val"}
            by_test = max(singles, key=lambda n: (singles[n]["test_acc"], -names.index(n)))
            methods["oracle_test"] = {**singles[by_test], "chosen": by_test, "selected_on": "test (upper bound)"}
            for m in WEIGHT_METHODS:
                methods[m]["weights"] = w["weights"][m]
            runs.append({"seed": s, "source_hscores": hs, "fits": w["fits"], "methods": methods})
        per_target[t] = runs
    return per_target


def table(per_target: dict) -> dict[str, Any]:
    out = {}
    for m in METHOD_ORDER:
        row = {}
        for t, runs in per_target.items():
            accs = [r["methods"][m]["test_acc"] for r in runs]
            row[t] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
        row["mean_over_targets"] = float(np.mean([v["mean"] for v in row.values()]))
        out[m] = row
    return out


def paired_summary(per_target: dict, method: str = "hgprompt") -> dict[str, Any]:
    """``method`` minus every baseline, pooled over target x seed and per target."""
    out = {}
    for b in BASELINES:
        a_all, b_all, per = [], [], {}
        for t, runs in per_target.items():
            a = [r["methods"][method]["test_acc"] for r in runs]
            c = [r["methods"][b]["test_acc"] for r in runs]
            per[t] = paired(a, c)
            a_all += a
            b_all += c
        out[b] = {**paired(a_all, b_all), "per_target": per}
    return out


def vpt_vs_probe(per_target: dict) -> dict[str, Any]:
    """Per target, VPT from random initialisation minus the linear probe (paired over seeds): does prompt tuning
    beat a linear head on the frozen features at all."""
    return {t: paired([r["methods"]["random"]["test_acc"] for r in runs],
                      [r["methods"]["linear_probe"]["test_acc"] for r in runs]) for t, runs in per_target.items()}


def on_seeds(per_target: dict, seeds) -> dict[str, list]:
    """The same results restricted to ``seeds`` (to compare two runs on the seeds both hold)."""
    return {t: [r for r in runs if r["seed"] in seeds] for t, runs in per_target.items()}


MIN_SEEDS_TO_MARK = 3


def best_entries(per_target: dict, methods=METHOD_ORDER) -> dict[str, list[str]]:
    """Per target, the methods to mark best: the one with the best mean test accuracy together with every method
    that is the same tune on every seed (the same job, as when HGPrompt's weights land on the source with the best
    H-score; results without job keys compare accuracies), if their paired interval against the runner-up, the
    best method outside that group (over seeds), excludes 0; else an empty list (nothing is marked).
    ``oracle_test`` is an upper bound, not a method.

    Fewer than ``MIN_SEEDS_TO_MARK`` seeds mark nothing: a percentile bootstrap over two differences only says
    whether both have the same sign."""
    out = {}
    for t, runs in per_target.items():
        if len(runs) < MIN_SEEDS_TO_MARK:
            out[t] = []
            continue
        accs = {m: [r["methods"][m]["test_acc"] for r in runs] for m in methods if m != "oracle_test"}
        tune = {m: [r["methods"][m].get("job", r["methods"][m]["test_acc"]) for r in runs] for m in accs}
        order = sorted(accs, key=lambda m: -np.mean(accs[m]))
        group = [m for m in order if tune[m] == tune[order[0]]]
        rest = [m for m in order if m not in group]
        p = paired(accs[order[0]], accs[rest[0]]) if rest else None
        out[t] = [m for m in methods if m in group] if p and excludes_zero(p["ci95"]) else []
    return out


def epoch0_fraction(tunes: dict) -> float:
    """Share of the tunes whose validation accuracy peaks at epoch 0 (first of equal peaks): tuning never beat the
    initial state on validation. With ``select="val"`` that is the share whose selected epoch is 0; with
    ``select="last"`` (nothing selected) it still says how often tuning did not help."""
    eps = [int(np.argmax(v["val_curve"])) for v in tunes.values()]
    return float(np.mean([e == 0 for e in eps])) if eps else float("nan")
