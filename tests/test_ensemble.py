import threading

import numpy as np
import pytest
import torch

from core import HGPromptEnsemble, UserInputError


def _fit(model, bank, task, **kw):
    kw.setdefault("steps", 6)
    kw.setdefault("n_samples", 30)
    return HGPromptEnsemble(**kw).fit(model, bank, task=task)


def test_weights_on_simplex_with_full_history(model, bank, task):
    ens = _fit(model, bank, task)
    assert ens.weights_.shape == (3,) and ens.weights_.min() >= 0
    assert ens.weights_.sum() == pytest.approx(1.0)
    assert len(ens.history_) == 7 and ens.n_steps_ == 6 and not ens.stopped_
    for row in ens.history_:
        assert set(row) >= {"step", "weights", "hscore", "regularizer", "objective"}
        assert row["objective"] == pytest.approx(row["hscore"] - 1.0 * row["regularizer"])
    assert ens.history_[0]["weights"] == pytest.approx([1 / 3] * 3)
    assert ens.prompt_.shape == bank.stack().shape[1:]
    torch.testing.assert_close(ens.prompt_, torch.tensordot(torch.tensor(ens.weights_, dtype=torch.float32), bank.stack(), 1))
    assert ens.names_ == bank.names


def test_objective_ascends(model, bank, task):
    ens = _fit(model, bank, task, steps=15, lr=0.05)
    assert ens.history_[-1]["objective"] > ens.history_[0]["objective"]


def test_deterministic_for_seed(model, bank, task):
    a = _fit(model, bank, task, seed=3, batch_size=12)
    b = _fit(model, bank, task, seed=3, batch_size=12)
    np.testing.assert_array_equal(a.weights_, b.weights_)
    c = _fit(model, bank, task, seed=4, batch_size=12)
    assert not np.array_equal(a.weights_, c.weights_)


def test_lambda_zero_is_h_score_only(model, bank, task):
    ens = _fit(model, bank, task, lam=0.0)
    for row in ens.history_:
        assert row["objective"] == row["hscore"]


def test_strong_regulariser_moves_mass_off_conflicting_pairs(model, task, bank, monkeypatch):
    import core.ensemble as ens_mod

    low = _fit(model, bank, task, lam=0.0, steps=5, lr=0.05)
    fav = int(np.argmax(low.weights_))  # the source the H-score alone favours
    cosine = torch.full((3, 3), 0.5)
    cosine[fav, :] = cosine[:, fav] = -0.9  # ... made to conflict with every other source
    cosine.fill_diagonal_(1.0)
    real = ens_mod.gradient_conflicts

    def with_conflict(*a, **kw):
        res = real(*a, **kw)
        res.cosine = cosine
        return res

    monkeypatch.setattr(ens_mod, "gradient_conflicts", with_conflict)
    high = _fit(model, bank, task, lam=50.0, steps=5, lr=0.05)
    assert high.weights_[fav] < 1 / 3 < low.weights_[fav]
    assert high.history_[-1]["regularizer"] < high.history_[0]["regularizer"]


def test_fisher_variant_runs(model, bank, task):
    ens = _fit(model, bank, task, regularizer="fisher")
    assert ens.conflicts_.fisher is not None and np.isfinite(ens.weights_).all()


def test_callback_and_cooperative_stop(model, bank, task):
    seen = []
    event = threading.Event()

    def cb(info):
        seen.append(info)
        if info["stage"] == "step" and info["step"] == 2:
            event.set()

    ens = HGPromptEnsemble(steps=50, n_samples=30).fit(model, bank, task=task, callback=cb, should_stop=event)
    assert ens.stopped_ and ens.n_steps_ == 3
    assert seen[0]["stage"] == "conflicts" and len(seen[0]["cosine"]) == 3
    assert [s["step"] for s in seen[1:]] == [0, 1, 2, 3]
    assert ens.weights_.sum() == pytest.approx(1.0)


def test_images_and_labels_input(model, bank, task):
    x, y = task.tensors("train", model.transform(), key="t")
    ens = HGPromptEnsemble(steps=2, n_samples=20).fit(model, bank, images=x, labels=y)
    assert ens.n_target_samples_ == 20


@pytest.mark.parametrize("kw,match", [
    ({"lam": -1.0}, "lam must be"), ({"regularizer": "x"}, "regularizer must be"), ({"h_variant": "x"}, "h_variant"),
    ({"steps": -2}, "steps must be"), ({"lr": 0}, "lr must be"), ({"n_samples": 1}, "n_samples"),
])
def test_bad_parameters(model, bank, task, kw, match):
    with pytest.raises(UserInputError, match=match):
        HGPromptEnsemble(**kw).fit(model, bank, task=task)


def test_single_class_target_refused(model, bank):
    x = torch.randn(10, 3, 16, 16)
    with pytest.raises(UserInputError, match="two classes"):
        HGPromptEnsemble(steps=1).fit(model, bank, images=x, labels=torch.zeros(10, dtype=torch.long))


def test_reusing_the_gradient_pass_gives_the_same_fit(model, task, bank):
    first = HGPromptEnsemble(steps=4, n_samples=24, regularizer="fisher", seed=3).fit(model, bank, task=task)
    again = HGPromptEnsemble(steps=4, n_samples=24, regularizer="conflict", lam=0.5, seed=3).fit(model, bank, task=task)
    reused = HGPromptEnsemble(steps=4, n_samples=24, regularizer="conflict", lam=0.5, seed=3).fit(
        model, bank, task=task, conflicts=first.conflicts_)
    np.testing.assert_allclose(reused.weights_, again.weights_, rtol=1e-5, atol=1e-7)
    no_fisher = again.conflicts_
    with pytest.raises(UserInputError, match="without the Fisher term"):
        HGPromptEnsemble(steps=2, n_samples=24, regularizer="fisher").fit(model, bank, task=task, conflicts=no_fisher)


def test_without_conflicting_pairs_the_regulariser_changes_nothing(model, task, bank):
    """bench/quality.py reuses hgprompt_h_only for hgprompt when no cosine is negative: that must be exact."""
    import dataclasses

    from bench.quality import no_conflicting_pair

    first = HGPromptEnsemble(steps=5, n_samples=24, lam=0.0, seed=1).fit(model, bank, task=task)
    agreeing = dataclasses.replace(first.conflicts_, cosine=first.conflicts_.cosine.abs())
    assert no_conflicting_pair(agreeing.cosine)
    h_only = HGPromptEnsemble(steps=5, n_samples=24, lam=0.0, seed=1).fit(model, bank, task=task, conflicts=agreeing)
    full = HGPromptEnsemble(steps=5, n_samples=24, lam=3.0, seed=1).fit(model, bank, task=task, conflicts=agreeing)
    assert np.array_equal(full.weights_, h_only.weights_) and torch.equal(full.prompt_, h_only.prompt_)
    assert all(h["regularizer"] == 0.0 for h in full.history_)
    conflicting = first.conflicts_.cosine.clone()
    conflicting[0, 1] = conflicting[1, 0] = -0.5
    assert not no_conflicting_pair(conflicting)
