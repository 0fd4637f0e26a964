import pytest
import torch
import torch.nn.functional as F

from core import gradient_conflicts, h_score
from core.conflicts import conflict_regularizer, cosine_matrix, fisher_regularizer


def _target(model, task, n=30):
    x, y = task.tensors("train", model.transform(), key="t")
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
    res = gradient_conflicts(model, x, y, prompts)
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


def test_chunked_equals_single_pass(model, task, bank):
    x, y = _target(model, task)
    a = gradient_conflicts(model, x, y, bank, fisher=True)
    b = gradient_conflicts(model, x, y, bank, fisher=True, chunk_size=7)
    torch.testing.assert_close(a.grads, b.grads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.fisher, b.fisher, rtol=1e-4, atol=1e-9)


def test_fisher_equals_per_sample_gradients_for_ce(model, task, bank):
    from core.conflicts import fit_linear_heads

    x, y = _target(model, task, 12)
    res = gradient_conflicts(model, x, y, bank, loss="ce", fisher=True)
    stack = bank.stack()
    with torch.no_grad():
        feats = model.forward_batched(x, stack)
    w, b = fit_linear_heads(feats, y, 3)
    for k in range(len(bank)):
        per = []
        for i in range(len(y)):
            p = stack[k].clone().requires_grad_(True)
            F.cross_entropy(model(x[i : i + 1], p) @ w[k] + b[k], y[i : i + 1]).backward()
            per.append(p.grad.flatten())
        per = torch.stack(per)
        assert res.fisher[k].item() == pytest.approx((per**2).mean(0).sum().item(), rel=1e-3)
        torch.testing.assert_close(res.grads[k].flatten(), per.mean(0), rtol=1e-3, atol=1e-7)


def test_cosine_matrix_and_regularisers_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    c = cosine_matrix(g)
    expected = torch.tensor([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(c, expected)
    a = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    # only the (0, 1) pair conflicts, counted both ways: 2 * 0.5 * 0.3 * 1
    assert conflict_regularizer(a, c).item() == pytest.approx(0.3)
    assert conflict_regularizer(torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64), c).item() == 0.0
    assert fisher_regularizer(a, torch.tensor([2.0, 2.0, 2.0, 2.0])).item() == pytest.approx(0.0)
    v = torch.tensor([1.0, 3.0])
    a2 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # v / mean(v) = [0.5, 1.5]; weighted mean 1; variance 0.25
    assert fisher_regularizer(a2, v).item() == pytest.approx(0.25)


def test_regulariser_gradient_flows_to_weights():
    c = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    theta_b = torch.tensor([3.0, 0.0], dtype=torch.float64)
    r0 = conflict_regularizer(torch.softmax(theta, 0), c)
    r1 = conflict_regularizer(torch.softmax(theta_b, 0), c)
    assert r1 < r0  # concentrating the mass on one source removes the conflict
    r0.backward()
    assert torch.isfinite(theta.grad).all()
