"""Scale: the method at ViT size (issue 31, item 5); writes bench/results/scale.json.

    nice -n 10 python bench/scale.py            # ViT-S/16 and ViT-B/16 at 224 px, K = 6, shallow and deep (CPU: long)
    python bench/scale.py --quick               # a tiny ViT, for the test suite
    python bench/scale.py --models vit_base_patch16_224 --device cuda --samples 256

For each timm model (random weights from a seed: time and memory do not depend on the values) and each prompt kind,
with K source prompts of T tokens on N random images:
- seconds of one source pass (the K x N rows' forward and backward with the Fisher vectors), one weight step (one
  evaluation of the objective: the forward and backward of the N rows under the mixed prompt), one tuning step (a
  batch of at most 64, AdamW), one evaluation forward of N rows;
- peak memory of each: the bytes of live tensors (core.model.resources.LiveTensorBytes, the same on every device)
  and, on the CPU, the process's resident memory above its start (sampled), on CUDA the allocator's peak;
- FLOPs of a row counted with torch.utils.flop_counter.FlopCounterMode (core.model.cost.row_cost), and the FLOP/s
  each timed pass achieved;
- the memory guard with HGPROMPT_MEMORY_LIMIT_MB set low: the rows per forward it chooses (no-grad and gradient
  passes) and that the H-scores and gradients it gives match the unchunked ones;
- a projection (labelled so) of the whole VTAB-1k study's FLOPs and GPU time: 19 targets x 5 seeds x the protocol's
  jobs with leave-one-out banks (K = 18), from the measured FLOPs per row, at an assumed sustained GPU throughput.
N is small on a CPU; every larger run is extrapolated by FLOPs, which the JSON says.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from speed import PeakMemory  # bench/ is the script's folder: the same sampler as bench/speed.py

from core import PromptedViT
from core.evaluation.methods import DEFAULT_METHODS
from core.evaluation.protocol import Protocol, seed_work
from core.io.runs import environment
from core.io.safe_io import atomic_write_json
from core.method.mixing import make_rule
from core.method.objective import Objective
from core.method.scoring import hscores_at
from core.method.source_pass import measure_sources
from core.metrics.h_score import default_n_samples
from core.model import resources
from core.model.cost import GPU_REFERENCE, Work, row_cost, tune_work
from core.model.device import resolve_device
from core.model.features import prompt_features
from core.model.tokens import Target
from core.tuning.tune import TuneConfig, tuning_step_seconds

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLASSES = 2  # (the H-score needs more samples than classes: small N stays valid)
#: VTAB-1k: 800 train + 200 val images per task; the test split is the task's full VTAB test split. Test sizes as
#: listed for VTAB-1k (VPT's and NOAH's data tables); an assumption of the projection, recorded in the JSON.
VTAB_TEST = {"cifar100": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
             "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
             "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
             "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150}


def measure(fn, device: torch.device) -> dict:
    """One timed run of ``fn`` (after the caller's warm-up) with its peak memory: live tensor bytes, and RSS above
    the start (CPU) or the allocator's peak (CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with PeakMemory(device) as mem:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        peak = resources.peak_tensor_bytes(fn)
        sync()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # cpu_seconds: this process's CPU time (all its threads): on a shared machine the wall clock also counts waiting.
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_tensor_mb": round(peak / 2**20, 1),
            "peak_process_mb": round(mem.peak_mb, 1)}


