"""2-D maps of prompt-induced features (PCA, UMAP, held-out LDA).

UMAP (McInnes et al., 2018) is imported lazily: its first import and numba
compile take seconds, so PCA is the instant default. Tiny data is handled the
way umap-learn users expect: ``n_neighbors`` is clamped to ``N - 1`` with a
warning, and spectral initialisation falls back to random initialisation.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

from ..errors import UserInputError

MapMethod = Literal["pca", "umap", "lda"]


def embed_2d(
    features: torch.Tensor | np.ndarray,
    method: MapMethod = "pca",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> np.ndarray:
    """A 2-D map ``(N, 2)`` of ``features: (N, D)``; seeded and deterministic."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise UserInputError(f"features must have shape (N, D), got {x.shape}.")
    n = x.shape[0]
    if n < 3:
        raise UserInputError(f"a 2-D map needs at least 3 points, got {n}.")
    if not np.isfinite(x).all():
        raise UserInputError("features contain NaN or infinite values; they cannot be mapped.")
    x = x.astype(np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA  # sklearn and umap imported lazily: `import core` stays fast

        if x.shape[1] < 2:
            return np.concatenate([x - x.mean(0), np.zeros((n, 1))], axis=1)
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap  # lazy: slow first import and numba compile
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise UserInputError("UMAP needs the umap-learn package: pip install umap-learn (or use "
                                 "method='pca').") from exc
        k = n_neighbors
        if k >= n:
            k = max(2, n - 1)
            warnings.warn(f"n_neighbors={n_neighbors} is not smaller than the {n} points; using {k}.", stacklevel=2)
        kwargs = dict(n_components=2, n_neighbors=k, min_dist=min_dist, random_state=seed, n_jobs=1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            if n <= k + 2:
                return umap.UMAP(init="random", **kwargs).fit_transform(x)
            try:
                return umap.UMAP(init="spectral", **kwargs).fit_transform(x)
            except (ValueError, TypeError, np.linalg.LinAlgError) as exc:  # spectral init fails on tiny/degenerate data
                warnings.warn(f"spectral initialisation failed ({exc}); using random initialisation.", stacklevel=2)
                return umap.UMAP(init="random", **kwargs).fit_transform(x)
    raise UserInputError(f"unknown map method {method!r}; use 'pca' or 'umap'.")


def _lda_axes(x: np.ndarray, y: np.ndarray, seed: int):
    """A fitted 2-D discriminant map: shrinkage LDA's axes (its first axis and the first principal component beside it
    when there are only two classes, which give LDA one axis)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    n_classes = len(np.unique(y))
    if n_classes < 2:
        raise UserInputError("an LDA map needs at least two classes among the points; use PCA or UMAP.")
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto", n_components=min(2, n_classes - 1)).fit(x, y)
    if n_classes > 2:
        return lda.transform
    pca = PCA(n_components=1, random_state=seed).fit(x)
    return lambda z: np.concatenate([lda.transform(z), pca.transform(z)], axis=1)


def maps_2d(
    features: dict[str, torch.Tensor | np.ndarray],
    method: MapMethod = "pca",
    labels: np.ndarray | None = None,
    fit_on: str | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """2-D maps of several feature sets of the same ``N`` images; returns ``(coords by name, shown)`` where
    ``shown`` are the indices of the images drawn (every ``coords[name]`` has one row per index in ``shown``).

    ``fit_on=None``: each set gets its own map (PCA or UMAP as :func:`embed_2d`). ``fit_on=name``: one map is fitted on
    that set and every set is put through it, so positions compare across sets. ``method="lda"`` needs ``labels``:
    shrinkage LDA's discriminant axes are fitted on half of the images (every second one) and only the *other* half is
    drawn, so a separation seen on the map holds for images its axes never saw (fitted and drawn on the same points,
    LDA separates the classes of almost any features of this size).
    """
    xs = {}
    for name, f in features.items():
        x = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise UserInputError(f"the features of {name!r} must be a finite (N, D) array, got shape {x.shape}.")
        xs[name] = x.astype(np.float64)
    n = len(next(iter(xs.values())))
    if fit_on is not None and fit_on not in xs:
        raise UserInputError(f"fit_on={fit_on!r} is not one of the feature sets {list(xs)}.")
    if method == "lda":
        if labels is None:
            raise UserInputError("an LDA map needs the images' labels.")
        y = np.asarray(labels)
        fit, shown = np.arange(0, n, 2), np.arange(1, n, 2)
        if len(shown) < 3:
            raise UserInputError(f"an LDA map needs at least 6 points (half to fit, half to draw), got {n}.")
        if fit_on is not None:
            axes = _lda_axes(xs[fit_on][fit], y[fit], seed)
            return {name: axes(x[shown]) for name, x in xs.items()}, shown
        return {name: _lda_axes(x[fit], y[fit], seed)(x[shown]) for name, x in xs.items()}, shown
    shown = np.arange(n)
    if fit_on is None:
        return {name: embed_2d(x, method, seed=seed) for name, x in xs.items()}, shown
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(xs[fit_on])
        return {name: pca.transform(x) for name, x in xs.items()}, shown
    if method == "umap":
        import umap

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            mapper = umap.UMAP(n_components=2, n_neighbors=min(15, max(2, n - 1)), min_dist=0.1, random_state=seed,
                               n_jobs=1).fit(xs[fit_on])
            return {name: (mapper.embedding_ if name == fit_on else mapper.transform(x))
                    for name, x in xs.items()}, shown
    raise UserInputError(f"unknown map method {method!r}; use 'pca', 'umap' or 'lda'.")
