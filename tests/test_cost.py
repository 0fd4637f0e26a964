"""The work a command does, estimated before it starts (core.model.cost): FLOPs counted on a row, rows counted as
the passes run them, and the CLI's line that says it."""
import pytest
import torch

from core import HGPromptEnsemble, TuneConfig, tune_prompt
from core.model.cost import Estimate, RowCost, Work, estimate, n_tokens, row_cost, tune_work
from core.model.toy import toy_task


class RowCounter:
    """Rows through the prompted blocks, split into passes without gradients and passes with (the memory guard's
    measurements for the prompts' shape made first, so that their rows are not counted)."""

    def __init__(self, model, monkeypatch, shape):
        from core.model.resources import forward_rows_that_fit, rows_that_fit

        forward_rows_that_fit(model, shape, n_tokens(model))
        forward_rows_that_fit(model, None, n_tokens(model))
        rows_that_fit(model, shape, n_tokens(model))
        self.forward = self.backward = 0
        real = model.forward_rows

        def spy(tokens, rows=None):
            if torch.is_grad_enabled() and (rows is not None and rows.requires_grad):
                self.backward += tokens.shape[0]
            else:
                self.forward += tokens.shape[0]
            return real(tokens, rows)

        monkeypatch.setattr(model, "forward_rows", spy)


def test_row_flops_are_counted_and_linear_in_rows(model):
    from torch.utils.flop_counter import FlopCounterMode

    shape = (4, model.embed_dim)
    row = row_cost(model, shape)
    # (the backward to the prompt computes no weight gradients: about as many FLOPs as the forward)
    assert 0 < row.forward_flops <= row.backward_flops and row.embed_flops > 0 and row.seconds_per_flop > 0
    x = torch.zeros(3, n_tokens(model), model.embed_dim)
    p = torch.zeros(3, *shape, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = model.forward_rows(x, p)
        assert fc.get_total_flops() == pytest.approx(3 * row.forward_flops, rel=1e-6)
        out.sum().backward()
    assert fc.get_total_flops() == pytest.approx(3 * (row.forward_flops + row.backward_flops), rel=1e-6)
    assert row_cost(model, (8, model.embed_dim)).forward_flops > row.forward_flops  # more prompt tokens, more work
    deep = row_cost(model, (model.depth, 4, model.embed_dim))
    assert deep.forward_flops == pytest.approx(row.forward_flops, rel=0.02)  # deep prompts replace, not add, tokens


def test_tune_work_counts_the_rows_a_tune_runs(model, monkeypatch):
    task = toy_task()  # fresh: nothing cached
    sizes = task.sizes()
    cfg = TuneConfig(epochs=2, batch_size=16)
    counter = RowCounter(model, monkeypatch, (4, model.embed_dim))
    tune_prompt(model, task, torch.zeros(4, model.embed_dim), cfg)
    work = tune_work(cfg.epochs, sizes["train"], sizes["val"], sizes["test"])
    assert counter.backward == work.backward  # (the rows forward with gradients: each goes back once)
    assert counter.forward + counter.backward == work.forward


def test_fit_work_bounds_the_rows_a_fit_runs(model, bank, monkeypatch):
    task = toy_task()
    est = HGPromptEnsemble(steps=3, n_samples=24, tol=0)
    counter = RowCounter(model, monkeypatch, tuple(bank.stack().shape[1:]))
    est.fit(model, bank, task=task, callback=lambda info: None)
    work = est.work(len(bank), 24)
    # without gradients only the finite check (each source's H-score comes from the source pass's forward)
    assert counter.forward == len(bank) * 8
    # the source pass, then at most steps + 2 evaluations (fewer once converged)
    assert len(bank) * 24 < counter.backward and counter.forward + counter.backward <= work.forward


def test_the_estimate_says_flops_time_and_warns_when_long(model, monkeypatch):
    import core.model.cost as cost

    e = estimate(model, Work(forward=100, backward=10, images=5), (4, model.embed_dim))
    row = e.row
    assert e.flops == pytest.approx(100 * row.forward_flops + 10 * row.backward_flops + 5 * row.embed_flops)
    assert e.seconds == pytest.approx(e.flops * row.seconds_per_flop)
    assert e.message().startswith("estimate: about ") and "on this CPU" in e.message()
    long = Estimate(Work(7168, 7168), 7168 * 1e11, 3 * 3600.0, RowCost(3.5e10, 6.5e10, 1e9, 1e-11, "cpu"))
    text = long.message("--n-samples 256")
    assert text.startswith("warning: this run is long: about 716.8 TFLOP") and "~3.0 h on this CPU" in text
    assert ("A GPU (--device cuda) or --n-samples 256 would shorten it" in text
            and "~2 s on an H100 at 40 % of its bf16 peak" in text)
    assert not Estimate(Work(), 1.0, cost.WARN_SECONDS - 1, row).long


def test_cli_says_the_estimate_before_it_starts(tmp_path, capsys):
    from core.cli import main
    from core.model.toy import toy_bank, toy_model

    m = toy_model()
    m.save(tmp_path / "backbone")
    toy_bank(m).save(tmp_path / "bank")
    toy_task("target").save_npz(tmp_path / "target.npz")
    common = ["--backbone", str(tmp_path / "backbone"), "--runs-dir", str(tmp_path / "runs"), "--target",
              str(tmp_path / "target.npz"), "--bank", str(tmp_path / "bank"), "--n-samples", "24"]
    assert main(["learn", *common, "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "estimate: about" in err and "rows forward" in err and "images embedded" in err
    assert main(["tune", *common, "--init", "uniform", "--epochs", "1"]) == 0
    assert "estimate: about" in capsys.readouterr().err
