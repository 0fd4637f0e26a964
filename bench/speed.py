"""Speed and scale of HGPrompt's building blocks; writes JSON under bench/results/.

    python bench/speed.py                 # embedded default backbone (or a small ViT if not built)
    python bench/speed.py --quick         # tiny settings, for the test suite
    python bench/speed.py --backbone vit_base_patch16_224 --img-size 224 --deep --bf16 --sources 6

Measured (best of --repeat runs after one warm-up, wall-clock):
- one ensemble weight step against one plain prompt-tuning step on the same batch;
- the batched K-source gradient pass against two loops over the sources:
  K separate forward+backward passes, and one forward with K retain_graph
  backward passes (the trap the batched pass avoids);
- both as K (sources) and N (target samples) grow;
- achieved FLOP/s of the prompted forward+backward against a plain matmul's FLOP/s in the same run;
- peak memory of each (RSS on the CPU, allocator peak on CUDA);
- PCA, UMAP cold (first call, numba compile) and UMAP warm on target features.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch


from core import PromptedViT, h_score
from core.model.device import autocast, resolve_device
from core.method.objective import combine_prompts
from core.method.gradients import prompt_gradients
from core.io.runs import environment

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
        l = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad()
        l.backward()
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
        g = torch.autograd.grad([p_alpha, reg], [theta], grad_outputs=[out.grads[0], torch.ones((), dtype=reg.dtype)])[0]
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
            "ts=[Task.load(assets.task_path(n)) for n in assets.shipped_tasks('target')+assets.shipped_tasks('source')]; "
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
            "weights": dict(zip(ens.names_, ens.weights_.tolist()))}


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
    ap.add_argument("--no-maps", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/speed-<device>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sources, args.samples, args.repeat = [2, 3], [8], 1
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_model(args).to(device)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
              "machine": platform.processor() or platform.machine(), "device": str(device),
              "backbone": {"name": model.name, "fingerprint": model.fingerprint, "embed_dim": model.embed_dim,
                           "depth": model.depth, "input_size": model.data_config()["input_size"]},
              "cases_by_K": [], "cases_by_N": []}
    n0 = args.samples[0] if args.quick else 32
    for k in args.sources:
        print(f"K={k} N={n0} ...", flush=True)
        result["cases_by_K"].append(bench_case(model, device, k, n0, args.tokens, args.deep, args.repeat))
    for n in args.samples:
        print(f"K=4 N={n} ...", flush=True)
        result["cases_by_N"].append(bench_case(model, device, min(4, max(args.sources)), n, args.tokens, args.deep, args.repeat))
    print("utilisation ...", flush=True)
    result["utilisation"] = utilisation(model, device, n0, args.tokens, args.deep, args.repeat)
    from core import assets

    if assets.available() and not args.quick and args.backbone is None:
        print("embedded default ...", flush=True)
        result["embedded_default"] = embedded_default()
    if not args.no_maps:
        print("maps ...", flush=True)
        result["maps"] = maps(model, device, 16 if args.quick else 200, args.quick)
    result["seconds"] = time.perf_counter() - t_start
    out = args.out or os.path.join(RESULTS, f"speed-{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(out + ".tmp", out)
    for c in result["cases_by_K"] + result["cases_by_N"]:
        print(f"K={c['K']:>2} N={c['N']:>3}: ensemble/VPT step {c['ratio_ensemble_over_vpt_step']:.2f}x, "
              f"batched vs loop {c['speedup_batched_vs_loop']:.2f}x, vs retain_graph loop "
              f"{c['speedup_batched_vs_retain_graph_loop']:.2f}x")
    u = result["utilisation"]
    print(f"utilisation {u['utilisation_vs_matmul']:.2f} of matmul ({u['achieved_flops_per_s'] / 1e9:.1f} vs "
          f"{u['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
