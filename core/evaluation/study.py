"""A study: the one evaluation protocol (:func:`core.evaluation.protocol.evaluate`) over a suite of targets on any
workspace, as Ray jobs, resumable from its job store; and the bank a leave-one-out study needs, one job per source.

    python -m core study --backbone DIR --bank BANK --targets SUITE/ --seeds 0 1 2 --out OUT
    python -m core study --backbone DIR --leave-one-out --targets SUITE/ --seeds 0 1 2 --out OUT

**Leave-one-out.** Multi-source transfer on one benchmark (the paper's VTAB-1k setting) gives each target the prompts
of the suite's *other* tasks. Without ``--bank`` the study first builds that bank (``OUT/bank``): one source prompt per
target task, every one tuned from one shared start (so task vectors are defined), one job each, exactly what
``python -m core build-bank`` does. Each target then runs with the bank less its own prompt (a prompt is a target's own
when its name or its source task is the target's name); every job's setup names the prompts its target gets.

**The folder** ``OUT``: ``study.json`` (the workspace, the protocol, every result, the summaries), ``results.csv`` (one
row per target, seed and method), ``results.md`` (the tables), ``jobs/`` (the job store: a study killed at any moment
is resumed by running the same command again, every finished job read back) and, for leave-one-out, ``bank/``.

``bench/quality.py`` runs the shipped suite through :func:`run_suite` and :func:`summarise`, as the ``study`` command
does; the dashboard's Study page reads the folder with :func:`read_study`.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from ..errors import UserInputError
from ..io.digest import settings_digest
from ..io.prompt_bank import SourcePrompt, save_start
from ..io.runs import environment
from ..io.safe_io import atomic_write_bytes, load_json, scratch_dir
from ..model.backbones import BackboneSpec
from ..tuning import bank as bank_mod
from ..tuning.tune import TuneConfig
from . import summary as ev
from .methods import METHODS, REFERENCE
from .protocol import Evaluation, Protocol, evaluate
from .setups import Targets, Workspace, load_backbone, load_target
from .sweep import Job, JobStore, MemoryStore, run_jobs, start_ray

STUDY_FILE, CSV_FILE, MD_FILE, JOBS_DIR, BANK_DIR = "study.json", "results.csv", "results.md", "jobs", "bank"
#: The references every method is compared with: selection by H-score, and the single source chosen on test.
REFERENCES = ("best_hscore", "oracle_test")


# ------------------------------------------------------------------ Ray
def check_gpus(gpus_per_job: float | None, address: str | None, serial: bool) -> None:
    """Refuse a GPU share Ray cannot give: not a share of one GPU or whole GPUs, or GPUs a local instance has none of
    (a job asking for one would wait forever)."""
    g = gpus_per_job
    if g is None:
        return
    if g < 0 or (g > 1 and g != int(g)):
        raise UserInputError(f"--gpus-per-job must be a share in [0, 1] or a whole number, got {g}")
    if g and not address and not serial:
        import torch  # heavy imports (ray, safetensors) inside functions: `python -m core --help` stays fast

        if not torch.cuda.is_available():
            raise UserInputError(f"--gpus-per-job {g} asks for GPUs, but CUDA sees none here; drop it or pass "
                                 "--address of a cluster that has GPUs")


def run_suite(protocol: Protocol, targets: list[str], *, setup: dict | None = None,
              setups: dict[str, dict] | None = None,
              store=None, serial: bool = False, threads: int | None = None, address: str | None = None,
              num_cpus: int | None = None, gpus_per_job: float | None = None,
              progress_for: Callable[[str], Any] | None = None) -> Evaluation:
    """The protocol over ``targets`` (one ``setup`` for all, or ``setups`` per target), on one Ray instance for both
    phases (local, or the cluster at ``address``) or, ``serial``, in this process."""
    check_gpus(gpus_per_job, address, serial)
    started = False if serial else start_ray(address, num_cpus)
    try:
        return evaluate(protocol, targets, setup=setup, setups=setups, store=store, serial=serial,
                        progress_for=progress_for, threads=threads, address=address, num_cpus=num_cpus,
                        gpus_per_job=gpus_per_job)
    finally:
        if started:
            import ray

            ray.shutdown()


# ------------------------------------------------------------ summaries
def summarise(run: Evaluation) -> dict[str, Any]:
    """What a suite's results say, in the keys ``bench/quality.py``'s JSON has always held: the jobs, how often tuning
    never beat its start, the results table, HGPrompt minus every method, the best entries, every result, VPT against
    the linear probe, and every method minus selection (best_hscore) and the test-chosen source (oracle_test)."""
    per_target = run.per_target
    present = ev.methods_in(per_target)
    return {
        # job_seconds: every job's own time on its worker, whichever run computed it.
        "jobs": {"weights": run.n_weight_jobs, "tunes": run.n_tune_jobs, "read_from_store": run.read_from_store,
                 "job_seconds": run.job_seconds},
        "epoch0_fraction": ev.epoch0_fraction(run.tunes),
        "table": ev.table(per_target),
        "paired": ev.paired_summary(per_target) if REFERENCE in present else {},
        "best_entries": ev.best_entries(per_target),
        "per_target": per_target,
        "vpt_vs_linear_probe": ev.vpt_vs_probe(per_target) if {"random", "linear_probe"} <= set(present) else {},
        "against_selection": ev.against(per_target, REFERENCES),
    }


def _per_source(init: Any, k: int) -> np.ndarray | None:
    """A weights method's initial prompt as one number per source: the average's weights, a rule's coefficients
    (averaged over blocks for the layer-wise rule); None for a rule without them (TIES)."""
    if isinstance(init, dict):
        if "coef" not in init:
            return None
        init = init["coef"]
    return np.asarray(init, dtype=np.float64).reshape(k, -1).mean(1)


def weight_matrix(run: Evaluation, sources: dict[str, list[str]],
                  names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per method, the targets x sources matrix of what each target takes from each source, averaged over seeds:
    a weights method's weight (a rule's coefficient), a select method's share of the seeds that chose the source.
    ``sources``: each target's sources, in the order of its bank (the order of its weights). A source a target never
    had (its own, in a leave-one-out study) is None. ``kind`` says which: ``"weights"``, ``"coefficients"`` or
    ``"chosen"``. ``names``: the columns' order (default: as the run met them)."""
    names = list(names or run.names)
    out: dict[str, dict[str, Any]] = {}
    for m in run.protocol.methods:
        method = METHODS[m]
        if method.kind == "fixed":
            continue
        values, kind = [], "chosen" if method.kind == "select" else "weights"
        for t in run.targets:
            seen: dict[str, list[float]] = {}
            for r in run.per_target.get(t, []):
                w = run.weights.get((t, r["seed"]))
                if w is None:
                    continue
                own = sources[t]
                if method.kind == "select":
                    chosen = r["methods"].get(m, {}).get("chosen")
                    if chosen is None:
                        continue
                    row = np.array([float(n == chosen) for n in own])
                else:
                    init = w["weights"].get(m)
                    if isinstance(init, dict):
                        kind = "coefficients"
                    row = _per_source(init, len(own)) if init is not None else None
                    if row is None:
                        continue
                for n, v in zip(own, row, strict=True):
                    seen.setdefault(n, []).append(float(v))
            values.append([float(np.mean(seen[n])) if n in seen else None for n in names])
        if any(v is not None for row in values for v in row):
            out[m] = {"kind": kind, "targets": list(run.targets), "sources": names, "values": values}
    return out


