"""What bf16 autocast changes against float32 on the shipped targets; writes bench/results/precision.json.

    python bench/precision.py                  # every shipped target, seeds 0-2; tunes on seeds 0-1 (about 40 min)
    python bench/precision.py --quick          # the toy setup, for the test suite

For every (target, seed) the weights are fitted twice, in float32 and under bf16 autocast (the ``precision`` option),
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = {"default": {}, "task_arithmetic_h_only": {"mixing": "task_arithmetic", "lam": 0.0}}
RECIPE = {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "head_lr": 1e-3, "weight_decay": 1e-4, "head_init": "probe",
          "batch_size": 64, "warmup": 0.1}


def fits(model, bank, task, seed: int, quick: bool) -> dict:
    """Both rules in both precisions on one (target, seed): what each gives, and how bf16 differs from fp32."""
    from core import HGPromptEnsemble

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
        **{name: {"max_abs_weight_change": float(np.abs(np.asarray(b[name]["weights"]) - np.asarray(a[name]["weights"])).max()),
                  "objective_change": b[name]["objective"] - a[name]["objective"]} for name in RULES},
        "fit_speedup": a["fit_seconds"] / b["fit_seconds"],
    }
    return out


def tunes(model, task, prompt: torch.Tensor, seed: int, quick: bool) -> dict:
    """The 2-epoch tune from ``prompt`` in both precisions (same seed, so the same batches): test accuracies."""
    from core import TuneConfig, tune_prompt

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
    from core.evaluation.setups import load_setup
    from core.io.runs import environment
    from core.metrics.stats import bootstrap_ci

    setup = {"kind": "toy" if args.quick else "embedded"}
    model, bank, tasks = load_setup(setup)
    targets = args.targets or list(tasks)
    seeds, tune_seeds = ([0], [0]) if args.quick else (args.seeds, args.tune_seeds)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
              "setup": setup["kind"], "threads": torch.get_num_threads(), "targets": {}}
    t0 = time.perf_counter()
    for t in targets:
        entry = result["targets"][t] = {"fits": {}, "tunes": {}}
        for s in seeds:
            print(f"{t} seed {s}: fits ...", flush=True)
            task = tasks[t].resplit(s)
            f = fits(model, bank, task, s, args.quick)
            prompt = f["fp32"].pop("prompt")
            f["bf16"].pop("prompt")
            entry["fits"][str(s)] = f
            if s in tune_seeds:
                print(f"{t} seed {s}: tunes ...", flush=True)
                entry["tunes"][str(s)] = tunes(model, tasks[t], prompt, s, args.quick)
    cmp = [f["compare"] for e in result["targets"].values() for f in e["fits"].values()]
    changes = [tn["test_acc_change"] for e in result["targets"].values() for tn in e["tunes"].values()]
    result["summary"] = {
        "fits": len(cmp),
        "rankings_equal": sum(c["ranking_equal"] for c in cmp), "top_source_equal": sum(c["top_source_equal"] for c in cmp),
        "max_abs_hscore_change": max(c["max_abs_hscore_change"] for c in cmp),
        **{f"{name}_weights_equal": sum(c[name]["max_abs_weight_change"] == 0.0 for c in cmp) for name in RULES},
        **{f"{name}_max_abs_weight_change": max(c[name]["max_abs_weight_change"] for c in cmp) for name in RULES},
        "fit_speedup_median": float(np.median([c["fit_speedup"] for c in cmp])),
        "tunes": len(changes), "test_acc_change_mean": float(np.mean(changes)) if changes else None,
        "test_acc_change_ci95": list(bootstrap_ci(np.asarray(changes))) if len(changes) > 1 else None,
        "seconds": time.perf_counter() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
