"""The task-vector plane coarse to fine against its full grid on the shipped pairs; writes bench/results/plane.json.

    python bench/plane.py                 # every pair of the shipped bank on the default target (the dashboard's plane)
    python bench/plane.py --quick         # the toy setup, for the test suite

For every pair: the full 21 x 21 lattice (the dashboard's settings: 128 samples, seed 0), and the coarse-to-fine
result read from the same values (the map's points, the window around its best, the paper's segment: the points
:func:`core.analysis.plane.task_vector_plane` scores with ``refine=True``), so each pair costs one full plane. Where
the two bests differ, by how much: the full grid's best minus the value of the point coarse to fine returns, and
the distance between the two points. On the first pair ``refine=True`` is also run itself, to check that it scores
the same points to the same values.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

from core.analysis.plane import coarse_indices, refine_window, segment_indices, task_vector_plane
from core.evaluation.setups import load_setup
from core.io import assets
from core.io.runs import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refined_from_full(axis: np.ndarray, values: np.ndarray, window: int = 5) -> tuple[float, float, float, int]:
    """What coarse to fine returns, read from a full grid's ``values (G, G)``: ``(l1, l2, value, prompts scored)``."""
    coarse = coarse_indices(axis)
    sub = values[np.ix_(coarse, coarse)]
    i, j = np.unravel_index(int(np.nanargmax(sub)), sub.shape)
    points = {(int(a), int(b)) for a in coarse for b in coarse}
    points |= set(refine_window((int(coarse[i]), int(coarse[j])), len(axis), window)) | set(segment_indices(axis))
    best = max(points, key=lambda p: values[p])
    return float(axis[best[0]]), float(axis[best[1]]), float(values[best]), len(points)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="default: the embedded default's default target")
    ap.add_argument("--quick", action="store_true", help="the toy setup (for tests)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "plane.json"))
    args = ap.parse_args(argv)
    model, bank, tasks = load_setup({"kind": "toy" if args.quick else "embedded"})
    target = args.target or (next(iter(tasks)) if args.quick else assets.default_target())
    task = tasks[target]
    kw = dict(grid=21, n_samples=24 if args.quick else 128, seed=0)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "environment": environment(),
              "target": target, "settings": kw, "pairs": {}}
    t0 = time.perf_counter()
    for n, (a, b) in enumerate(itertools.combinations(bank.names, 2)):
        print(f"{a} x {b} ...", flush=True)
        full = task_vector_plane(model, bank, task, a, b, refine=False, **kw)
        axis = full.l1
        fl1, fl2, fv = full.best()
        rl1, rl2, rv, prompts = refined_from_full(axis, full.values)
        entry = {"full_best": [fl1, fl2, fv], "refined_best": [rl1, rl2, rv], "same_point": (fl1, fl2) == (rl1, rl2),
                 "value_lost": fv - rv, "distance": float(np.hypot(fl1 - rl1, fl2 - rl2)), "prompts_refined": prompts,
                 "prompts_full": int(full.values.size), "full_seconds": full.seconds}
        if n == 0:  # the real coarse-to-fine pass once: the same points, the same values
            fine = task_vector_plane(model, bank, task, a, b, **kw)
            entry["refine_run"] = {"best": list(fine.best()), "prompts": fine.extra["prompts"], "seconds": fine.seconds,
                                   "max_abs_value_change": max(abs(fine.at(x, y) - full.at(x, y))
                                                               for x, y, _ in zip(*fine.points(), strict=True))}
        result["pairs"][f"{a}|{b}"] = entry
        pairs = list(result["pairs"].values())
        result["summary"] = {"pairs": len(pairs), "same_best_point": sum(p["same_point"] for p in pairs),
                             "max_value_lost": max(p["value_lost"] for p in pairs),
                             "max_distance": max(p["distance"] for p in pairs),
                             "prompts_refined_max": max(p["prompts_refined"] for p in pairs), "prompts_full": 441,
                             "seconds": time.perf_counter() - t0}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(args.out + ".tmp", args.out)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
