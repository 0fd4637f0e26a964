"""Every pass of a fit computed once (issue 34 item 1), the target checked once (issue 33 item 2), and a fit that
can be stopped at any stage (the source pass's forward or backward, the candidates, a step) keeping what it knows."""
import numpy as np
import pytest
import torch

from core import HGPromptEnsemble, Objective, measure_sources, target_tokens
from core.errors import StopRequested

KW = dict(steps=6, n_samples=30)


def _rows(history):
    """History rows without their clock."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _count(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ---------------------------------------------------------------- every pass once
@pytest.mark.parametrize("kw", [dict(), dict(mixing="task_arithmetic"), dict(regularizer="interference")])
def test_at_lambda_0_the_fisher_backward_and_the_mixing_forward_are_skipped_and_nothing_else_changes(
        model, bank, task, kw):
    """lambda 0 does not use R: the pass measures neither the Fisher vectors nor the mixing losses, and the fit is
    the one it was when it did (the same pass with them, given), bit for bit; only R, unmeasured, is NaN."""
    fit = HGPromptEnsemble(lam=0.0, **KW, **kw).fit(model, bank, task=task)
    assert fit.source_pass_.grad_var is None and fit.source_pass_.mixing_loss is None
    full = measure_sources(model, target_tokens(model, task, None, 30, 0), bank, fishr=True,
                           mixing="regularizer" in kw)
    before = HGPromptEnsemble(lam=0.0, **KW, **kw).fit(model, bank, task=task, source_pass=full)
    assert np.array_equal(fit.weights_, before.weights_) and fit.objective_ == before.objective_
    assert torch.equal(fit.prompt_, before.prompt_) and fit.candidates_ == before.candidates_
    assert torch.equal(fit.source_pass_.grads, full.grads)  # the gradients do not depend on the second backward
    now, then = _rows(fit.history_), _rows(before.history_)
    assert [{k: v for k, v in r.items() if k != "regularizer"} for r in now] == [
        {k: v for k, v in r.items() if k != "regularizer"} for r in then]
    assert all(np.isnan(r["regularizer"]) for r in now) and all(np.isfinite(r["regularizer"]) for r in then)


def test_a_fit_with_a_callback_runs_no_forward_more_than_one_without(model, bank, task, monkeypatch):
    """The live view's first H-scores come from the source pass's own forward: no extra forward of the K prompts."""
    import core.method.scoring as scoring

    counter = _StopAt(0)  # counts the first block's forwards (every forward of the backbone), never stops
    handle = model.backbone.blocks[0].register_forward_hook(counter)
    try:
        quiet = HGPromptEnsemble(**KW).fit(model, bank, task=task)
        n_quiet = counter.calls
        seen = []
        loud = HGPromptEnsemble(**KW).fit(model, bank, task=task, callback=seen.append)
    finally:
        handle.remove()
    assert counter.calls == 2 * n_quiet
    assert np.array_equal(quiet.weights_, loud.weights_) and _rows(quiet.history_) == _rows(loud.history_)
    first = seen[0]
    assert first["stage"] == "sources" and first["source_hscores"] == loud.source_hscores_.tolist()
    # the same H-scores the extra forward (scoring.hscores_at) used to give, to float rounding
    target = target_tokens(model, task, None, 30, 0)
    np.testing.assert_allclose(first["source_hscores"], scoring.hscores_at(model, *target, bank.stack()), rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(mixing="task_arithmetic"), dict(lam=0.0, seed=2)])
def test_the_start_vertex_takes_its_gradient_from_the_source_pass(model, bank, task, monkeypatch, kw):
    """A fit that starts at a single source reads that source's gradient from the source pass (one objective
    evaluation fewer) and ends where a fit that evaluated the vertex again ends."""
    import core.method.objective as objective_mod

    fit = HGPromptEnsemble(**KW, **kw).fit(model, bank, task=task)
    assert fit.start_ in bank.names  # started at a vertex
    i = bank.names.index(fit.start_)
    objective = Objective(model, target_tokens(model, task, None, 30, kw.get("seed", 0)), fit.rule_, fit.source_pass_,
                          fit.lam, fit.regularizer)
    from_pass, evaluated = objective.vertex_with_grad(i), objective(fit.rule_.single(i))
    torch.testing.assert_close(from_pass.grad, evaluated.grad, rtol=1e-5, atol=1e-9)
    assert from_pass.objective == pytest.approx(evaluated.objective, rel=1e-6)

    calls = _count(monkeypatch, objective_mod, "prompt_gradients")
    again = HGPromptEnsemble(**KW, **kw).fit(model, bank, task=task)
    n_now = len(calls)
    monkeypatch.setattr(Objective, "vertex_with_grad", lambda self, i: self(self.rule.single(i), share=True))
    before = HGPromptEnsemble(**KW, **kw).fit(model, bank, task=task)
    assert len(calls) - n_now == n_now + 1  # the evaluation the source pass saves
    assert np.array_equal(again.weights_, fit.weights_)
    np.testing.assert_allclose(fit.weights_, before.weights_, rtol=1e-6, atol=1e-9)
    assert fit.objective_ == pytest.approx(before.objective_, rel=1e-6)
    assert [r["step"] for r in fit.history_] == [r["step"] for r in before.history_]


def test_the_sweep_measures_one_source_pass_with_what_any_fit_needs_and_draws_the_sample_once(monkeypatch):
    """A weights job: the sample drawn and checked once for every fit; the Fisher vectors measured because one of its
    fits (lambda 1) uses them, though another (lambda 0) does not."""
    import core.method.source_pass as sp_mod
    import core.model.tokens as tokens_mod
    from core.evaluation.protocol import Context, weights_job
    from core.model.toy import toy_bank, toy_model, toy_targets

    model = toy_model()
    ctx = Context(model, toy_bank(model), toy_targets())
    draws = _count(monkeypatch, tokens_mod, "sample_tokens")
    passes = []
    real = sp_mod.measure_sources
    monkeypatch.setattr(sp_mod, "measure_sources", lambda *a, **k: passes.append(k) or real(*a, **k))
    out = weights_job({"target": "toy_a", "seed": 0, "ensemble": {"steps": 3},
                       "methods": ["uniform", "hgprompt_h_only", "hgprompt", "hgprompt_ta_h_only"]}, ctx)
    assert len(draws) == 1 and len(passes) == 1 and passes[0]["fishr"] and not passes[0]["mixing"]
    assert set(out["fits"]) == {"hgprompt_h_only", "hgprompt", "hgprompt_ta_h_only"}
    passes.clear()
    weights_job({"target": "toy_a", "seed": 0, "ensemble": {"steps": 3}, "methods": ["hgprompt_h_only"]}, ctx)
    assert not passes[0]["fishr"]  # nothing uses them


def test_the_target_is_checked_once_per_fit(model, bank, task, monkeypatch):
    import core.metrics.h_score as h_mod

    checks = _count(monkeypatch, h_mod, "check_labels")
    renames = _count(monkeypatch, h_mod, "_renamed")
    HGPromptEnsemble(steps=4, n_samples=30, start="uniform", tol=0.0).fit(model, bank, task=task)
    assert len(checks) == 1 and len(renames) == 1  # where the sample entered; every H-score after takes it as checked


def test_a_target_refuses_what_no_objective_can_score(model):
    from core.errors import UserInputError

    x = torch.zeros(4, 3, 16, 16)
    with pytest.raises(UserInputError, match="at least two classes"):
        target_tokens(model, x, torch.zeros(4), None, 0)
    with pytest.raises(UserInputError, match="whole numbers"):
        target_tokens(model, x, torch.tensor([0.0, 0.5, 1.0, 1.0]), None, 0)


# ---------------------------------------------------------------- stop at any stage
def test_a_stop_after_the_source_pass_forward_keeps_the_best_source_by_h(model, bank, task):
    """should_stop turns True once the forward has given the sources' H-scores: the fit returns the best of them,
    one-hot, with every source's H-score kept, and says it was stopped."""
    seen = []
    ens = HGPromptEnsemble(**KW).fit(model, bank, task=task, callback=seen.append,
                                     should_stop=lambda: any(e["stage"] == "sources" for e in seen))
    best = int(np.argmax(seen[0]["source_hscores"]))
    assert ens.stopped_ and not ens.converged_ and ens.source_pass_ is None
    assert ens.weights_.tolist() == [float(i == best) for i in range(len(bank))]
    assert ens.source_hscores_.tolist() == seen[0]["source_hscores"] and ens.start_ == bank.names[best]
    assert ens.objective_ == ens.ensemble_hscore_ == pytest.approx(max(seen[0]["source_hscores"]))
    assert torch.equal(ens.prompt_, bank.stack()[best]) and ens.history_[-1]["final"] and len(ens.history_) == 1
    assert [e["stage"] for e in seen] == ["sources", "step"]


