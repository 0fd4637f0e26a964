import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage

from core import UserInputError, h_score
from core.metrics.h_score import ledoit_wolf_shrinkage as torch_lw


def _data(n=60, d=8, c=3, sep=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centers = rng.normal(size=(c, d)) * sep
    x = rng.normal(size=(n, d)) + centers[y]
    return x, y


def _class_mean_features(f, y):
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    return g


def ref_shrinkage(f, y):
    """NumPy reference: scikit-learn's LedoitWolf for cov_a and its coefficient (1/N covariances)."""
    f = f - f.mean(0)
    lw = LedoitWolf(assume_centered=False).fit(f)
    g = _class_mean_features(f, y)
    cov_g = g.T @ g / len(f)
    return np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * cov_g))


def ref_pinv(f, y):
    """tllib's H-score: np.cov of features and of class means, pseudo-inverse."""
    covf = np.cov(f, rowvar=False)
    covg = np.cov(_class_mean_features(f, y), rowvar=False)
    return np.trace(np.linalg.pinv(covf, rcond=1e-15) @ covg)


def ref_trace_ratio(f, y):
    return np.trace(np.cov(_class_mean_features(f, y), rowvar=False)) / np.trace(np.cov(f, rowvar=False))


@pytest.mark.parametrize("n,d", [(60, 8), (20, 40), (200, 16)])
def test_shrinkage_matches_sklearn_reference(n, d):
    x, y = _data(n, d)
    ours = h_score(torch.tensor(x), torch.tensor(y)).item()
    assert ours == pytest.approx(ref_shrinkage(x, y), rel=1e-6)


def test_lw_coefficient_matches_sklearn():
    x, _ = _data(30, 50)
    xc = x - x.mean(0)
    assert torch_lw(torch.tensor(xc)).item() == pytest.approx(ledoit_wolf_shrinkage(xc), rel=1e-9)


def test_pinv_and_trace_ratio_match_references():
    x, y = _data(80, 6)
    assert h_score(torch.tensor(x), torch.tensor(y), "pinv").item() == pytest.approx(ref_pinv(x, y), rel=1e-6)
    trace_ratio = h_score(torch.tensor(x), torch.tensor(y), "trace_ratio").item()
    assert trace_ratio == pytest.approx(ref_trace_ratio(x, y), rel=1e-9)


@pytest.mark.parametrize("variant", ["shrinkage", "pinv", "trace_ratio"])
def test_invariant_to_label_renaming_and_sample_order(variant):
    x, y = _data()
    f, yt = torch.tensor(x), torch.tensor(y)
    base = h_score(f, yt, variant)
    renamed = torch.tensor(np.array([7, 2, 11])[y])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    assert h_score(f, renamed, variant).item() == pytest.approx(base.item(), rel=1e-9)
    assert h_score(f[perm], yt[perm], variant).item() == pytest.approx(base.item(), rel=1e-9)


@pytest.mark.parametrize("variant", ["shrinkage", "pinv", "trace_ratio"])
def test_separable_scores_above_random(variant):
    xs, y = _data(sep=4.0)
    xr, _ = _data(sep=0.0, seed=1)
    y = torch.tensor(y)
    assert h_score(torch.tensor(xs), y, variant) > h_score(torch.tensor(xr), y, variant) + 0.5


def test_differentiable_and_ascent_increases_score():
    x, y = _data(40, 6, sep=0.5)
    f = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    h = h_score(f, torch.tensor(y))
    h.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    with torch.no_grad():
        h2 = h_score(f + 0.05 * f.grad / f.grad.norm(), torch.tensor(y))
    assert h2 > h


def test_float_dtype_and_device_kept():
    x, y = _data()
    assert h_score(torch.tensor(x, dtype=torch.float32), torch.tensor(y)).dtype == torch.float32
    assert h_score(torch.tensor(x), torch.tensor(y)).dtype == torch.float64


def test_constant_features_score_zero():
    f = torch.ones(20, 5) * 3.0
    y = torch.arange(20) % 2
    for v in ("shrinkage", "pinv", "trace_ratio"):
        assert h_score(f, y, v).item() == 0.0


@pytest.mark.parametrize(
    "features,labels,match",
    [
        (torch.randn(10, 4), torch.zeros(10), "at least two classes"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), "more samples than classes"),
        (torch.randn(10, 4), torch.zeros(9), "10 samples but labels have 9"),
        (torch.randn(10), torch.zeros(10), r"shape \(N, D\)"),
        (torch.tensor([[float("nan"), 1.0]] * 4), torch.tensor([0, 1, 0, 1]), "NaN or infinite"),
        (torch.randn(10, 4), torch.rand(10), "whole numbers"),
    ],
)
def test_clear_errors(features, labels, match):
    with pytest.raises(UserInputError, match=match):
        h_score(features, labels)


def test_unknown_variant():
    with pytest.raises(UserInputError, match="unknown H-score variant 'foo'"):
        h_score(torch.randn(10, 3), torch.arange(10) % 2, "foo")


def test_shrinkage_gradient_matches_finite_differences():
    """The Ledoit-Wolf coefficient is part of the gradient, so a step along the gradient raises the score as
    predicted."""
    from core import h_score

    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 12, generator=g, dtype=torch.float64)
    y = torch.arange(40) % 4
    f[:, 0] += y
    torch.autograd.gradcheck(lambda x: h_score(x, y), (f.requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["shrinkage", "pinv", "trace_ratio"])
def test_per_class_terms_sum_to_the_h_score_and_find_the_class_that_stands_out(variant):
    from core.metrics.h_score import h_score_per_class

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=g)
    f = torch.randn(300, 20, generator=g, dtype=torch.float64)
    f[y == 2] += 1.5  # class 2's mean stands out
    terms = h_score_per_class(f, y, variant)
    assert terms.shape == (4,) and (terms >= 0).all()
    assert float(terms.sum()) == pytest.approx(float(h_score(f, y, variant)), rel=1e-10)
    assert int(terms.argmax()) == 2 and float(terms[2]) > 2 * float(terms[[0, 1, 3]].max())
    shifted = h_score_per_class(f, y + 1, variant)  # an absent label gets 0, the others keep their terms
    assert float(shifted[0]) == 0 and torch.allclose(shifted[1:], terms)
