import numpy as np
import pytest
import torch

from core import UserInputError, h_score
from core.analysis.maps import embed_2d
from core.method.scoring import hscores_at
from core.model.features import prompt_features
from core.model.tokens import embed_images


def test_feature_shapes_and_batching(model, bank, task):
    x, y = task.tensors("train", model.transform(), "t")
    tok = embed_images(model, x[:10])
    plain = prompt_features(model, tok)
    assert plain.shape == (10, model.embed_dim)
    # With no prompt the features are timm's own pre-logits features.
    ref = model.backbone.forward_head(model.backbone.forward_features(x[:10]), pre_logits=True)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    f = prompt_features(model, tok, bank.stack(), batch_size=4, prompts_per_pass=2)
    assert f.shape == (3, 10, model.embed_dim)
    torch.testing.assert_close(f[1], model.forward_tokens(tok, bank[1].prompt), rtol=1e-5, atol=1e-5)
    # The scorer's H-scores are the H-scores of these features.
    hs = hscores_at(model, tok, y[:10], bank.stack())
    torch.testing.assert_close(hs, torch.stack([h_score(fk, y[:10]).double() for fk in f]), rtol=1e-6, atol=1e-6)


def test_pca_map_deterministic():
    f = np.random.default_rng(0).normal(size=(40, 8))
    a, b = embed_2d(f, "pca", seed=1), embed_2d(f, "pca", seed=1)
    assert a.shape == (40, 2)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # UMAP's first call in a process compiles numba's code: about 35 s on 2 cores
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

    from core.analysis.maps import maps_2d

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
    from core.analysis.maps import maps_2d

    rng = np.random.default_rng(1)
    feats = {"a": rng.normal(size=(50, 8)), "ensemble": rng.normal(size=(50, 8)) * 3}
    own, _ = maps_2d(feats, "pca")
    shared, shown = maps_2d(feats, "pca", fit_on="ensemble")
    np.testing.assert_allclose(np.abs(shared["ensemble"]), np.abs(own["ensemble"]), atol=1e-8)
    assert not np.allclose(np.abs(shared["a"]), np.abs(own["a"]))
    assert list(shown) == list(range(50))
    with pytest.raises(UserInputError, match="fit_on"):
        maps_2d(feats, "pca", fit_on="missing")
