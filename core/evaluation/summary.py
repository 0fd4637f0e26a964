"""Summaries of an evaluation: the results table, paired differences with bootstrap intervals, which entries are
clearly best, and how often tuning never beat the initial state."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..metrics.stats import excludes_zero, paired
from .methods import METHODS, REFERENCE


def methods_in(per_target: dict) -> list[str]:
    """The methods every (target, seed) of a result holds, in the registry's order (single-source tunes left out)."""
    runs = [r for rs in per_target.values() for r in rs]
    return [m for m in METHODS if runs and all(m in r["methods"] for r in runs)]


def table(per_target: dict) -> dict[str, Any]:
    """Per method, per target: mean and spread of the test accuracy over seeds; and the mean over targets."""
    out = {}
    for m in methods_in(per_target):
        row = {}
        for t, runs in per_target.items():
            accs = [r["methods"][m]["test_acc"] for r in runs]
            row[t] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
        row["mean_over_targets"] = float(np.mean([v["mean"] for v in row.values()]))
        out[m] = row
    return out


def paired_summary(per_target: dict, method: str = REFERENCE) -> dict[str, Any]:
    """``method`` minus every other method (upper bounds left out), pooled over target x seed and per target."""
    out = {}
    for b in [m for m in methods_in(per_target) if m != method and not METHODS[m].upper_bound]:
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


def best_entries(per_target: dict, methods=None) -> dict[str, list[str]]:
    """Per target, the methods to mark best: the one with the best mean test accuracy together with every method
    that is the same tune on every seed (the same job, as when HGPrompt's weights land on the source with the best
    H-score; results without job keys compare accuracies), if their paired interval against the runner-up, the
    best method outside that group (over seeds), excludes 0; else an empty list (nothing is marked).
    ``oracle_test`` is an upper bound, not a method.

    Fewer than ``MIN_SEEDS_TO_MARK`` seeds mark nothing: a percentile bootstrap over two differences only says
    whether both have the same sign."""
    methods = methods_in(per_target) if methods is None else methods
    out = {}
    for t, runs in per_target.items():
        if len(runs) < MIN_SEEDS_TO_MARK:
            out[t] = []
            continue
        accs = {m: [r["methods"][m]["test_acc"] for r in runs] for m in methods
                if not (m in METHODS and METHODS[m].upper_bound)}
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


def markdown(q: dict) -> str:
    """The results table (a best entry is bold only where its interval against the runner-up excludes 0) and
    the paired comparison of HGPrompt with every baseline."""
    targets, t = q["targets"], q["table"]
    lines = ["| method | " + " | ".join(targets) + " | mean |", "|---|" + "---|" * (len(targets) + 1)]
    for m, row in t.items():
        cells = []
        for tg in targets:
            s = f"{100 * row[tg]['mean']:.1f}" + ("" if len(q["seeds"]) == 1 else f" ± {100 * row[tg]['std']:.1f}")
            cells.append(f"**{s}**" if m in q["best_entries"].get(tg, []) else s)
        label = "oracle_test (upper bound: chosen on test)" if m == "oracle_test" else m
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * row['mean_over_targets']:.1f} |")
    lines += ["", "| HGPrompt minus | mean (points) | 95 % bootstrap interval | wins / ties / losses |",
              "|---|---|---|---|"]
    for b, p in q["paired"].items():
        lines.append(f"| {b} | {100 * p['mean_diff']:+.2f} | [{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}] | "
                     f"{p['wins']} / {p['ties']} / {p['losses']} |")
    return "\n".join(lines)


def against(per_target: dict, references=("best_hscore", "oracle_test"), by_target: bool = False) -> dict[str, Any]:
    """Every method minus each of ``references`` (selection by H-score; the single source chosen on test, an upper
    bound only a real mixture can pass), pooled over target x seed: ``{method: {reference: paired}}``; with
    ``by_target`` each pooled entry also holds ``per_target`` (the same difference over one target's seeds)."""
    present = methods_in(per_target)
    out = {}
    for m in present:
        if m in references:
            continue
        out[m] = {}
        for ref in references:
            if ref not in present:
                continue
            a = [r["methods"][m]["test_acc"] for runs in per_target.values() for r in runs]
            b = [r["methods"][ref]["test_acc"] for runs in per_target.values() for r in runs]
            out[m][ref] = paired(a, b)
            if by_target:
                out[m][ref]["per_target"] = {t: paired([r["methods"][m]["test_acc"] for r in runs],
                                                       [r["methods"][ref]["test_acc"] for r in runs])
                                             for t, runs in per_target.items()}
    return out
