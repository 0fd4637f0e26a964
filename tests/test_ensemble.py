import dataclasses
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
    ens = _fit(model, bank, task, start="uniform", tol=0.0)
    assert ens.weights_.shape == (3,) and ens.weights_.min() >= 0
    assert ens.weights_.sum() == pytest.approx(1.0)
    assert ens.start_ == "uniform" and ens.history_[0]["weights"] == pytest.approx([1 / 3] * 3)
    for row in ens.history_:
        assert set(row) >= {"step", "weights", "hscore", "regularizer", "objective", "accepted", "step_size"}
        assert row["objective"] == pytest.approx(row["hscore"] - 1.0 * row["regularizer"])
    assert ens.history_[-1]["final"] and ens.history_[-1]["weights"] == pytest.approx(ens.weights_.tolist())
    assert ens.prompt_.shape == bank.stack().shape[1:]
    torch.testing.assert_close(ens.prompt_,
                               torch.tensordot(torch.tensor(ens.weights_, dtype=torch.float32), bank.stack(), 1))
    assert ens.names_ == bank.names
    assert set(ens.candidates_) == set(bank.names) | {"uniform"}


@pytest.mark.parametrize("kw", [
    {"lam": 0.0}, {"lam": 1.0}, {"lam": 1.0, "regularizer": "conflict"}, {"lam": 2.0, "regularizer": "interference"},
    {"lam": 0.0, "optimizer": "adam"}, {"lam": 1.0, "start": "uniform"},
    {"lam": 1.0, "optimizer": "adam", "start": "uniform"},
])
def test_never_below_the_best_single_source_or_the_uniform_point(model, bank, task, kw):
    ens = _fit(model, bank, task, steps=8, **kw)
    assert ens.objective_ >= max(ens.candidates_.values()) - 1e-9
    assert ens.history_[-1]["objective"] == pytest.approx(ens.objective_)
    eg = [h["objective"] for h in ens.history_]
    if ens.optimizer == "eg":  # EG keeps a step only when it raises J
        assert all(b >= a - 1e-12 for a, b in zip(eg, eg[1:], strict=False))


class SaddleModel:
    """Two sources P_1 = (1, 0), P_2 = (-1, 0): the class signal is scaled by ||p||^2, so it vanishes at the uniform
    mixture (0, 0). J is symmetric about the uniform point, which is therefore stationary, and a minimum along the
    edge: an optimiser that starts there and follows the gradient never leaves."""

    embed_dim = 3
    device = torch.device("cpu")
    name, fingerprint = "saddle", "saddle"

    def check_prompt(self, prompt, what="prompt"):
        return "shallow"

    def parameters(self):  # (none: the memory guard measures what a row adds beyond them)
        return iter(())

    def buffers(self):
        return iter(())

    def embed(self, x):
        return x.reshape(x.shape[0], 1, -1)

    def forward_rows(self, tokens, rows):
        s = (rows[:, 0] ** 2).sum(-1, keepdim=True)  # (M, 1)
        return torch.cat([tokens[:, 0, :1] * s, tokens[:, 0, 1:]], dim=1)

    def forward_tokens(self, tokens, prompt):
        return self.forward_rows(tokens, prompt.unsqueeze(0).expand(tokens.shape[0], *prompt.shape))

    def forward_tokens_batched(self, tokens, prompts):
        k, b = prompts.shape[0], tokens.shape[0]
        rows = prompts.unsqueeze(1).expand(k, b, *prompts.shape[1:]).reshape(k * b, *prompts.shape[1:])
        x = tokens.unsqueeze(0).expand(k, *tokens.shape).reshape(k * b, *tokens.shape[1:])
        return self.forward_rows(x, rows).reshape(k, b, -1)


