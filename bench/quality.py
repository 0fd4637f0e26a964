"""Quality: HGPrompt against every baseline on every shipped target; writes JSON under bench/results/.

    python bench/quality.py                     # all shipped targets, seeds 0 1 2, the default budget
    python bench/quality.py --targets shapes_quad --seeds 0 --workers 1     # a quick look
    python bench/quality.py --quick             # tiny settings, for the test suite

Every method gets the same splits, seed and tuning budget (TuneConfig); only the initial prompt
differs. Single-source tunes are run once per (target, seed) and shared: they give the oracle
(best single source by test accuracy), the H-score-selected source (best_hscore), and Kendall's tau
between the sources' H-scores and their accuracies.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core import HGPromptEnsemble, PromptBank, PromptedViT, Task, TuneConfig, assets, tune_prompt  # noqa: E402
from core.ensemble import combine_prompts  # noqa: E402
from core.conflicts import gradient_conflicts  # noqa: E402
from core.h_score import default_n_samples  # noqa: E402
from core.runs import environment  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHOD_ORDER = ["random", "linear_probe", "uniform", "best_hscore", "oracle", "h_proportional",
                "hgprompt_h_only", "hgprompt", "hgprompt_conflict"]


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return float(tau) if np.isfinite(tau) else float("nan")


def no_conflicting_pair(cosine: torch.Tensor) -> bool:
    """True when no two different sources' gradients have a negative cosine (the conflict penalty is then 0)."""
    off = ~torch.eye(cosine.shape[0], dtype=torch.bool)
    return bool((cosine[off] >= 0).all())


def run_target(model, bank: PromptBank, task: Task, seed: int, cfg: TuneConfig, ens_params: dict, log) -> dict:
    stack = bank.stack()
    k = len(bank)
    cfg = TuneConfig(**{**cfg.to_dict(), "seed": seed, "num_tokens": stack.shape[-2], "deep": stack.dim() == 4})
    out: dict = {"seed": seed, "methods": {}}
    # One gradient pass (with the Fisher term) on the fit's target sample serves the three HGPrompt variants, and
    # its per-source H-scores are those best_hscore and h_proportional use.
    n = ens_params.get("n_samples", "auto")
    x, y = task.sample(model, "train", default_n_samples(model.embed_dim, len(task.splits["train"])) if n == "auto" else n, seed)
    conflicts = gradient_conflicts(model, x, y, stack, h_variant=ens_params.get("h_variant", "shrinkage"), fishr=True)
    hs = conflicts.source_hscores.double().numpy()
    out["source_hscores"] = dict(zip(bank.names, hs.tolist()))

    def tune(name, init, weights=None):
        t0 = time.perf_counter()
        r = tune_prompt(model, task, init, cfg, train_accuracy=False)  # train accuracy is not reported here
        out["methods"][name] = {"test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch,
                                "weights": None if weights is None else [float(w) for w in weights],
                                "seconds": time.perf_counter() - t0}
        log(f"    {name:<16} test {r.test_acc:.3f} val {r.val_acc:.3f} ({time.perf_counter() - t0:.0f} s)")
        return r

    single = {}
    for i, sp in enumerate(bank):
        w = np.eye(k)[i]
        single[sp.name] = tune(f"single:{sp.name}", sp.prompt, w).test_acc
    out["single_source_acc"] = single
    tune("random", "random")
    tune("linear_probe", None)
    tune("uniform", stack.mean(0), np.full(k, 1 / k))
    best_h = int(np.argmax(hs))
    out["methods"]["best_hscore"] = {**out["methods"][f"single:{bank.names[best_h]}"], "chosen": bank.names[best_h]}
    best = max(single, key=single.get)
    out["methods"]["oracle"] = {**out["methods"][f"single:{best}"], "chosen": best}
    pos = np.clip(hs, 0, None)
    w = pos / pos.sum() if pos.sum() > 0 else np.full(k, 1 / k)
    tune("h_proportional", combine_prompts(torch.tensor(w, dtype=torch.float32), stack), w)
    for name, lam, reg in (("hgprompt_h_only", 0.0, "fishr"), ("hgprompt", ens_params.get("lam", 1.0), "fishr"),
                           ("hgprompt_conflict", ens_params.get("lam", 1.0), "conflict")):
        if name == "hgprompt_conflict" and no_conflicting_pair(conflicts.cosine):
            # R(alpha) = sum alpha_i alpha_j max(0, -C_ij) is 0 for every alpha: the fit, and so the tune, are
            # bit for bit those of hgprompt_h_only (tested in tests/test_ensemble.py).
            out["methods"][name] = {**out["methods"]["hgprompt_h_only"], "same_as": "hgprompt_h_only"}
            out["cosine"] = conflicts.cosine.tolist()
            log(f"    {name:<16} = hgprompt_h_only (no conflicting pair of sources)")
            continue
        t0 = time.perf_counter()
        ens = HGPromptEnsemble(**{**ens_params, "lam": lam, "regularizer": reg, "seed": seed}).fit(
            model, bank, task=task, conflicts=conflicts)
        fit_s = time.perf_counter() - t0
        tune(name, ens.prompt_, ens.weights_)
        out["methods"][name]["fit_seconds"] = fit_s
        if name == "hgprompt_conflict":
            out["cosine"] = ens.conflicts_.cosine.tolist()
    names = list(single)
    out["kendall_tau_hscore_vs_acc"] = kendall_tau([out["source_hscores"][n] for n in names], [single[n] for n in names])
    return out


