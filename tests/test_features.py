import numpy as np
import pytest
import torch

from core import UserInputError
from core.features import embed_2d, extract_features, source_features, source_hscores


def test_feature_shapes(model, bank, task):
    x, y = task.tensors("train", model.transform(), key="t")
    assert extract_features(model, x[:10]).shape == (10, model.embed_dim)
    f = source_features(model, x[:10], bank.stack(), batch_size=4)
    assert f.shape == (3, 10, model.embed_dim)
    torch.testing.assert_close(f[1], extract_features(model, x[:10], bank[1].prompt), rtol=1e-5, atol=1e-5)
    assert source_hscores(model, x[:20], y[:20], bank.stack()).shape == (3,)


def test_pca_map_deterministic():
    f = np.random.default_rng(0).normal(size=(40, 8))
    a, b = embed_2d(f, "pca", seed=1), embed_2d(f, "pca", seed=1)
    assert a.shape == (40, 2)
    np.testing.assert_array_equal(a, b)


def test_umap_tiny_data_clamps_neighbours():
    f = np.random.default_rng(0).normal(size=(8, 5))
    with pytest.warns(UserWarning, match="n_neighbors=15"):
        m = embed_2d(f, "umap", seed=0)
    assert m.shape == (8, 2) and np.isfinite(m).all()


def test_map_errors():
    with pytest.raises(UserInputError, match="at least 3 points"):
        embed_2d(np.zeros((2, 4)))
    with pytest.raises(UserInputError, match="unknown map method"):
        embed_2d(np.zeros((5, 4)), "tsne")
    with pytest.raises(UserInputError, match="NaN"):
        embed_2d(np.full((5, 4), np.nan))