def rows(run: Evaluation) -> list[dict[str, Any]]:
    """One row per (target, seed, method): accuracies, the selected epoch, a select method's source, the job."""
    out = []
    for t, runs in run.per_target.items():
        for r in runs:
            for m, v in r["methods"].items():
                if m.startswith("single:"):
                    continue
                out.append({"target": t, "seed": r["seed"], "method": m, "test_acc": v["test_acc"],
                            "val_acc": v["val_acc"], "best_epoch": v.get("best_epoch"), "chosen": v.get("chosen", ""),
                            "job": v.get("job", "")})
    return out


def _ci(p: dict[str, Any]) -> str:
    lo, hi = p["ci95"]
    return "one pair" if not np.isfinite(lo) else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"


def markdown(result: dict[str, Any]) -> str:
    """The study's tables: test accuracy per method and target, then every method minus selection and minus the
    test-chosen source, pooled and per target, with bootstrap intervals (in points)."""
    targets, table = result["targets"], result["table"]
    lines = [f"# Study: {len(targets)} targets, seeds {result['seeds']}", "",
             f"Backbone: {result['backbone']['describe']} (fingerprint {result['backbone']['fingerprint']}); bank "
             f"{result['bank']['folder']}" + (" (leave-one-out: each target without its own prompt)"
                                               if result["leave_one_out"] else "") + ".", "",
             "## Test accuracy (%), mean ± std over seeds", "",
             "| method | " + " | ".join(targets) + " | mean |", "|---|" + "---|" * (len(targets) + 1)]
    for m, row in table.items():
        cells = [f"{100 * row[t]['mean']:.1f} ± {100 * row[t]['std']:.1f}" for t in targets]
        label = f"{m} (upper bound: chosen on test)" if METHODS[m].upper_bound else m
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * row['mean_over_targets']:.1f} |")
    against = result["against"]
    for ref in REFERENCES:
        if not any(ref in v for v in against.values()):
            continue
        lines += ["", f"## Every method minus {ref} (points; 95 % bootstrap interval over target x seed pairs)", "",
                  "| method | pooled | wins / ties / losses | " + " | ".join(targets) + " |",
                  "|---|---|---|" + "---|" * len(targets)]
        for m, refs in against.items():
            if ref not in refs:
                continue
            p = refs[ref]
            per = [f"{100 * p['per_target'][t]['mean_diff']:+.2f} {_ci(p['per_target'][t])}" for t in targets]
            lines.append(f"| {m} | {100 * p['mean_diff']:+.2f} {_ci(p)} | {p['wins']} / {p['ties']} / {p['losses']} | "
                         + " | ".join(per) + " |")
    if result.get("stopped"):
        lines += ["", "The study was stopped before every job finished: the tables hold the finished ones."]
    return "\n".join(lines) + "\n"


