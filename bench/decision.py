"""The decision (fourth edition): does a short tune of each candidate predict what the full tune makes of it?

    python bench/decision.py                      # every shipped target, 5 seeds, the full recipe ->
    bench/results/decision.json
    python bench/decision.py --stage sweep        # only the full-recipe jobs (weights and full tunes), no short tunes
    python bench/decision.py --quick --out /tmp/d.json   # the toy setup, for the tests

The sweep runs on Ray, every finished job a file under --store (an interrupted run resumes). Finished jobs of
bench/results/quality-full.json (the same recipe, bank and splits) are written into the store first and read
back, not recomputed: that JSON holds every job's key and result (``--no-read-back`` computes them again).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np

from core.evaluation import summary as ev
from core.evaluation.decision import FULL_RECIPE, SHORT, candidate_init, choose, short_jobs
from core.evaluation.methods import METHODS
from core.evaluation.protocol import Protocol, evaluate, init_id, initial_prompt, run_job, weight_jobs
from core.evaluation.setups import load_setup
from core.evaluation.sweep import Job, JobStore, run_jobs, start_ray, tqdm_progress
from core.io.assets import COMPOSITIONS
from core.io.digest import settings_digest
from core.io.runs import environment
from core.metrics.stats import kendall, paired
from core.metrics.transferability import transferability
from core.model.features import prompt_features
from core.model.tokens import split_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
#: The full recipe of bench/quality.py --full (20 epochs, prompt lr 1e-2, the last epoch), key for key, so that its
#: jobs' keys are the quality sweep's.
FULL = dict(FULL_RECIPE)
#: What the decision needs beside itself: every single source (oracle_test), selection by H-score, the default,
#: the mixture task arithmetic learns at lambda 0, the full sum, the uniform point.
SWEEP = ("best_hscore", "oracle", "oracle_test", "hgprompt", "hgprompt_ta_h_only", "task_arithmetic_sum", "uniform")
#: The short schedules compared (epochs of their own one-cycle schedule, judged at the last one). The registry's
#: decision uses core.evaluation.decision.SHORT, chosen from these figures (1 epoch).
LENGTHS = (1, 2, 3, 5)
PROFILES = {
    "default": {"setup": {"kind": "embedded"}, "seeds": [0, 1, 2, 3, 4], "tune": FULL, "ensemble": {"lam": 1.0},
                "read_back": os.path.join(RESULTS, "quality-full.json"), "lengths": LENGTHS},
    "quick": {"setup": {"kind": "toy"}, "seeds": [0, 1], "tune": {**FULL, "epochs": 2},
              "ensemble": {"lam": 1.0, "steps": 3},
              "read_back": None, "lengths": (1, 2)},
}


def read_back(path: str, store, setup: dict, protocol) -> dict[str, int]:
    """Write the finished jobs of a quality sweep's JSON (``path``) into ``store`` under the keys this protocol
    gives them: every tune under its own key (a key names the target, seed, initial prompt and recipe), and per
    (target, seed) a weights job holding the protocol's weights methods, taken from that sweep's fits (the fits of
    one weights job share a source pass and come out bit for bit as when each ran alone). Jobs already in the
    store are left alone; a JSON of another recipe, setup or bank is not read. Returns the counts written."""
    q = json.load(open(path))
    if q["tune_config"] != protocol.tune or q.get("ensemble_params") != protocol.ensemble:
        return {"weights": 0, "tunes": 0}
    wanted = [m for m in protocol.methods if METHODS[m].kind == "weights"]
    n = {"weights": 0, "tunes": 0}
    for t, runs in q["per_target"].items():
        for r in runs:
            for v in r["methods"].values():
                if "job" in v and not store.has(v["job"]):
                    store.put(v["job"],
                              {**{k: v[k] for k in ("test_acc", "val_acc", "best_epoch", "val_curve", "seconds")},
                                         "read_back": os.path.relpath(path, ROOT)})
                    n["tunes"] += 1
            if not all(m in r["methods"] and "weights" in r["methods"][m] for m in wanted):
                continue
            key = weight_jobs(setup, [t], replace(protocol, seeds=[r["seed"]]))[0].key
            if not store.has(key):
                store.put(key, {"source_hscores": r["source_hscores"],
                                "weights": {m: r["methods"][m]["weights"] for m in wanted},
                                "fits": {m: f for m, f in r["fits"].items() if m in wanted},
                                "seconds": 0.0, "read_back": os.path.relpath(path, ROOT)})
                n["weights"] += 1
    return n


DECIDE = "hgprompt_decide"
#: Margins (accuracy) of the sensitivity check: how much a candidate must beat the first on validation.
MARGINS = (0.005, 0.01, 0.02)


# ------------------------------------------------------ tune-free predictors
def probe_job(payload: dict) -> dict:
    """The candidates' scores without tuning, on one (target, seed)'s train split (all of it): the shrinkage H-score
    (the objective the fit maximises) and the 5-fold cross-validated probe log-likelihood of each initial prompt's
    frozen features (a module-level function, so Ray ships it by reference)."""
    import torch

    torch.set_num_threads(int(payload.get("threads", 1)))
    t0 = time.perf_counter()
    model, bank, tasks = load_setup(payload["setup"])
    task = tasks[payload["target"]].resplit(payload["seed"])
    stack, start = bank.stack(), getattr(bank, "start", None)
    tok, y = split_tokens(model, task, "train")
    prompts = torch.stack([initial_prompt(i, stack, start) for i in payload["inits"]])
    feats = prompt_features(model, tok, prompts)
    return {o: [float(transferability(f, y, o)) for f in feats] for o in ("hscore", "probe_ll")} | {
        "n": int(len(y)), "seconds": time.perf_counter() - t0}


def probe_jobs(setup, targets, seeds, bank, weights: dict[tuple, dict], candidates) -> dict[tuple, "object"]:
    """One probe job per (target, seed) over the decision's candidates' initial prompts."""
    names, stack, start = list(bank.names), bank.stack(), getattr(bank, "start", None)
    out = {}
    for t in targets:
        for s in seeds:
            if (t, s) not in weights:
                continue
            inits = [candidate_init(c, names, weights[(t, s)]) for c in candidates]
            ids = settings_digest([init_id(i, stack, start) for i in inits])
            out[(t, s)] = Job(f"probe/{t}/{s}/{ids}/{settings_digest(setup)}",
                              {"setup": setup, "target": t, "seed": s, "inits": inits, "threads": 1})
    return out


def designed_jobs(setup, targets, protocol, bank, designs: dict[str, list[str]]) -> dict[tuple, "object"]:
    """Per (designed target, seed), the full tune of the designed sum ``P0 + sum of the task vectors of the sources
    that carry the target's factors``: a reference, not a candidate (a user does not know the design). Keyed as the
    protocol keys tunes, so a learned mixture that is exactly this sum shares the job."""
    names, stack, start = list(bank.names), bank.stack(), getattr(bank, "start", None)
    digest = settings_digest(setup, protocol.tune)
    out = {}
    for t in targets:
        if len(designs.get(t, [])) < 2 or start is None:
            continue
        init = {"rule": "task_arithmetic", "coef": [1.0 if n in designs[t] else 0.0 for n in names]}
        for s in protocol.seeds:
            key = f"tune/{t}/{s}/{init_id(init, stack, start)}/{digest}"
            out[(t, s)] = Job(key, {"kind": "tune", "setup": setup, "target": t, "seed": s, "tune": protocol.tune,
                                    "init": init, "key": key, "methods": ["designed sum"], "threads": 1})
    return out


def designed_result(per_target: dict, done: dict, jobs: dict, designs: dict) -> dict:
    """Per designed target: the designed sum's test accuracy minus selection by H-score, minus the better of its
    two sources (the one with the better mean), and minus oracle_test, paired over seeds."""
    out = {}
    for t in sorted({t for t, _ in jobs}, key=list(per_target).index):
        runs = [r for r in per_target[t] if (t, r["seed"]) in jobs]
        acc = [done[jobs[(t, r["seed"])].key]["test_acc"] for r in runs]
        singles = {n: [r["methods"][f"single:{n}"]["test_acc"] for r in runs] for n in designs[t]}
        better = max(singles, key=lambda n: np.mean(singles[n]))
        out[t] = {"sources": designs[t], "test_acc": acc, "better_source": better,
                  "minus_better_source": paired(acc, singles[better]),
                  "minus_best_hscore": paired(acc, [r["methods"]["best_hscore"]["test_acc"] for r in runs]),
                  "minus_oracle_test": paired(acc, [r["methods"]["oracle_test"]["test_acc"] for r in runs]),
                  "learned_is_designed": sum(r["methods"]["hgprompt_ta_h_only"]["job"] == jobs[(t, r["seed"])].key
                                             for r in runs)}
    return out


# ---------------------------------------------------------------- analysis
def distinct(candidates, methods: dict) -> list[str]:
    """The candidates with distinct initial prompts (the first of each group, in the decision's order): two
    candidates with one prompt share every tune, so counting both would count one prediction twice."""
    seen, out = set(), []
    for c in candidates:
        if methods[c]["job"] not in seen:
            seen.add(methods[c]["job"])
            out.append(c)
    return out


def rule_result(per_target: dict, score, candidates, margin: float = 0.0) -> dict:
    """A decision rule over the sweep: per (target, seed), ``score(target, run, candidate)`` for every candidate
    (None: the rule cannot score this pair), the chosen candidate (core.evaluation.decision.choose) and its full
    tune's test accuracy; then that accuracy minus selection by H-score and minus oracle_test, pooled and per target,
    Kendall's tau between the scores and the full tunes' test accuracies over the distinct candidates (per pair, then
    the mean per target and pooled), and how often each candidate was chosen."""
    rows = []
    for t, runs in per_target.items():
        for r in runs:
            m = r["methods"]
            if not all(c in m for c in candidates) or "best_hscore" not in m:
                continue
            scores = {c: score(t, r, c) for c in candidates}
            if any(v is None for v in scores.values()):
                continue
            chosen = choose(scores, list(candidates), margin)
            d = distinct(candidates, m)
            tau = kendall([scores[c] for c in d], [m[c]["test_acc"] for c in d]) if len(d) > 1 else float("nan")
            rows.append({"target": t, "seed": r["seed"], "chosen": chosen, "test_acc": m[chosen]["test_acc"],
                         "best_hscore": m["best_hscore"]["test_acc"],
                         "oracle_test": m.get("oracle_test", {}).get("test_acc"),
                         "tau": tau, "distinct": len(d)})
    out = {"pairs": len(rows), "rows": rows, "chosen": {c: sum(r["chosen"] == c for r in rows) for c in candidates}}
    targets = sorted({r["target"] for r in rows}, key=list(per_target).index)
    for ref in ("best_hscore", "oracle_test"):
        ok = [r for r in rows if r[ref] is not None]
        out[f"minus_{ref}"] = {**paired([r["test_acc"] for r in ok], [r[ref] for r in ok]),
                               "per_target": {t: paired([r["test_acc"] for r in ok if r["target"] == t],
                                                        [r[ref] for r in ok if r["target"] == t]) for t in targets}}
    taus = {t: [r["tau"] for r in rows if r["target"] == t and np.isfinite(r["tau"])] for t in targets}
    out["tau"] = {"per_target": {t: float(np.mean(v)) if v else float("nan") for t, v in taus.items()},
                  "pooled": float(np.mean([x for v in taus.values() for x in v])) if any(taus.values())
                  else float("nan"),
                  "pairs_with_tau": sum(len(v) for v in taus.values())}
    return out


def goal(result: dict) -> dict:
    """The issue's goal for a default: pooled minus selection by H-score > 0 with the interval's lower end above 0 and
    no target's mean below -0.5 points; the moonshot: pooled minus oracle_test > 0."""
    b, o = result["minus_best_hscore"], result["minus_oracle_test"]
    worst = min(b["per_target"].items(),
                key=lambda kv: kv[1]["mean_diff"]) if b["per_target"] else (None, {"mean_diff": 0})
    return {"above_selection": b["mean_diff"] > 0 and b["ci95"][0] > 0,
            "worst_target": worst[0], "worst_target_minus_selection": worst[1]["mean_diff"],
            "no_target_below_half_a_point": worst[1]["mean_diff"] >= -0.005,
            "met": bool(b["mean_diff"] > 0 and b["ci95"][0] > 0 and worst[1]["mean_diff"] >= -0.005),
            "moonshot": bool(o["mean_diff"] > 0)}


def _fmt(p: dict) -> str:
    return (f"{100 * p['mean_diff']:+.2f} [{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}] "
            f"({p['wins']}/{p['ties']}/{p['losses']})")


def markdown(result: dict) -> str:
    lines = ["| decision by | tau pooled | minus selection by H-score | minus oracle_test | worst target | "
             "chosen (best_hscore / mixture / uniform / sum) | short-tune seconds a pair |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["rules"].items():
        g = r["goal"]
        lines.append(f"| {name} | {r['tau']['pooled']:+.2f} | {_fmt(r['minus_best_hscore'])} | "
                     f"{_fmt(r['minus_oracle_test'])} | {g['worst_target']} "
                     f"{100 * g['worst_target_minus_selection']:+.2f} | "
                     + " / ".join(str(v) for v in r["chosen"].values())
                     + f" | {r.get('seconds_per_pair', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the toy setup (for the tests)")
    ap.add_argument("--stage", choices=("all", "sweep"), default="all",
                    help="sweep: only the full-recipe jobs of the methods the decision chooses among")
    ap.add_argument("--targets", nargs="+", default=None, help="default: every shipped target")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--serial", action="store_true", help="run the jobs in this process, one after another")
    ap.add_argument("--no-read-back", action="store_true", help="compute the quality sweep's jobs again")
    ap.add_argument("--store", default=None,
                    help="folder of finished jobs (default: bench/results/tmp/decision-<profile>)")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/decision.json)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="short schedules to compare, in epochs (default: the profile's, 1 2 3 5)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    name = "quick" if args.quick else "default"
    profile = PROFILES[name]
    setup = profile["setup"]
    model, bank, tasks = load_setup(setup)
    targets = args.targets or list(tasks)
    unknown = [t for t in targets if t not in tasks]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {sorted(tasks)}")
    seeds = args.seeds or profile["seeds"]
    store = JobStore(args.store or os.path.join(RESULTS, "tmp", f"decision-{name}"))
    methods = list(SWEEP) if args.stage == "sweep" else [*SWEEP, DECIDE]
    protocol = Protocol(methods, seeds, tune=profile["tune"], ensemble=profile["ensemble"], singles="all")
    read = {"weights": 0, "tunes": 0}
    if profile["read_back"] and not args.no_read_back:
        read = read_back(profile["read_back"], store, setup, protocol)
        print("read back from", profile["read_back"], read, flush=True)
    if not args.serial:
        start_ray()
    run = evaluate(protocol, targets, setup=setup, store=store, serial=args.serial, progress_for=tqdm_progress,
                   threads=1)
    print(f"sweep: {run.n_weight_jobs} weight jobs, {run.n_tune_jobs} tunes, {run.read_from_store} read from the "
          f"store, {run.seconds / 60:.1f} min", flush=True)
    if args.stage == "sweep":
        return 0

    # ---- the short tunes of every length, all at once (both workers busy), deduplicated with every tune so far
    lengths = args.lengths or profile["lengths"]
    plans, jobs = {}, {}
    for n in lengths:
        js, plans[n] = short_jobs(setup, targets, protocol, bank, run.weights, short={"epochs": n, "select": "last"})
        jobs.update({j.key: j for j in js})
    jobs = [type(j)(j.key, {**j.payload, "threads": 1}) for j in jobs.values()]
    computed = [j.key for j in jobs if not store.has(j.key)]
    shorts = run_jobs(run_job, jobs, store, serial=args.serial, progress=tqdm_progress("short tunes"))
    p_jobs = probe_jobs(setup, targets, seeds, bank, run.weights, decision_candidates())
    probes = run_jobs(probe_job, list(p_jobs.values()), store, serial=args.serial, progress=tqdm_progress("probes"))
    designs = compositions(setup)
    d_jobs = designed_jobs(setup, targets, protocol, bank, designs)
    d_done = run_jobs(run_job, list({j.key: j for j in d_jobs.values()}.values()), store, serial=args.serial,
                      progress=tqdm_progress("designed sums"))

    per_target = run.per_target
    candidates = decision_candidates()
    rules: dict[str, dict] = {}
    for n in lengths:
        plan = plans[n]
        rules[f"short tune, {n} epochs"] = rule_result(
            per_target, lambda t, r, c, plan=plan: shorts[plan[(t, r["seed"])][DECIDE][c]]["val_acc"], candidates)
        rules[f"short tune, {n} epochs"]["seconds_per_pair"] = float(np.mean([
            sum(shorts[k]["seconds"] for k in set(plan[ts][DECIDE].values())) for ts in plan]))
    # Sensitivity, not a choice made on test: a margin a candidate's validation accuracy must beat the first
    # candidate's by (200 validation images: one image is 0.5 points).
    margins = {n: {m: rule_result(per_target,
                                  lambda t, r, c, plan=plans[n]: shorts[plan[(t, r["seed"])][DECIDE][c]]["val_acc"],
                                  candidates, margin=m) for m in MARGINS} for n in lengths}
    for per in margins.values():
        for r in per.values():
            r["goal"] = goal(r)
            del r["rows"]
    order = list(decision_candidates())
    for o, label in (("hscore", "H-score of the initial features (train)"),
                     ("probe_ll", "probe log-likelihood, 5-fold (train)")):
        rules[label] = rule_result(
            per_target, lambda t, r, c, o=o: probes[p_jobs[(t, r["seed"])].key][o][order.index(c)], candidates)
    for n in (0, *lengths):  # free: the full tunes' own validation curves at epoch n (mid-schedule, not a short one)
        rules[f"full tune's val at epoch {n}"] = rule_result(
            per_target, lambda t, r, c, n=n: r["methods"][c]["val_curve"][n], candidates)
    rules["full tune's val at its end"] = rule_result(per_target, lambda t, r, c: r["methods"][c]["val_acc"],
                                                      candidates)
    for r in rules.values():
        r["goal"] = goal(r)
    # the registry's decision is the rule at its own length: the same choice on every pair
    own = {(t, r["seed"]): r["methods"][DECIDE]["decision"]["chosen"] for t, runs in per_target.items() for r in runs
           if DECIDE in r["methods"]}
    same = rules.get(f"short tune, {SHORT['epochs']} epochs")
    if same is not None:
        assert all(own[(x["target"], x["seed"])] == x["chosen"]
                   for x in same["rows"]), "the registry's decision differs"

    weights_s = [w["seconds"] for w in run.weights.values() if "read_back" not in w]
    tunes_s = [v["seconds"] for v in run.tunes.values() if "read_back" not in v]
    result = {
        "command": " ".join(["python", "bench/decision.py", *(argv if argv is not None else sys.argv[1:])]),
        "profile": name, "environment": environment(),
        "backbone": {"name": model.name, "fingerprint": model.fingerprint},
        "sources": bank.names, "targets": targets, "seeds": seeds, "tune_config": profile["tune"],
        "ensemble_params": profile["ensemble"], "compositions": compositions(setup), "candidates": list(candidates),
        "lengths": list(lengths), "methods": protocol.methods,
        "split": "train/val redrawn per seed from the pooled train + val images; test fixed",
        "jobs": {"weights": run.n_weight_jobs, "tunes": run.n_tune_jobs, "short_tunes": len(jobs),
                 "short_tunes_computed_here": len(computed), "read_back": read,
                 "read_from_store": run.read_from_store, "job_seconds": run.job_seconds},
        "cost": {"weights_job_seconds_mean": float(np.mean(weights_s)) if weights_s else None,
                 "weights_jobs_timed": len(weights_s),
                 "full_tune_seconds_mean": float(np.mean(tunes_s)) if tunes_s else None,
                 "full_tunes_timed": len(tunes_s),
                 "short_tune_seconds_per_pair": {n: rules[f"short tune, {n} epochs"]["seconds_per_pair"]
                                                 for n in lengths},
                 "probe_seconds_mean": float(np.mean([v["seconds"] for v in probes.values()]))},
        "table": ev.table(per_target), "against_selection": ev.against(per_target),
        "rules": rules, "margins": margins, "designed_sum": designed_result(per_target, d_done, d_jobs, designs),
        "per_target": per_target,
    }
    result["markdown"] = markdown(result)
    result["seconds"] = time.perf_counter() - t_start
    out = args.out or os.path.join(RESULTS, "decision.json" if name == "default" else f"decision-{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(result["markdown"])
    print(f"wrote {out} in {result['seconds'] / 60:.1f} min")
    return 0


def decision_candidates() -> tuple[str, ...]:
    """The registry decision's candidates, safest first."""
    return METHODS[DECIDE].candidates


def compositions(setup: dict) -> dict:
    """The designed targets and the sources that carry their factors (the embedded default's; the toy's first
    target with its first two sources, for the tests), or {}."""
    if setup.get("kind") == "toy":
        return {"toy_a": ["src0", "src1"]}
    if setup.get("kind") != "embedded":
        return {}
    return {t: list(s) for t, s in COMPOSITIONS.items()}


if __name__ == "__main__":
    sys.exit(main())
