"""Mixing rules, the bank's shared start, and the transferability objectives against their references."""
import numpy as np
import pytest
import torch

from core import HGPromptEnsemble, PromptBank, SourcePrompt, UnsafeFileError, UserInputError
from core.method.mixing import make_rule, ties_merge
from core.metrics.transferability import logme, probe_folds, probe_loglik, transferability, transrate
from core.model.toy import toy_model, toy_task
from core.tuning.bank import shared_start, verify_start


@pytest.fixture(scope="module")
def tuned_bank():
    """Three toy sources tuned (one epoch each) from one shared start, recorded with the bank."""
    from core import TuneConfig
    from core.tuning.bank import build_source_prompt

    model = toy_model()
    start, info = shared_start(model, 4, False, seed=0)
    prompts = []
    for i in range(3):
        task = toy_task(f"src{i}", n_classes=2 + i, seed=20 + i, n=(40, 12, 12))
        sp, _ = build_source_prompt(model, task, TuneConfig(epochs=2, lr=0.05, select="last", num_tokens=4),
                                    start=start)
        prompts.append(sp)
    return model, PromptBank(prompts, start, info)


def _deep_stack(k=3, depth=2, t=4, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(depth, t, d, generator=g)
    return start, start[None] + 0.3 * torch.randn(k, depth, t, d, generator=g)


@pytest.mark.parametrize("mixing", ["average", "task_arithmetic", "layerwise"])
def test_every_rule_gives_each_single_source_exactly(mixing):
    start, stack = _deep_stack()
    rule = make_rule(mixing, stack, start)
    for i in range(stack.shape[0]):
        assert torch.equal(rule.prompt(rule.single(i)), stack[i]), (mixing, i)
    if mixing != "average":  # the full-strength sum keeps every source's change: P0 + sum tau
        full = rule.prompt(torch.ones(rule.shape, dtype=torch.float64))
        torch.testing.assert_close(full, start + (stack - start[None]).sum(0), rtol=1e-6, atol=1e-6)
        assert "sum" in rule.candidates(["a", "b", "c"])
    uniform = rule.prompt(rule.candidates(["a", "b", "c"])["uniform"])
    torch.testing.assert_close(uniform, stack.mean(0), rtol=1e-6, atol=1e-6)  # every rule's uniform point: the mean


def test_layerwise_weights_act_block_by_block():
    start, stack = _deep_stack()
    rule = make_rule("layerwise", stack, start)
    w = torch.zeros(rule.shape, dtype=torch.float64)
    w[1, 0] = 1.0  # source 1's change in block 0 only
    p = rule.prompt(w)
    assert torch.equal(p[0], stack[1, 0]) and torch.equal(p[1], start[1])
    with pytest.raises(UserInputError, match="needs deep prompts"):
        make_rule("layerwise", stack[:, 0], start[0])


def test_ties_with_density_one_and_one_source_is_that_source():
    start, stack = _deep_stack(k=1)
    torch.testing.assert_close(ties_merge(stack, start, density=1.0), stack[0], rtol=0, atol=1e-6)


def test_ties_trims_elects_and_averages_by_hand():
    start = torch.zeros(1, 4)
    taus = torch.tensor([[[1.0, -2.0, 0.1, 3.0]], [[2.0, 1.0, -0.2, -1.0]], [[-1.0, 1.0, 0.3, 2.0]]])
    merged = ties_merge(start[None] + taus, start, density=0.5)
    # Trim at each row's (4 - 2) = 2nd smallest magnitude, kept when >= it:
    #   [1, -2, .1, 3] -> [1, -2, 0, 3];  [2, 1, -.2, -1] -> [2, 1, 0, -1];  [-1, 1, .3, 2] -> [-1, 1, 0, 2]
    # Elected signs of the sums [2, 0, 0, 4]: [+, 0 -> +, 0 -> +, +] (a tie takes the sign of the whole sum).
    # Means of the agreeing (positive) entries: [(1 + 2) / 2, (1 + 1) / 2, 0, (3 + 2) / 2].
    torch.testing.assert_close(merged[0], torch.tensor([1.5, 1.0, 0.0, 2.5]))
    with pytest.raises(UserInputError, match="shared start"):
        ties_merge(taus, None)


def test_the_bank_records_its_start_and_refuses_a_wrong_one(tmp_path, tuned_bank):
    model, bank = tuned_bank
    bank.save(tmp_path)
    back = PromptBank.load(tmp_path, model=model)
    assert torch.equal(back.start, bank.start) and back.start_info == bank.start_info and back.names == bank.names
    verify_start(back, model)  # the recipe remakes it
    from core.io.prompt_bank import START_FILE
    from core.io.safe_io import save_tensors

    save_tensors(tmp_path / START_FILE, {"prompt": bank.start + 1e-3})  # swapped behind the bank's back
    with pytest.raises(UnsafeFileError, match="is not the one .* records"):
        PromptBank.load(tmp_path)
    lying = PromptBank(list(bank), bank.start + 1e-3, bank.start_info)
    with pytest.raises(UserInputError, match="is not VPT's initialisation for seed 0"):
        verify_start(lying, model)


def test_a_prompt_equal_to_the_start_or_to_another_is_flagged(tuned_bank):
    model, bank = tuned_bank
    untuned = SourcePrompt("untuned", bank.start.clone(), backbone=model.name, backbone_fingerprint=model.fingerprint)
    copy = SourcePrompt("copy", bank[0].prompt.clone(), backbone=model.name, backbone_fingerprint=model.fingerprint)
    with pytest.warns(UserWarning, match="equals the bank's start P0"):
        flagged = PromptBank([*bank, untuned, copy], bank.start, bank.start_info)
    assert any("'untuned' equals the bank's start" in n for n in flagged.notes)
    assert any(f"'{bank[0].name}' and 'copy' are the same tensor" in n for n in flagged.notes)
    assert not bank.notes  # the tuned sources moved from their start, and differ


def test_a_source_that_did_not_move_from_its_start_is_refused():
    from core import TuneConfig
    from core.tuning.bank import build_source_prompt

    model = toy_model()
    start, _ = shared_start(model, 4, False, seed=0)
    with pytest.raises(UserInputError, match="did not move from its start"):
        build_source_prompt(model, toy_task(), TuneConfig(epochs=0, num_tokens=4), start=start)


def test_task_arithmetic_needs_the_start_and_keeps_the_vertex_guarantee(tuned_bank):
    model, bank = tuned_bank
    task = toy_task("target", seed=3)
    no_start = PromptBank(list(bank))
    with pytest.raises(UserInputError, match="needs the shared start"):
        HGPromptEnsemble(mixing="task_arithmetic", steps=2).fit(model, no_start, task=task)
    ens = HGPromptEnsemble(mixing="task_arithmetic", steps=8, n_samples=40).fit(model, bank, task=task)
    assert set(ens.candidates_) == set(bank.names) | {"uniform", "sum"}
    assert ens.objective_ >= max(ens.candidates_.values()) - 1e-9
    assert (ens.weights_ >= 0).all() and (ens.weights_ <= 1).all()
    torch.testing.assert_close(ens.prompt_, make_rule("task_arithmetic", bank.stack(), bank.start).prompt(
        torch.as_tensor(ens.weights_)))
    # every point the fit kept is a real evaluation: the returned objective is the objective at the returned prompt
    from core import Objective, measure_sources
    from core.model.tokens import target_tokens

    target = target_tokens(model, task, None, 40, 0)
    sp = measure_sources(model, target, bank.stack(), fishr=True)
    obj = Objective(model, target, ens.rule_, sp, ens.lam, ens.regularizer)
    assert obj(torch.as_tensor(ens.weights_)).objective == pytest.approx(ens.objective_, abs=2e-4)


@pytest.mark.parametrize("objective", ["logme", "transrate", "probe_ll"])
def test_a_fit_can_maximise_any_objective(tuned_bank, objective):
    model, bank = tuned_bank
    task = toy_task("target", seed=3)
    ens = HGPromptEnsemble(objective=objective, lam=0.0, steps=4, n_samples=40).fit(model, bank, task=task)
    from core.model.tokens import target_tokens

    _, y = target_tokens(model, task, None, 40, 0)
    direct = [float(transferability(f, y, objective)) for f in ens.source_pass_.features]
    assert [ens.candidates_[n] for n in bank.names] == pytest.approx(direct, rel=1e-9)  # vertices scored by it
    assert ens.objective_ >= max(ens.candidates_.values()) - 1e-9


# ------------------------------------------------------- objectives against references
def _logme_reference(f, y):
    """LogME as published (You et al.; the SVD form of thuml/LogME), in NumPy."""
    fh, ft = f, f.T
    d, n = ft.shape
    v, s, vh = np.linalg.svd(ft @ fh, full_matrices=True)
    out = []
    for k in range(int(y.max()) + 1):
        yk = (y == k).astype(np.float64)
        alpha, beta, eps = 1.0, 1.0, 1e-5
        lam = alpha / beta
        tmp = vh @ (ft @ yk)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + eps)
            beta_de = ((yk - fh @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + eps)
            new = alpha / beta
            if abs(new - lam) / lam < 0.01:
                break
            lam = new
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
              - beta / 2 * (beta_de + eps) - alpha / 2 * (alpha_de + eps) - n / 2 * np.log(2 * np.pi))
        out.append(ev / n)
    return float(np.mean(out))