def _csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if table:
        w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(table)
    return buf.getvalue()


# ------------------------------------------------------------ the bank
def source_jobs(spec: BackboneSpec, fingerprint: str, tasks: dict[str, str], tune: dict[str, Any]) -> list[Job]:
    """One job per source task (name -> path): tune its prompt from the shared start ``tune`` makes."""
    d = settings_digest(spec.to_dict(), fingerprint, tune)
    return [Job(f"source/{name}/{settings_digest(d, path)}", {"kind": "source", "backbone": spec.to_dict(),
                                                              "fingerprint": fingerprint, "name": name, "task": path,
                                                              "tune": tune}) for name, path in tasks.items()]


def source_job(payload: dict[str, Any], model=None, task=None, callback=None) -> dict[str, Any]:
    """One source prompt, tuned from the bank's shared start (remade here from its recipe: VPT's initialisation for
    the tune's seed); the prompt comes back inside the result (safetensors bytes, base64), so a job run on another
    machine needs no shared file system. ``model`` / ``task``: already loaded (in this process)."""
    import torch
    from safetensors.torch import save

    t0 = time.perf_counter()
    if model is None:
        torch.set_num_threads(int(payload.get("threads") or 1))
        model = load_backbone(BackboneSpec.from_dict(payload["backbone"]))
        if model.fingerprint != payload["fingerprint"]:
            raise UserInputError(f"the backbone's fingerprint is {model.fingerprint} in this worker but "
                                 f"{payload['fingerprint']} where the bank was planned: its weights differ between "
                                 "machines. Give every machine the same backbone files.")
    task = task if task is not None else load_target(payload["name"], payload["task"])
    cfg = TuneConfig(**payload["tune"])
    start, _ = bank_mod.shared_start(model, cfg.num_tokens, cfg.deep, cfg.seed)
    sp, res = bank_mod.build_source_prompt(model, task, cfg, name=payload["name"], callback=callback, start=start)
    data = save({"prompt": sp.prompt.contiguous()})
    return {"name": sp.name, "prompt": base64.b64encode(data).decode("ascii"), "metadata": sp.metadata(),
            "metrics": res.metrics(), "seconds": time.perf_counter() - t0}


