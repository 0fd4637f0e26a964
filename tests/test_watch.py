"""core.model.watch: a stop flag answered within one block, forward and backward; progress per block; hooks that
act only on their own thread and are gone when the context ends."""
import threading

import pytest
import torch

from core.errors import StopRequested
from core.model.watch import watched


def _tokens(model, n=5):
    with torch.no_grad():
        return model.embed(torch.rand(n, 3, 16, 16))


def _hooks(model):
    mods = [model.backbone.patch_embed, model.backbone.norm, *model.backbone.blocks]
    return sum(len(m._forward_hooks) for m in mods)


def test_progress_counts_every_block_forward_and_backward(model, bank):
    tokens = _tokens(model)
    seen = []
    prompt = bank.stack()[0].clone().requires_grad_(True)
    with watched(model, progress=seen.append):
        feats = model.forward_tokens(tokens, prompt)
        feats.sum().backward()
    depth = model.depth
    fwd = [s for s in seen if s["pass"] == "forward"]
    bwd = [s for s in seen if s["pass"] == "backward"]
    assert [s["block"] for s in fwd] == list(range(1, depth + 1))
    assert [s["block"] for s in bwd] == list(range(depth, 0, -1))  # the backward runs the blocks in reverse
    assert all(s["rows"] == 5 and s["depth"] == depth for s in fwd + bwd)
    assert prompt.grad is not None and _hooks(model) == 0


def test_a_stop_during_the_forward_ends_it_at_the_next_block(model, bank):
    tokens = _tokens(model)
    flag, seen = threading.Event(), []

    def progress(info):
        seen.append(info)
        flag.set()  # asked for after the first block: the second must not run

    with pytest.raises(StopRequested):
        with watched(model, flag, progress):
            with torch.no_grad():
                model.forward_tokens(tokens, bank.stack()[0])
    assert len(seen) == 1 and _hooks(model) == 0


def test_a_stop_during_the_backward_ends_it_at_the_next_block(model, bank):
    tokens = _tokens(model)
    flag, seen = threading.Event(), []

    def progress(info):
        seen.append(info)
        if info["pass"] == "backward":
            flag.set()

    prompt = bank.stack()[0].clone().requires_grad_(True)
    with pytest.raises(StopRequested):
        with watched(model, flag, progress):
            model.forward_tokens(tokens, prompt).sum().backward()
    assert [s["pass"] for s in seen].count("backward") == 1 and prompt.grad is None


def test_another_threads_forward_is_not_watched(model, bank):
    tokens = _tokens(model)
    flag = threading.Event()
    flag.set()
    other: list = []
    with watched(model, flag):
        t = threading.Thread(target=lambda: other.append(model.forward_tokens(tokens, bank.stack()[0]).shape))
        t.start()
        t.join()
        with pytest.raises(StopRequested):
            model.forward_tokens(tokens, bank.stack()[0])
    assert other == [(5, model.embed_dim)]


def test_the_embedding_polls_too(model):
    flag = threading.Event()
    flag.set()
    with pytest.raises(StopRequested), watched(model, flag):
        model.embed(torch.rand(2, 3, 16, 16))


def _stop_at(stage: str):
    """A stop flag set when the fit's callback reports ``stage`` ("sources": during the source pass; "conflicts":
    during the candidates), and a log of what the callback heard."""
    flag, heard = threading.Event(), []

    def callback(info):
        heard.append(info["stage"])
        if info["stage"] == stage:
            flag.set()
    return flag, heard, callback


def test_a_fit_stopped_during_its_source_pass_keeps_the_best_source_and_writes_a_run(model, bank, task, tmp_path):
    from core import HGPromptEnsemble
    from core.io.runs import RunWriter, load_run
    from core.method.record import EnsembleRecord

    flag, heard, callback = _stop_at("sources")
    ens = HGPromptEnsemble(n_samples=30, steps=5).fit(model, bank, task=task, callback=callback, should_stop=flag)
    # no gradient pass finished
    assert heard[0] == "sources" and "conflicts" not in heard and ens.stopped_ and ens.source_pass_ is None
    best = int(ens.source_hscores_.argmax())
    assert ens.weights_.tolist() == [float(i == best) for i in range(len(bank))]
    assert torch.equal(ens.prompt_, bank.stack()[best]) and ens.ensemble_hscore_ == ens.source_hscores_[best]
    with RunWriter(str(tmp_path), "learn", {}) as run:
        EnsembleRecord.from_fit(ens).write(run, model)
    rec = EnsembleRecord.read(run.path)
    assert rec.stopped and rec.cosine is None and rec.weights == ens.weights_.tolist()
    assert load_run(run.path)["weights"]["stopped"] is True


def test_a_fit_stopped_during_its_candidates_keeps_the_best_point_with_its_cosines(model, bank, task):
    from core import HGPromptEnsemble

    flag, heard, callback = _stop_at("conflicts")
    ens = HGPromptEnsemble(n_samples=30, steps=5).fit(model, bank, task=task, callback=callback, should_stop=flag)
    assert ens.stopped_ and ens.source_pass_ is not None and ens.n_steps_ == 0 and "step" not in heard[:2]
    assert ens.weights_.max() == 1.0 and ens.start_ == bank.names[int(ens.source_hscores_.argmax())]


def test_a_fit_stopped_before_anything_was_scored_raises_and_a_refit_is_clean(model, bank, task):
    from core import HGPromptEnsemble

    flag = threading.Event()
    flag.set()
    ens = HGPromptEnsemble(n_samples=30, steps=2)
    with pytest.raises(StopRequested):
        ens.fit(model, bank, task=task, callback=lambda info: None, should_stop=flag)
    ens.fit(model, bank, task=task)
    assert not ens.stopped_ and ens.source_pass_ is not None and _hooks(model) == 0
