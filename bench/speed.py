"""Speed and scale of HGPrompt's building blocks, and the issue's goals, against a matmul roofline; writes JSON.

    python bench/speed.py                          # embedded default backbone (or a small ViT if not built)
    python bench/speed.py --goals-only --before /work/main   # the goals, a checkout's before and this one after
    python bench/speed.py --quick                  # tiny settings, for the test suite
    python bench/speed.py --backbone vit_base_patch16_224 --img-size 224 --deep --precision bf16 --sources 6

Measured (best of --repeat runs after one warm-up, wall-clock):
- one ensemble weight step against one plain prompt-tuning step on the same batch;
- the batched K-source gradient pass against two loops over the sources:
  K separate forward+backward passes, and one forward with K retain_graph
  backward passes (the trap the batched pass avoids);
- both as K (sources) and N (target samples) grow;
- achieved FLOP/s of the prompted forward+backward against a plain matmul's FLOP/s in the same run;
- peak memory of each (RSS on the CPU, allocator peak on CUDA);
- PCA, UMAP cold (first call, numba compile) and UMAP warm on target features;
- the goals (embedded default; issue 34), at each --precision: the default fit (without and with a callback, as the
  CLI and the dashboard run it), the task-vector plane as the dashboard computes it, one weight step and one tuning
  step, each as seconds, FLOPs (torch.utils.flop_counter.FlopCounterMode), achieved GFLOP/s and the fraction of a
  2048 x 2048 matmul's GFLOP/s in the same dtype, measured in the same process just before and after the job (so
  the ratio holds on a shared machine); with --dashboard, click Run to the final weights on a freshly launched
  server; with --profile-jobs, one weights job and two tune jobs of the 2-epoch quality profile at one thread, as
  Ray runs them. --before CHECKOUT runs the same goals on another checkout's code first (PYTHONPATH), in the same
  sitting, and writes both into bench/results/speed-goals.json.

The building blocks run at the first --precision (bf16 autocast on CUDA or a CPU with bf16 instructions; fp32 is
exact); a checkout without the precision option runs fp32 only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from core import PromptedViT, h_score
from core.io.runs import environment
from core.method.gradients import prompt_gradients
from core.method.objective import combine_prompts
from core.model.device import autocast, resolve_device

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class PeakMemory:
    """Peak memory above the start while the block runs: RSS sampled every 2 ms on the CPU, allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._rss()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._max, self._rss()) - self._base) / 2**20
        return False


