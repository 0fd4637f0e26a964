"""Thread policy: small float64 linear algebra on one intra-op thread, the backbone's big layers on all of them.

An H-score solve is a handful of (D, D) float64 operations (D = 192 for the embedded default) and a probe head's
L-BFGS a few hundred small matmuls: split over two OpenMP threads, each operation costs more in synchronisation than
in arithmetic, and when another process holds the second core a thread waits for it at every barrier. Measured on
this project's 2-core machine, shared (docs/BENCHMARKS.md, "Thread policy"): one H-score 97-136 ms with 2 threads
against 1.9-2.1 ms with one, seven probe heads 1.2-2.9 s against 0.07 s. The backbone's layers are large enough to
gain from every thread, so only the small operations are wrapped.

``torch.set_num_threads`` sets the calling thread's OpenMP (and MKL) thread count, so a dashboard session or a Ray
job that enters :func:`one_thread` does not change another thread's count.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block (or, as a decorator, each call) at one intra-op thread; restore the count after."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
