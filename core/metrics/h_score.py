"""Transferability by the H-score, differentiable, in torch.

H-score (Bao et al., "An Information-Theoretic Approach to Transferability in
Task Transfer Learning", ICIP 2019):

    H(f) = tr( cov(f)^-1 cov(E[f | y]) )

Three variants are offered because the implementations in the wild disagree:

- ``"shrinkage"`` (default; Ibrahim et al., "Newer is not always better:
  Rethinking transferability metrics", 2022): ``cov(f)`` is replaced by the
  Ledoit-Wolf shrunk estimate ``cov_a = (1 - a) cov(f) + a (tr cov(f) / D) I``
  and the score is ``tr(cov_a^-1 (1 - a) cov(E[f|y]))``. Stable with few
  samples per class and large D.
- ``"pinv"`` (tllib / the original paper): the pseudo-inverse of ``cov(f)``.
- ``"trace_ratio"`` (H-ensemble's code): ``tr(cov(E[f|y])) / tr(cov(f))``.

Where we go beyond the papers (documented in docs/METHOD_NOTES.md):
both covariances use the biased 1/N normalisation (Ibrahim et al.'s code mixes
1/N and 1/(N-1)); the Ledoit-Wolf coefficient ``a`` is computed in torch and
differentiated through (detached, the gradient disagreed with the score); the score is computed in
float64 with a Cholesky solve rather than an explicit inverse; constant
features score exactly 0.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserInputError
from ..registry import Registry
from .threads import one_thread

#: The H-score variants: each maps the centred features' statistics to the per-class terms of the score.
H_VARIANTS: Registry = Registry("H-score variant", default="shrinkage")
HScoreVariant = str  # a name in H_VARIANTS


def check_labels(labels: torch.Tensor | object, n_samples: int) -> torch.Tensor:
    """Validate integer class labels ``(N,)`` and return them as a long tensor."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise UserInputError(
            f"labels must be a 1-D vector of class indices, got shape {tuple(labels.shape)}; "
            "pass one integer label per sample."
        )
    if labels.shape[0] != n_samples:
        raise UserInputError(
            f"features have {n_samples} samples but labels have {labels.shape[0]}; "
            "pass exactly one label per feature row."
        )
    if labels.dtype.is_floating_point:
        if not torch.isfinite(labels).all() or not torch.equal(labels, labels.round()):
            raise UserInputError("labels must be whole numbers (class indices); got non-integer values.")
    return labels.long()


