"""Mixing rules and objectives: which objective ranks mixtures as accuracy does, and a case whose answer is a mixture.

    python bench/mixing.py                     # every shipped target -> bench/results/mixing.json
                                               # (about 2.5 h on 2 CPUs)
    python bench/mixing.py --quick --out /tmp/m.json   # the toy setup, for the tests

Two batches of Ray jobs (``--serial``: one after another here): the untuned part (probes, fits), then every tune;
every finished job is a file under ``--store`` (an interrupted run resumes). Three parts:

- ``objective_tau``: per shipped target (seed 0: its train/val split redrawn as the protocol does), the objectives
  (the shrinkage, pinv and trace-ratio H-scores, LogME, TransRate, the cross-validated probe log-likelihood) on the
  fit's target sample, and the probe accuracy (logistic regression on the frozen features of the 800 train images,
  scored on the 1000 test images) over every single source, the uniform average, every pair's midpoint and task
  arithmetic sum, the full task-arithmetic sum and TIES; then the tuned accuracy (the full recipe: 20 epochs, prompt lr
  1e-2, the last epoch) of six of them. Kendall's tau of each objective against each accuracy, per target and pooled.
- ``known_answer``: ``shapes_quad`` (which quadrant) with ``shapes_xpos`` (x position) and ``shapes_yhalf`` (top or
  bottom half) in the bank: each (mixing rule, objective, lambda 1 or 0) fitted on the whole bank for seeds 0-4, and the
  learned prompts, both single sources and the random start tuned in two regimes (10 train images per class, and all
  800: there only the mixtures learned with the H-score and the probe likelihood, as a tune costs 20x more), with the
  paired difference of each learned mixture minus each single source.
- ``timing``: the default fit and a task-arithmetic fit on the default target; one weight step against one plain
  prompt-tuning step on the same sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from core import HGPromptEnsemble, Objective, TuneConfig, measure_sources, tune_prompt
from core.evaluation.setups import load_setup
from core.evaluation.sweep import Job, JobStore, run_jobs, start_ray, tqdm_progress
from core.io.digest import settings_digest, tensor_digest
from core.io.runs import environment
from core.method.mixing import make_rule, ties_merge
from core.metrics.stats import kendall, paired
from core.metrics.transferability import transferability
from core.model.features import prompt_features
from core.model.tokens import target_tokens
from core.tuning.tune import tuning_step_seconds

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: The objectives compared: name -> (transferability objective, H-score variant).
OBJECTIVES = {"hscore": ("hscore", "shrinkage"), "hscore_pinv": ("hscore", "pinv"),
              "hscore_trace_ratio": ("hscore", "trace_ratio"), "logme": ("logme", "shrinkage"),
              "transrate": ("transrate", "shrinkage"), "probe_ll": ("probe_ll", "shrinkage")}
RULES = ("average", "task_arithmetic")
#: lambda 1 (the default: the fishr regulariser weighs the mixing) and 0 (the objective alone).
LAMS = (1.0, 0.0)
FULL = {"epochs": 20, "lr": 1e-2, "head_lr": 1e-3, "select": "last"}  # the quality sweep's --full recipe
PROFILES = {
    "default": {"targets": None, "seeds": [0, 1, 2, 3, 4], "regimes": [40, None], "tune": FULL,
                "pair": ("shapes_xpos", "shapes_yhalf"),
                "known_target": "shapes_quad", "setup": {"kind": "embedded"},
                "full_regime_objectives": ("hscore", "probe_ll")},
    "quick": {"targets": None, "seeds": [0, 1], "regimes": [6, None], "tune": {**FULL, "epochs": 1},
              "pair": ("src0", "src1"),
              "known_target": "toy_a", "setup": {"kind": "toy"},
              "full_regime_objectives": ("hscore",)},
}



def score(name: str, features: torch.Tensor, labels: torch.Tensor) -> float:
    objective, variant = OBJECTIVES[name]
    return float(transferability(features, labels, objective, variant))


# ------------------------------------------------------------------- jobs
def job(payload: dict) -> dict:
    """One unit: a fit (its weights and the prompt it makes) or a tune (its accuracies)."""
    torch.set_num_threads(int(payload.get("threads", 1)))
    model, bank, tasks = load_setup(payload["setup"])
    task = tasks[payload["target"]].resplit(payload["seed"])
    t0 = time.perf_counter()
    if payload["kind"] == "probe":
        out = probe_scores(model, bank, task)
    elif payload["kind"] == "fit":
        objective, variant = OBJECTIVES[payload["objective"]]
        ens = HGPromptEnsemble(mixing=payload["rule"], objective=objective, h_variant=variant, lam=payload["lam"],
                               seed=payload["seed"]).fit(model, bank, task=task)
        out = {"weights": ens.weights_.tolist(), "objective": ens.objective_, "start": ens.start_,
               "steps": ens.n_steps_, "prompt": ens.prompt_.tolist()}
    else:
        cfg = TuneConfig(**{**payload["tune"], "seed": payload["seed"], "n_train": payload["n_train"]})
        prompt = None if payload["prompt"] is None else torch.tensor(payload["prompt"])
        r = tune_prompt(model, task, prompt, cfg, train_accuracy=False)
        out = {"test_acc": r.test_acc, "val_acc": r.val_acc}
    out["seconds"] = time.perf_counter() - t0
    return out


def tune_job(setup, target, seed, prompt: torch.Tensor, tune: dict, n_train=None) -> Job:
    digest = tensor_digest(prompt).rsplit(':', 1)[1][:12]
    key = f"tune/{target}/{seed}/{n_train}/{digest}/{settings_digest(setup, tune)}"
    return Job(key, {"kind": "tune", "setup": setup, "target": target, "seed": seed, "tune": tune, "n_train": n_train,
                     "prompt": prompt.tolist()})


# -------------------------------------------------------------- mixtures
def mixtures(bank) -> dict[str, torch.Tensor]:
    """Every single source, the uniform average, each pair's midpoint and task-arithmetic sum, the full sum, TIES."""
    stack, start, names = bank.stack(), bank.start, bank.names
    out = {n: stack[i] for i, n in enumerate(names)}
    out["uniform"] = stack.mean(0)
    ta = make_rule("task_arithmetic", stack, start)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out[f"mid({names[i]},{names[j]})"] = (stack[i] + stack[j]) / 2
            w = torch.zeros(len(names), dtype=torch.float64)
            w[[i, j]] = 1.0
            out[f"sum({names[i]},{names[j]})"] = ta.prompt(w)
    out["sum(all)"] = ta.prompt(torch.ones(len(names), dtype=torch.float64))
    out["ties"] = ties_merge(stack, start)
    return out


