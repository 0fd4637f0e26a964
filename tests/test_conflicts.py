import pytest
import torch
import torch.nn.functional as F

from core import h_score, measure_sources, target_tokens
from core.method.regularizers import conflict_regularizer, fishr_regularizer, pair_penalty
from core.method.source_pass import cosine_matrix


def source_pass(model, x, y, prompts, **kw):
    """The source pass on images ``x`` with labels ``y``."""
    return measure_sources(model, target_tokens(model, x, y, None, 0), prompts, **kw)


def _target(model, task, n=30):
    x, y = task.tensors("train", model.transform(), "t")
    return x[:n], y[:n]


def _loop_grads(model, x, y, prompts):
    out = []
    for p in prompts:
        p = p.clone().requires_grad_(True)
        (-h_score(model(x, p), y)).backward()
        out.append(p.grad)
    return torch.stack(out)


@pytest.mark.parametrize("deep", [False, True])
def test_batched_gradients_equal_per_source_loop(model, task, deep):
    x, y = _target(model, task)
    g = torch.Generator().manual_seed(0)
    shape = (3, model.depth, 4, model.embed_dim) if deep else (3, 4, model.embed_dim)
    prompts = torch.randn(shape, generator=g)
    res = source_pass(model, x, y, prompts)
    torch.testing.assert_close(res.grads, _loop_grads(model, x, y, prompts), rtol=1e-4, atol=1e-6)
    assert res.cosine.shape == (3, 3)
    torch.testing.assert_close(res.cosine, res.cosine.T)
    torch.testing.assert_close(torch.diagonal(res.cosine), torch.ones(3))
    if deep:
        assert res.layer_cosine.shape == (model.depth, 3, 3)
    else:
        assert res.layer_cosine is None
    hs = torch.stack([h_score(model(x, p), y) for p in prompts])
    torch.testing.assert_close(res.source_hscores, hs.float(), rtol=1e-4, atol=1e-5)


def test_chunked_pass_equals_single_pass(model, task, bank):
    x, y = _target(model, task)
    a = source_pass(model, x, y, bank, fishr=True)
    b = source_pass(model, x, y, bank, fishr=True, chunk_size=7)
    torch.testing.assert_close(a.grads, b.grads, rtol=1e-4, atol=1e-7)
    # The probe heads are refitted by L-BFGS on features that differ in the last bits: they agree to ~1 %.
    torch.testing.assert_close(a.grad_var, b.grad_var, rtol=3e-2, atol=1e-3 * float(a.grad_var.abs().max()))


def test_fisher_vector_equals_variance_of_single_sample_gradients(model, task, bank):
    """F_k from the batched pass against a loop of single-sample gradients of the probe head's cross-entropy."""
    from core.metrics.probe import fit_linear_heads

    x, y = _target(model, task, 12)
    res = source_pass(model, x, y, bank, fishr=True)
    stack = bank.stack()
    with torch.no_grad():
        feats = model.forward_tokens_batched(model.embed(x), stack)
    w, b = fit_linear_heads(feats, y, 3)
    assert res.grad_var.shape == stack.shape
    for k in range(len(bank)):
        per = []
        for i in range(len(y)):
            p = stack[k].clone().requires_grad_(True)
            F.cross_entropy(model(x[i : i + 1], p) @ w[k] + b[k], y[i : i + 1]).backward()
            per.append(p.grad)
        per = torch.stack(per)
        torch.testing.assert_close(res.grad_var[k], per.var(0, unbiased=False), rtol=2e-3, atol=1e-9)


def test_retired_fisher_names_say_what_to_use(model, task, bank):
    from core import UserInputError

    x, y = _target(model, task, 12)
    res = source_pass(model, x, y, bank)
    with pytest.raises(UserInputError, match="retired.*fishr"):
        res.regularizer(torch.ones(3, dtype=torch.float64) / 3, "fisher")
    with pytest.raises(UserInputError, match="fishr=True"):
        res.regularizer(torch.ones(3, dtype=torch.float64) / 3, "fishr")


def test_cosine_matrix_and_regularisers_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    c = cosine_matrix(g)
    expected = torch.tensor([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(c, expected)
    a = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    # only the (0, 1) pair conflicts, counted both ways: 2 * 0.5 * 0.3 * 1
    assert conflict_regularizer(a, c).item() == pytest.approx(0.3)
    assert conflict_regularizer(torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64), c).item() == 0.0
    # fishr from the Gram matrix equals sum_k a_k ||F_k - sum_j a_j F_j||^2 computed directly
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [3.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    mean = a @ f
    direct = (a * ((f - mean) ** 2).sum(1)).sum()
    assert fishr_regularizer(a, f @ f.T).item() == pytest.approx(direct.item())
    for i in range(4):  # zero at every vertex: a single source has no spread
        assert fishr_regularizer(torch.eye(4, dtype=torch.float64)[i], f @ f.T).item() == pytest.approx(0.0, abs=1e-12)
    # the interference penalty is the same pair form on the measured mixing loss
    mix = torch.tensor([[0.0, -0.2], [0.1, 0.0]])
    assert pair_penalty(torch.tensor([0.5, 0.5], dtype=torch.float64), mix).item() == pytest.approx(0.25 * 0.2)


@pytest.mark.parametrize("kind", ["conflict", "fishr", "pair"])
def test_regulariser_gradients_equal_finite_differences(kind):
    """The weights' gradient of each penalty (what the optimiser follows) is the derivative of its value."""
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, -0.8], [0.2, -0.8, 1.0]], dtype=torch.float64)
    f = torch.rand(3, 7, generator=g, dtype=torch.float64)
    fn = {"conflict": lambda a: conflict_regularizer(a, c), "fishr": lambda a: fishr_regularizer(a, f @ f.T),
          "pair": lambda a: pair_penalty(a, c)}[kind]
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fn(torch.softmax(theta, 0)), [theta])
    eps = 1e-6
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = eps
        fd = (fn(torch.softmax(theta.detach() + e, 0)) - fn(torch.softmax(theta.detach() - e, 0))) / (2 * eps)
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
    assert grad.abs().max() > 1e-3  # the penalty moves with the weights here, so the check is not of zeros
    # Concentrating the mass on one source removes every pair's penalty.
    assert float(fn(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
