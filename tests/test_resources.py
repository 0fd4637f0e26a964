"""Runs that would not fit in memory: measured activation sizes, automatic chunking, and a clear refusal."""
import pytest
import torch
from test_conflicts import _target

from core import HGPromptEnsemble, UserInputError, measure_sources, target_tokens
from core.model.resources import activation_bytes_per_row, free_bytes, rows_that_fit


def test_activation_size_is_measured_per_row(model):
    shallow = activation_bytes_per_row(model, (4, model.embed_dim), 5)
    longer = activation_bytes_per_row(model, (8, model.embed_dim), 5)
    deep = activation_bytes_per_row(model, (model.depth, 4, model.embed_dim), 5)
    assert 0 < shallow < longer  # more prompt tokens, more activations
    assert deep >= shallow
    # Order of magnitude: at least the tokens of every block must be kept.
    assert shallow >= (4 + 5) * model.embed_dim * 4 * model.depth


def test_free_memory_override(monkeypatch):
    monkeypatch.setenv("HGPROMPT_MEMORY_LIMIT_MB", "3")
    assert free_bytes("cpu") == 3 * 2**20
    monkeypatch.delenv("HGPROMPT_MEMORY_LIMIT_MB")
    assert free_bytes("cpu") > 2**20


def test_too_little_memory_falls_back_to_chunks_with_the_same_result(model, task, bank, monkeypatch):
    x, y = _target(model, task)
    full = measure_sources(model, target_tokens(model, x, y, None, 0), bank, fishr=True)
    tokens = model.embed(x)
    per_row = activation_bytes_per_row(model, tuple(bank.stack().shape[1:]), tokens.shape[1])
    # Room for about 2 samples x K prompts at a time: the pass must chunk, and agree exactly.
    monkeypatch.setenv("HGPROMPT_MEMORY_LIMIT_MB", str(2.5 * len(bank) * per_row / 0.6 / 2**20))
    assert rows_that_fit(model, tuple(bank.stack().shape[1:]), tokens.shape[1]) < len(bank) * len(y)
    small = measure_sources(model, target_tokens(model, x, y, None, 0), bank, fishr=True)
    torch.testing.assert_close(full.grads, small.grads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(full.grad_var, small.grad_var, rtol=3e-2, atol=1e-3 * float(full.grad_var.abs().max()))


def test_run_that_cannot_fit_is_refused_with_the_sizes(model, task, bank, monkeypatch):
    monkeypatch.setenv("HGPROMPT_MEMORY_LIMIT_MB", "0.001")
    with pytest.raises(UserInputError, match=r"GiB of CPU memory .* fewer sources"):
        HGPromptEnsemble(steps=2, n_samples=24).fit(model, bank, task=task)


def test_container_memory_limit_counts(monkeypatch):
    import io

    import core.model.resources as resources

    real_open = open
    files = {"/sys/fs/cgroup/memory.max": str(2**30), "/sys/fs/cgroup/memory.current": str(2**28)}

    def fake_open(path, *a, **kw):
        return io.StringIO(files[path]) if path in files else real_open(path, *a, **kw)

    monkeypatch.delenv("HGPROMPT_MEMORY_LIMIT_MB", raising=False)
    monkeypatch.setattr(resources, "open", fake_open, raising=False)
    assert resources._cgroup_bytes_left() == 3 * 2**28
    assert resources.free_bytes("cpu") == 3 * 2**28  # this machine has more than 768 MiB available
    files["/sys/fs/cgroup/memory.max"] = "max"  # no limit: the host's MemAvailable counts
    assert resources._cgroup_bytes_left() is None
    assert resources.free_bytes("cpu") > 3 * 2**28
