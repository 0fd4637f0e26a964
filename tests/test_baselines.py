import numpy as np
import pytest

from core import TuneConfig, UserInputError
from core.evaluation.methods import DEFAULT_METHODS, METHODS, check_methods
from core.evaluation.protocol import Context, Protocol, evaluate
from core.evaluation.summary import paired_summary, table


def test_every_method_runs_on_every_seed_with_the_split_redrawn(model, bank, task):
    protocol = Protocol("all", [0, 1], tune={"epochs": 1}, ensemble={"steps": 2, "n_samples": 30})
    res = evaluate(protocol, [task.name], context=Context(model, bank, {task.name: task}))
    runs = res.per_target[task.name]
    assert [r["seed"] for r in runs] == [0, 1] and not res.stopped
    for r in runs:
        assert set(r["methods"]) >= set(METHODS)
        for m in METHODS:
            v = r["methods"][m]
            assert 0.0 <= v["test_acc"] <= 1.0 and 0.0 <= v["val_acc"] <= 1.0
            if METHODS[m].kind == "weights" and isinstance(v["weights"], dict):  # a mixing rule on the task vectors
                w = v["weights"]
                assert w["rule"] in ("task_arithmetic", "ties")
                assert len(w["coef"]) == len(bank) if "coef" in w else 0 < w["density"] <= 1
            elif METHODS[m].kind == "weights":  # the paper's average: weights on the simplex
                assert len(v["weights"]) == len(bank) and sum(v["weights"]) == pytest.approx(1.0, abs=1e-5)
        m = r["methods"]
        assert m["uniform"]["weights"] == pytest.approx([1 / 3] * 3)
        singles = {k.split(":", 1)[1]: v for k, v in m.items() if k.startswith("single:")}
        assert set(singles) == set(bank.names)  # the oracle looks at every source
        assert m["oracle"]["val_acc"] == max(v["val_acc"] for v in singles.values())  # chosen on validation
        assert m["oracle_test"]["test_acc"] == max(v["test_acc"] for v in singles.values())
        best_h = max(bank.names, key=lambda n: r["source_hscores"][n])
        assert m["best_hscore"]["chosen"] == best_h and m["best_hscore"]["test_acc"] == singles[best_h]["test_acc"]
        h = np.array([r["source_hscores"][n] for n in bank.names])
        assert m["h_proportional"]["weights"] == pytest.approx((h / h.sum()).tolist())
    # Seeds redraw the split: the two seeds' tasks are different resplits of the same task.
    assert task.resplit(0).pooled_index["train"].tolist() != task.resplit(1).pooled_index["train"].tolist()
    # Methods with the same initial prompt share one tune (the same job, so the same result).
    keys = [v["job"] for v in runs[0]["methods"].values()]
    assert len(set(keys)) < len(keys) and res.n_tune_jobs < len(METHODS) * 2 + 2 * len(bank)
    summary = table(res.per_target)
    assert list(summary) == list(METHODS)  # every method, in the registry's order
    paired = paired_summary(res.per_target)
    assert "hgprompt" not in paired and "oracle_test" not in paired and paired["random"]["n"] == 2


def test_a_seed_means_the_same_in_process_and_in_a_sweep(model, bank, task):
    """The CLI and the dashboard (in this process, on the objects they loaded) and the Ray sweep (every worker
    loading a setup) run the same jobs: the same seed gives the same split, weights and accuracies."""
    from core.evaluation.setups import load_setup

    toy_model, toy_bank, tasks = load_setup({"kind": "toy"})
    protocol = Protocol(["uniform", "best_hscore", "hgprompt"], [1], tune={"epochs": 1}, ensemble={"steps": 2})
    inproc = evaluate(protocol, ["toy_a"], context=Context(toy_model, toy_bank, {"toy_a": tasks["toy_a"]}))
    sweep = evaluate(protocol, ["toy_a"], setup={"kind": "toy"})
    a, b = inproc.per_target["toy_a"][0]["methods"], sweep.per_target["toy_a"][0]["methods"]
    for m in protocol.methods:
        assert a[m]["test_acc"] == b[m]["test_acc"] and a[m].get("weights") == b[m].get("weights")


def test_a_stop_request_keeps_the_finished_jobs(model, bank, task):
    tunes_done = []  # the stop flag is polled at every block of every pass: it turns on after two tunes finished

    def progress_for(phase):
        return lambda done, total, key=None: tunes_done.append(key) if phase == "tunes" else None

    protocol = Protocol(DEFAULT_METHODS, [0], tune={"epochs": 1}, ensemble={"steps": 2, "n_samples": 30})
    res = evaluate(protocol, [task.name], context=Context(model, bank, {task.name: task},
                                                          should_stop=lambda: len(tunes_done) >= 2),
                   progress_for=progress_for)
    assert res.stopped
    done = res.per_target[task.name][0]["methods"]
    assert 0 < len(done) < len(protocol.methods)
    assert all(0 <= v["test_acc"] <= 1 for v in done.values())


def test_unknown_method_and_bad_protocols():
    with pytest.raises(UserInputError, match="unknown method"):
        check_methods(["hgprompt", "magic"])
    with pytest.raises(UserInputError, match="seeds must be distinct"):
        Protocol(["random"], [0, 0])
    with pytest.raises(UserInputError, match="seed must be an integer"):
        Protocol(["random"], [-1])
    with pytest.raises(UserInputError, match="epochs must be"):
        Protocol(["random"], [0], tune={"epochs": -3})
    with pytest.raises(UserInputError, match="no parameter 'lamda'"):
        Protocol(["hgprompt"], [0], ensemble={"lamda": 1.0})


def test_the_tune_config_of_a_protocol_is_a_tune_config():
    assert Protocol(["random"], [0], tune={"epochs": 2}).tune == {"epochs": 2}
    assert TuneConfig(**{"epochs": 2}).epochs == 2


def test_a_jobs_key_names_a_workspace_bank_by_its_digest_not_its_folder():
    from core.evaluation.protocol import weight_jobs

    protocol = Protocol(["uniform"], [0], tune={"epochs": 1})
    here = {"kind": "workspace", "bank": "/a/bank", "bank_digest": "d1", "targets": {"t": "/data/t"}}
    moved, other = {**here, "bank": "/b/copy"}, {**here, "bank_digest": "d2"}
    keys = lambda setup: [j.key for j in weight_jobs(setup, ["t"], protocol)]
    assert keys(here) == keys(moved) != keys(other)
    assert weight_jobs(moved, ["t"], protocol)[0].payload["setup"]["bank"] == "/b/copy"  # the worker still loads it
    assert keys({"kind": "embedded"}) != keys({"kind": "toy"})