def probe_scores(model, bank, task) -> dict:
    """Every objective and the probe accuracy of every mixture on ``task`` (its seed-0 split): no tuning."""
    mix = mixtures(bank)
    names = list(mix)
    prompts = torch.stack([mix[n] for n in names])
    tok, y = target_tokens(model, task, None, "auto", 0)
    feats = prompt_features(model, tok, prompts)
    scores = {o: [score(o, f, y) for f in feats] for o in OBJECTIVES}
    probe = [tune_prompt(model, task, p, TuneConfig(epochs=0, seed=0), train_accuracy=False).test_acc for p in prompts]
    return {"mixtures": names, "probe_acc": probe, "scores": scores,
            "tau_probe": {o: kendall(v, probe) for o, v in scores.items()}}


def tuned_subset(bank, probe: dict) -> list[str]:
    """Six mixtures to tune per target: the two single sources with the best probe accuracy, their midpoint and their
    task-arithmetic sum, the uniform average and TIES."""
    singles = [n for n in probe["mixtures"] if n in bank.names]
    acc = dict(zip(probe["mixtures"], probe["probe_acc"], strict=False))
    a, b = sorted(singles, key=lambda n: -acc[n])[:2]
    i, j = sorted([bank.names.index(a), bank.names.index(b)])
    pa, pb = bank.names[i], bank.names[j]
    return [a, b, f"mid({pa},{pb})", f"sum({pa},{pb})", "uniform", "ties"]