def test_vertex_guarantee_when_the_uniform_start_is_a_saddle():
    from core.metrics.h_score import h_score

    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 3, 1, 1, generator=g)
    x[:, 0, 0, 0] += 3.0 * y  # the first feature carries the class
    prompts = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
    model = SaddleModel()
    # the uniform point is stationary: the objective's slope towards either source is 0 there
    a = torch.tensor([0.5, 0.5], requires_grad=True)
    h = h_score(model.forward_tokens(model.embed(x), torch.tensordot(a, prompts, 1)), y)
    (grad,) = torch.autograd.grad(h, [a])
    assert abs(float(grad[0] - grad[1])) < 1e-6
    for kw in ({}, {"optimizer": "adam"}, {"start": "uniform"}, {"start": "uniform", "optimizer": "adam"}):
        ens = HGPromptEnsemble(steps=10, n_samples=None, chunk_size=1000, **kw).fit(model, prompts, images=x, labels=y)
        best_vertex = max(ens.source_hscores_)
        assert ens.candidates_["uniform"] < best_vertex - 0.5
        assert ens.objective_ >= best_vertex - 1e-9, kw
        assert ens.weights_.max() == pytest.approx(1.0)


def test_lambda_zero_is_h_score_only(model, bank, task):
    ens = _fit(model, bank, task, lam=0.0, start="uniform")
    for row in ens.history_:
        assert row["objective"] == row["hscore"]


def test_regulariser_lowers_the_penalty_at_the_returned_point(model, task, bank, monkeypatch):
    import core.method.ensemble as ens_mod

    low = _fit(model, bank, task, lam=0.0, start="uniform", regularizer="conflict")
    fav = int(np.argmax(low.weights_))
    cosine = torch.full((3, 3), 0.5)
    cosine[fav, :] = cosine[:, fav] = -0.9  # the favoured source made to conflict with every other
    cosine.fill_diagonal_(1.0)
    real = ens_mod.measure_sources

    def with_conflict(*a, **kw):
        return dataclasses.replace(real(*a, **kw), cosine=cosine)

    monkeypatch.setattr(ens_mod, "measure_sources", with_conflict)
    high = _fit(model, bank, task, lam=50.0, start="uniform", regularizer="conflict")
    assert high.history_[-1]["regularizer"] < high.history_[0]["regularizer"]
    assert high.history_[-1]["regularizer"] <= 1e-3 or high.weights_[fav] < low.weights_[fav]


def test_callback_and_cooperative_stop(model, bank, task):
    seen = []
    event = threading.Event()

    def cb(info):
        seen.append(info)
        if info["stage"] == "step" and info["step"] == 2:
            event.set()

    ens = HGPromptEnsemble(steps=50, n_samples=30, start="uniform", optimizer="adam", tol=0.0).fit(
        model, bank, task=task, callback=cb, should_stop=event)
    assert ens.stopped_ and not ens.converged_
    # First every source alone (from the source pass's forward, for a live view), then what the whole pass gave.
    best = int(np.argmax(seen[0]["source_hscores"]))
    assert seen[0]["stage"] == "sources" and seen[0]["weights"] == [float(i == best) for i in range(3)]
    assert seen[1]["stage"] == "conflicts" and len(seen[1]["cosine"]) == 3
    assert seen[0]["source_hscores"] == seen[1]["source_hscores"] == ens.source_hscores_.tolist()
    # what the callback was given stays as it was given (the candidates scored later are not added to it)
    assert seen[1]["candidates"] == dict(zip(bank.names, ens.source_hscores_.tolist(), strict=True))
    assert "uniform" in ens.candidates_
    assert [s["step"] for s in seen[2:5]] == [0, 1, 2]
    assert ens.weights_.sum() == pytest.approx(1.0)


def test_images_and_labels_input(model, bank, task):
    x, y = task.tensors("train", model.transform(), "t")
    ens = HGPromptEnsemble(steps=2, n_samples=20).fit(model, bank, images=x, labels=y)
    assert ens.n_target_samples_ == 20


def test_auto_samples_and_the_small_sample_warning(model, bank, task):
    ens = HGPromptEnsemble(steps=1).fit(model, bank, task=task)
    assert ens.n_target_samples_ == len(task.splits["train"])  # auto: max(256, 4D/3), at most what the task has
    assert ens.warnings_ == [] and 0.0 <= ens.shrinkage_ <= 1.0
    with pytest.warns(UserWarning, match="exactly C - 1"):
        small = HGPromptEnsemble(steps=1, n_samples=20, h_variant="pinv").fit(model, bank, task=task)
    assert "N = 20" in small.warnings_[0]


