"""Property-based checks: a correct finite result or a clear error, never a silent NaN, never a hang."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from core import UserInputError, h_score
from core.method.regularizers import conflict_regularizer, fishr_regularizer
from core.method.source_pass import cosine_matrix

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def feature_sets(draw):
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, 24))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]))
    kind = draw(st.sampled_from(["normal", "constant", "duplicates", "rank1"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "normal":
        f = rng.normal(size=(n, d))
    elif kind == "constant":
        f = np.full((n, d), rng.normal())
    elif kind == "duplicates":
        f = np.repeat(rng.normal(size=(1 + n // 2, d)), 2, axis=0)[:n]
    else:
        f = np.outer(rng.normal(size=n), rng.normal(size=d))
    c = draw(st.integers(1, max(1, n)))
    y = rng.integers(0, c, size=n)
    return torch.tensor(f * scale), torch.tensor(y)


@FAST
@given(feature_sets(), st.sampled_from(["shrinkage", "pinv", "trace_ratio"]))
def test_h_score_finite_or_clear_error(data, variant):
    f, y = data
    try:
        h = h_score(f, y, variant)
    except UserInputError as exc:
        assert "class" in str(exc) or "samples" in str(exc)
        return
    assert torch.isfinite(h), (f, y)
    assert h.item() >= -1e-6


@FAST
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 20)),
              elements=st.floats(-1e6, 1e6, allow_nan=False)))
def test_cosine_and_regularisers_bounded(g):
    c = cosine_matrix(torch.tensor(g))
    assert torch.isfinite(c).all() and (c.abs() <= 1 + 1e-6).all()
    k = g.shape[0]
    alpha = torch.softmax(torch.randn(k, dtype=torch.float64), 0)
    r = conflict_regularizer(alpha, c)
    assert torch.isfinite(r) and 0 <= r.item() <= 1 + 1e-6
    f = torch.tensor(np.abs(g), dtype=torch.float64)
    rf = fishr_regularizer(alpha, f @ f.T)
    assert torch.isfinite(rf) and rf.item() >= -1e-9 * max(1.0, float((f**2).sum()))


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_never_load_as_a_prompt(tmp_path_factory, blob):
    from core import SourcePrompt

    d = tmp_path_factory.mktemp("fz")
    (d / "p.safetensors").write_bytes(blob)
    (d / "p.json").write_text('{"name": "p", "backbone_fingerprint": ""}')
    with pytest.raises(UserInputError):
        SourcePrompt.load(d / "p.safetensors")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_flipped_bytes_in_a_real_prompt_are_refused_or_identical(tmp_path_factory, pos, value):
    from core import SourcePrompt

    d = tmp_path_factory.mktemp("fl")
    sp = SourcePrompt("p", torch.randn(3, 8), backbone_fingerprint="x")
    sp.save(d)
    raw = bytearray((d / "p.safetensors").read_bytes())
    pos = pos % len(raw)
    raw[pos] = value
    (d / "p.safetensors").write_bytes(bytes(raw))
    try:
        back = SourcePrompt.load(d / "p.safetensors")
    except UserInputError:
        return
    assert back.prompt.shape == (3, 8) and torch.isfinite(back.prompt).all()


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.integers(4, 24), st.integers(2, 4), st.sampled_from([1e-3, 1.0, 1e3]), st.integers(0, 1000))
def test_weight_learner_on_random_targets(model, bank, n, c, scale, seed):
    from core import HGPromptEnsemble

    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, 3, 16, 16)) * scale, dtype=torch.float32)
    y = torch.tensor(rng.integers(0, c, size=n))
    try:
        ens = HGPromptEnsemble(steps=3, n_samples=None).fit(model, bank, images=x, labels=y)
    except UserInputError:
        return
    assert np.isfinite(ens.weights_).all() and abs(ens.weights_.sum() - 1) < 1e-6
    assert all(np.isfinite(h["objective"]) for h in ens.history_)
