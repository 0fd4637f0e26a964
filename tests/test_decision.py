"""The decision (fourth edition): short-tune each candidate initial prompt, keep the one validation likes best."""
import numpy as np
import pytest
import torch

from core.errors import UserInputError
from core.evaluation.decision import SHORT, candidate_init, choose, decide, short_jobs, with_choices
from core.evaluation.methods import METHODS
from core.evaluation.protocol import Protocol, evaluate, init_id
from core.io.tasks import Task
from core.model.toy import toy_bank, toy_model
from core.tuning.tune import TuneConfig, tune_prompt

DECIDE = "hgprompt_decide"


def test_choose_keeps_the_best_score_and_the_earlier_candidate_on_a_tie():
    order = ["single", "mixture", "uniform"]
    assert choose({"single": 0.80, "mixture": 0.85, "uniform": 0.85}, order) == "mixture"
    assert choose({"single": 0.85, "mixture": 0.85, "uniform": 0.80}, order) == "single"
    assert choose({"single": 0.80, "uniform": 0.90}, order) == "uniform"  # a candidate not tuned is left out


def test_choose_with_a_margin_keeps_the_first_candidate_unless_it_is_beaten_by_more():
    order = ["single", "mixture"]
    assert choose({"single": 0.80, "mixture": 0.81}, order, margin=0.02) == "single"
    assert choose({"single": 0.80, "mixture": 0.83}, order, margin=0.02) == "mixture"


def test_choose_refuses_scores_without_the_first_candidate():
    with pytest.raises(UserInputError, match="first candidate 'single'"):
        choose({"mixture": 0.9}, ["single", "mixture"])