def decode_prompt(result: dict[str, Any]):
    """The :class:`SourcePrompt` a source job returned."""
    from safetensors.torch import load

    meta = result["metadata"]
    return SourcePrompt(name=meta["name"], prompt=load(base64.b64decode(result["prompt"]))["prompt"],
                        source_task=meta.get("source_task", "unknown"), backbone=meta.get("backbone", "unknown"),
                        backbone_fingerprint=meta["backbone_fingerprint"], source_accuracy=meta.get("source_accuracy"),
                        train_config=meta.get("train_config") or {})


def build_bank(model, spec: BackboneSpec, tasks: dict[str, str], cfg, *, loaded: dict[str, Any] | None = None,
               store=None, serial: bool = True, threads: int | None = None, address: str | None = None,
               num_cpus: int | None = None, gpus_per_job: float | None = None, progress=None,
               callback_for: Callable[[str], Any] | None = None, on_done: Callable[[Any, dict], None] | None = None):
    """Tune one source prompt per task (name -> path), all from the shared start ``cfg`` makes, as jobs: here one
    after another (``serial``; ``loaded``: tasks already loaded, by name; ``callback_for(name)``: a per-epoch
    callback), or on Ray. ``store``: a job store (a rerun reads finished sources back). ``on_done(prompt, metrics)``
    after every source, in the tasks' order. Returns ``[(SourcePrompt, metrics)]`` in the tasks' order."""
    tune = cfg.to_dict()
    jobs = source_jobs(spec, model.fingerprint, tasks, tune)
    if threads is not None:
        jobs = [Job(j.key, {**j.payload, "threads": int(threads)}) for j in jobs]
    loaded = loaded or {}

    def here(payload: dict[str, Any]) -> dict[str, Any]:
        name = payload["name"]
        return source_job(payload, model, loaded.get(name), callback_for(name) if callback_for else None)

    reported: list[str] = []

    def report(done: int, total: int, key: str) -> None:
        if progress:
            progress(done, total, key)
        if on_done and key:  # in order: a source is reported once every source before it has finished
            finished = {j.payload["name"]: j.key for j in jobs if store.has(j.key)}
            for j in jobs[len(reported):]:
                if j.payload["name"] not in finished:
                    break
                r = store.get(j.key)
                on_done(decode_prompt(r), r["metrics"])
                reported.append(j.payload["name"])

    store = store if store is not None else MemoryStore()
    check_gpus(gpus_per_job, address, serial)
    results = run_jobs(here if serial else source_job, jobs, store, address=address, num_cpus=num_cpus,
                       gpus_per_job=gpus_per_job, serial=serial, progress=report)
    for j in jobs[len(reported):]:  # read back from the store: reported now
        if on_done:
            on_done(decode_prompt(results[j.key]), results[j.key]["metrics"])
    return [(decode_prompt(results[j.key]), results[j.key]["metrics"]) for j in jobs]


#: The prefix of build-bank's scratch folders beside --out (core.io.safe_io.scratch_dir names the process).
BANK_SCRATCH = ".bank-"


def write_bank(prompts, start, start_info: dict[str, Any], out: str) -> None:
    """Write the prompts and their shared start into ``out``: into a scratch folder beside it first, moved into place
    when all are written (the whole folder at once when ``out`` is new, else file by file, each rename atomic, the
    JSON last so that a prompt is never listed without its tensor). A failure leaves ``out`` as it was."""
    scratch = scratch_dir(os.path.dirname(os.path.abspath(out)), BANK_SCRATCH)
    try:
        for sp in prompts:
            sp.save(scratch)
        save_start(scratch, start, start_info)
        if not os.path.exists(out):
            os.replace(scratch, out)
            return
        for f in sorted(os.listdir(scratch), key=lambda f: f.endswith(".json")):
            os.replace(os.path.join(scratch, f), os.path.join(out, f))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def own_prompts(bank, target: str) -> list[str]:
    """The prompts of ``bank`` that are ``target``'s own: named after it, or tuned on a source task of its name."""
    return [p.name for p in bank if p.name == target or p.source_task == target]