def timed(fn, device, repeat: int) -> dict:
    """Best wall-clock seconds of ``fn`` over ``repeat`` runs after a warm-up, and its peak memory."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "peak_mb": round(mem.peak_mb, 1)}


def load_model(args) -> PromptedViT:
    from core import assets

    if args.backbone is None and assets.available() and not args.quick:
        return PromptedViT.from_directory(assets.BACKBONE_DIR)
    name = args.backbone or "vit_tiny_patch16_224"
    if args.quick:
        return PromptedViT.create(name, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    kw = {"img_size": args.img_size} if args.img_size else {}
    if args.backbone is None:  # a small stand-in for the embedded default when it is not built
        kw = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}
    return PromptedViT.create(name, **kw)


def bench_case(model, device, k: int, n: int, tokens_t: int, deep: bool, repeat: int, classes: int = 4) -> dict:
    """Step ratio and batched-vs-loop ratios for K sources and N target samples."""
    torch.manual_seed(0)
    c, h, w = model.data_config()["input_size"]
    x = torch.randn(n, c, h, w, device=device)
    y = (torch.arange(n, device=device) % classes)
    d = model.embed_dim
    shape = (k, model.depth, tokens_t, d) if deep else (k, tokens_t, d)
    bank = (torch.randn(shape) * 0.1).to(device)
    with torch.no_grad():
        tok = model.embed(x)

    def loss(f):
        return -torch.stack([h_score(fk, y) for fk in f])

    # One plain VPT step: prompt + linear head, cross-entropy, AdamW.
    prompt = torch.nn.Parameter(bank[0].clone())
    head = torch.nn.Linear(d, classes).to(device)
    opt = torch.optim.AdamW([prompt, *head.parameters()], lr=1e-3)

    def vpt_step():
        with autocast(device):
            logits = head(model.forward_tokens(tok, prompt).float())
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # One HGPrompt weight step: forward with P(alpha), H-score, backward to theta, Adam.
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt_t = torch.optim.Adam([theta], lr=0.1)
    cosine = torch.eye(k)

    def ens_step():
        alpha = torch.softmax(theta, 0)
        p_alpha = combine_prompts(alpha.float().to(device), bank)
        out = prompt_gradients(model, tok, p_alpha.detach()[None], lambda f: -h_score(f[0], y).reshape(1))
        reg = alpha @ (-cosine.double()).clamp_min(0) @ alpha
        g = torch.autograd.grad([p_alpha, reg], [theta],
                                grad_outputs=[out.grads[0], torch.ones((), dtype=reg.dtype)])[0]
        opt_t.zero_grad()
        theta.grad = g
        opt_t.step()

    def batched():
        prompt_gradients(model, tok, bank, loss)

    def loop():
        for i in range(k):
            p = bank[i].clone().requires_grad_(True)
            with autocast(device):
                f = model.forward_tokens(tok, p)
            (-h_score(f.float(), y)).backward()

    def retain_loop():
        leaf = bank.clone().requires_grad_(True)
        with autocast(device):
            f = model.forward_tokens_batched(tok, leaf)
        losses = loss(f.float())
        for i in range(k):
            torch.autograd.grad(losses[i], leaf, retain_graph=i < k - 1)

    r = {"K": k, "N": n, "T": tokens_t, "deep": deep}
    r["vpt_step"] = timed(vpt_step, device, repeat)
    r["ensemble_step"] = timed(ens_step, device, repeat)
    r["batched_grads"] = timed(batched, device, repeat)
    r["loop_grads"] = timed(loop, device, repeat)
    r["retain_graph_loop_grads"] = timed(retain_loop, device, max(1, repeat // 2))
    r["ratio_ensemble_over_vpt_step"] = r["ensemble_step"]["seconds"] / r["vpt_step"]["seconds"]
    r["speedup_batched_vs_loop"] = r["loop_grads"]["seconds"] / r["batched_grads"]["seconds"]
    r["speedup_batched_vs_retain_graph_loop"] = r["retain_graph_loop_grads"]["seconds"] / r["batched_grads"]["seconds"]
    return r


def utilisation(model, device, n: int, tokens_t: int, deep: bool, repeat: int) -> dict:
    """Achieved FLOP/s of a prompted forward+backward against a plain matmul's FLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w = model.data_config()["input_size"]
    x = torch.randn(n, c, h, w, device=device)
    shape = (model.depth, tokens_t, model.embed_dim) if deep else (tokens_t, model.embed_dim)
    p = (torch.randn(shape) * 0.1).to(device).requires_grad_(True)

    def fwd_bwd():
        with autocast(device):
            f = model(x, p)
        f.float().square().mean().backward()

    with FlopCounterMode(display=False) as fc:
        fwd_bwd()
    flops = fc.get_total_flops()
    t = timed(fwd_bwd, device, repeat)["seconds"]
    size = 2048 if device.type == "cpu" else 8192
    try:  # the roofline in the dtype the block runs at
        from core.model.device import current_precision

        dtype = DTYPES[current_precision()]
    except ImportError:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    tm = timed(lambda: a @ b, device, repeat)["seconds"]
    mm_flops = 2 * size**3 / tm
    achieved = flops / t
    return {"prompted_fwd_bwd_flops": flops, "prompted_fwd_bwd_seconds": t, "achieved_flops_per_s": achieved,
            "matmul_size": size, "matmul_dtype": str(dtype), "matmul_flops_per_s": mm_flops,
            "utilisation_vs_matmul": achieved / mm_flops}


