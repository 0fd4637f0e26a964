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


def test_lda_map_is_held_out_and_separates_only_real_structure():
    from sklearn.metrics import silhouette_score

    from core.features import maps_2d

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    means = rng.normal(size=(4, 64)) * 0.4
    feats = {"signal": means[y] + rng.normal(size=(300, 64)), "noise": rng.normal(size=(300, 64))}
    coords, shown = maps_2d(feats, "lda", labels=y)
    assert list(shown) == list(range(1, 300, 2))  # drawn: the half the axes were not fitted on
    assert coords["signal"].shape == (150, 2)
    assert silhouette_score(coords["signal"], y[shown]) > 0.15
    assert silhouette_score(coords["noise"], y[shown]) < 0.05  # held out, pure noise shows no classes
    two = maps_2d({"a": feats["signal"]}, "lda", labels=y % 2)[0]["a"]  # two classes: LDA axis + a PCA axis
    assert two.shape == (150, 2) and np.ptp(two[:, 1]) > 0
    with pytest.raises(UserInputError, match="labels"):
        maps_2d(feats, "lda")


def test_a_shared_map_puts_every_set_through_the_one_fitted_on_the_named_set():
    from core.features import maps_2d

    rng = np.random.default_rng(1)
    feats = {"a": rng.normal(size=(50, 8)), "ensemble": rng.normal(size=(50, 8)) * 3}
    own, _ = maps_2d(feats, "pca")
    shared, shown = maps_2d(feats, "pca", fit_on="ensemble")
    np.testing.assert_allclose(np.abs(shared["ensemble"]), np.abs(own["ensemble"]), atol=1e-8)
    assert not np.allclose(np.abs(shared["a"]), np.abs(own["a"]))
    assert list(shown) == list(range(50))
    with pytest.raises(UserInputError, match="fit_on"):
        maps_2d(feats, "pca", fit_on="missing")