@pytest.mark.parametrize("kw,match", [
    ({"lam": -1.0}, "lam must be"), ({"regularizer": "x"}, "regularizer must be"), ({"h_variant": "x"}, "h_variant"),
    ({"steps": -2}, "steps must be"), ({"lr": 0}, "lr must be"), ({"n_samples": 1}, "n_samples"),
    ({"optimizer": "sgd"}, "optimizer must be"), ({"tol": -1}, "tol must be"), ({"start": "middle"}, "start must be"),
    ({"regularizer": "fisher"}, "retired"),
])
def test_bad_parameters(model, bank, task, kw, match):
    with pytest.raises(UserInputError, match=match):
        HGPromptEnsemble(**kw).fit(model, bank, task=task)


def test_single_class_target_refused(model, bank):
    x = torch.randn(10, 3, 16, 16)
    with pytest.raises(UserInputError, match="two classes"):
        HGPromptEnsemble(steps=1).fit(model, bank, images=x, labels=torch.zeros(10, dtype=torch.long))


def test_deterministic_for_seed(model, bank, task):
    a = _fit(model, bank, task, seed=3, start="uniform")
    b = _fit(model, bank, task, seed=3, start="uniform")
    np.testing.assert_array_equal(a.weights_, b.weights_)


def test_reusing_the_source_pass_gives_the_same_fit(model, task, bank):
    first = HGPromptEnsemble(steps=4, n_samples=24, regularizer="fishr", seed=3,
                             start="uniform").fit(model, bank, task=task)
    again = HGPromptEnsemble(steps=4, n_samples=24, regularizer="conflict", lam=0.5, seed=3,
                             start="uniform").fit(model, bank, task=task)
    reused = HGPromptEnsemble(steps=4, n_samples=24, regularizer="conflict", lam=0.5, seed=3, start="uniform").fit(
        model, bank, task=task, source_pass=first.source_pass_)
    np.testing.assert_allclose(reused.weights_, again.weights_, rtol=1e-5, atol=1e-7)
    with pytest.raises(UserInputError, match="regularizer='fishr' needs"):
        HGPromptEnsemble(steps=2, n_samples=24, regularizer="fishr").fit(model, bank, task=task,
                                                                         source_pass=again.source_pass_)