def _weak_task() -> Task:
    """Three classes that a bright patch sets, faint against the noise: the initial prompt changes what 2 epochs
    reach (on the toy targets every start reaches the same accuracy)."""
    def images(seed, n):
        rng = np.random.default_rng(seed)
        y = np.arange(n) % 3
        rng.shuffle(y)
        x = rng.integers(0, 100, size=(n, 16, 16, 3))
        for i, c in enumerate(y):
            x[i, (c % 2) * 6 : (c % 2) * 6 + 6, (c // 2) * 8 : (c // 2) * 8 + 6, :] += 40
        return np.clip(x, 0, 255).astype(np.uint8), y

    return Task.from_arrays("weak", images(0, 60), images(1, 60), images(2, 30), classes=["a", "b", "c"])


def test_decide_keeps_the_candidate_whose_short_tune_validates_best_and_tunes_a_repeated_prompt_once():
    model = toy_model()
    bank = toy_bank(model)
    g = torch.Generator().manual_seed(5)
    g1, g2 = torch.randn(4, 32, generator=g) * 3, torch.randn(4, 32, generator=g) * 3
    candidates = {"random": "random", "src0": bank.stack()[0], "copy": bank.stack()[0].clone(), "g1": g1, "g2": g2}
    cfg = TuneConfig(epochs=2, lr=0.1, batch_size=16, seed=0, select="last")
    # the reference: each distinct candidate tuned alone with the same schedule
    ref = {n: tune_prompt(model, _weak_task(), p, cfg, train_accuracy=False).val_acc for n, p in candidates.items()
           if n != "copy"}
    assert len(set(ref.values())) >= 3  # the starts lead to different places, so the choice is a real one
    best = max(ref.values())
    expected = next(n for n in candidates if ref.get(n) == best)  # the earliest of the best

    d = decide(model, _weak_task(), candidates, cfg)
    assert d.chosen == expected and d.chosen != "random"
    assert {n: d.val_acc[n] for n in ref} == ref
    assert d.same_as == {"copy": "src0"} and d.val_acc["copy"] == d.val_acc["src0"]


def test_decide_refuses_no_candidates():
    model = toy_model()
    with pytest.raises(UserInputError, match="at least one candidate"):
        decide(model, _weak_task(), {}, TuneConfig(epochs=1))


def test_with_choices_gives_the_decide_method_the_initial_prompt_of_the_candidate_that_validated_best():
    names = ["a", "b", "c"]
    w = {"source_hscores": {"a": 1.0, "b": 2.0, "c": 1.5},
         "weights": {"hgprompt_ta_h_only": {"rule": "task_arithmetic", "coef": [0.0, 1.0, 1.0]},
                     "uniform": [1 / 3] * 3, "task_arithmetic_sum": {"rule": "task_arithmetic", "coef": [1.0] * 3}}}
    cands = METHODS[DECIDE].candidates
    plan = {("t", 0): {DECIDE: {c: f"tune/{c}" for c in cands}}}
    val = {"best_hscore": 0.80, "hgprompt_ta_h_only": 0.86, "uniform": 0.70, "task_arithmetic_sum": 0.86}
    shorts = {f"tune/{c}": {"val_acc": v, "test_acc": 0.5, "seconds": 2.0} for c, v in val.items()}
    protocol = Protocol([DECIDE], [0])
    out = with_choices(protocol, names, {("t", 0): w}, shorts, plan)[("t", 0)]
    assert out["decisions"][DECIDE]["chosen"] == "hgprompt_ta_h_only"
    assert out["weights"][DECIDE] == w["weights"]["hgprompt_ta_h_only"]
    assert candidate_init("best_hscore", names, w) == [0.0, 1.0, 0.0]  # b has the highest H-score
    shorts["tune/best_hscore"]["val_acc"] = 0.90
    assert with_choices(protocol, names, {("t", 0): w}, shorts, plan)[("t", 0)]["weights"][DECIDE] == [0.0, 1.0, 0.0]
    del shorts["tune/uniform"]  # a stopped evaluation: no choice without every short tune
    assert DECIDE not in with_choices(protocol, names, {("t", 0): w}, shorts, plan)[("t", 0)]["weights"]


def test_the_protocol_tunes_the_chosen_candidate_once_and_a_short_tune_equal_to_the_recipe_is_the_tune_itself():
    cands = list(METHODS[DECIDE].candidates)
    setup = {"kind": "toy"}
    ens = {"steps": 2}
    # the short schedule is the recipe itself: every short tune is a full tune's job, nothing is tuned twice
    recipe = dict(SHORT)
    with_decision = evaluate(Protocol([*cands, DECIDE], [0], tune=recipe, ensemble=ens, singles=1), ["toy_a"],
                             setup=setup)
    without = evaluate(Protocol(cands, [0], tune=recipe, ensemble=ens, singles=1), ["toy_a"], setup=setup)
    assert set(with_decision.tunes) == set(without.tunes)
    run = with_decision.per_target["toy_a"][0]["methods"]
    dec = run[DECIDE]["decision"]
    assert run[DECIDE]["job"] == run[dec["chosen"]]["job"]  # the decision's full tune is its candidate's
    assert dec["val_acc"] == {c: with_decision.tunes[run[c]["job"]]["val_acc"] for c in cands}
    assert set(with_decision.shorts) <= set(with_decision.tunes)


def test_short_jobs_key_the_short_schedule_apart_from_the_full_recipe():
    model = toy_model()
    bank = toy_bank(model)
    names = list(bank.names)
    w = {"source_hscores": dict(zip(names, [1.0, 3.0, 2.0], strict=True)),
         "weights": {"uniform": [1 / 3] * 3, "hgprompt_ta_h_only": {"rule": "task_arithmetic", "coef": [0.0, 1.0, 0.0]},
                     "task_arithmetic_sum": {"rule": "task_arithmetic", "coef": [1.0] * 3}}}
    protocol = Protocol([DECIDE], [0], tune={"epochs": 20})
    jobs, plan = short_jobs({"kind": "toy"}, ["toy_a"], protocol, bank, {("toy_a", 0): w})
    keys = plan[("toy_a", 0)][DECIDE]
    # best_hscore (source 1) and the mixture that is source 1 alone are one prompt: one job
    assert keys["best_hscore"] == keys["hgprompt_ta_h_only"] and len(jobs) == 3
    assert all(j.payload["tune"]["epochs"] == SHORT["epochs"] and j.payload["tune"]["select"] == "last" for j in jobs)
    stack, start = bank.stack(), bank.start
    assert keys["uniform"].split("/")[3] == init_id([1 / 3] * 3, stack, start)
    longer, _ = short_jobs({"kind": "toy"}, ["toy_a"], protocol, bank, {("toy_a", 0): w}, short={"epochs": 5})
    assert not {j.key for j in longer} & {j.key for j in jobs}


def test_the_estimator_keeps_what_decide_chooses_among_its_rules_candidates_and_the_fitted_point_stays_known():
    from core import HGPromptEnsemble
    from core.evaluation.decision import FULL_RECIPE

    model, task = toy_model(), _weak_task()
    bank = toy_bank(model)
    kw = {"steps": 2, "n_samples": 30, "seed": 0, "lam": 0.0}
    plain = HGPromptEnsemble(**kw).fit(model, bank, task=task)
    chosen = HGPromptEnsemble(**kw, choose_by="short_tune").fit(model, bank, task=task)
    assert plain.decision_ is None and np.array_equal(plain.fitted_weights_, plain.weights_)
    np.testing.assert_array_equal(chosen.fitted_weights_, plain.weights_)  # the same fit before the choice
    # the reference: decide() on the rule's candidates, safest first, with the decision's short schedule
    names, rule = plain.names_, plain.rule_
    best = max(names, key=lambda n: plain.candidates_[n])
    points = {best: rule.single(names.index(best)), "fitted": torch.as_tensor(plain.weights_),
              "uniform": rule.candidates(names)["uniform"]}
    ref = decide(model, task, {n: rule.prompt(w).cpu() for n, w in points.items()},
                 TuneConfig(**{**FULL_RECIPE, **SHORT}, seed=0))
    d = chosen.decision_
    assert d.chosen == ref.chosen and d.val_acc == ref.val_acc
    np.testing.assert_array_equal(chosen.weights_, points[d.chosen].numpy())
    torch.testing.assert_close(chosen.prompt_, rule.prompt(torch.as_tensor(chosen.weights_)).cpu())
    assert chosen.objective_ == plain.objective_  # the fitted point's, as documented


def test_the_estimator_refuses_a_short_tune_choice_without_a_task_and_names_the_fix():
    from core import HGPromptEnsemble

    model = toy_model()
    x, y = torch.rand(20, 3, 16, 16), torch.arange(20) % 2
    with pytest.raises(UserInputError, match=r"task=.*choose_by='objective'"):
        HGPromptEnsemble(choose_by="short_tune").fit(model, toy_bank(model), x, y)
    with pytest.raises(UserInputError, match="choose_by must be one of 'objective', 'short_tune', got 'tune'"):
        HGPromptEnsemble(choose_by="tune").fit(model, toy_bank(model), x, y)


def test_a_comparison_refuses_the_estimators_choose_by_and_names_the_method_that_does_it():
    with pytest.raises(UserInputError, match="hgprompt_decide"):
        Protocol(["hgprompt"], [0], ensemble={"choose_by": "short_tune"})
