import threading

import pytest
import torch

from core import TuneConfig, UserInputError, tune_prompt
from core.model.toy import toy_task
from core.tuning.bank import build_source_prompt


def test_linear_probe_learns_separable_task(model):
    task = toy_task(n=(120, 40, 60))
    res = tune_prompt(model, task, None, TuneConfig(epochs=30, head_lr=0.05, batch_size=32))
    assert res.prompt is None
    assert res.test_acc > 0.6  # chance is 1/3
    assert res.val_acc >= res.history[0]["val_acc"]


def test_backbone_untouched_by_tuning(task):
    from core.model.toy import toy_model

    m = toy_model()
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    tune_prompt(m, task, "random", TuneConfig(epochs=2))
    assert not m.backbone.training
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prompt_is_tuned_from_given_initialisation(model, task):
    init = torch.randn(4, model.embed_dim)
    res = tune_prompt(model, task, init, TuneConfig(epochs=0))
    assert torch.equal(res.prompt, init) and res.best_epoch == 0
    res2 = tune_prompt(model, task, init, TuneConfig(epochs=2, lr=0.05))
    assert res2.prompt.shape == init.shape
    assert 0.0 <= res2.test_acc <= 1.0 and len(res2.history) == 3


def test_deep_random_init_and_seed_determinism(model, task):
    cfg = TuneConfig(epochs=2, deep=True, num_tokens=3, seed=5)
    a, b = tune_prompt(model, task, "random", cfg), tune_prompt(model, task, "random", cfg)
    assert a.prompt.shape == (model.depth, 3, model.embed_dim)
    assert torch.equal(a.prompt, b.prompt) and a.test_acc == b.test_acc


def test_skipping_train_accuracy_changes_nothing_else(model, task):
    cfg = TuneConfig(epochs=2, seed=3)
    for init in ("random", None):  # a prompt, and a linear probe (whose fixed features reuse the probe fit's)
        a = tune_prompt(model, task, init, cfg)
        b = tune_prompt(model, task, init, cfg, train_accuracy=False)
        assert 0.0 <= a.train_acc <= 1.0 and b.train_acc != b.train_acc  # NaN
        assert a.test_acc == b.test_acc and a.val_acc == b.val_acc and a.best_epoch == b.best_epoch
        assert torch.equal(a.head_weight, b.head_weight)
        assert (a.prompt is None and b.prompt is None) or torch.equal(a.prompt, b.prompt)


def test_select_last_reports_the_end_of_the_same_trajectory(model, task):
    """select="last" trains exactly as select="val" and reports the final epoch's state, whatever validation said."""
    cfg = TuneConfig(epochs=4, lr=0.05, seed=2)
    by_val = tune_prompt(model, task, "random", cfg)
    last = tune_prompt(model, task, "random", TuneConfig(**{**cfg.to_dict(), "select": "last"}))
    assert [h["val_acc"] for h in last.history] == [h["val_acc"] for h in by_val.history]
    assert last.best_epoch == 4 and last.val_acc == last.history[-1]["val_acc"]
    if by_val.best_epoch == 4:
        assert torch.equal(last.prompt, by_val.prompt) and last.test_acc == by_val.test_acc
    with pytest.raises(UserInputError, match="select must be"):
        TuneConfig(select="best")


def test_stop_keeps_best_so_far(model, task):
    ev = threading.Event()
    res = tune_prompt(model, task, "random", TuneConfig(epochs=50, batch_size=8),
                      callback=lambda info: ev.set() if info["epoch"] == 2 else None, should_stop=ev)
    assert res.stopped and len(res.history) == 3
    assert res.prompt is not None and 0 <= res.test_acc <= 1


def test_build_source_prompt_records_provenance(model, task):
    sp, res = build_source_prompt(model, task, TuneConfig(epochs=2, select="last"), name="toy_src")
    assert sp.backbone_fingerprint == model.fingerprint and sp.source_task == "toy"
    assert sp.source_accuracy == res.test_acc and sp.train_config["epochs"] == 2
    assert sp.train_config["best_epoch"] == 2  # the source's own last epoch, never the untuned start


@pytest.mark.parametrize("kw,match",
                         [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size")])
def test_bad_config(kw, match):
    with pytest.raises(UserInputError, match=match):
        TuneConfig(**kw)


def test_bad_init(model, task):
    with pytest.raises(UserInputError, match="init must be"):
        tune_prompt(model, task, "zeros")
    with pytest.raises(UserInputError, match="width"):
        tune_prompt(model, task, torch.randn(4, 7))


def test_initial_state_is_shared_across_seeds_without_changing_results(model, monkeypatch):
    """A second tune from the same prompt (another seed, another method) reuses the probe head and the
    epoch-0 accuracies kept in the task's cache; every result equals a tune on a fresh task."""
    init = torch.randn(4, model.embed_dim, generator=torch.Generator().manual_seed(1)) * 0.3
    shared = toy_task(seed=3)
    for prompt in (init, None):
        for seed, epochs in ((0, 0), (1, 0), (2, 2), (3, 1)):
            cfg = TuneConfig(epochs=epochs, lr=0.05, seed=seed)
            a = tune_prompt(model, shared, prompt, cfg)
            b = tune_prompt(model, toy_task(seed=3), prompt, cfg)  # nothing cached
            assert (a.test_acc, a.val_acc, a.best_epoch, a.history[0]["val_acc"]) == (
                b.test_acc, b.val_acc, b.best_epoch, b.history[0]["val_acc"])
            assert torch.equal(a.head_weight, b.head_weight) and torch.equal(a.head_bias, b.head_bias)
            assert (a.prompt is None and b.prompt is None) or torch.equal(a.prompt, b.prompt)
    calls = []
    forward = model.forward_rows  # the one place prompts meet the blocks: every prompted forward goes through it
    monkeypatch.setattr(model, "forward_rows", lambda *a, **k: calls.append(1) or forward(*a, **k))
    res = tune_prompt(model, shared, init, TuneConfig(epochs=0, seed=7), train_accuracy=False)  # all kept
    assert calls == [] and res.best_epoch == 0
    tune_prompt(model, shared, init + 1e-3, TuneConfig(epochs=0, seed=7), train_accuracy=False)  # computed anew
    assert calls


def test_the_tuning_estimate_is_timed_steps_and_per_image_evaluation_times_the_work(model, monkeypatch):
    """With every timed interval made 1 s, the estimate is the training steps times the mean of the timed steps, plus
    the images evaluated times the timed batch's cost per image."""
    import math

    import core.tuning.tune as tuning

    task = toy_task("estimate", n=(150, 40, 30))
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: float(next(clock)))
    prompt = torch.zeros(4, model.embed_dim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for epochs in (1, 3):
        est = tuning.estimate_tune_seconds(model, task, prompt, TuneConfig(epochs=epochs, batch_size=64))
        step, per_image = 1.0, 1 / 40  # each timed step in 1 s (their mean: 1 s); the 40 val images in 1 s
        per_epoch = math.ceil(150 / 64) * step + 40 * per_image
        assert est == pytest.approx(epochs * per_epoch + (150 + 40 + 30) * per_image)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the backbone is untouched
    assert not model.training