def test_fits_sharing_a_source_pass_share_their_hscore_evaluations(model, task, bank, monkeypatch):
    """A second lambda on the same source pass reuses the points the first one evaluated (the uniform point, the
    common start) instead of running the model again, and ends where a fresh fit ends."""
    import core.method.objective as objective_mod

    calls = []
    real = objective_mod.prompt_gradients
    monkeypatch.setattr(objective_mod, "prompt_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(steps=4, n_samples=24, seed=3, start="uniform")
    fresh = {lam: HGPromptEnsemble(lam=lam, **kw).fit(model, bank, task=task) for lam in (0.0, 2.0)}
    fresh_calls = len(calls)
    calls.clear()
    first = HGPromptEnsemble(lam=2.0, **kw).fit(model, bank, task=task)  # the fit whose regulariser needs most
    n_first = len(calls)
    second = HGPromptEnsemble(lam=0.0, **kw).fit(model, bank, task=task, source_pass=first.source_pass_,
                                                 memo=first.memo_)
    n_second = len(calls) - n_first
    assert np.array_equal(first.weights_, fresh[2.0].weights_) and np.array_equal(second.weights_, fresh[0.0].weights_)
    assert second.objective_ == fresh[0.0].objective_
    assert n_second < fresh_calls - n_first  # at least the uniform point came from the first fit
    # Kept in the memo: the points every lambda evaluates (here the uniform start), not the optimiser's steps.
    assert second.memo_ is first.memo_ and len(first.memo_) == 1 and len(second.history_) > 2
    # A lambda-0 fit measures no Fisher vectors (it does not use them): its pass is refused where they are needed.
    with pytest.raises(UserInputError, match="lambda 0"):
        HGPromptEnsemble(lam=2.0, **kw).fit(model, bank, task=task, source_pass=fresh[0.0].source_pass_)
    # Another target sample (another seed) is another key: nothing is reused across samples.
    other = HGPromptEnsemble(lam=2.0, **{**kw, "seed": 4}).fit(model, bank, task=task, memo=first.memo_)
    assert len(first.memo_) == 2 and np.array_equal(other.weights_, HGPromptEnsemble(lam=2.0, **{**kw, "seed": 4}).fit(
        model, bank, task=task).weights_)


def test_without_conflicting_pairs_the_conflict_regulariser_changes_nothing(model, task, bank):
    """When no cosine is negative, R = 0 for every alpha: the conflict fit is the lambda = 0 fit exactly."""
    def no_conflicting_pair(cosine):
        return bool((cosine[~torch.eye(cosine.shape[0], dtype=torch.bool)] >= 0).all())

    kw = dict(steps=5, n_samples=24, seed=1, regularizer="conflict", start="uniform")
    first = HGPromptEnsemble(lam=0.0, **kw).fit(model, bank, task=task)
    agreeing = dataclasses.replace(first.source_pass_, cosine=first.source_pass_.cosine.abs())
    assert no_conflicting_pair(agreeing.cosine)
    h_only = HGPromptEnsemble(lam=0.0, **kw).fit(model, bank, task=task, source_pass=agreeing)
    full = HGPromptEnsemble(lam=3.0, **kw).fit(model, bank, task=task, source_pass=agreeing)
    assert np.array_equal(full.weights_, h_only.weights_) and torch.equal(full.prompt_, h_only.prompt_)
    assert all(h["regularizer"] == 0.0 for h in full.history_)
    conflicting = first.source_pass_.cosine.clone()
    conflicting[0, 1] = conflicting[1, 0] = -0.5
    assert not no_conflicting_pair(conflicting)


@pytest.mark.parametrize("regularizer", ["fishr", "conflict"])
def test_the_objectives_weight_gradient_equals_autograd_through_the_mixed_prompt(model, bank, task, regularizer):
    """dJ/dalpha from one prompt gradient (<dH/dP, P_k>) equals autograd through combine_prompts, the features and
    the H-score, at a mixture with every weight non-zero."""
    from core import Objective, combine_prompts, h_score, measure_sources
    from core.model.tokens import target_tokens

    target = target_tokens(model, task, None, 40, 0)
    tokens, y = target
    stack = bank.stack()
    sp = measure_sources(model, target, stack, fishr=True)
    objective = Objective(model, target, stack, sp, lam=0.7, regularizer=regularizer)
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    point = objective(alpha)
    a = alpha.clone().requires_grad_(True)
    h = h_score(model.forward_tokens(tokens, combine_prompts(a, stack.double()).float()), y)
    (ref_h,) = torch.autograd.grad(h, [a], retain_graph=True)
    j = h - 0.7 * sp.regularizer(a, regularizer)
    (ref,) = torch.autograd.grad(j, [a])
    # float32 features: the two routes agree to a few parts in 10^4 of the gradient's size (measured 0.4-6e-4)
    assert float((point.grad - ref).norm()) <= 2e-3 * float(ref.norm())
    assert float(ref_h.norm()) > 1e-5  # H itself moves with the weights here: the check is not of a regulariser alone
    assert point.objective == pytest.approx(float(j.detach()), rel=1e-5)


@pytest.mark.parametrize("bank_seed", [2, 3, 8])
@pytest.mark.parametrize("start", ["best", "uniform"])
def test_the_optimiser_reaches_the_brute_force_optimum_of_the_simplex(model, task, bank_seed, start):
    """Banks whose H-score optimum is a mixture (found by scoring a grid of 231 mixtures): the fit ends at the grid's
    best value or above it, near the same weights, from either start."""
    from core.analysis.interference import simplex_hscores
    from core.model.toy import toy_bank

    bank = toy_bank(model, seed=bank_seed)
    w, h = simplex_hscores(model, bank.stack(), task, resolution=20, n_samples=48, seed=0)
    best = int(np.argmax(h))
    assert w[best].max() < 0.9  # an interior optimum: the grid's best point is a mixture
    ens = HGPromptEnsemble(lam=0.0, n_samples=48, seed=0, steps=100, tol=1e-7, start=start).fit(model, bank, task=task)
    assert ens.objective_ >= h[best] - 1e-5
    assert np.abs(ens.weights_ - w[best]).max() <= 0.1  # within two grid steps of the grid's best mixture
