"""Interference between source prompts: gradient cosines against a null, and the measured mixing loss.

A gradient cosine is a *prediction* of interference; what interference is, on
the target, is measured directly here: the H-score along the segment
``P(t) = (1 - t) P_i + t P_j`` and the mixing loss

    I_ij = H((P_i + P_j) / 2) - (H_i + H_j) / 2      (negative: mixing the pair loses transferability)

Three gradient-based readings are reported beside it, each with what it can and cannot say:

- ``raw``: ``cos(g_i, g_j)`` of the gradients of ``-H`` at ``P_i`` and ``P_j``. On a frozen
  backbone these share a prompt-independent direction, so raw cosines are mostly positive.
- ``centred``: the cosines after subtracting the mean gradient over the K sources. Centring
  makes cosines negative by construction (their expected value for K exchangeable vectors is
  ``-1 / (K - 1)``), so it means something only against a null centred the same way.
- The null band: the same cosines among ``K`` random prompts of the sources' mean norm (raw, and
  centred among themselves); a source pair below the band's low end conflicts more than random
  prompts do.
- ``derivative``: the directional derivatives ``D_ij = <grad H(P_i), P_j - P_i>``; a quadratic
  through both ends with these slopes predicts ``I_ij ~ (D_ij + D_ji) / 8``.

``InterferenceResult.spearman()`` says how well each reading ranks the measured ``I``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import UserInputError
from ..method.gradients import prompt_gradients
from ..method.scoring import hscores_at, mixing_loss, segment_hscores, simplex_points
from ..method.source_pass import centred_cosines, cosine_matrix, target_loss_fn
from ..metrics.h_score import H_VARIANTS, HScoreVariant
from ..model.device import PRECISIONS, precision
from ..model.features import check_finite_features
from ..model.tokens import target_tokens
from ..options import check, choice, option, options, seed_option

VARIANTS = ("raw", "centred")
#: Most points along a segment: the forward pass scores K (K - 1) / 2 * (points - 2) prompts.
MAX_POINTS = 101


@dataclass
class InterferenceConfig:
    """The settings of :func:`interference` (the CLI's ``interference`` command reads them from here)."""

    n_samples: int | Literal["auto"] | None = option(
        "auto", "target samples (class-stratified); auto: max(256, 4D/3), so N > D; None: the whole train split",
        low=2, high=1_000_000, fix="the H-score needs at least two samples of two classes")
    points: int = option(3, "odd number of points along each pair's segment, ends included (the midpoint is one)",
                         low=3, high=MAX_POINTS)
    n_random: int | None = option(None, "random prompts in the null band (default: as many as the sources)", low=2,
                                  high=1024, fix="a null needs at least one pair")
    h_variant: str = choice(H_VARIANTS, "H-score variant")
    seed: int = seed_option("seed of the sample and of the random prompts", cli="")
    chunk_size: int | None = option(None, "bound memory by running forward/backward in chunks of this many samples",
                                    low=1, high=1_000_000)
    precision: str = choice(PRECISIONS, "the frozen backbone's precision: fp32, or bf16 autocast (for GPUs; "
                                  "H-scores stay in float64)")

    def __post_init__(self) -> None:
        check(self, normalise=True)
        if self.points % 2 == 0:
            raise UserInputError("points must be an odd integer >= 3 (the midpoint is one of them), got "
                                 f"{self.points!r}.")


def random_prompts(like: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """``m`` Gaussian prompts shaped like ``like[0]``, each scaled to the mean norm of ``like: (K, *S)``."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn((m, *like.shape[1:]), generator=g, dtype=torch.float32)
    norm = like.reshape(like.shape[0], -1).norm(dim=1).mean()
    return r / r.reshape(m, -1).norm(dim=1).reshape(-1, *([1] * (like.dim() - 1))) * norm


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    k = m.shape[-1]
    return m[..., ~torch.eye(k, dtype=torch.bool)]


@dataclass
class InterferenceResult:
    """Interference between K source prompts on one target sample (see the module docstring)."""

    names: list[str]
    t: np.ndarray  # (S,) points along each segment, 0 and 1 included
    source_hscores: np.ndarray  # (K,)
    segment: np.ndarray  # (K, K, S) H along P_i -> P_j
    mixing_loss: np.ndarray  # (K, K) I_ij, diagonal 0
    directional: np.ndarray  # (K, K) D_ij = <grad H(P_i), P_j - P_i>, diagonal 0
    cosine: dict[str, np.ndarray]  # variant -> (K, K)
    null: dict[str, np.ndarray]  # variant -> (M, M) the same cosines among M random prompts
    null_band: dict[str, tuple[float, float]]  # variant -> (min, max) of the null's off-diagonal cosines
    layer_cosine: dict[str, np.ndarray] | None = None  # variant -> (depth, K, K), deep prompts only
    layer_null_band: dict[str, np.ndarray] | None = None  # variant -> (depth, 2), deep prompts only
    n_samples: int = 0
    seed: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def predicted_mixing_loss(self) -> np.ndarray:
        """The quadratic prediction ``(D_ij + D_ji) / 8`` of ``I_ij`` from the two end slopes."""
        return (self.directional + self.directional.T) / 8.0

    def below_null(self, variant: str = "centred") -> np.ndarray:
        """``(K, K)`` bool: pairs whose cosine is below the low end of the random-prompt null band."""
        return (self.cosine[variant] < self.null_band[variant][0]) & ~np.eye(len(self.names), dtype=bool)

    def spearman(self) -> dict[str, float]:
        """Spearman correlation over pairs ``i < j`` of each reading with the measured ``I_ij``.

        Positive means the reading ranks the pairs the way the measured interference does (a lower cosine
        or predicted loss goes with a more negative ``I``). NaN with fewer than three pairs.
        """
        from scipy.stats import spearmanr

        iu = np.triu_indices(len(self.names), 1)
        if len(iu[0]) < 3:
            return {v: float("nan") for v in (*VARIANTS, "derivative")}
        readings = {**{v: self.cosine[v] for v in VARIANTS}, "derivative": self.predicted_mixing_loss()}
        out = {}
        for v, m in readings.items():
            rho = spearmanr(m[iu], self.mixing_loss[iu]).statistic
            out[v] = float(rho) if np.isfinite(rho) else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "names": self.names, "t": self.t.tolist(), "source_hscores": self.source_hscores.tolist(),
            "segment": self.segment.tolist(), "mixing_loss": self.mixing_loss.tolist(),
            "directional": self.directional.tolist(), "predicted_mixing_loss": self.predicted_mixing_loss().tolist(),
            "cosine": {k: v.tolist() for k, v in self.cosine.items()},
            "null": {k: v.tolist() for k, v in self.null.items()},
            "null_band": {k: list(v) for k, v in self.null_band.items()},
            "spearman": self.spearman(), "n_samples": self.n_samples, "seed": self.seed, "seconds": self.seconds,
        }
        if self.layer_cosine is not None:
            d["layer_cosine"] = {k: v.tolist() for k, v in self.layer_cosine.items()}
            d["layer_null_band"] = {k: v.tolist() for k, v in self.layer_null_band.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InterferenceResult":
        """The result :meth:`to_dict` wrote (``interference.json`` of a run), every array back as an array."""
        arr = np.asarray
        layered = d.get("layer_cosine") is not None
        return cls(
            names=list(d["names"]), t=arr(d["t"]), source_hscores=arr(d["source_hscores"]), segment=arr(d["segment"]),
            mixing_loss=arr(d["mixing_loss"]), directional=arr(d["directional"]),
            cosine={k: arr(v) for k, v in d["cosine"].items()}, null={k: arr(v) for k, v in d["null"].items()},
            null_band={k: tuple(v) for k, v in d["null_band"].items()},
            layer_cosine={k: arr(v) for k, v in d["layer_cosine"].items()} if layered else None,
            layer_null_band={k: arr(v) for k, v in d["layer_null_band"].items()} if layered else None,
            n_samples=int(d.get("n_samples", 0)), seed=int(d.get("seed", 0)), seconds=float(d.get("seconds", 0.0)))


def interference(
    model,
    prompts,
    task_or_images,
    labels: torch.Tensor | None = None,
    *,
    names: list[str] | None = None,
    callback=None,
    should_stop=None,
    **settings: Any,
) -> InterferenceResult:
    """Gradient cosines (raw, centred, with a random-prompt null band) and the measured mixing loss.

    ``prompts``: a :class:`PromptBank` or a stack ``(K, T, D)`` / ``(K, depth, T, D)``.
    ``task_or_images``: a :class:`core.io.tasks.Task` (a class-stratified sample of its train split) or
    preprocessed images ``(N, C, H, W)`` with ``labels``. ``settings``: the fields of :class:`InterferenceConfig`
    (``n_samples``, ``points``, ``n_random``: random prompts in the null, default K, so a centred null is centred
    over as many vectors as the sources are; ``h_variant``, ``seed``, ``chunk_size``). Cost: one gradient pass over
    ``K + n_random`` prompts and one forward over ``K (K - 1) / 2 * (points - 2)`` segment prompts.
    ``callback(info)`` hears ``{"stage": "gradients"}`` before the gradient pass and ``{"stage": "segments", "done",
    "total"}`` as the segment prompts are scored; ``should_stop`` (a callable or an Event) is polled between batches
    and ends the measurement with :class:`core.errors.StopRequested`.
    """
    t0 = time.perf_counter()
    unknown = sorted(set(settings) - set(options(InterferenceConfig)))
    if unknown:
        raise UserInputError(f"interference() has no setting {unknown[0]!r}; its settings are "
                             f"{', '.join(options(InterferenceConfig))}.")
    cfg = InterferenceConfig(**settings)
    with precision(cfg.precision):
        return _interference(model, prompts, task_or_images, labels, cfg, names, callback, should_stop, t0)


def _interference(model, prompts, task_or_images, labels, cfg: InterferenceConfig, names, callback, should_stop,
                  t0: float) -> InterferenceResult:
    n_samples, points, n_random, h_variant, seed, chunk_size = (
        cfg.n_samples, cfg.points, cfg.n_random, cfg.h_variant, cfg.seed, cfg.chunk_size)
    if hasattr(prompts, "stack"):
        prompts.check_compatible(model)
        names = names or prompts.names
        prompts = prompts.stack()
    prompts = torch.as_tensor(prompts).float()
    if prompts.dim() not in (3, 4) or prompts.shape[0] < 2:
        raise UserInputError("interference needs a stack of at least two prompts (K, T, D) or (K, depth, T, D), got "
                             f"{tuple(prompts.shape)}.")
    model.check_prompt(prompts[0], "prompts")
    k = prompts.shape[0]
    names = list(names) if names is not None else [f"source_{i}" for i in range(k)]
    m = k if n_random is None else int(n_random)

    tokens, y = target_tokens(model, task_or_images, labels, n_samples, seed)
    check_finite_features(model, tokens, prompts, names)
    device = model.device

    # One gradient pass over the sources and the random prompts together.
    if callback:
        callback({"stage": "gradients", "prompts": k + m})
    rand = random_prompts(prompts, m, seed)
    both = torch.cat([prompts, rand])
    out = prompt_gradients(model, tokens, both.to(device), target_loss_fn(y, "hscore", h_variant),
                           chunk_size=chunk_size)
    grads = out.grads.float().cpu()
    g_src, g_rand = grads[:k], grads[k:]
    hs = (-out.losses[:k]).double().cpu()

    cos = {"raw": cosine_matrix(g_src), "centred": centred_cosines(g_src)}
    null = {"raw": cosine_matrix(g_rand), "centred": centred_cosines(g_rand)}
    band = {v: (float(_off_diagonal(null[v]).min()), float(_off_diagonal(null[v]).max())) for v in VARIANTS}
    layer_cos = layer_band = None
    if prompts.dim() == 4:
        depth = prompts.shape[1]
        layer_cos, layer_band = {}, {}
        for v, fn in (("raw", cosine_matrix), ("centred", centred_cosines)):
            layer_cos[v] = torch.stack([fn(g_src[:, layer]) for layer in range(depth)]).numpy()
            nl = [_off_diagonal(fn(g_rand[:, layer])) for layer in range(depth)]
            layer_band[v] = np.array([[float(x.min()), float(x.max())] for x in nl])

    # grads are of -H, so grad H(P_i) = -g_i.
    diff = prompts[None] - prompts[:, None]  # (K, K, *S): P_j - P_i at [i, j]
    directional = -(g_src[:, None].double() * diff.double()).reshape(k, k, -1).sum(-1)

    t = torch.linspace(0, 1, points, dtype=torch.float64)
    report = (lambda done, total: callback({"stage": "segments", "done": done, "total": total})) if callback else None
    seg = segment_hscores(model, tokens, y, prompts, t, hs, h_variant, progress=report, should_stop=should_stop)
    mix = mixing_loss(seg, t)
    return InterferenceResult(
        names=names, t=t.numpy(), source_hscores=hs.numpy(), segment=seg.numpy(), mixing_loss=mix.numpy(),
        directional=directional.numpy(), cosine={v: c.numpy() for v, c in cos.items()},
        null={v: c.numpy() for v, c in null.items()}, null_band=band, layer_cosine=layer_cos,
        layer_null_band=layer_band, n_samples=int(tokens.shape[0]), seed=int(seed),
        seconds=time.perf_counter() - t0,
    )


def simplex_hscores(model, prompts: torch.Tensor, task_or_images, labels: torch.Tensor | None = None, *,
                    resolution: int = 10, n_samples: int | str | None = "auto",
                    h_variant: HScoreVariant = H_VARIANTS.default,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The H-score over a grid of the simplex of ``prompts: (k, *S)`` (``k`` small, 3 for a triangle).

    Returns the weights ``(M, k)`` and the H-scores ``(M,)``; all grid prompts go through one batched pass.
    """
    prompts = torch.as_tensor(prompts).float()
    model.check_prompt(prompts[0], "prompts")
    tokens, y = target_tokens(model, task_or_images, labels, n_samples, seed)
    w = simplex_points(prompts.shape[0], resolution)
    grid = torch.tensordot(w.float(), prompts, dims=1)  # (M, *S)
    return w.numpy(), hscores_at(model, tokens, y, grid, h_variant).numpy()