def class_labels(labels: torch.Tensor | object, n_samples: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Labels checked once where they enter: renamed ``0 .. C - 1`` (long, ``(N,)``), the original label of each
    class ``(C,)``, and ``C``; refused unless there are two classes or more and more samples than classes (what
    every transferability objective needs)."""
    return _renamed(check_labels(labels, n_samples), n_samples)


def _renamed(y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    present, y = torch.unique(y, return_inverse=True)  # label renaming does not change the score
    c = int(y.max().item()) + 1 if n else 0
    if c < 2:
        raise UserInputError(
            f"the H-score needs at least two classes, got {c}; the target task must have "
            "samples of two or more classes."
        )
    if n <= c:
        raise UserInputError(
            f"the H-score needs more samples than classes, got N={n} samples for C={c} classes; "
            "use more target samples (at least two for some class)."
        )
    return y, present, c


def _validate(features: torch.Tensor, labels: object,
              n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Checked features, labels renamed to ``0 .. C - 1``, ``C``, and the original label of each renamed class.

    With ``n_classes`` the labels were checked where they entered (:func:`class_labels`, a
    :class:`core.model.tokens.Target`): only their shape is asserted. The features are checked either way: a
    diverged prompt makes them non-finite."""
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(features)
    if features.dim() != 2:
        raise UserInputError(
            f"features must have shape (N, D), got {tuple(features.shape)}; "
            "flatten or pool the features to one vector per sample first."
        )
    n = features.shape[0]
    if n_classes is None:
        y = check_labels(labels, n).to(features.device)
    else:
        assert labels.shape == (n,) and labels.dtype == torch.long, (tuple(labels.shape), labels.dtype)
        y = labels.to(features.device)
    if not torch.isfinite(features).all():
        raise UserInputError(
            "features contain NaN or infinite values; the H-score is undefined. "
            "Check the inputs and the prompt (a diverged prompt gives non-finite features)."
        )
    if n_classes is not None:
        return features, y, n_classes, torch.arange(n_classes, device=features.device)
    y, present, c = _renamed(y, n)
    return features, y, c, present


def ledoit_wolf_shrinkage(centered: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage coefficient of centred data ``(N, D)``, as scikit-learn computes it.

    Returns a scalar in [0, 1]; same formula as ``sklearn.covariance.ledoit_wolf_shrinkage``.
    """
    n, d = centered.shape
    x2 = centered**2
    emp_cov_trace = x2.sum(0) / n  # (D,)
    mu = emp_cov_trace.sum() / d
    beta_ = (x2.T @ x2).sum()
    delta_ = ((centered.T @ centered) ** 2).sum() / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * emp_cov_trace.sum() + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    if delta <= 0:
        return torch.zeros((), dtype=centered.dtype, device=centered.device)
    return (beta / delta).clamp(0.0, 1.0)


def class_means(f: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means ``(C, D)`` and class frequencies ``(C,)`` of centred features."""
    counts = torch.bincount(y, minlength=c).to(f.dtype)  # (C,)
    sums = torch.zeros(c, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f)
    return sums / counts.clamp_min(1)[:, None], counts / f.shape[0]


def h_score(
    features: torch.Tensor,
    labels: torch.Tensor,
    variant: HScoreVariant = H_VARIANTS.default,
    n_classes: int | None = None,
) -> torch.Tensor:
    """H-score of ``features: (N, D)`` for ``labels: (N,)``; a differentiable scalar.

    Higher is more transferable. ``variant``: a name in :data:`H_VARIANTS` (see the module docstring). The result
    has ``features``' dtype and device; it is computed in float64. ``n_classes``: the labels are already checked
    and renamed ``0 .. C - 1`` (a :class:`core.model.tokens.Target`'s), so they are not checked again.
    """
    terms, _, out_dtype = _class_terms(features, labels, variant, n_classes)
    return terms.sum().to(out_dtype)


def h_score_per_class(
    features: torch.Tensor,
    labels: torch.Tensor,
    variant: HScoreVariant = H_VARIANTS.default,
) -> torch.Tensor:
    """Each class's share of the H-score: ``(C,)`` for labels ``0 .. C - 1``, summing to :func:`h_score`.

    ``cov(E[f|y]) = sum_c p_c m_c m_c^T``, so ``H = sum_c p_c m_c^T A^-1 m_c`` (``A`` the variant's covariance,
    ``m_c`` the class mean of the centred features): class ``c``'s term is how far its mean stands out from the
    whole, in units of the feature spread, weighted by its frequency. A class absent from ``labels`` gets 0.
    """
    terms, present, out_dtype = _class_terms(features, labels, variant)
    out = torch.zeros(int(present.max().item()) + 1, dtype=terms.dtype, device=terms.device)
    return out.index_copy(0, present, terms).to(out_dtype)


@one_thread()  # (D, D) float64 solves: one thread is faster than two (core.metrics.threads)
def _class_terms(features, labels, variant: str,
                 n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """The H-score's per-class terms (float64, one per class present), the labels they belong to, the output dtype."""
    H_VARIANTS.check(variant)
    features, y, c, present = _validate(features, labels, n_classes)
    out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.double()
    scale = f.detach().abs().max()
    f = f - f.mean(0, keepdim=True)
    n, d = f.shape
    means, freq = class_means(f, y, c)  # (C, D), (C,)
    cov_f = f.T @ f / n  # (D, D)
    total_var = torch.diagonal(cov_f).sum()
    if total_var <= torch.finfo(f.dtype).tiny or total_var <= d * (1e-10 * scale) ** 2:
        # Constant features carry no information about the labels.
        return f.sum() * 0.0 + torch.zeros(c, dtype=f.dtype, device=f.device), present, out_dtype
    # tr(A^-1 cov_g) with cov_g = sum_c freq_c m_c m_c^T, so only C right-hand sides are needed.
    weighted = means * freq.sqrt()[:, None]  # (C, D)
    return H_VARIANTS[variant](f, weighted, cov_f, total_var), present, out_dtype


# Each variant: centred features ``f: (N, D)`` (float64), the frequency-weighted class means ``weighted: (C, D)``,
# ``cov_f: (D, D)`` and its trace -> the per-class terms ``(C,)`` of ``tr(A^-1 cov(E[f|y]))``.
@H_VARIANTS.register("shrinkage", help="Ledoit-Wolf shrunk cov(f) (Ibrahim et al. 2022): stable with few samples per "
                     "class and large D")
def _shrinkage_terms(f, weighted, cov_f, total_var) -> torch.Tensor:
    d = f.shape[1]
    a = ledoit_wolf_shrinkage(f)
    mu = total_var / d
    cov_a = (1.0 - a) * cov_f + a * mu * torch.eye(d, dtype=f.dtype, device=f.device)
    chol, info = torch.linalg.cholesky_ex(cov_a)
    if info.item() != 0:  # only when a == 0 and cov_f is singular: fall back to a tiny ridge
        cov_a = cov_a + 1e-10 * mu * torch.eye(d, dtype=f.dtype, device=f.device)
        chol = torch.linalg.cholesky(cov_a)
    sol = torch.cholesky_solve(weighted.T, chol)  # (D, C)
    return (1.0 - a) * (sol * weighted.T).sum(0)


@H_VARIANTS.register("pinv", help="the pseudo-inverse of cov(f) (tllib, the original paper); exactly C - 1 for "
                     "every prompt when N <= D")
def _pinv_terms(f, weighted, cov_f, total_var) -> torch.Tensor:
    return ((weighted @ torch.linalg.pinv(cov_f, hermitian=True)) * weighted).sum(1)


@H_VARIANTS.register("trace_ratio", help="tr(cov E[f|y]) / tr(cov f) (H-ensemble's code)")
def _trace_ratio_terms(f, weighted, cov_f, total_var) -> torch.Tensor:
    return (weighted**2).sum(1) / total_var


def default_n_samples(dim: int, available: int) -> int:
    """How many target samples the H-score is estimated from by default: ``max(256, ceil(4 D / 3))``, at most
    ``available``.

    With ``N <= D`` the feature covariance is singular: the ``pinv`` H-score is then exactly ``C - 1`` for
    every prompt, and the shrinkage estimate leans on its shrinkage target. How the sources' ranking by H-score
    agrees with their probe accuracies at 128, 256 and 800 samples: docs/METHOD_NOTES.md ("Target sample").
    """
    return int(min(available, max(256, math.ceil(4 * dim / 3))))


def resolve_n_samples(n: int | str | None, dim: int, available: int) -> int | None:
    """``n`` itself, or :func:`default_n_samples` when ``n == "auto"`` (None still means all)."""
    return default_n_samples(dim, available) if n == "auto" else n


def sample_size_warning(n: int, d: int, variant: str) -> str | None:
    """A warning when the H-score ``variant`` is estimated from ``n <= d`` samples of ``d``-dimensional features."""
    if n > d:
        return None
    if variant == "pinv":
        return (f"the pinv H-score with N = {n} samples <= D = {d} feature dimensions is exactly C - 1 for every "
                "prompt: it carries no signal and the weights move on noise. Use more samples (n_samples >= "
                f"{d + 1}) or the shrinkage variant.")
    return (f"the H-score is estimated from N = {n} samples for D = {d} feature dimensions (N <= D): the covariance is "
            f"singular and the estimate leans on shrinkage. Use n_samples >= {d + 1} where the target has them.")
