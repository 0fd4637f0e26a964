"""The regularisers of the ensemble weights: penalties on mixing sources, each a function of the weights alone.

HGPrompt (Zhang et al., "Learning Optimal Prompt Ensemble for Multi-source Visual Prompt Transfer", arXiv
2504.12311) regularises the ensemble weights with what the sources' gradients on the target say. Each penalty
here depends only on quantities measured once at the fixed source prompts (:mod:`core.method.source_pass`), so it
costs nothing per optimisation step. docs/METHOD_NOTES.md says where each goes beyond the paper.

- ``"fishr"`` (the final abstract's "matching gradient variances ... based on Hessian and Fisher information",
  read as Fishr, Rame et al., ICML 2022): ``F_k`` is the diagonal empirical Fisher *vector* at ``P_k``, the
  variance over target samples of the per-sample gradients of the cross-entropy of a probe head fitted on the
  target features under ``P_k``; ``R(a) = sum_k a_k ||F_k - sum_j a_j F_j||^2`` with the ``F_k`` scaled by their
  mean norm, so lambda has one scale on every backbone.
- ``"conflict"`` (the first abstract's gradient-conflict reading): ``R(a) = sum_{i != j} a_i a_j max(0, -C_ij)`` on
  the raw gradient cosines. Raw cosines share a prompt-independent direction (see :mod:`core.analysis.interference`),
  so on many targets no pair is negative and this ``R`` is identically 0.
- ``"interference"`` (ours, resting on the measured quantity): ``R(a) = sum_{i != j} a_i a_j max(0, -I_ij)`` with
  ``I_ij = H((P_i + P_j)/2) - (H_i + H_j)/2`` the measured mixing loss of the pair.

All three are 0 at every vertex (a single source), so a vertex's objective is its H-score whatever lambda is.
"""
from __future__ import annotations

import torch

from ..errors import UserInputError
from ..registry import Registry

#: The regularisers: each ``R(alpha, source_pass)`` for the composition ``alpha: (K,)`` and a
#: :class:`core.method.source_pass.SourcePass`; ``needs`` names what the source pass must measure for it
#: (``"fishr"``: the Fisher vectors, ``"mixing"``: the mixing losses, None: nothing beyond the gradients).
REGULARIZERS: Registry = Registry("regularizer", default="fishr")
Regularizer = str  # a name in REGULARIZERS
REGULARIZERS.retire("fisher", "the scalar 'fisher' regulariser (one number per source) was retired: it lost the "
                    "direction of the Fisher and drove the weight off the most useful source. Use regularizer='fishr', "
                    "the per-parameter (vector) reading of the same idea.")


def pair_penalty(alpha: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} alpha_i alpha_j max(0, -M_ij)`` for ``alpha: (K,)``, ``matrix: (K, K)``."""
    penalty = (-matrix.to(alpha.dtype)).clamp_min(0.0)
    penalty = penalty - torch.diag_embed(torch.diagonal(penalty))
    return alpha @ penalty @ alpha


def conflict_regularizer(alpha: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """The weight mass on conflicting pairs, ``sum_{i != j} alpha_i alpha_j max(0, -C_ij)``."""
    return pair_penalty(alpha, cosine)


def fishr_gram(grad_var: torch.Tensor) -> torch.Tensor:
    """``(K, K)`` Gram matrix of the Fisher vectors ``grad_var: (K, *S)`` scaled by their mean norm (all ``fishr``
    needs)."""
    f = grad_var.reshape(grad_var.shape[0], -1).double()
    f = f / f.norm(dim=1).mean().clamp_min(1e-30)
    return f @ f.T


def fishr_regularizer(alpha: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha_k ||F_k - sum_j alpha_j F_j||^2`` from the Gram matrix ``gram[i, j] = <F_i, F_j>``.

    Expanding the square with ``sum alpha = 1``: ``sum_k alpha_k G_kk - alpha^T G alpha``.
    """
    g = gram.to(alpha.dtype)
    return (alpha * torch.diagonal(g)).sum() - alpha @ g @ alpha


@REGULARIZERS.register("fishr", help="spread of the sources' per-sample gradient variances (the paper's final reading)",
                       needs="fishr")
def fishr(alpha: torch.Tensor, source_pass) -> torch.Tensor:
    if source_pass.grad_var is None:
        raise UserInputError("the 'fishr' regulariser needs the Fisher vectors: source_pass(..., fishr=True).")
    return fishr_regularizer(alpha, source_pass.fishr_gram())


@REGULARIZERS.register("conflict", help="weight on pairs whose raw gradients conflict", needs=None)
def conflict(alpha: torch.Tensor, source_pass) -> torch.Tensor:
    return conflict_regularizer(alpha, source_pass.cosine)


@REGULARIZERS.register("interference", help="weight on pairs whose measured mixing loses H-score", needs="mixing")
def interference(alpha: torch.Tensor, source_pass) -> torch.Tensor:
    if source_pass.mixing_loss is None:
        raise UserInputError("the 'interference' regulariser needs the measured mixing losses: "
                             "source_pass(..., mixing=True).")
    return pair_penalty(alpha, source_pass.mixing_loss)
