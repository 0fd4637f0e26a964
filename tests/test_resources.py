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


# ------------------------------------------------------------------ passes without gradients (issue 31 b)
def test_a_forward_without_gradients_keeps_far_less_a_row_than_one_with(model):
    from core.model.resources import forward_bytes_per_row

    shape, n_tokens = (4, model.embed_dim), 17
    no_grad = forward_bytes_per_row(model, shape, n_tokens)
    assert 0 < no_grad and no_grad >= (4 + n_tokens) * model.embed_dim * 4  # at least the row's own tokens
    assert forward_bytes_per_row(model, (model.depth, 4, model.embed_dim), n_tokens) >= no_grad
    # A larger ViT: one block's temporaries, not every block's saved activations.
    from core.model.toy import toy_model

    big = toy_model(depth=6)
    assert forward_bytes_per_row(big, shape, n_tokens) < activation_bytes_per_row(big, shape, n_tokens) / 2


def test_live_tensor_bytes_counts_what_is_alive():
    from core.model.resources import peak_tensor_bytes

    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more: 8000 alive
        del a
        c = b.view(10, 100) + 1  # a view costs nothing; c 4000 more: b and c alive, 8000
        return c.sum()  # 4 bytes more while b and c are alive

    assert peak_tensor_bytes(work) == 8004


@pytest.mark.slow
def test_every_pass_without_gradients_chunks_under_a_low_limit_and_gives_the_same_numbers(model, bank, monkeypatch):
    """With HGPROMPT_MEMORY_LIMIT_MB set to a few rows' worth, every no-grad forward (the H-scores of many prompts,
    transferability(), the plane, the fit's announcement of the sources, the source pass's probe features, the
    tuning's evaluations) takes no more rows than fit, and the numbers are those of the unchunked passes."""
    from core import HGPromptEnsemble, TuneConfig, transferability, tune_prompt
    from core.analysis.plane import task_vector_plane
    from core.method.scoring import hscores_at
    from core.model.features import prompt_features
    from core.model.resources import SAFETY, forward_bytes_per_row, forward_rows_that_fit
    from core.model.tokens import target_tokens
    from core.model.toy import toy_task

    stack = bank.stack()

    def run_all():
        task = toy_task()  # a fresh task each time: nothing read back from its cache
        tokens, y = target_tokens(model, task, None, 24, 0)
        out = {"h": hscores_at(model, tokens, y, stack),
               "transferability": torch.as_tensor(transferability(model, task, bank, n_samples=24)),
               "no_prompt": prompt_features(model, tokens, None),
               "plane": torch.as_tensor(task_vector_plane(model, bank, task, "src0", "src1", grid=3, n_samples=24,
                                                          probe=True, n_test=12).values)}
        announced = []
        HGPromptEnsemble(steps=0, n_samples=12, grad_loss="ce").fit(
            model, bank, task=task, callback=lambda info: announced.append(info["source_hscores"])
            if info["stage"] == "sources" else None)
        out["announced"] = torch.tensor(announced[0])
        res = tune_prompt(model, task, stack[0], TuneConfig(epochs=1, batch_size=16))
        out["tune"] = torch.tensor([res.val_acc, res.test_acc, res.train_acc])
        return out

    full = run_all()
    n_tokens = 1 + (model.backbone.patch_embed.num_patches)
    per_row = max(forward_bytes_per_row(model, tuple(stack.shape[1:]), n_tokens),
                  forward_bytes_per_row(model, None, n_tokens))
    # About 7 rows without gradients, and 3 with (the source pass's 3 prompts still fit, one sample at a time).
    monkeypatch.setenv("HGPROMPT_MEMORY_LIMIT_MB", str(7.5 * per_row / SAFETY / 2**20))
    seen = []
    real = model.forward_rows

    def spy(tokens, rows=None):
        if not torch.is_grad_enabled():
            shape = None if rows is None else tuple(rows.shape[1:])
            seen.append((tokens.shape[0], forward_rows_that_fit(model, shape, tokens.shape[1])))
        return real(tokens, rows)

    monkeypatch.setattr(model, "forward_rows", spy)
    small = run_all()
    assert seen and all(rows <= fit for rows, fit in seen), [s for s in seen if s[0] > s[1]][:3]
    assert max(rows for rows, _ in seen) <= 10  # the limit was low: a pass of 24 samples x 3 prompts had to chunk
    for key, value in full.items():
        torch.testing.assert_close(small[key].double(), value.double(), rtol=1e-4, atol=1e-5, msg=key)