def maps(model, device, n: int, quick: bool) -> dict:
    """PCA, UMAP cold and warm on N target features (the embedded default's target when built)."""
    from core import assets
    from core.analysis.maps import embed_2d
    from core.model.features import prompt_features
    from core.model.tokens import embed_images, split_images

    if assets.available() and not quick and assets.default_target():
        from core.io.tasks import Task

        task = Task.load(assets.task_path(assets.default_target()))
        xs = split_images(model, task, "train")[0][:n]
    else:
        c, h, w = model.data_config()["input_size"]
        xs = torch.randn(n, c, h, w)
    feats = prompt_features(model, embed_images(model, xs)).cpu()
    out = {"n_points": int(feats.shape[0]), "dim": int(feats.shape[1])}
    t0 = time.perf_counter()
    embed_2d(feats, "pca")  # the first call imports scikit-learn
    out["pca_cold_seconds_incl_import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed_2d(feats, "pca")
    out["pca_seconds"] = time.perf_counter() - t0
    # UMAP's first call in a fresh process compiles numba code: measure it in a child process.
    code = ("import time,numpy as np; from core.analysis.maps import embed_2d; "
            f"f=np.random.default_rng(0).normal(size=({feats.shape[0]},{feats.shape[1]})); "
            "t=time.perf_counter(); embed_2d(f,'umap'); a=time.perf_counter()-t; "
            "t=time.perf_counter(); embed_2d(f,'umap'); print(a, time.perf_counter()-t)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=900)
    cold, warm = (float(v) for v in res.stdout.split()[-2:])
    out["umap_cold_seconds_incl_import"] = cold
    out["umap_warm_seconds"] = warm
    return out


def embedded_default() -> dict:
    """Time to load the embedded default (backbone, bank, every task) and to run the default ensemble on it."""
    from core import HGPromptEnsemble, PromptBank, Task, assets

    code = ("import time; t=time.perf_counter(); "
            "from core import PromptedViT, PromptBank, Task, assets; i=time.perf_counter()-t; t=time.perf_counter(); "
            "m=PromptedViT.from_directory(assets.BACKBONE_DIR); b=PromptBank.load(assets.PROMPTS_DIR, model=m); "
            "ts=[Task.load(assets.task_path(n)) for n in "
            "assets.shipped_tasks('target')+assets.shipped_tasks('source')]; "
            "print(i, time.perf_counter()-t)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    imports, load = (float(v) for v in res.stdout.split()[-2:])
    model = PromptedViT.from_directory(assets.BACKBONE_DIR)
    bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
    target = assets.default_target()
    task = Task.load(assets.task_path(target))
    t0 = time.perf_counter()
    ens = HGPromptEnsemble().fit(model, bank, task=task)
    run = time.perf_counter() - t0
    return {"import_seconds": imports, "load_seconds": load, "default_target": target,
            "default_ensemble_seconds_incl_preprocessing": run, "default_ensemble_fit_seconds": ens.fit_seconds_,
            "weights": dict(zip(ens.names_, ens.weights_.tolist(), strict=True))}


# ------------------------------------------------------------------ the goals (issue 34)
def checkout_root() -> str:
    """The folder of the checkout whose ``core`` this process imported (``--before`` points PYTHONPATH elsewhere)."""
    import core

    return os.path.dirname(os.path.dirname(os.path.abspath(core.__file__)))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def at_precision(p: str):
    """The checkout's precision context (a checkout without the option runs fp32 only)."""
    try:
        from core.model.device import precision
    except ImportError:
        if p != "fp32":
            raise
        return contextlib.nullcontext()
    return precision(p)


def precisions_supported() -> list[str]:
    from core import HGPromptEnsemble

    return ["fp32", "bf16"] if "precision" in HGPromptEnsemble().get_params() else ["fp32"]


ROOFLINE_SIZE = 2048  # (--quick: 512)


def roofline(device: torch.device, precision: str, size: int | None = None, repeat: int = 5) -> float:
    """FLOP/s of a ``size x size`` matmul in the precision's dtype, best of ``repeat`` after a warm-up."""
    dtype = DTYPES[precision]
    size = size or ROOFLINE_SIZE
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / timed(lambda: a @ b, device, repeat)["seconds"]


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def against_roofline(name: str, fn, flops: int, device, precision: str, repeat: int) -> dict:
    """Seconds of ``fn`` (best of ``repeat``, no warm-up: the caller warmed it), its achieved FLOP/s, and the
    fraction of the matmul roofline in the same dtype (and in fp32), measured just before and after it."""
    print(f"  {name} [{precision}] ...", flush=True)
    before = {p: roofline(device, p) for p in ("fp32", "bf16")}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with at_precision(precision):
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    after = {p: roofline(device, p) for p in ("fp32", "bf16")}
    roof = {p: (before[p] + after[p]) / 2 for p in before}
    t = min(times)
    return {"precision": precision, "seconds": t, "all_seconds": times, "flops": flops,
            "gflop_per_s": flops / t / 1e9, "roofline_gflop_per_s": {p: v / 1e9 for p, v in roof.items()},
            "roofline_spread_gflop_per_s": {p: [before[p] / 1e9, after[p] / 1e9] for p in before},
            "fraction_of_roofline": flops / t / roof[precision], "fraction_of_fp32_roofline": flops / t / roof["fp32"]}


def plane_pair(ens) -> tuple[str, str]:
    """The dashboard's plane opens on the two sources with the best H-score."""
    order = np.argsort(-np.asarray(ens.source_hscores_))
    return ens.names_[int(order[0])], ens.names_[int(order[1])]


def goals(args, device) -> dict:
    """The issue's goal jobs on the embedded default's default target, at every supported --precision."""
    import inspect

    from core import HGPromptEnsemble, PromptBank, PromptedViT, Task, assets
    from core.analysis.plane import task_vector_plane
    from core.method.gradients import prompt_gradients
    from core.method.objective import combine_prompts
    from core.model.tokens import split_tokens, target_tokens
    from core.tuning.tune import tuning_step_seconds

    if args.quick:  # the toy setup, tiny settings: for the test suite
        from core.evaluation.setups import load_setup

        model, bank, tasks = load_setup({"kind": "toy"})
        model = model.to(device)
        target = next(iter(tasks))
        task = tasks[target]
        fit_kw, plane_kw = {"n_samples": 40, "steps": 3}, dict(grid=9, n_samples=24, seed=0)
    else:
        model = PromptedViT.from_directory(assets.BACKBONE_DIR).to(device)
        bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
        target = assets.default_target()
        task = Task.load(assets.task_path(target))
        # The plane as the dashboard computes it (dashboard/views/plane.py: a 21 x 21 lattice, 128 samples).
        fit_kw, plane_kw = {}, dict(grid=21, n_samples=128, seed=0)
    supported = precisions_supported()
    precisions = [p for p in args.precision if p in supported]
    out = {"target": target, "threads": torch.get_num_threads(), "precisions": precisions, "jobs": {}}
    print("goals: warm-up fit (embeds the target), FLOP counts ...", flush=True)
    warm = HGPromptEnsemble(**fit_kw).fit(model, bank, task=task)
    out["weights_fp32"] = dict(zip(warm.names_, warm.weights_.tolist(), strict=True))
    fit = lambda p, cb=None: HGPromptEnsemble(**fit_kw, **({"precision": p} if len(supported) > 1 else {})).fit(
        model, bank, task=task, callback=cb)
    noop = lambda info: None
    flops = {"fit": count_flops(lambda: fit("fp32")), "fit_with_callback": count_flops(lambda: fit("fp32", noop))}
    # The plane's FLOPs per prompt counted on a 3 x 3 grid (every prompt costs the same), times the prompts it scored.
    a, b = plane_pair(warm)
    refines = "refine" in inspect.signature(task_vector_plane).parameters
    per_prompt = count_flops(lambda: task_vector_plane(model, bank, task, a, b, **{**plane_kw, "grid": 3})) / 9
    plane_runs = {"plane": {"refine": True}} if refines else {}
    if not refines or args.plane_full:
        plane_runs["plane_full_grid"] = {"refine": False} if refines else {}
    # One weight step: the objective's forward-backward at the uniform point on the fit's sample.
    tokens, y = target_tokens(model, task, None, warm.n_target_samples_, 0)
    stack = bank.stack().to(device)
    from core.metrics.h_score import h_score

    def weight_step():
        p_alpha = combine_prompts(torch.full((stack.shape[0],), 1.0 / stack.shape[0], device=device), stack)
        prompt_gradients(model, tokens, p_alpha[None], lambda f: -h_score(f[0], y).reshape(1))

    flops["weight_step"] = count_flops(weight_step)
    tr_tok, tr_y = split_tokens(model, task, "train")
    tune_args = (model, tr_tok[:64], tr_y[:64], warm.prompt_.to(device), task.num_classes)
    flops["tuning_step"] = count_flops(lambda: tuning_step_seconds(*tune_args, repeat=1)) // 2  # (warm-up + 1 step)
    out["flops"] = {**flops, "plane_per_prompt": per_prompt}
    print("  thread policy ...", flush=True)
    out["thread_policy"] = thread_policy(model, tokens, y)
    out["plane_pair"] = [a, b]
    for p in precisions:
        jobs = out["jobs"][p] = {}
        with at_precision(p):
            weight_step()  # warm-ups at this precision
            fit(p)
        jobs["fit"] = against_roofline("default fit", lambda p=p: fit(p), flops["fit"], device, p, args.goal_repeat)
        jobs["fit_with_callback"] = against_roofline("default fit with a callback", lambda p=p: fit(p, noop),
                                                     flops["fit_with_callback"], device, p, 1)
        for name, kw in plane_runs.items():
            scored = {}

            def plane(kw=kw, scored=scored):
                r = task_vector_plane(model, bank, task, a, b, **plane_kw, **kw)
                scored["prompts"] = int(r.extra.get("prompts", r.values.size))
                scored["best"] = list(r.best())

            plane()  # (warm: the sample's tokens; its prompt count)
            jobs[name] = against_roofline(name, plane, int(per_prompt * scored["prompts"]), device, p, 1)
            jobs[name].update(scored)
        jobs["weight_step"] = against_roofline("weight step", weight_step, flops["weight_step"], device, p,
                                               args.goal_repeat * 3)

        steps: list[float] = []
        tuning_step_seconds(*tune_args, repeat=1)  # warm-up at this precision
        t = against_roofline("tuning steps",
                             lambda steps=steps: steps.extend(tuning_step_seconds(*tune_args, repeat=3)),
                             4 * flops["tuning_step"], device, p, 1)
        # tuning_step_seconds times three steps after an untimed one: the best of those is the step's time.
        t.update({"seconds": min(steps), "all_seconds": steps, "flops": flops["tuning_step"],
                  "gflop_per_s": flops["tuning_step"] / min(steps) / 1e9})
        t["fraction_of_roofline"] = t["gflop_per_s"] / t["roofline_gflop_per_s"][p]
        t["fraction_of_fp32_roofline"] = t["gflop_per_s"] / t["roofline_gflop_per_s"]["fp32"]
        jobs["tuning_step"] = t
    return out


def thread_policy(model, tokens: torch.Tensor, y: torch.Tensor, rounds: int = 3) -> dict:
    """The thread policy measured, not guessed: the small float64 work (one H-score, the probe heads of 7 sources) and
    a big layer's work (a forward of the sample's rows through the backbone) at every thread the machine has and at
    one, alternating ``rounds`` times in this process; seconds, median over the rounds. ``torch.set_num_threads`` is
    called around each (``core.metrics.threads.one_thread`` would pin the small work to one thread whatever we set)."""
    import core.metrics.h_score as hs
    from core.metrics.probe import fit_linear_heads
    from core.model.features import prompt_features

    feats = prompt_features(model, tokens)  # (N, D) float32
    heads_in = feats[None].expand(7, *feats.shape).contiguous()
    heads = getattr(fit_linear_heads, "__wrapped__", fit_linear_heads)  # (without one_thread's pin, where it has one)
    n_all = max(1, os.cpu_count() or 1)
    work = {"hscore": lambda: hs.h_score(feats.double(), y),
            "probe_heads_7": lambda: heads(heads_in, y, int(y.max()) + 1),
            "backbone_forward": lambda: prompt_features(model, tokens)}
    pinned = hs._class_terms
    hs._class_terms = getattr(pinned, "__wrapped__", pinned)
    times = {name: {n_all: [], 1: []} for name in work}
    old = torch.get_num_threads()
    try:
        for _ in range(rounds):
            for n in (n_all, 1):
                torch.set_num_threads(n)
                for name, fn in work.items():
                    fn()
                    t0 = time.perf_counter()
                    fn()
                    times[name][n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
        hs._class_terms = pinned
    return {name: {f"{n}_threads_seconds": float(np.median(v)) for n, v in per.items()} | {"all": per}
            for name, per in times.items()}


def dashboard_run(root: str, device) -> dict:
    """Click Run (default settings) on a freshly launched server of the checkout at ``root``: seconds to the live and
    to the final weights (bench/dashboard.py's browser helpers), with the fp32 and bf16 rooflines just before."""
    import importlib.util
    import shutil
    import tempfile
    import urllib.request

    spec = importlib.util.spec_from_file_location("bench_dashboard",
                                                  os.path.join(os.path.dirname(__file__), "dashboard.py"))
    dash = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dash)
    roof = {p: roofline(device, p) / 1e9 for p in ("fp32", "bf16")}
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "HGPROMPT_RUNS": os.path.join(tmp, "runs")}
    port = dash._port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    out = {"roofline_gflop_per_s": roof}
    try:
        while time.perf_counter() - t0 < 120:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.1)
        out["health_seconds_after_launch"] = time.perf_counter() - t0
        driver = dash.chrome(os.path.join(tmp, "profile"))
        try:
            live, final = dash.click_run(driver, url)
        finally:
            driver.quit()
        out.update({"click_to_live_weights_seconds": live, "click_to_final_weights_seconds": final})
    except Exception as exc:  # recorded in the JSON rather than losing the other figures
        out["error"] = f"{exc.__class__.__name__}: {exc}"[:500]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    out["roofline_after_gflop_per_s"] = {p: roofline(device, p) / 1e9 for p in ("fp32", "bf16")}
    return out


def profile_jobs(target: str, seed: int = 0) -> dict:
    """One weights job and two tune jobs (from the default fit's prompt, and a linear probe) of the 2-epoch quality
    profile, each in a fresh process at one thread as a Ray worker runs them: seconds per job, from which the
    profile's time is estimated (its last run: 30 weight jobs in 15.0 min and 311 tunes in 35.7 min on two workers)."""
    code = r"""
import json, sys, time
from bench.quality import PROFILES
from core.evaluation.protocol import Protocol, run_job, weight_jobs
prof = PROFILES["default"]
setup = {"kind": "embedded"}
protocol = Protocol(list(prof["methods"]), [int(sys.argv[2])], tune=prof["tune"], ensemble=prof["ensemble"],
                    singles=prof["singles"])
job = weight_jobs(setup, [sys.argv[1]], protocol)[0]
t0 = time.perf_counter(); w = run_job({**job.payload, "threads": 1}); tw = time.perf_counter() - t0
out = {"weights_job_seconds": tw, "tune_job_seconds": []}
for init in (w["weights"]["hgprompt"], None):
    t0 = time.perf_counter()
    run_job({"kind": "tune", "setup": setup, "target": sys.argv[1], "seed": int(sys.argv[2]), "tune": prof["tune"],
             "init": init, "key": "bench", "methods": [], "threads": 1})
    out["tune_job_seconds"].append(time.perf_counter() - t0)
print(json.dumps(out))
"""
    root = checkout_root()  # (python -c puts its working folder first on sys.path: the measured checkout's)
    bench_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, bench_root])}
    res = subprocess.run([sys.executable, "-c", code, target, str(seed)], capture_output=True, text=True, cwd=root,
                         env=env, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr[-1000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="backbone folder or timm name (default: embedded default)")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--deep", action="store_true", help="deep prompts")
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--sources", type=int, nargs="+", default=[2, 4, 8, 16], help="K values")
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128], help="N values (at K=4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                    help="the goals run at each; the building blocks at the first (default: fp32 bf16)")
    ap.add_argument("--no-maps", action="store_true")
    ap.add_argument("--goals-only", action="store_true", help="only the goals (embedded default)")
    ap.add_argument("--no-goals", action="store_true", help="skip the goals")
    ap.add_argument("--goal-repeat", type=int, default=2, help="timed runs of the default fit (best of)")
    ap.add_argument("--plane-full", action="store_true", help="also time the plane's full 21 x 21 grid")
    ap.add_argument("--dashboard", action="store_true", help="also click Run on a fresh dashboard server (Chromium)")
    ap.add_argument("--profile-jobs", action="store_true", help="also time the quality profile's jobs at one thread")
    ap.add_argument("--before", default=None, metavar="CHECKOUT",
                    help="first run the goals on CHECKOUT's code (e.g. /work/main), then on this one; both are written "
                         "to bench/results/speed-goals.json")
    ap.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/speed-<device>.json, or "
                                                "speed-goals.json with --goals-only)")
    args = ap.parse_args(argv)
    if args.quick:
        global ROOFLINE_SIZE
        args.sources, args.samples, args.repeat, ROOFLINE_SIZE = [2, 3], [8], 1, 512
    if args.before:
        return before_and_after(args, argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from core import assets

    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
              "machine": platform.processor() or platform.machine(), "device": str(device),
              "checkout": checkout_root()}
    if args.goals_only:
        if not args.quick:
            assets.require()
        result["goals"] = goals(args, device)
        if args.dashboard:
            print("dashboard ...", flush=True)
            result["goals"]["dashboard"] = dashboard_run(checkout_root(), device)
        if args.profile_jobs:
            print("quality profile's jobs ...", flush=True)
            result["goals"]["profile_jobs"] = profile_jobs(result["goals"]["target"])
        result["seconds"] = time.perf_counter() - t_start
        write(result, args.out or os.path.join(RESULTS, "speed-goals.json"))
        print_goals(result["goals"])
        return 0
    first = args.precision[0] if args.precision[0] in precisions_supported() else "fp32"
    with at_precision(first):
        model = load_model(args).to(device)
        result.update({"precision": first, "backbone": {"name": model.name, "fingerprint": model.fingerprint,
                       "embed_dim": model.embed_dim, "depth": model.depth,
                       "input_size": model.data_config()["input_size"]},
                       "cases_by_K": [], "cases_by_N": []})
        n0 = args.samples[0] if args.quick else 32
        for k in args.sources:
            print(f"K={k} N={n0} ...", flush=True)
            result["cases_by_K"].append(bench_case(model, device, k, n0, args.tokens, args.deep, args.repeat))
        for n in args.samples:
            print(f"K=4 N={n} ...", flush=True)
            result["cases_by_N"].append(bench_case(model, device, min(4, max(args.sources)), n, args.tokens, args.deep,
                                                   args.repeat))
        print("utilisation ...", flush=True)
        result["utilisation"] = utilisation(model, device, n0, args.tokens, args.deep, args.repeat)
        if assets.available() and not args.quick and args.backbone is None:
            print("embedded default ...", flush=True)
            result["embedded_default"] = embedded_default()
        if not args.no_maps:
            print("maps ...", flush=True)
            result["maps"] = maps(model, device, 16 if args.quick else 200, args.quick)
    if assets.available() and not args.quick and args.backbone is None and not args.no_goals:
        result["goals"] = goals(args, device)
    result["seconds"] = time.perf_counter() - t_start
    out = args.out or os.path.join(RESULTS, f"speed-{device.type}.json")
    write(result, out)
    for c in result["cases_by_K"] + result["cases_by_N"]:
        print(f"K={c['K']:>2} N={c['N']:>3}: ensemble/VPT step {c['ratio_ensemble_over_vpt_step']:.2f}x, "
              f"batched vs loop {c['speedup_batched_vs_loop']:.2f}x, vs retain_graph loop "
              f"{c['speedup_batched_vs_retain_graph_loop']:.2f}x")
    u = result["utilisation"]
    print(f"utilisation {u['utilisation_vs_matmul']:.2f} of matmul ({u['achieved_flops_per_s'] / 1e9:.1f} vs "
          f"{u['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    if "goals" in result:
        print_goals(result["goals"])
    print(f"wrote {out}")
    return 0


def write(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(out + ".tmp", out)


def print_goals(g: dict) -> None:
    for p, jobs in g["jobs"].items():
        for name, j in jobs.items():
            print(f"{p} {name:<18} {j['seconds']:8.2f} s  {j['gflop_per_s']:6.1f} GFLOP/s  "
                  f"{j['fraction_of_roofline']:.2f} of the {p} roofline ({j['roofline_gflop_per_s'][p]:.0f} GFLOP/s)")
    if "dashboard" in g:
        print("dashboard:", {k: v for k, v in g["dashboard"].items() if "seconds" in k})
    if "profile_jobs" in g:
        print("quality profile's jobs:", g["profile_jobs"])


def before_and_after(args, argv: list[str]) -> int:
    """The goals on the ``--before`` checkout's code, then on this one, each in its own process, in one sitting."""
    rest = [a for i, a in enumerate(argv) if a != "--before" and (i == 0 or argv[i - 1] != "--before")]
    rest = [a for a in rest if a != "--goals-only"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for label, root in (("before", os.path.abspath(args.before)), ("after", here)):
        out = os.path.join(RESULTS, f"tmp-speed-goals-{label}.json")
        env = {**os.environ, "PYTHONPATH": root}
        print(f"== {label}: {root}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--goals-only", *rest, "--out", out], env=env,
                       check=True)
        with open(out) as fh:
            runs[label] = json.load(fh)
        os.remove(out)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), **runs}
    write(result, args.out or os.path.join(RESULTS, "speed-goals.json"))
    print(f"wrote {args.out or os.path.join(RESULTS, 'speed-goals.json')}")
    return 0


if __name__ == "__main__":
    from core.errors import UserInputError

    try:
        sys.exit(main())
    except UserInputError as exc:  # a wrong device or setting: the message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