def case(model: PromptedViT, device, k: int, n: int, n_source: int, tokens_t: int, deep: bool, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    c, h, w = model.data_config()["input_size"]
    with torch.no_grad():
        tokens = model.embed(torch.randn(n, c, h, w, generator=g).to(device))
    y = (torch.arange(n) % CLASSES).to(device)
    d = model.embed_dim
    shape = (model.depth, tokens_t, d) if deep else (tokens_t, d)
    stack = (torch.randn(k, *shape, generator=g) * 0.1).to(device)
    n_tok = tokens.shape[1]
    row = row_cost(model, shape, n_tok)
    out = {"kind": "deep" if deep else "shallow", "K": k, "N": n, "N_source_pass": n_source, "T": tokens_t,
           "tokens_per_row": n_tok + tokens_t,
           "flops_per_row": {"forward": row.forward_flops, "backward": row.backward_flops,
                             "forward_backward": row.forward_flops + row.backward_flops, "embed": row.embed_flops}}

    def rate(work: Work, seconds: float) -> float:
        return row.flops(work) / seconds

    def rates(work: Work, r: dict) -> dict:
        return {"flops": row.flops(work), "flop_per_s": rate(work, r["seconds"]),
                "flop_per_cpu_s": rate(work, r["cpu_seconds"])}

    # The source pass: K x N rows forward and backward, one more backward for the Fisher vectors.
    src_tok, src_y = tokens[:n_source], y[:n_source]
    sp_box = {}

    def run_source_pass():
        sp_box["sp"] = measure_sources(model, Target(src_tok, src_y, CLASSES), stack, fishr=True)

    r = measure(run_source_pass, device)
    work = Work(forward=k * n_source, backward=2 * k * n_source)
    out["source_pass"] = {**r, **rates(work, r)}

    # One weight step: an evaluation of the objective at a new point (forward and backward of the N rows).
    # (the source pass gives the vertices and the Fisher vectors; its sample need not be the objective's)
    objective = Objective(model, Target(tokens, y, CLASSES), make_rule("average", stack, None), sp_box["sp"], 1.0,
                          "fishr")
    alphas = [torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0) for _ in range(2)]
    objective(alphas[0])  # warm-up
    r = measure(lambda: objective(alphas[1]), device)
    work = Work(forward=n, backward=n)
    out["weight_step"] = {**r, **rates(work, r)}

    # One tuning step on a batch of at most `batch`.
    b = min(batch, n)
    times = []
    r = measure(lambda: times.extend(tuning_step_seconds(model, tokens[:b], y[:b], stack[0], CLASSES, repeat=1)),
                device)
    work = Work(forward=b, backward=b)
    step = {"seconds": times[-1], "cpu_seconds": r["cpu_seconds"] / 2}  # (measure timed an untimed step and one)
    out["tuning_step"] = {"batch": b, **step, "peak_tensor_mb": r["peak_tensor_mb"],
                          "peak_process_mb": r["peak_process_mb"], **rates(work, step)}

    # One evaluation forward of the N rows (the tuning's val/test passes, the H-scores of many prompts).
    prompt_features(model, tokens[:2], stack[:1])
    r = measure(lambda: prompt_features(model, tokens, stack[:1]), device)
    work = Work(forward=n)
    out["eval_forward"] = {**r, **rates(work, r)}
    out["bytes_per_row"] = {"no_grad_peak": resources.forward_bytes_per_row(model, shape, n_tok),
                            "autograd_saved": resources.activation_bytes_per_row(model, shape, n_tok)}
    return out


class _Limit:
    """HGPROMPT_MEMORY_LIMIT_MB set for a block, and every forward's rows recorded (with or without gradients)."""

    def __init__(self, model, mb: float):
        self.model, self.mb, self.rows = model, mb, []

    def __enter__(self):
        self.old = os.environ.get("HGPROMPT_MEMORY_LIMIT_MB")
        os.environ["HGPROMPT_MEMORY_LIMIT_MB"] = str(self.mb)
        real = self.model.forward_rows

        def spy(t, rows=None):
            self.rows.append((t.shape[0], torch.is_grad_enabled()))
            return real(t, rows)

        self.model.forward_rows = spy
        return self

    def __exit__(self, *exc):
        del self.model.forward_rows
        if self.old is None:
            os.environ.pop("HGPROMPT_MEMORY_LIMIT_MB")
        else:
            os.environ["HGPROMPT_MEMORY_LIMIT_MB"] = self.old
        return False

    def largest(self, grad: bool) -> int:
        return max((r for r, g in self.rows if g == grad), default=0)


