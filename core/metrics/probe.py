"""Linear probes on frozen features: multinomial logistic regression, K independent heads in one L-BFGS fit."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .threads import one_thread


@one_thread()  # small matmuls: one thread is faster than two (core.metrics.threads)
def fit_linear_heads(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 50,
                     weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic-regression heads for ``features: (K, N, D)`` -> ``W: (K, D, C)``, ``b: (K, C)``.

    Fitted by L-BFGS on standardised features; the K heads are independent.
    """
    f = features.detach().float()
    k, _, d = f.shape
    mu, sd = f.mean(1, keepdim=True), f.std(1, keepdim=True).clamp_min(1e-6)
    z = (f - mu) / sd
    w = torch.zeros(k, d, num_classes, device=f.device, requires_grad=True)
    b = torch.zeros(k, num_classes, device=f.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("knd,kdc->knc", z, w) + b[:, None]
        loss = F.cross_entropy(logits.reshape(-1, num_classes), labels.repeat(k)) * k
        loss = loss + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # Fold the standardisation into the head so it applies to raw features.
    w_raw = (w.detach() / sd.transpose(1, 2))
    b_raw = b.detach() - torch.einsum("kd,kdc->kc", mu[:, 0], w_raw)
    return w_raw, b_raw
