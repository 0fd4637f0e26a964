import numpy as np
import pytest
import torch

from core import UserInputError, h_score
from core.analysis.interference import interference
from core.method.scoring import mixing_loss
from core.method.source_pass import cosine_matrix


def _sample(model, task, n=30):
    x, y = task.tensors("train", model.transform(), "t")
    return x[:n], y[:n]


def _h(model, x, y, p):
    with torch.no_grad():
        return float(h_score(model(x, p), y))


def test_segment_mixing_loss_and_slopes_against_a_direct_per_pair_computation(model, task, bank):
    x, y = _sample(model, task)
    res = interference(model, bank, x, y, points=5, seed=0)
    stack = bank.stack()
    k = len(bank)
    assert res.segment.shape == (k, k, 5) and res.names == bank.names
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            for s, t in enumerate(res.t):
                direct = _h(model, x, y, (1 - t) * stack[i] + t * stack[j])
                assert res.segment[i, j, s] == pytest.approx(direct, rel=1e-4, abs=1e-5)
            mid = _h(model, x, y, (stack[i] + stack[j]) / 2)
            ends = (_h(model, x, y, stack[i]) + _h(model, x, y, stack[j])) / 2
            assert res.mixing_loss[i, j] == pytest.approx(mid - ends, rel=1e-3, abs=1e-5)
            p = stack[i].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(h_score(model(x, p), y), [p])
            assert res.directional[i, j] == pytest.approx(float((g * (stack[j] - stack[i])).sum()), rel=1e-3, abs=1e-6)
    assert np.all(np.diag(res.mixing_loss) == 0) and np.allclose(res.mixing_loss, res.mixing_loss.T)


def test_cosine_variants_and_a_null_band_reproducible_for_a_seed(model, task, bank):
    x, y = _sample(model, task)
    a = interference(model, bank, x, y, seed=4)
    b = interference(model, bank, x, y, seed=4)
    c = interference(model, bank, x, y, seed=5)
    assert a.null_band == b.null_band and np.array_equal(a.null["raw"], b.null["raw"])
    assert a.null_band != c.null_band
    # the sources' own cosines do not depend on the seed
    np.testing.assert_array_equal(a.cosine["raw"], c.cosine["raw"])
    for v in ("raw", "centred"):
        lo, hi = a.null_band[v]
        assert -1 <= lo <= hi <= 1
        assert a.null[v].shape == (len(bank), len(bank))  # as many random prompts as sources by default
    # centred cosines are the cosines of the gradients minus their mean over the sources
    from core import measure_sources, target_tokens

    g = measure_sources(model, target_tokens(model, x, y, None, 0), bank).grads
    torch.testing.assert_close(torch.as_tensor(a.cosine["centred"]), cosine_matrix(g - g.mean(0, keepdim=True)),
                               atol=1e-4, rtol=1e-4)
    rho = a.spearman()
    assert set(rho) == {"raw", "centred", "derivative"} and all(-1 <= r <= 1 for r in rho.values())
    d = a.to_dict()
    assert d["null_band"]["centred"] == list(a.null_band["centred"]) and len(d["predicted_mixing_loss"]) == len(bank)


def test_deep_prompts_get_per_layer_cosines_and_bands(model, task):
    x, y = _sample(model, task)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randn(3, model.depth, 4, model.embed_dim, generator=g) * 0.5
    res = interference(model, prompts, x, y)
    assert res.layer_cosine["raw"].shape == (model.depth, 3, 3)
    assert res.layer_null_band["centred"].shape == (model.depth, 2)


def test_the_interference_regulariser_rests_on_the_measured_mixing_loss(model, task, bank):
    from core import HGPromptEnsemble
    from core.model.tokens import split_images

    ens = HGPromptEnsemble(regularizer="interference", steps=2, n_samples=30, seed=0).fit(model, bank, task=task)
    x, y = split_images(model, task, "train")
    idx = task.subsample("train", 30, 0)
    res = interference(model, bank, x[idx], y[idx], seed=0)
    np.testing.assert_allclose(ens.source_pass_.mixing_loss.numpy(), res.mixing_loss, rtol=1e-3, atol=1e-5)


def test_bad_inputs_say_what_to_do(model, task, bank):
    x, y = _sample(model, task)
    with pytest.raises(UserInputError, match="odd integer"):
        interference(model, bank, x, y, points=4)
    with pytest.raises(UserInputError, match="at least two prompts"):
        interference(model, bank.stack()[:1], x, y)
    with pytest.raises(UserInputError, match="midpoint"):
        mixing_loss(torch.zeros(2, 2, 2), torch.tensor([0.0, 1.0]))


def test_simplex_grid_and_its_hscores_against_a_direct_computation(model, task, bank):
    from core.analysis.interference import simplex_hscores
    from core.method.scoring import simplex_points

    pts = simplex_points(3, 4)
    assert pts.shape == (15, 3) and torch.allclose(pts.sum(1), torch.ones(15, dtype=torch.float64))
    assert {tuple(p) for p in pts.tolist()} >= {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}
    x, y = _sample(model, task)
    stack = bank.stack()
    w, h = simplex_hscores(model, stack, x, y, resolution=4)
    for i in (0, 5, 14):
        direct = _h(model, x, y, torch.tensordot(torch.as_tensor(w[i], dtype=torch.float32), stack, 1))
        assert h[i] == pytest.approx(direct, rel=1e-4, abs=1e-5)


def test_target_sample_reuses_the_split_tokens_a_tune_embedded(model, task, monkeypatch):
    """Once a tune has embedded the train split, a fit's sample is those rows: the same tokens and labels as
    embedding the sample itself, without running the patch embedding again."""
    from core.model.tokens import split_tokens, target_tokens
    from core.model.toy import toy_task

    fresh = toy_task("fresh", seed=5)
    want_tok, want_y = target_tokens(model, fresh, None, 20, 3)
    split_tokens(model, fresh, "train")
    monkeypatch.setattr(model, "embed", lambda *a, **k: pytest.fail("embedded again"))
    tok, y = target_tokens(model, fresh, None, 20, 3)
    torch.testing.assert_close(tok, want_tok, rtol=1e-6, atol=1e-6)
    assert torch.equal(y, want_y) and tok.shape[0] == 20
