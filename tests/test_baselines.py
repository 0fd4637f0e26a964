import pytest

from core import TuneConfig, UserInputError
from core.baselines import METHODS, check_methods, run_baselines


def test_every_method_runs_on_the_same_split(model, bank, task):
    res = run_baselines(model, bank, task, methods="all", seeds=(0,), tune_config=TuneConfig(epochs=1),
                        ensemble_params={"steps": 2, "n_samples": 30})
    assert [r.method for r in res] == list(METHODS)
    for r in res:
        assert 0.0 <= r.test_acc <= 1.0 and 0.0 <= r.val_acc <= 1.0
        if r.weights is not None:
            assert len(r.weights) == len(bank) and sum(r.weights) == pytest.approx(1.0, abs=1e-5)
    by = {r.method: r for r in res}
    assert by["uniform"].weights == pytest.approx([1 / 3] * 3)
    assert by["best_hscore"].weights.count(1.0) == 1 and "source_hscores" in by["best_hscore"].details
    assert set(by["oracle"].details["per_source"]) == set(bank.names)
    assert by["oracle"].test_acc == max(v["test_acc"] for v in by["oracle"].details["per_source"].values())
    assert by["linear_probe"].weights is None and by["random"].weights is None


def test_unknown_method():
    with pytest.raises(UserInputError, match="unknown method"):
        check_methods(["hgprompt", "magic"])