def check_suite(targets: list[str]) -> None:
    """A leave-one-out suite needs two targets or more."""
    if len(targets) < 2:
        raise UserInputError(f"--leave-one-out needs a suite of at least two targets, got {len(targets)} "
                             f"({', '.join(targets)}): each target gets the prompts of the suite's other tasks, and a "
                             "suite of one leaves none. Give more --targets, or drop --leave-one-out and give --bank "
                             "DIR with prompts of other sources.")


def loo_sources(bank, targets: list[str]) -> dict[str, list[str]]:
    """Per target, the bank's prompts less the target's own (leave-one-out)."""
    check_suite(targets)
    out = {}
    for t in targets:
        own = own_prompts(bank, t)
        out[t] = [n for n in bank.names if n not in own]
        if not out[t]:
            raise UserInputError(f"with --leave-one-out, target {t!r} keeps no prompt: the bank's only prompts "
                                 f"({', '.join(own)}) are its own. Add prompts of other tasks to the bank.")
    return out


# ------------------------------------------------------------ the study
def default_folder(root: str, workspace: dict[str, Any], protocol: Protocol, leave_one_out: bool) -> str:
    """``root/study-<digest>``: the same command finds the same folder, so running it again resumes it."""
    return os.path.join(root, "study-" + settings_digest(workspace, vars(protocol), leave_one_out))


def run_study(backbone: BackboneSpec, targets: dict[str, str], protocol: Protocol, out: str, *,
              bank: str | None = None, leave_one_out: bool = False, bank_seed: int = 0, store: str | None = None,
              serial: bool = False, threads: int | None = None, device: Any = None, address: str | None = None,
              num_cpus: int | None = None, gpus_per_job: float | None = None,
              progress_for: Callable[[str], Any] | None = None, log: Callable[[str], None] | None = None,
              command: str | None = None) -> dict[str, Any]:
    """Run a study into the folder ``out`` (see the module's docstring) and return what ``study.json`` holds.

    ``backbone``, ``targets`` (name -> path) and ``bank`` (a folder; with ``leave_one_out`` and no bank, the bank is
    built from the targets into ``out/bank`` with the protocol's tuning recipe, reported at its last epoch, from the
    start ``bank_seed`` makes). ``store``: the job store's folder (default ``out/jobs``). ``serial``: every job in this
    process; else on Ray (``address``: a cluster). ``device``: where this process loads the backbone (the workers take
    CUDA where Ray gives them a GPU)."""
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    names = list(targets)
    if not names:
        raise UserInputError("give at least one target (--targets).")
    if leave_one_out:
        check_suite(names)
    if not leave_one_out and bank is None and backbone.kind != "embedded":
        raise UserInputError("give --bank DIR (prompts tuned on this backbone), or --leave-one-out to build one from "
                             "the targets themselves.")
    check_gpus(gpus_per_job, address, serial)
    os.makedirs(out, exist_ok=True)
    store = JobStore(store or os.path.join(out, JOBS_DIR))
    import torch

    threads_before = torch.get_num_threads()  # a job run here sets the threads it asks for: given back at the end
    if serial and threads is None:
        threads = threads_before  # the jobs run here: all of this process's threads
    model = load_backbone(backbone, device)
    tasks = Targets(targets)
    for t in names:  # every target read now: a folder that is not a task is named before any job runs
        tasks[t]
    started = False if serial else start_ray(address, num_cpus)
    try:
        built = None
        if leave_one_out and bank is None:
            bank = os.path.join(out, BANK_DIR)
            cfg = TuneConfig(**{**protocol.tune, "select": "last", "seed": int(bank_seed)})
            say(f"building the leave-one-out bank: {len(names)} source prompts into {bank}")
            built = build_bank(model, backbone, targets, cfg, loaded={t: tasks[t] for t in names}, store=store,
                               serial=serial, threads=threads, address=address, num_cpus=num_cpus,
                               gpus_per_job=gpus_per_job, progress=progress_for("sources") if progress_for else None)
            start, info = bank_mod.shared_start(model, cfg.num_tokens, cfg.deep, cfg.seed)
            write_bank([sp for sp, _ in built], start, info, bank)
        ws = Workspace(backbone, bank, dict(targets))
        prompts = ws.load_bank(model)
        sources = loo_sources(prompts, names) if leave_one_out else {t: list(prompts.names) for t in names}
        setups = {t: ws.setup(model, prompts, sources=sources[t] if leave_one_out else None, targets=[t])
                  for t in names}
        singles = len(prompts) if protocol.singles == "all" else min(int(protocol.singles), len(prompts))
        n_select = any(METHODS[m].kind == "select" for m in protocol.methods)
        say(f"{len(names)} targets x {len(protocol.seeds)} seeds: {len(names) * len(protocol.seeds)} weight jobs, then "
            f"at most {len(names) * len(protocol.seeds) * (len(protocol.methods) + (singles if n_select else 0))} "
            f"tunes (methods with the same initial prompt share one); job store {store.root}")
        run = run_suite(protocol, names, setups=setups, store=store, serial=serial, threads=threads, address=address,
                        num_cpus=num_cpus, gpus_per_job=gpus_per_job, progress_for=progress_for)
    finally:
        torch.set_num_threads(threads_before)
        if started:
            import ray

            ray.shutdown()
    result: dict[str, Any] = {
        "command": command, "workspace": ws.to_dict(),
        "backbone": {"name": model.name, "fingerprint": model.fingerprint, "describe": backbone.describe(),
                     "embed_dim": model.embed_dim, "depth": model.depth},
        "bank": {"folder": ws.bank_folder, "names": prompts.names, "built": built is not None,
                 "metrics": {sp.name: m for sp, m in built} if built else None},
        "leave_one_out": leave_one_out, "sources_by_target": sources,
        "targets": names, "seeds": list(protocol.seeds), "methods": list(protocol.methods),
        "protocol": vars(protocol), "environment": environment(),
        "engine": {"serial": serial, "address": address or ("local" if not serial else None)},
        "stopped": run.stopped,
        **summarise(run),
        "against": ev.against(run.per_target, REFERENCES, by_target=True),
        "weights": weight_matrix(run, sources, prompts.names),
    }
    result["seconds"] = time.perf_counter() - t0
    write_study(result, out, rows(run))
    return result


