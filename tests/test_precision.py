"""The backbone's precision (fp32 or bf16 autocast) and the thread policy of the small float64 work."""
import threading

import pytest
import torch

from core import HGPromptEnsemble, TuneConfig, tune_prompt
from core.analysis.interference import interference
from core.errors import UserInputError
from core.method.gradients import prompt_gradients
from core.metrics.h_score import h_score
from core.metrics.threads import one_thread
from core.model.device import current_precision, precision


class AutocastSpy:
    """Records, at every forward of the backbone's first block, whether CPU autocast is on and at which dtype."""

    def __init__(self, model):
        self.seen: list[tuple[bool, torch.dtype]] = []
        self.handle = model.backbone.blocks[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_the_fits_precision_reaches_the_backbones_autocast_and_is_left_behind(model, bank, task):
    with AutocastSpy(model) as spy:
        HGPromptEnsemble(precision="bf16", steps=2, n_samples=30).fit(model, bank, task=task)
    assert spy.seen and all(on and dtype == torch.bfloat16 for on, dtype in spy.seen)
    assert current_precision() == "fp32"  # the fit's setting ends with the fit
    with AutocastSpy(model) as spy:
        HGPromptEnsemble(precision="fp32", steps=2, n_samples=30).fit(model, bank, task=task)
    assert spy.seen and not any(on for on, _ in spy.seen)


def test_a_tunes_and_an_interference_runs_precision_reach_the_autocast(model, bank, task):
    with AutocastSpy(model) as spy:
        tune_prompt(model, task, bank.stack()[0], TuneConfig(epochs=1, precision="bf16"))
    assert spy.seen and all(on and dtype == torch.bfloat16 for on, dtype in spy.seen)
    with AutocastSpy(model) as spy:
        interference(model, bank, task, n_samples=30, precision="bf16")
    assert spy.seen and all(on and dtype == torch.bfloat16 for on, dtype in spy.seen)


def test_bf16_ranks_the_sources_as_fp32_does_and_keeps_the_hscores_close(model, bank, task):
    fits = {p: HGPromptEnsemble(precision=p, steps=0, n_samples=48).fit(model, bank, task=task)
            for p in ("fp32", "bf16")}
    h32, h16 = (torch.as_tensor(fits[p].source_hscores_) for p in ("fp32", "bf16"))
    assert h32.argsort().tolist() == h16.argsort().tolist()
    assert not torch.equal(h32, h16)  # bf16 did run: the H-scores moved, a little
    assert torch.allclose(h16, h32, atol=0.02 * float(h32.abs().max()))
    assert fits["bf16"].weights_.tolist() == fits["fp32"].weights_.tolist()


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(UserInputError, match=r"precision must be one of 'fp32', 'bf16', got 'fp16'"):
        with precision("fp16"):
            pass


def test_the_features_come_back_float32_and_the_metric_stays_float64_under_bf16(model):
    from core.model.features import prompt_features

    tokens = model.embed(torch.randn(6, 3, 16, 16))
    exact = prompt_features(model, tokens)
    with precision("bf16"):
        feats = prompt_features(model, tokens)
    assert feats.dtype == torch.float32 and not torch.equal(feats, exact)  # bf16 ran, and its output is float32
    assert h_score(feats.double(), torch.arange(6) % 2).dtype == torch.float64


def test_one_thread_runs_the_block_on_one_thread_and_restores_even_after_an_error():
    torch.set_num_threads(2)
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        with one_thread():
            raise ValueError("inside")
    assert torch.get_num_threads() == 2


def test_one_thread_in_another_thread_leaves_this_threads_count_alone():
    torch.set_num_threads(2)
    inside, go = threading.Event(), threading.Event()
    seen = []

    def worker():
        with one_thread():
            seen.append(torch.get_num_threads())
            inside.set()
            go.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    here = torch.get_num_threads()
    go.set()
    t.join()
    assert seen == [1] and here == 2


def test_the_gradient_pass_equals_one_backward_through_the_loss_bit_for_bit(model, bank, task):
    """The pass takes the loss's gradient with respect to the features on one thread, then the backbone's backward
    from it: the same arithmetic as one backward through the whole graph."""
    from core.model.tokens import target_tokens

    tokens, y = target_tokens(model, task, None, 30, 0)
    prompts = bank.stack()
    loss_fn = lambda f: -torch.stack([h_score(fk, y) for fk in f])
    out = prompt_gradients(model, tokens, prompts, loss_fn)
    k, n = prompts.shape[0], tokens.shape[0]
    leaf = prompts.clone().requires_grad_(True)
    rows = leaf.unsqueeze(1).expand(k, n, *prompts.shape[1:]).reshape(k * n, *prompts.shape[1:])
    x = tokens.unsqueeze(0).expand(k, *tokens.shape).reshape(k * n, *tokens.shape[1:])
    losses = loss_fn(model.forward_rows(x, rows).reshape(k, n, -1))
    (ref,) = torch.autograd.grad(losses.sum(), [leaf])
    assert torch.equal(out.grads, ref) and torch.equal(out.losses, losses.detach())