def summarise(per_target: dict) -> dict:
    table = {}
    for m in METHOD_ORDER:
        row = {}
        for t, runs in per_target.items():
            accs = [r["methods"][m]["test_acc"] for r in runs if m in r["methods"]]
            if accs:
                row[t] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
        if row:
            row["mean_over_targets"] = float(np.mean([v["mean"] for v in row.values()]))
            table[m] = row
    return table


def markdown(table: dict, targets: list[str]) -> str:
    best = {t: max(table[m][t]["mean"] for m in table if t in table[m]) for t in targets}
    best_mean = max(table[m]["mean_over_targets"] for m in table)
    lines = ["| method | " + " | ".join(targets) + " | mean |", "|---|" + "---|" * (len(targets) + 1)]
    for m, row in table.items():
        cells = []
        for t in targets:
            v = row[t]
            s = f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
            cells.append(f"**{s}**" if abs(v["mean"] - best[t]) < 1e-12 else s)
        mean = f"{100 * row['mean_over_targets']:.1f}"
        cells.append(f"**{mean}**" if abs(row["mean_over_targets"] - best_mean) < 1e-12 else mean)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=None, help="shipped target names (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    ap.add_argument("--epochs", type=int, default=1, help="tuning epochs, the same for every method")
    ap.add_argument("--lr", type=float, default=1e-2, help="prompt learning rate")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate (the head starts from a probe fit)")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n-samples", type=lambda s: s if s == "auto" else int(s), default="auto")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes running (target, seed) jobs side by side, each with cpu_count/workers threads "
                         "(default: 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny model and data (for tests)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    if args.quick:
        args.epochs, args.steps, args.n_samples = 1, 2, 30
        args.seeds = args.seeds or [0]
        args.workers = 1 if args.workers is None else args.workers
        names = None
    else:
        assets.require()
        names = args.targets or assets.shipped_tasks("target")
        args.seeds = args.seeds or [0, 1, 2]
        args.workers = 2 if args.workers is None else args.workers
    if args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    cfg = TuneConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=64)
    ens_params = {"lam": args.lam, "steps": args.steps, "n_samples": args.n_samples}
    model, bank, tasks = _setup(args.quick, names)
    jobs = [(t.name, seed) for t in tasks for seed in args.seeds]
    workers = max(1, min(args.workers, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    log(f"{len(jobs)} (target, seed) jobs on {workers} worker(s) x {threads} thread(s)")
    if workers == 1:
        torch.set_num_threads(threads)
        by_name = {t.name: t for t in tasks}
        results = [{**_job(name, seed, cfg, ens_params, model, bank, by_name, log), "worker": 0} for name, seed in jobs]
    else:
        results = _run_workers(jobs, workers, threads, args.quick, names, cfg, ens_params, t_start)
    per_target = {t.name: [r for (name, _), r in zip(jobs, results) if name == t.name] for t in tasks}
    table = summarise(per_target)
    targets = [t.name for t in tasks]
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
        "backbone": {"name": model.name, "fingerprint": model.fingerprint},
        "sources": bank.names, "targets": targets, "seeds": args.seeds,
        "tune_config": cfg.to_dict(), "ensemble_params": ens_params, "workers": workers, "threads_per_worker": threads,
        "jobs_by_worker": {w: [list(j) for j, r in zip(jobs, results) if r["worker"] == w] for w in range(workers)},
        "table": table, "per_target": per_target,
        "kendall_tau": {t: [r["kendall_tau_hscore_vs_acc"] for r in runs] for t, runs in per_target.items()},
        "weights": {t: {m: [r["methods"][m]["weights"] for r in runs] for m in ("hgprompt", "hgprompt_h_only", "hgprompt_conflict")}
                    for t, runs in per_target.items()},
        "markdown": markdown(table, targets), "seconds": time.perf_counter() - t_start,
    }
    out = args.out or os.path.join(RESULTS, "quality.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(out + ".tmp", out)
    print(result["markdown"])
    print(f"wrote {out} in {result['seconds'] / 60:.1f} min")
    return 0


def next_job(worker: int, workers: int, jobs: list[tuple[str, int]], claimed: list[bool]) -> int | None:
    """Index of the job that ``worker`` should run next, or None when every job is claimed.

    Each worker owns every ``workers``-th target and runs its seeds in order: a tune from a seed-independent
    prompt (a single source, the uniform average, the linear probe) then reuses the probe head and epoch-0
    accuracies that the task cached for an earlier seed, and a worker embeds only the targets it runs. A worker
    that has run out of its own jobs takes the last unclaimed job of another's (the one its owner would reach
    last), so that no worker idles while another still has a queue.
    """
    targets = list(dict.fromkeys(name for name, _ in jobs))
    mine = set(targets[worker::workers])
    for i, (name, _) in enumerate(jobs):
        if name in mine and not claimed[i]:
            return i
    for i in range(len(jobs) - 1, -1, -1):
        if not claimed[i]:
            return i
    return None


def _run_workers(jobs, workers, threads, quick, names, cfg, ens_params, t_start) -> list[dict]:
    """Run the jobs in ``workers`` processes that claim them by :func:`next_job`; results in job order."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    claimed = ctx.Array("b", len(jobs))
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(w, workers, jobs, claimed, results, quick, names, threads, cfg, ens_params, t_start))
             for w in range(workers)]
    for p in procs:
        p.start()
    done: dict[int, dict] = {}
    try:
        while len(done) < len(jobs):
            try:
                i, r = results.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError(f"the workers exited with {len(jobs) - len(done)} job(s) not done "
                                       f"(exit codes {[p.exitcode for p in procs]})") from None
                continue
            if i is None:
                raise RuntimeError(f"a worker failed:\n{r}")
            done[i] = r
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return [done[i] for i in range(len(jobs))]


def _worker_main(worker, workers, jobs, claimed, results, quick, names, threads, cfg, ens_params, t_start) -> None:
    import traceback

    # perf_counter is system-wide on Linux, so the parent's start time gives one clock across the workers.
    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] (worker {worker}) {msg}", flush=True)

    try:
        torch.set_num_threads(threads)
        model, bank, tasks = _setup(quick, names)
        by_name = {t.name: t for t in tasks}
        while True:
            with claimed.get_lock():
                i = next_job(worker, workers, jobs, [bool(c) for c in claimed])
                if i is None:
                    return
                claimed[i] = 1
            name, seed = jobs[i]
            results.put((i, {**_job(name, seed, cfg, ens_params, model, bank, by_name, log), "worker": worker}))
    except BaseException:
        results.put((None, traceback.format_exc()))
        raise


def _setup(quick: bool, names):
    if quick:
        return _quick_setup()
    model = PromptedViT.from_directory(assets.BACKBONE_DIR)
    bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
    return model, bank, [Task.load(assets.task_path(n)) for n in names]


def _job(name, seed, cfg, ens_params, model, bank, tasks, log) -> dict:
    log(f"{name} seed {seed}")
    return run_target(model, bank, tasks[name], seed, cfg, ens_params, log)


def _quick_setup():
    from core import SourcePrompt

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from conftest import make_model, make_task

    model = make_model()
    g = torch.Generator().manual_seed(0)
    bank = PromptBank(SourcePrompt(f"s{i}", torch.randn(4, model.embed_dim, generator=g) * 0.3,
                                   backbone_fingerprint=model.fingerprint) for i in range(3))
    return model, bank, [make_task("toy_a")]


if __name__ == "__main__":
    sys.exit(main())
