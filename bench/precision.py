"""What bf16 autocast changes against float32 on the shipped targets; writes bench/results/precision.json.

    python bench/precision.py                  # every shipped target, seeds 0-2; tunes on seeds 0-1
                                               # (about 40 min, quiet)
    python bench/precision.py --quick          # the toy setup, for the test suite

For every (target, seed), first every source's H-score on the fit's sample in both precisions (their rankings); then
the weights are fitted twice, in float32 and under bf16 autocast (the ``precision`` option),
with the default settings and with task arithmetic at lambda 0 (the rule that mixes most often here; it reuses the
default fit's source pass): the sources' H-scores, their ranking, the weights and the objective of both. Then, paired,
the quality profile's 2-epoch tune (bench/quality.py's recipe) from the float32 fit's prompt, once in each precision:
the test accuracies and their difference. The default precision is chosen from this (docs/METHOD_NOTES.md,
"Precision"): bf16 only if the weights and the rankings are unchanged on every shipped target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from core import HGPromptEnsemble, TuneConfig, tune_prompt
from core.evaluation.setups import load_setup
from core.io.runs import environment
from core.io.safe_io import atomic_write_json
from core.method.scoring import hscores_at
from core.metrics.stats import bootstrap_ci
from core.model.device import precision
from core.model.tokens import target_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = {"default": {}, "task_arithmetic_h_only": {"mixing": "task_arithmetic", "lam": 0.0}}
RECIPE = {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "head_lr": 1e-3, "weight_decay": 1e-4, "head_init": "probe",
          "batch_size": 64, "warmup": 0.1}


def fits(model, bank, task, seed: int, quick: bool) -> dict:
    """Both rules in both precisions on one (target, seed): what each gives, and how bf16 differs from fp32."""
    extra = {"steps": 3, "n_samples": 40} if quick else {}
    out = {}
    for p in ("fp32", "bf16"):
        t0 = time.perf_counter()
        first = HGPromptEnsemble(precision=p, seed=seed, **extra).fit(model, bank, task=task)
        runs = {"default": first}
        for name, over in RULES.items():
            if name != "default":
                runs[name] = HGPromptEnsemble(precision=p, seed=seed, **extra, **over).fit(
                    model, bank, task=task, source_pass=first.source_pass_, memo=first.memo_)
        out[p] = {"seconds": time.perf_counter() - t0, "source_hscores": first.source_hscores_.tolist(),
                  "ranking": [first.names_[i] for i in np.argsort(-first.source_hscores_, kind="stable")],
                  "fit_seconds": first.fit_seconds_,
                  **{name: {"weights": e.weights_.tolist(), "objective": e.objective_, "hscore": e.ensemble_hscore_}
                     for name, e in runs.items()}}
        out[p]["prompt"] = first.prompt_  # (kept for the tunes, dropped before writing)
    a, b = out["fp32"], out["bf16"]
    h32, h16 = np.asarray(a["source_hscores"]), np.asarray(b["source_hscores"])
    gaps = np.diff(np.sort(h32))
    out["compare"] = {
        "max_abs_hscore_change": float(np.abs(h16 - h32).max()),
        "smallest_gap_between_two_sources_fp32": float(gaps.min()) if gaps.size else None,
        "ranking_equal": a["ranking"] == b["ranking"], "top_source_equal": a["ranking"][0] == b["ranking"][0],
        **{name: {"max_abs_weight_change": float(np.abs(np.asarray(b[name]["weights"])
                                                        - np.asarray(a[name]["weights"])).max()),
                  "objective_change": b[name]["objective"] - a[name]["objective"]} for name in RULES},
        "fit_speedup": a["fit_seconds"] / b["fit_seconds"],
    }
    return out


def tunes(model, task, prompt: torch.Tensor, seed: int, quick: bool) -> dict:
    """The 2-epoch tune from ``prompt`` in both precisions (same seed, so the same batches): test accuracies."""
    out = {}
    for p in ("fp32", "bf16"):
        cfg = TuneConfig(**{**RECIPE, "epochs": 1 if quick else RECIPE["epochs"]}, seed=seed, precision=p)
        r = tune_prompt(model, task.resplit(seed), prompt, cfg, train_accuracy=False)
        out[p] = {"test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch, "seconds": r.seconds}
    out["test_acc_change"] = out["bf16"]["test_acc"] - out["fp32"]["test_acc"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the weight fits")
    ap.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the paired tunes")
    ap.add_argument("--targets", nargs="+", default=None, help="default: every shipped target")
    ap.add_argument("--quick", action="store_true", help="the toy setup (for tests)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "precision.json"))
    args = ap.parse_args(argv)
    setup = {"kind": "toy" if args.quick else "embedded"}
    model, bank, tasks = load_setup(setup)
    targets = args.targets or list(tasks)
    seeds, tune_seeds = ([0], [0]) if args.quick else (args.seeds, args.tune_seeds)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
              "setup": setup["kind"], "threads": torch.get_num_threads(), "targets": {}}
    t0 = time.perf_counter()
    # In three passes, cheapest first, the JSON rewritten after each (target, seed): a stopped run keeps what it did.
    # 1. every source's H-score on the fit's sample (one forward of the K sources) in both precisions: the rankings;
    for s in seeds:
        for t in targets:
            entry = result["targets"].setdefault(t, {"hscores": {}, "fits": {}, "tunes": {}})
            entry["hscores"][str(s)] = source_hscores(model, bank, tasks[t].resplit(s), s, args.quick)
        result["summary"] = summary(result, time.perf_counter() - t0)
        atomic_write_json(args.out, result)
    # 2. the fits (both rules) in both precisions: the weights; 3. the paired tunes.
    for s in seeds:
        for t in targets:
            entry = result["targets"][t]
            print(f"{t} seed {s}: fits ...", flush=True)
            f = fits(model, bank, tasks[t].resplit(s), s, args.quick)
            prompt = f["fp32"].pop("prompt")
            f["bf16"].pop("prompt")
            entry["fits"][str(s)] = f
            if s in tune_seeds:
                print(f"{t} seed {s}: tunes ...", flush=True)
                entry["tunes"][str(s)] = tunes(model, tasks[t], prompt, s, args.quick)
            result["summary"] = summary(result, time.perf_counter() - t0)
            atomic_write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


def source_hscores(model, bank, task, seed: int, quick: bool) -> dict:
    """Every source's H-score on the fit's target sample, in float32 and under bf16; their rankings compared."""
    tokens, y = target_tokens(model, task, None, 40 if quick else "auto", seed)
    out = {}
    for p in ("fp32", "bf16"):
        with precision(p):
            h = hscores_at(model, tokens, y, bank.stack().to(tokens.device)).double().numpy()
        out[p] = {"hscores": h.tolist(), "ranking": [bank.names[i] for i in np.argsort(-h, kind="stable")]}
    h32, h16 = np.asarray(out["fp32"]["hscores"]), np.asarray(out["bf16"]["hscores"])
    gaps = np.diff(np.sort(h32))
    out["compare"] = {"max_abs_hscore_change": float(np.abs(h16 - h32).max()),
                      "smallest_gap_fp32": float(gaps.min()) if gaps.size else None,
                      "ranking_equal": out["fp32"]["ranking"] == out["bf16"]["ranking"],
                      "top_source_equal": out["fp32"]["ranking"][0] == out["bf16"]["ranking"][0],
                      "swapped": [[a, b] for a, b in zip(out["fp32"]["ranking"], out["bf16"]["ranking"], strict=True)
                                  if a != b]}
    return out


def summary(result: dict, seconds: float) -> dict:
    hs = [h["compare"] for e in result["targets"].values() for h in e["hscores"].values()]
    cmp = [f["compare"] for e in result["targets"].values() for f in e["fits"].values()]
    changes = [tn["test_acc_change"] for e in result["targets"].values() for tn in e["tunes"].values()]
    out = {"samples": len(hs), "source_rankings_equal": sum(h["ranking_equal"] for h in hs),
           "source_top_equal": sum(h["top_source_equal"] for h in hs),
           "source_max_abs_hscore_change": max(h["max_abs_hscore_change"] for h in hs), "seconds": seconds}
    if not cmp:
        return out
    return {
        **out,
        "fits": len(cmp),
        "rankings_equal": sum(c["ranking_equal"] for c in cmp),
        "top_source_equal": sum(c["top_source_equal"] for c in cmp),
        "max_abs_hscore_change": max(c["max_abs_hscore_change"] for c in cmp),
        **{f"{name}_weights_equal": sum(c[name]["max_abs_weight_change"] == 0.0 for c in cmp) for name in RULES},
        **{f"{name}_max_abs_weight_change": max(c[name]["max_abs_weight_change"] for c in cmp) for name in RULES},
        "fit_speedup_median": float(np.median([c["fit_speedup"] for c in cmp])),
        "tunes": len(changes), "test_acc_change_mean": float(np.mean(changes)) if changes else None,
        "test_acc_change_ci95": list(bootstrap_ci(np.asarray(changes))) if len(changes) > 1 else None,
    }


if __name__ == "__main__":
    sys.exit(main())