def test_a_fit_stopped_in_its_source_pass_writes_and_reads_back_its_record(model, bank, task, tmp_path):
    from core.io.runs import RunWriter
    from core.method.record import EnsembleRecord

    seen = []
    ens = HGPromptEnsemble(**KW).fit(model, bank, task=task, callback=seen.append, should_stop=lambda: bool(seen))
    with RunWriter(tmp_path, "learn", {"target": "toy"}) as run:
        EnsembleRecord.from_fit(ens).write(run, model)
    back = EnsembleRecord.read(run.final)
    assert back.stopped and back.weights == ens.weights_.tolist() and back.cosine is None
    assert back.source_hscores == ens.source_hscores_.tolist() and torch.equal(back.prompt, ens.prompt_)


class _StopAt:
    """A hook that raises StopRequested at its ``n``-th call, as the dashboard's watch does from a block."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise StopRequested()


@pytest.mark.parametrize("where", ["source_backward", "candidates", "step"])
def test_a_stop_raised_inside_any_stage_returns_the_best_point_known(model, bank, task, where):
    """StopRequested from a forward or backward hook on a block: during the source pass's backward (the sources'
    H-scores are known), while scoring the candidates, or during a step. The fit returns the best point it knew."""
    kw = dict(steps=8, n_samples=30, start="uniform", tol=0.0)
    free = HGPromptEnsemble(**kw).fit(model, bank, task=task)
    block = model.backbone.blocks[0]  # (the last block may run only its class token, past its forward hooks)
    if where == "source_backward":
        handle = block.register_full_backward_hook(_StopAt(1))
    else:  # forwards: the finiteness check, the source pass, the uniform point, then one per step
        handle = block.register_forward_hook(_StopAt(3 if where == "candidates" else 5))
    try:
        ens = HGPromptEnsemble(**kw).fit(model, bank, task=task)
    finally:
        handle.remove()
    assert ens.stopped_ and not ens.converged_ and ens.history_[-1]["final"]
    vertices = max(free.source_hscores_)
    assert ens.objective_ == pytest.approx(max(h["objective"] for h in ens.history_ if np.isfinite(h["objective"])))
    if where == "source_backward":
        assert ens.source_pass_ is None and ens.objective_ == pytest.approx(vertices)
    elif where == "candidates":
        assert ens.source_pass_ is not None and "uniform" not in ens.candidates_
        assert ens.objective_ == pytest.approx(vertices)
    else:
        assert "uniform" in ens.candidates_ and len(ens.history_) < len(free.history_)
        assert ens.objective_ >= max(ens.candidates_.values()) - 1e-12


def test_a_stop_before_any_h_score_is_raised_for_the_caller(model, bank, task):
    """A stop during the first forward (nothing measured yet) leaves the fit with no result: StopRequested."""
    handle = model.backbone.blocks[0].register_forward_hook(_StopAt(1))
    try:
        with pytest.raises(StopRequested):
            HGPromptEnsemble(**KW).fit(model, bank, task=task)
    finally:
        handle.remove()