# ----------------------------------------------------------------- summary
def paired_against(results: dict[str, list[float]], mixture: str, singles: list[str]) -> dict:
    return {s: paired(results[mixture], results[s]) for s in singles}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the toy setup (for the tests)")
    ap.add_argument("--targets", nargs="+", default=None)
    ap.add_argument("--serial", action="store_true", help="run the jobs in this process, one after another")
    ap.add_argument("--store", default=None,
                    help="folder of finished jobs (default: bench/results/tmp/mixing-<profile>)")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/mixing.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    name = "quick" if args.quick else "default"
    profile = PROFILES[name]
    setup = profile["setup"]
    log = lambda m: print(m, flush=True)
    model, bank, tasks = load_setup(setup)
    targets = args.targets or profile["targets"] or list(tasks)
    store = JobStore(args.store or os.path.join(RESULTS, "tmp", f"mixing-{name}"))
    kw = {"serial": args.serial}
    if not args.serial:
        start_ray()
    result = {"command": " ".join(["python", "bench/mixing.py", *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment(), "backbone": {"name": model.name, "fingerprint": model.fingerprint},
              "sources": bank.names, "bank_start": bank.start_info, "targets": targets, "objectives": list(OBJECTIVES),
              "tune_config": profile["tune"]}

    # ---- the untuned part, all at once: every target's mixtures probed, and the known-answer fits
    target = profile["known_target"]
    pair = list(profile["pair"])
    seeds = profile["seeds"]
    probe_jobs = {t: Job(f"probe/{t}/{settings_digest(setup)}",
                         {"kind": "probe", "setup": setup, "target": t, "seed": 0})
                  for t in targets}
    fit_jobs = [Job(f"fit/{target}/{s}/{rule}/{o}/{lam}/{settings_digest(setup)}",
                    {"kind": "fit", "setup": setup, "target": target, "seed": s, "rule": rule, "objective": o,
                     "lam": lam})
                for lam in LAMS for rule in RULES for o in OBJECTIVES for s in seeds]
    first = run_jobs(job, [*probe_jobs.values(), *fit_jobs], store, progress=tqdm_progress("probes and fits"), **kw)
    probe = {t: first[probe_jobs[t].key] for t in targets}
    for t in targets:
        log(f"  {t}: tau vs probe " + ", ".join(f"{o} {v:+.2f}" for o, v in probe[t]["tau_probe"].items()))
    learned = {}
    for j in fit_jobs:
        p = j.payload
        learned.setdefault(f"{p['rule']}/{p['objective']}/lam{p['lam']:g}", {})[p["seed"]] = first[j.key]

    # ---- the tuned part, all at once: six mixtures per target (seed 0), and the known answer's candidates
    mix = mixtures(bank)
    subsets = {t: tuned_subset(bank, probe[t]) for t in targets}
    tau_jobs = {(t, m): tune_job(setup, t, 0, mix[m], profile["tune"]) for t in targets for m in subsets[t]}
    ia, ib = bank.names.index(pair[0]), bank.names.index(pair[1])
    # The pair's midpoint and sum are the mixtures' own (the sum as the task-arithmetic rule makes it, so a fit that
    # learns exactly (1, 1) on the pair gives the same prompt, bit for bit, and shares its tunes).
    in_bank = ",".join(sorted(pair, key=bank.names.index))
    designed = {pair[0]: mix[pair[0]], pair[1]: mix[pair[1]], "random": bank.start,
                f"mid({pair[0]},{pair[1]})": mix[f"mid({in_bank})"],
                f"sum({pair[0]},{pair[1]})": mix[f"sum({in_bank})"]}
    cands: dict[str, dict[int, torch.Tensor]] = {c: {s: p for s in seeds} for c, p in designed.items()}
    for key, per_seed in learned.items():
        cands[f"learned:{key}"] = {s: torch.tensor(per_seed[s]["prompt"]) for s in seeds}
    # Every candidate in the few-shot regime; with all 800 train images (a tune costs 20x more) the designed
    # candidates and the mixtures learned with the objectives in ``full_regime_objectives`` only.
    in_regime = {n: [c for c in cands if n is not None or not c.startswith("learned:")
                     or c.split(":", 1)[1].split("/")[1] in profile["full_regime_objectives"]]
                 for n in profile["regimes"]}
    known_jobs = {(n, c, s): tune_job(setup, target, s, cands[c][s], profile["tune"], n)
                  for n in profile["regimes"] for c in in_regime[n] for s in seeds}
    every = list({j.key: j for j in [*tau_jobs.values(), *known_jobs.values()]}.values())
    done = run_jobs(job, every, store, progress=tqdm_progress("tunes"), **kw)

    per_target = {}
    for t in targets:
        chosen = subsets[t]
        acc = [done[tau_jobs[(t, m)].key]["test_acc"] for m in chosen]
        idx = [probe[t]["mixtures"].index(m) for m in chosen]
        scores = {o: [probe[t]["scores"][o][i] for i in idx] for o in OBJECTIVES}
        per_target[t] = {**probe[t], "tuned": {"mixtures": chosen, "test_acc": acc,
                                                "probe_acc": [probe[t]["probe_acc"][i] for i in idx], "scores": scores,
                                                "tau_tuned": {o: kendall(v, acc) for o, v in scores.items()}}}
        log(f"  {t}: tau vs tuned "
            + ", ".join(f"{o} {v:+.2f}" for o, v in per_target[t]["tuned"]["tau_tuned"].items()))
    pooled = {o: {"tau_probe_mean": float(np.nanmean([per_target[t]["tau_probe"][o] for t in targets])),
                  "tau_tuned_mean": float(np.nanmean([per_target[t]["tuned"]["tau_tuned"][o] for t in targets])),
                  "tau_probe_over_tuned_mixtures_mean": float(np.nanmean(
                      [kendall(per_target[t]["tuned"]["probe_acc"], per_target[t]["tuned"]["test_acc"])
                       for t in targets]))}
              for o in OBJECTIVES}
    best_tuned = max(OBJECTIVES, key=lambda o: np.nan_to_num(pooled[o]["tau_tuned_mean"], nan=-2))
    best_probe = max(OBJECTIVES, key=lambda o: np.nan_to_num(pooled[o]["tau_probe_mean"], nan=-2))
    result["objective_tau"] = {"per_target": per_target, "pooled": pooled, "best_against_tuned": best_tuned,
                               "best_against_probe": best_probe,
                               "probe_against_tuned": "Kendall's tau of the probe accuracy itself against the tuned "
                                                      "accuracy over the same six mixtures (how well the probe "
                                                      "predicts tuning)"}

    log(f"known answer: {target} with {pair}")
    regimes = {}
    for n_train in profile["regimes"]:
        acc = {c: [done[known_jobs[(n_train, c, s)].key]["test_acc"] for s in seeds] for c in in_regime[n_train]}
        better = max(pair, key=lambda n: np.mean(acc[n]))
        regimes[str(n_train if n_train is not None else "all")] = {
            "test_acc": acc, "better_single": better,
            "minus_singles": {c: paired_against(acc, c, pair) for c in acc if c not in pair}}
        log(f"  n_train {n_train}: " + ", ".join(f"{c} {np.mean(v):.3f}" for c, v in acc.items()))
    on_pair = {key: {s: [v["weights"][ia], v["weights"][ib]] for s, v in per_seed.items()}
               for key, per_seed in learned.items()}
    result["known_answer"] = {"target": target, "sources": pair, "seeds": seeds, "lams": list(LAMS), "fits": learned,
                              "weights_on_the_pair": on_pair, "regimes": regimes}
    result["known_answer"]["goal"] = _goal(result["known_answer"])

    # ---- timing
    result["timing"] = timing(model, bank, tasks[target])
    result["seconds"] = time.perf_counter() - t_start
    out = args.out or os.path.join(RESULTS, "mixing.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for fit in result["known_answer"]["fits"].values():  # the prompts are in the job store; the JSON keeps the weights
        for v in fit.values():
            v.pop("prompt", None)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    log(json.dumps({"pooled": pooled, "goal": result["known_answer"]["goal"], "timing": result["timing"]}, indent=1))
    log(f"wrote {out} in {result['seconds'] / 60:.1f} min")
    return 0


def _goal(k: dict) -> dict:
    """The issue's goal for the known-answer case: a learned mixture that puts >= 0.25 on each complementary source
    (on every seed), and whose interval against the better single source excludes 0 in at least one regime."""
    out = {}
    for key, per_seed in k["weights_on_the_pair"].items():
        mixes = all(min(w) >= 0.25 for w in per_seed.values())
        beats = {r: v["minus_singles"][f"learned:{key}"][v["better_single"]] for r, v in k["regimes"].items()
                 if f"learned:{key}" in v["minus_singles"]}  # a regime tunes only some objectives' mixtures
        out[key] = {"mixture_on_every_seed": mixes,
                    "interval_above_better_single": [r for r, p in beats.items() if p["ci95"][0] > 0],
                    "minus_better_single": {r: {"mean_diff": p["mean_diff"], "ci95": p["ci95"]}
                                            for r, p in beats.items()}}
    return out


def timing(model, bank, task, repeat: int = 3) -> dict:
    """The default fit and a task-arithmetic fit on the target; one weight step (task arithmetic) against one plain
    prompt-tuning step on the same sample."""
    t0 = time.perf_counter()
    HGPromptEnsemble().fit(model, bank, task=task)
    default_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ens = HGPromptEnsemble(mixing="task_arithmetic").fit(model, bank, task=task)
    ta_s = time.perf_counter() - t0
    target = target_tokens(model, task, None, "auto", 0)
    tok, y = target
    sp = measure_sources(model, target, bank.stack(), fishr=True)
    objective = Objective(model, target, make_rule("task_arithmetic", bank.stack(), bank.start), sp, 1.0, "fishr")
    w = torch.full((len(bank),), 0.5, dtype=torch.float64)
    step = min(_time(lambda: objective(w)) for _ in range(repeat))
    vpt = min(tuning_step_seconds(model, tok, y, bank.stack().mean(0), int(y.max()) + 1, repeat))
    return {"default_fit_seconds": default_s, "task_arithmetic_fit_seconds": ta_s, "ta_fit_steps": ens.n_steps_,
            "ta_start": ens.start_, "weight_step_seconds": step, "vpt_step_seconds": vpt,
            "weight_step_over_vpt_step": step / vpt, "n_samples": int(len(y))}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
