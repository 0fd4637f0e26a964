"""Method checks: does the weight optimiser reach its optimum, does a regulariser act, does a cosine predict
interference?

    python bench/method.py                       # every shipped target, seeds 0 1 2 -> bench/results/method.json
    python bench/method.py --targets shapes_quad --seeds 0
    python bench/method.py --quick --out /tmp/m.json    # tiny model and task, for the tests

Per (target, seed), on the fit's own target sample (``n_samples="auto"``):
- fits with every regulariser (lambda = 1) and the H-score-only ablation, with EG (default) and Adam: the final
  objective against the best single source and the uniform point, whether the weights differ from the ablation's;
- ``core.interference``: raw and centred gradient cosines with their random-prompt null band, the measured mixing
  loss ``I_ij``, and the Spearman correlation of each reading with ``I_ij``.
Per target (seed 0): the probe accuracy (``tune_prompt`` with ``--tune-epochs``, 0 = the probe fitted on the
prompted train features, tested once) of every single source and of three pairwise uniform mixtures (the pairs with
the most, median and least negative ``I_ij``), so the measured interference is checked against accuracy; and
Kendall's tau between the sources' H-scores (128 samples and auto) and their accuracies.
Timing: the default fit on the default target, one weight step against one plain prompt-tuning step on the same
batch, and the source pass against one forward-backward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from core import (
    HGPromptEnsemble,
    Objective,
    PointMemo,
    PromptBank,
    PromptedViT,
    Task,
    TuneConfig,
    assets,
    h_score,
    measure_sources,
    target_tokens,
    tune_prompt,
)
from core.analysis.interference import interference
from core.io.runs import environment
from core.method.gradients import prompt_gradients
from core.metrics.h_score import resolve_n_samples
from core.metrics.stats import kendall
from core.model.tokens import split_images
from core.model.toy import toy_bank, toy_model, toy_task
from core.tuning.tune import tuning_step_seconds

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FITS = {  # name -> HGPromptEnsemble parameters (besides seed)
    "h_only": {"lam": 0.0},
    "fishr": {"lam": 1.0, "regularizer": "fishr"},
    "conflict": {"lam": 1.0, "regularizer": "conflict"},
    "interference": {"lam": 1.0, "regularizer": "interference"},
    "h_only_adam": {"lam": 0.0, "optimizer": "adam"},
    "fishr_adam": {"lam": 1.0, "regularizer": "fishr", "optimizer": "adam"},
    "fishr_from_uniform": {"lam": 1.0, "regularizer": "fishr", "start": "uniform"},
}
DEFAULT_FIT = "fishr"



def run_seed(model, bank, task, seed: int, n_samples, log) -> dict:
    stack = bank.stack()
    n = resolve_n_samples(n_samples, model.embed_dim, len(task.splits["train"]))
    x, y = sample_images(model, task, n, seed)
    t0 = time.perf_counter()
    inter = interference(model, bank, x, y, seed=seed)
    out = {"seed": seed, "n_samples": int(len(y)), "interference": inter.to_dict()}
    log(f"    interference {inter.seconds:.0f} s; spearman {({k: round(v, 2) for k, v in inter.spearman().items()})}")
    conflicts = measure_sources(model, target_tokens(model, x, y, None, seed), stack, fishr=True)
    conflicts = dataclasses.replace(conflicts, mixing_loss=torch.as_tensor(inter.mixing_loss, dtype=torch.float32))
    memo = PointMemo()  # every fit of this seed shares the points they all evaluate
    out["fits"] = {}
    for name, params in FITS.items():
        ens = HGPromptEnsemble(**params, seed=seed, n_samples=n).fit(model, bank, task=task, source_pass=conflicts,
                                                                      memo=memo)
        best_vertex = float(max(ens.source_hscores_))
        out["fits"][name] = {
            "weights": ens.weights_.tolist(), "objective": ens.objective_, "hscore": ens.ensemble_hscore_,
            "regularizer": ens.history_[-1]["regularizer"], "best_vertex": best_vertex,
            "uniform": ens.candidates_["uniform"],
            "reaches_best_candidate": ens.objective_ >= max(ens.candidates_.values()) - 1e-3,
            "start": ens.start_, "converged": ens.converged_, "steps": ens.n_steps_, "seconds": ens.fit_seconds_,
            "regularizer_at_uniform": float(conflicts.regularizer(
                torch.full((len(bank),), 1 / len(bank), dtype=torch.float64), params.get("regularizer", "fishr"))),
        }
    h_only = np.array(out["fits"]["h_only"]["weights"])
    for f in out["fits"].values():
        f["max_weight_change_vs_h_only"] = float(np.abs(np.array(f["weights"]) - h_only).max())
    log("    fits: " + ", ".join(f"{k} J={v['objective']:.3f} (best single {v['best_vertex']:.3f}, {v['steps']} steps)"
                                  for k, v in out["fits"].items() if k in ("h_only", "fishr"))
                                  + f"  [{time.perf_counter() - t0:.0f} s]")
    return out


def pair_accuracies(model, bank, task, inter: dict, epochs: int, log) -> dict:
    """Accuracy of every single source and of three pairwise uniform mixtures, next to the measured I."""
    stack = bank.stack()
    cfg = TuneConfig(epochs=epochs, seed=0, num_tokens=stack.shape[-2])
    acc = {}
    for sp in bank:
        acc[sp.name] = tune_prompt(model, task, sp.prompt, cfg, train_accuracy=False).test_acc
    mix = np.array(inter["mixing_loss"])
    iu = np.triu_indices(len(bank), 1)
    order = np.argsort(mix[iu])
    picks = [order[0], order[len(order) // 2], order[-1]]
    pairs = []
    for p in picks:
        i, j = int(iu[0][p]), int(iu[1][p])
        mid = tune_prompt(model, task, (stack[i] + stack[j]) / 2, cfg, train_accuracy=False).test_acc
        a, b = bank.names[i], bank.names[j]
        pairs.append({"pair": [a, b], "mixing_loss": float(mix[i, j]), "acc_mid": mid, "acc_ends": [acc[a], acc[b]],
                      "acc_mixing_loss": mid - (acc[a] + acc[b]) / 2})
        log(f"    pair {a}+{b}: I = {mix[i, j]:+.3f}, accuracy mid {mid:.3f} vs ends {acc[a]:.3f}/{acc[b]:.3f}")
    return {"epochs": epochs, "single": acc, "pairs": pairs}


def timing(model, bank, task, repeat: int = 3) -> dict:
    """The default fit on the default target; a weight step against a plain prompt-tuning step on the same batch."""
    t0 = time.perf_counter()
    ens = HGPromptEnsemble().fit(model, bank, task=task)
    fit_s = time.perf_counter() - t0
    stack = bank.stack()
    n = ens.n_target_samples_
    x, y = sample_images(model, task, n, 0)
    target = target_tokens(model, x, y, None, 0)
    tok, y = target
    best = lambda fn: min(_time(fn) for _ in range(repeat))

    # The fit's own objective on its own sample: one weight step is one evaluation of it.
    objective = Objective(model, target, stack, ens.source_pass_, ens.lam, ens.regularizer, ens.h_variant)
    alpha = torch.full((len(bank),), 1 / len(bank), dtype=torch.float64)
    step = best(lambda: objective(alpha))
    vpt = min(tuning_step_seconds(model, tok, y, stack.mean(0), int(y.max()) + 1, repeat))
    pass_seconds = best(lambda: measure_sources(model, target, stack, fishr=True))
    grads_only = best(lambda: prompt_gradients(model, tok, stack, lambda f: -torch.stack([h_score(g, y) for g in f])))
    return {"default_target": task.name, "default_fit_seconds": fit_s, "default_fit_steps": ens.n_steps_,
            "default_fit_start": ens.start_, "n_samples": n, "weight_step_seconds": step, "vpt_step_seconds": vpt,
            "ratio_weight_step_over_vpt_step": step / vpt, "source_pass_seconds": pass_seconds,
            "source_pass_over_one_forward_backward_of_K_prompts": pass_seconds / grads_only,
            "source_pass_over_weight_steps": pass_seconds / step}


def sample_images(model, task, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-stratified sample of the train split's preprocessed images and labels (what a fit draws)."""
    x, y = split_images(model, task, "train")
    idx = task.subsample("train", n, seed)
    return x[idx], y[idx]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarise(per_target: dict, pairs: dict) -> dict:
    fits = [f for runs in per_target.values() for r in runs for f in r["fits"].values()]
    changed = {t: any(r["fits"][DEFAULT_FIT]["max_weight_change_vs_h_only"] > 0.01 for r in runs)
               for t, runs in per_target.items()}
    nonzero = {t: any(r["fits"][DEFAULT_FIT]["regularizer_at_uniform"] > 1e-9 for r in runs)
               for t, runs in per_target.items()}
    rho = {}
    for v in ("raw", "centred", "derivative"):
        per = {t: [r["interference"]["spearman"][v] for r in runs] for t, runs in per_target.items()}
        rho[v] = {"per_target_mean": {t: float(np.nanmean(x)) for t, x in per.items()},
                  "pooled_mean": float(np.nanmean([x for xs in per.values() for x in xs]))}
    neg = {t: [int((np.triu(np.array(r["interference"]["mixing_loss"]), 1) < 0).sum()) for r in runs]
           for t, runs in per_target.items()}
    vertex = {t: sum(max(r["fits"]["h_only"]["weights"]) > 0.999 for r in runs) for t, runs in per_target.items()}
    agree = [np.sign(p["mixing_loss"]) == np.sign(p["acc_mixing_loss"]) for t in pairs for p in pairs[t]["pairs"]]
    acc_rho = None
    if pairs:
        from scipy.stats import spearmanr

        xs = [p["mixing_loss"] for t in pairs for p in pairs[t]["pairs"]]
        ys = [p["acc_mixing_loss"] for t in pairs for p in pairs[t]["pairs"]]
        acc_rho = float(spearmanr(xs, ys).statistic) if len(xs) >= 3 else None
    return {
        "fits_reaching_best_candidate": f"{sum(f['reaches_best_candidate'] for f in fits)}/{len(fits)}",
        "default_regularizer": DEFAULT_FIT,
        "default_regularizer_nonzero_at_uniform": nonzero,
        "default_regularizer_changes_weights": changed,
        "h_only_optimum_is_a_single_source": {t: f"{v}/{len(per_target[t])}" for t, v in vertex.items()},
        "negative_mixing_loss_pairs": neg,
        "spearman_with_mixing_loss": rho,
        "pairs_where_accuracy_loss_has_the_sign_of_I": f"{int(sum(agree))}/{len(agree)}",
        "spearman_I_vs_accuracy_mixing_loss_pooled": acc_rho,
        "mean_fit_seconds": {k: float(np.mean([r["fits"][k]["seconds"] for runs in per_target.values() for r in runs]))
                             for k in FITS},
        "mean_fit_steps": {k: float(np.mean([r["fits"][k]["steps"] for runs in per_target.values() for r in runs]))
                           for k in FITS},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tune-epochs", type=int, default=0, help="epochs of the pair tunes (0: the probe state)")
    ap.add_argument("--no-pairs", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny model and task (for the tests)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "method.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log = lambda m: print(m, flush=True)
    if args.quick:
        model = toy_model()
        bank = toy_bank(model)
        tasks = {"toy_a": toy_task("toy_a")}
        args.seeds = args.seeds[:1]
    else:
        model = PromptedViT.from_directory(assets.BACKBONE_DIR)
        bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
        tasks = {t: Task.load(assets.task_path(t)) for t in (args.targets or assets.shipped_tasks("target"))}
    per_target, pairs, tau = {}, {}, {}
    for name, task in tasks.items():
        log(f"{name}:")
        per_target[name] = []
        for seed in args.seeds:
            log(f"  seed {seed}")
            per_target[name].append(run_seed(model, bank, task, seed, "auto", log))
        if not args.no_pairs:
            pairs[name] = pair_accuracies(model, bank, task, per_target[name][0]["interference"], args.tune_epochs, log)
            acc = [pairs[name]["single"][n] for n in bank.names]
            tau[name] = {"auto": kendall(per_target[name][0]["interference"]["source_hscores"], acc)}
            x, y = sample_images(model, task, 128, 0)
            small = measure_sources(model, target_tokens(model, x, y, None, 0), bank.stack()).source_hscores.numpy()
            tau[name]["n128"] = kendall(small, acc)
    time_task = tasks[assets.default_target()] if not args.quick else next(iter(tasks.values()))
    result = {
        "command": " ".join(["python", *sys.argv]), "environment": environment(),
        "backbone": {"name": model.name, "fingerprint": model.fingerprint, "embed_dim": model.embed_dim},
        "sources": bank.names, "targets": list(tasks), "seeds": args.seeds, "fits": FITS,
        "per_target": per_target, "pair_accuracies": pairs, "kendall_tau_hscore_vs_probe_accuracy": tau,
        "timing": timing(model, bank, time_task, repeat=1 if args.quick else 3),
    }
    result["summary"] = summarise(per_target, pairs)
    result["seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    log(json.dumps(result["summary"], indent=1))
    log(json.dumps(result["timing"], indent=1))
    log(f"wrote {args.out} in {result['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