def memory_guard(model: PromptedViT, device, k: int, n: int, tokens_t: int, rows_no_grad: int) -> dict:
    """The memory guard under a low HGPROMPT_MEMORY_LIMIT_MB: the H-scores of K prompts with about ``rows_no_grad``
    rows allowed a forward without gradients, and the source pass's gradients with room for two samples of the K
    prompts at a time; the rows each pass took, and the numbers against the unchunked passes."""
    g = torch.Generator().manual_seed(1)
    c, h, w = model.data_config()["input_size"]
    with torch.no_grad():
        tokens = model.embed(torch.randn(n, c, h, w, generator=g).to(device))
    y = (torch.arange(n) % CLASSES).to(device)
    shape = (tokens_t, model.embed_dim)
    stack = (torch.randn(k, *shape, generator=g) * 0.1).to(device)
    n_tok = tokens.shape[1]
    h_full = hscores_at(model, tokens, y, stack)
    sp_full = measure_sources(model, Target(tokens, y, CLASSES), stack)
    fwd, grad = (resources.forward_bytes_per_row(model, shape, n_tok),
                 resources.gradient_bytes_per_row(model, shape, n_tok))
    mb = 2**20 * resources.SAFETY  # MiB of free memory per byte the guard may use
    with _Limit(model, (rows_no_grad + 0.5) * fwd / mb) as no_grad:
        fit_no_grad = resources.forward_rows_that_fit(model, shape, n_tok)
        h_small = hscores_at(model, tokens, y, stack)
    with _Limit(model, (2 * k + 0.5) * grad / mb) as with_grad:
        fit_grad = resources.rows_that_fit(model, shape, n_tok)
        sp_small = measure_sources(model, Target(tokens, y, CLASSES), stack)
    return {"K": k, "N": n, "rows_unchunked": k * n,
            "no_grad": {"limit_mb": round(no_grad.mb, 2), "rows_that_fit": fit_no_grad,
                        "largest_forward": no_grad.largest(False),
                        "hscores_max_abs_diff": float((h_full - h_small).abs().max())},
            "gradient": {"limit_mb": round(with_grad.mb, 2), "rows_that_fit": fit_grad,
                         "largest_forward_backward": with_grad.largest(True),
                         "grads_rel_diff": float((sp_full.grads - sp_small.grads).norm() / sp_full.grads.norm())},
            "bytes_per_row": {"no_grad_peak": fwd, "gradient_peak": grad}}


