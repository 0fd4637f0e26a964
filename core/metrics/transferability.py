"""Transferability objectives: how well a target's labels can be read from features, each a differentiable function
of ``features: (N, D)`` and ``labels: (N,)`` (classes ``0..C-1``) that is higher when the features transfer better.

- ``"hscore"``: the H-score (Bao et al., ICIP 2019) in its shrinkage, pinv or trace-ratio variant
  (:mod:`core.metrics.h_score`); in ``[0, C - 1]``.
- ``"logme"``: LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML
  2021): the log marginal evidence of a Bayesian linear model from the features to each class's one-hot column, with
  its prior and noise precisions maximised by LogME's fixed-point iteration; per sample, averaged over classes.
  Written with Cholesky solves of ``alpha I + beta F^T F`` instead of LogME's SVD, the same quantities, so it is
  stable to differentiate.
- ``"transrate"``: TransRate (Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022): the coding
  rate of the centred features minus the coding rates of each class's features, ``R(Z) - sum_c R(Z_c) / C`` with
  ``R(Z) = 1/2 logdet(I + Z^T Z / (n eps))``, eps = 1e-4. The classes are weighted 1/C as in tllib's
  implementation (``tllib.ranking.transrate``), not n_c / n as in the authors' code: the two agree on balanced
  classes and differ on imbalanced ones (by up to 11.5 % in our check, docs/METHOD_NOTES.md).
- ``"probe_ll"`` (ours): the cross-validated log-likelihood of a linear probe, the most direct proxy of what tuning
  starts from. The probe is shrinkage LDA (scikit-learn's ``LinearDiscriminantAnalysis(solver="lsqr",
  shrinkage=0.2)``, in closed form, so differentiable): fitted on 4 of 5 stratified folds, scored on the held-out
  fold, the mean of ``log p(y | x)`` over every sample.

Tests hold LogME and TransRate to NumPy references of the published code on fixed features, and the probe to
scikit-learn on the same folds.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..registry import Registry
from .h_score import H_VARIANTS, HScoreVariant, _validate, h_score

#: The transferability objectives: each ``(features (N, D), labels (N,), h_variant) -> scalar``, higher is better.
OBJECTIVES: Registry = Registry("objective", default="hscore")
Transferability = str  # a name in OBJECTIVES
PROBE_FOLDS = 5
PROBE_SHRINKAGE = 0.2
TRANSRATE_EPS = 1e-4


def transferability(features: torch.Tensor, labels: torch.Tensor, objective: Transferability = OBJECTIVES.default,
                    h_variant: HScoreVariant = H_VARIANTS.default, n_classes: int | None = None) -> torch.Tensor:
    """``objective`` of ``features: (N, D)`` for ``labels: (N,)``: a differentiable scalar, higher is better.

    ``n_classes``: the labels are already checked and renamed ``0 .. C - 1`` (a :class:`core.model.tokens.Target`'s),
    so they are not checked again."""
    return OBJECTIVES[objective](features, labels, h_variant, n_classes)


@OBJECTIVES.register("hscore", help="the H-score of the target features (its variant: h_variant); in [0, C - 1]")
def _hscore(features, labels, h_variant, n_classes=None):
    return h_score(features, labels, h_variant, n_classes)


@OBJECTIVES.register("logme", help="LogME: the log evidence of a Bayesian linear model of the labels (You et al., "
                     "ICML 2021)")
def _logme(features, labels, h_variant, n_classes=None):
    f, y, c = _checked(features, labels, n_classes)
    return logme(f, y, c).to(_dtype(features))


@OBJECTIVES.register("transrate", help="TransRate: the features' coding rate minus the classes' (Huang et al., ICML "
                     "2022; classes weighted 1/C, as tllib)")
def _transrate(features, labels, h_variant, n_classes=None):
    f, y, c = _checked(features, labels, n_classes)
    return transrate(f, y, c).to(_dtype(features))


@OBJECTIVES.register("probe_ll", help="the cross-validated log-likelihood of a shrinkage-LDA probe on the target "
                     "sample (ours)")
def _probe_ll(features, labels, h_variant, n_classes=None):
    f, y, c = _checked(features, labels, n_classes)
    return probe_loglik(f, y, c).to(_dtype(features))


def _dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _checked(features, labels, n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float64 features, labels renamed 0..C-1, C; the same refusals as the H-score's."""
    features, y, c, _ = _validate(features, labels, n_classes)
    return features.double(), y, c


def logme(f: torch.Tensor, y: torch.Tensor, c: int, iterations: int = 11, epsilon: float = 1e-5) -> torch.Tensor:
    """LogME of features ``f: (N, D)`` (float64) for labels ``y`` in ``0..c-1``: the mean over classes of the
    per-sample log evidence of each one-hot column (LogME's fixed point from alpha = beta = 1, at most 11 steps,
    stopped when alpha / beta moves by less than 1 %)."""
    n, d = f.shape
    a = f.T @ f  # (D, D)
    eye = torch.eye(d, dtype=f.dtype, device=f.device)
    out = []
    for k in range(c):
        yk = (y == k).to(f.dtype)
        fy = f.T @ yk  # (D,)
        alpha, beta = torch.ones((), dtype=f.dtype), torch.ones((), dtype=f.dtype)
        lam = alpha / beta
        for _ in range(iterations):
            chol = torch.linalg.cholesky(a + lam * eye)
            gamma = d - lam * torch.cholesky_inverse(chol).diagonal().sum()  # sum_i s_i / (s_i + lam)
            m = torch.cholesky_solve(fy[:, None], chol)[:, 0]  # beta (alpha I + beta A)^-1 F^T y = (lam I + A)^-1 F^T y
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + epsilon)
            beta_de = ((yk - f @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + epsilon)
            new_lam = alpha / beta
            if abs(float((new_lam - lam).detach())) / float(lam.detach()) < 0.01:
                break
            lam = new_lam
        logdet = torch.linalg.slogdet(alpha * eye + beta * a)[1]  # sum_i log(alpha + beta s_i)
        evidence = (d / 2.0 * torch.log(alpha) + n / 2.0 * torch.log(beta) - 0.5 * logdet
                    - beta / 2.0 * (beta_de + epsilon) - alpha / 2.0 * (alpha_de + epsilon)
                    - n / 2.0 * math.log(2 * math.pi))
        out.append(evidence / n)
    return torch.stack(out).mean()


def _coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    n, d = z.shape
    return 0.5 * torch.linalg.slogdet(torch.eye(d, dtype=z.dtype, device=z.device) + z.T @ z / (n * eps))[1]


def transrate(f: torch.Tensor, y: torch.Tensor, c: int, eps: float = TRANSRATE_EPS) -> torch.Tensor:
    """TransRate ``R(Z) - sum_c R(Z_c) / C`` of the centred features (float64); each class weighted 1/C, as tllib
    weighs them (the authors' code weighs class c by n_c / n)."""
    z = f - f.mean(0, keepdim=True)
    return _coding_rate(z, eps) - sum(_coding_rate(z[y == k], eps) for k in range(c)) / c


def probe_folds(y: np.ndarray, folds: int = PROBE_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Held-out index sets of a stratified K-fold split (scikit-learn's ``StratifiedKFold``, shuffled, seeded); fewer
    folds when the smallest class has fewer samples."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y).min())
    k = max(2, min(folds, smallest))
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    return [test for _, test in split]


def lda_log_proba(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, c: int,
                  shrinkage: float = PROBE_SHRINKAGE) -> torch.Tensor:
    """``log p(class | x)`` ``(M, C)`` of shrinkage LDA fitted on ``train_f`` (scikit-learn's lsqr solver: priors and
    means of the training rows, each class's empirical covariance shrunk towards ``tr / D`` and weighted by its
    prior)."""
    d = train_f.shape[1]
    counts = torch.bincount(train_y, minlength=c).to(train_f.dtype)
    priors = counts / counts.sum()
    means = torch.zeros(c, d, dtype=train_f.dtype,
                        device=train_f.device).index_add_(0, train_y, train_f) / counts[:, None]
    eye = torch.eye(d, dtype=train_f.dtype, device=train_f.device)
    cov = torch.zeros(d, d, dtype=train_f.dtype, device=train_f.device)
    for k in range(c):
        xk = train_f[train_y == k] - means[k]
        emp = xk.T @ xk / xk.shape[0]
        cov = cov + priors[k] * ((1 - shrinkage) * emp + shrinkage * emp.diagonal().mean() * eye)
    coef = torch.linalg.solve(cov, means.T).T  # (C, D)
    intercept = -0.5 * (means * coef).sum(1) + torch.log(priors)
    return torch.log_softmax(test_f @ coef.T + intercept, dim=1)


def probe_loglik(f: torch.Tensor, y: torch.Tensor, c: int, folds: int = PROBE_FOLDS, seed: int = 0) -> torch.Tensor:
    """The mean held-out ``log p(y | x)`` of a shrinkage-LDA probe over stratified folds of ``(f, y)``."""
    total = f.new_zeros(())
    for test in probe_folds(y.cpu().numpy(), folds, seed):
        mask = torch.ones(len(y), dtype=torch.bool, device=f.device)
        mask[torch.as_tensor(test, device=f.device)] = False
        logp = lda_log_proba(f[mask], y[mask], f[~mask], c)
        total = total + logp.gather(1, y[~mask][:, None]).sum()
    return total / len(y)