def write_study(result: dict[str, Any], out: str, table: list[dict[str, Any]]) -> None:
    """``study.json``, ``results.csv`` and ``results.md`` into ``out`` (each written atomically)."""
    atomic_write_bytes(os.path.join(out, CSV_FILE), _csv(table).encode("utf-8"))
    atomic_write_bytes(os.path.join(out, MD_FILE), markdown(result).encode("utf-8"))
    # in the order it was made (methods in the registry's order, targets as given), not sorted as the job store is
    atomic_write_bytes(os.path.join(out, STUDY_FILE), (json.dumps(result, indent=1) + "\n").encode("utf-8"))


def read_study(folder: str) -> dict[str, Any]:
    """What ``study.json`` in ``folder`` holds; a folder without one is refused, saying what it lacks."""
    folder = os.path.expanduser(folder)
    path = os.path.join(folder, STUDY_FILE)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder!r} is not a folder; give the --out folder of `python -m core study`.")
    if not os.path.isfile(path):
        jobs = os.path.join(folder, JOBS_DIR)
        n = sum(f.endswith(".json") for _, _, fs in os.walk(jobs) for f in fs) if os.path.isdir(jobs) else 0
        raise UserInputError(f"{folder!r} holds no {STUDY_FILE}: " + (
            f"its study has not finished ({n} jobs done in {JOBS_DIR}/); run the same `python -m core study` command "
            "again to resume it." if n else "it is not a study folder (the --out folder of `python -m core study`)."))
    data = load_json(path, max_bytes=256 * 2**20)
    if not isinstance(data, dict) or "per_target" not in data or "targets" not in data:
        raise UserInputError(f"{path!r} is not a study's results (no targets or per_target).")
    return data


def job_result(folder: str, key: str) -> dict[str, Any] | None:
    """A finished job's stored result (None when the store no longer holds it)."""
    store = JobStore(os.path.join(folder, JOBS_DIR))
    try:
        return store.get(key) if key and store.has(key) else None
    except UserInputError:
        return None