def vtab_projection(results: dict, k: int = 18, seeds: int = 5) -> dict:
    """The whole VTAB-1k study's FLOPs and GPU time at an assumed throughput, from the measured FLOPs per row and
    the protocol's rows (core.evaluation.protocol.seed_work)."""
    cfg = TuneConfig()
    protocol = Protocol(list(DEFAULT_METHODS), list(range(seeds)))
    out = {"label": "PROJECTION, not a measurement: measured FLOPs per row x the protocol's rows, at an assumed GPU "
                    "throughput", "assumed_gpu": GPU_REFERENCE[0], "assumed_flop_per_s": GPU_REFERENCE[1],
           "targets": len(VTAB_TEST), "seeds": seeds, "K_leave_one_out": k, "methods": list(DEFAULT_METHODS),
           "tune": {"epochs": cfg.epochs, "train": 800, "val": 200}, "steps_cap": 30,
           "assumed_test_sizes": VTAB_TEST, "cases": {}}
    for model_name, cases in results.items():
        for c in cases:
            if "flops_per_row" not in c:
                continue
            fl = c["flops_per_row"]
            n = default_n_samples(int(c["embed_dim"]), 800)
            # every task's images embedded once; per seed its weights job and tunes
            work = sum((seed_work(protocol, k, n, 800, 200, n_test) * seeds + Work(images=1000 + n_test)
                        for n_test in VTAB_TEST.values()), Work())
            bank = sum((tune_work(cfg.epochs, 800, 200, t, images=1000 + t) for t in VTAB_TEST.values()), Work())
            total = Work()
            flops = {}
            for part, wk in (("study", work), ("bank", bank)):
                flops[part] = wk.forward * fl["forward"] + wk.backward * fl["backward"] + wk.images * fl["embed"]
                total = total + wk
            cpu_rate = c["tuning_step"]["flop_per_cpu_s"] * max(1, torch.get_num_threads())
            out["cases"][f"{model_name}/{c['kind']}"] = {
                "n_samples_for_weights": n, "rows": vars(total),
                "flops": {**flops, "total": flops["study"] + flops["bank"]},
                "gpu_hours": (flops["study"] + flops["bank"]) / GPU_REFERENCE[1] / 3600,
                "this_cpu_days_at_its_tuning_step_rate_all_threads": (flops["study"]
                                                                      + flops["bank"]) / cpu_rate / 86400}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sources", type=int, default=6, help="K")
    ap.add_argument("--tokens", type=int, default=10, help="T")
    ap.add_argument("--samples", type=int, default=32, help="N of a weight step and an evaluation")
    ap.add_argument("--source-samples", type=int, default=16, help="N of the source pass (K x N rows)")
    ap.add_argument("--batch", type=int, default=32, help="tuning batch (at most 64)")
    ap.add_argument("--guard-samples", type=int, default=8, help="N of the memory guard's check")
    ap.add_argument("--guard-rows", type=int, default=5, help="rows a no-grad forward may take in the guard's check")
    ap.add_argument("--quick", action="store_true", help="a tiny ViT, for the test suite")
    ap.add_argument("--out", default=os.path.join(RESULTS, "scale.json"))
    args = ap.parse_args(argv)
    for flag, n in (("--samples", args.samples), ("--source-samples", args.source_samples),
                    ("--guard-samples", args.guard_samples)):
        if n <= CLASSES:
            ap.error(f"{flag} must be more than {CLASSES} (the H-score needs more samples than classes), got {n}")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.quick:
        specs = {"tiny": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)}
        args.samples, args.source_samples, args.batch, args.guard_samples, args.sources = 8, 4, 8, 4, 3
    else:
        specs = {m: {"img_size": args.img_size} for m in args.models}
    results: dict[str, list] = {}
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    for name, kw in specs.items():
        timm_name = "vit_tiny_patch16_224" if name == "tiny" else name
        model = PromptedViT.create(timm_name, seed=0, **kw).to(device)
        info = {"embed_dim": model.embed_dim, "depth": model.depth, "fingerprint": model.fingerprint,
                "init": model.config["init"]}
        results[name] = []
        for deep in (False, True):
            t0 = time.perf_counter()
            c = case(model, device, args.sources, args.samples, args.source_samples, args.tokens, deep, args.batch)
            c.update(info, seconds_case=time.perf_counter() - t0)
            print(f"{name} {c['kind']}: source pass {c['source_pass']['seconds']:.1f} s, weight step "
                  f"{c['weight_step']['seconds']:.2f} s, tuning step {c['tuning_step']['seconds']:.2f} s, "
                  f"{c['flops_per_row']['forward'] / 1e9:.2f} GFLOP a row forward", file=sys.stderr, flush=True)
            results[name].append(c)
            write(args, device, results, load_start, t_all, complete=False)  # a long run keeps what it measured
        guard = memory_guard(model, device, args.sources, args.guard_samples, args.tokens, args.guard_rows)
        results[name].append({"memory_guard": guard})
        print(f"{name} memory guard: {guard}", file=sys.stderr, flush=True)
        write(args, device, results, load_start, t_all, complete=False)
    write(args, device, results, load_start, t_all, complete=True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def write(args, device, results: dict, load_start, t_all: float, complete: bool) -> None:
    data = {"environment": environment(), "device": str(device), "threads": torch.get_num_threads(),
            "load_average": {"start": load_start, "end": os.getloadavg()}, "cpu_count": os.cpu_count(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "complete": complete,
            "note": "random weights (seeded); N is small on a CPU: larger runs scale by FLOPs (rows x FLOPs per row); "
                    "on a shared machine 'seconds' (wall) includes waiting for the CPU, 'cpu_seconds' does not",
            "models": results, "vtab1k_projection": vtab_projection(results),
            "seconds_total": time.perf_counter() - t_all}
    atomic_write_json(args.out, data)


if __name__ == "__main__":
    sys.exit(main())