def _transrate_reference(z, y, eps=1e-4):
    def rate(x):
        n, d = x.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + x.T @ x / (n * eps))[1]

    z = z - z.mean(0, keepdims=True)
    c = int(y.max()) + 1
    return rate(z) - sum(rate(z[y == k]) for k in range(c)) / c


@pytest.mark.parametrize("n,d", [(120, 16), (60, 80)])
def test_logme_and_transrate_match_numpy_references(n, d):
    rng = np.random.default_rng(n)
    y = np.arange(n) % 3
    f = rng.normal(size=(n, d)) + 0.6 * y[:, None]
    ft, yt = torch.tensor(f), torch.tensor(y)
    assert float(logme(ft, yt, 3)) == pytest.approx(_logme_reference(f, y), rel=1e-9)
    assert float(transrate(ft, yt, 3)) == pytest.approx(_transrate_reference(f, y), rel=1e-9)


def test_the_probe_log_likelihood_matches_scikit_learn_on_the_same_folds():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(0)
    for c in (2, 4):  # the binary case too, where scikit-learn reduces LDA to one axis
        y = np.arange(100) % c
        f = rng.normal(size=(100, 12)) + 0.8 * y[:, None]
        total = 0.0
        for test in probe_folds(y):
            train = np.setdiff1d(np.arange(len(y)), test)
            lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.2).fit(f[train], y[train])
            total += lda.predict_log_proba(f[test])[np.arange(len(test)), y[test]].sum()
        assert float(probe_loglik(torch.tensor(f), torch.tensor(y), c)) == pytest.approx(total / len(y), rel=1e-9)


@pytest.mark.parametrize("objective", ["hscore", "logme", "transrate", "probe_ll"])
def test_objectives_rank_separable_features_above_noise_and_have_gradients(objective):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    noise = torch.randn(90, 10, generator=g, dtype=torch.float64)
    signal = noise.clone()
    signal[:, 0] += 4.0 * y
    assert float(transferability(signal, y, objective)) > float(transferability(noise, y, objective))
    f = signal.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(transferability(f, y, objective), [f])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    with pytest.raises(UserInputError, match="unknown objective"):
        transferability(signal, y, "leep")
