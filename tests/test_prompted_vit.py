import pytest
import torch
import torch.nn as nn

from core import PromptedViT, UnsafeFileError, UserInputError
from core.model.toy import TINY, toy_model


def _x(n=5, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg"},
                                {"reg_tokens": 2}])
def test_no_prompt_equals_timm_pre_logits(kw):
    m = toy_model(**kw)
    x = _x()
    ref = m.backbone.forward_head(m.backbone.forward_features(x), pre_logits=True)
    torch.testing.assert_close(m(x), ref)


def test_backbone_frozen_and_stays_in_eval():
    m = toy_model()
    assert not any(p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert m.training and not m.backbone.training
    assert not any(mod.training for mod in m.backbone.modules())


@pytest.mark.parametrize("deep", [False, True])
def test_batched_equals_one_by_one(deep):
    m = toy_model()
    shape = (3, m.depth, 4, m.embed_dim) if deep else (3, 4, m.embed_dim)
    prompts = torch.randn(shape)
    x = _x()
    batched = m.forward_tokens_batched(m.embed(x), prompts)
    assert batched.shape == (3, 5, m.embed_dim)
    for k in range(3):
        torch.testing.assert_close(batched[k], m(x, prompts[k]), rtol=1e-5, atol=1e-5)


def test_prompt_changes_features_and_is_not_pooled():
    m = toy_model(global_pool="avg")
    x = _x()
    p = torch.randn(4, m.embed_dim) * 3
    assert not torch.allclose(m(x, p), m(x), atol=1e-4)
    # With no blocks the prompt tokens cannot reach the patch tokens: if they were pooled, features would change.
    m0 = toy_model(global_pool="avg", depth=0)
    torch.testing.assert_close(m0(x, p), m0(x))


def test_deep_prompt_layers_all_matter():
    m = toy_model()
    x = _x()
    p = torch.randn(m.depth, 4, m.embed_dim)
    q = p.clone()
    # only the second block's prompt changes (not a constant shift: LayerNorm removes it)
    q[1] = torch.randn(4, m.embed_dim) * 3
    assert not torch.allclose(m(x, p), m(x, q), atol=1e-5)


def _hand_written_vpt(vit, x, prompt):
    """VPT written out on timm's stages: prompt tokens after the prefix tokens, replaced before every block for a deep
    prompt, dropped before the pooling (Jia et al. 2022, Fig. 2)."""
    p = vit.num_prefix_tokens
    deep = prompt.dim() == 3
    layers = prompt if deep else prompt[None]
    t = layers.shape[1]
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    h = torch.cat([h[:, :p], layers[0].expand(len(x), -1, -1), h[:, p:]], dim=1)
    for i, blk in enumerate(vit.blocks):
        if deep and i > 0:
            h = torch.cat([h[:, :p], layers[i].expand(len(x), -1, -1), h[:, p + t:]], dim=1)
        h = blk(h)
    h = torch.cat([h[:, :p], h[:, p + t:]], dim=1)
    return vit.forward_head(vit.norm(h), pre_logits=True)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg"}, {"reg_tokens": 2}, {"depth": 3}])
@pytest.mark.parametrize("deep", [False, True])
def test_prompt_insertion_equals_a_hand_written_concatenation(kw, deep):
    m = toy_model(**kw)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randn((m.depth, 3, m.embed_dim) if deep else (3, m.embed_dim), generator=g)
    x = _x(6)
    torch.testing.assert_close(m(x, prompt), _hand_written_vpt(m.backbone, x, prompt), rtol=1e-5, atol=1e-5)
    if deep:  # a deep prompt whose later layers are changed gives other features: every block's tokens are used
        other = prompt.clone()
        other[-1] += 2.0 * torch.randn(other[-1].shape, generator=g)
        torch.testing.assert_close(m(x, other), _hand_written_vpt(m.backbone, x, other), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(x, other), m(x, prompt), atol=1e-4)


def test_gradients_reach_prompt_not_backbone():
    m = toy_model()
    p = torch.randn(4, m.embed_dim, requires_grad=True)
    f = m(_x(), p)
    # Not f.sum(): the final LayerNorm starts with weight 1 and bias 0, so each feature vector sums to 0 exactly
    # and that sum's gradient is 0 up to rounding.
    (f * torch.linspace(-1, 1, f.shape[1])).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 1e-3
    assert all(q.grad is None for q in m.backbone.parameters())


@pytest.mark.parametrize("shape,match",
                         [((4, 31), "width D=31"), ((5, 4, 32), "5 layers"), ((2, 3, 4, 32), r"\(T, D\)")])
def test_incompatible_prompts_refused(shape, match):
    m = toy_model()
    with pytest.raises(UserInputError, match=match):
        m(_x(), torch.randn(shape))


def test_wrong_image_size_refused():
    with pytest.raises(UserInputError, match="expects"):
        toy_model()(torch.randn(2, 3, 32, 32))


def test_fingerprint_tracks_weights():
    a, b = toy_model(seed=0), toy_model(seed=0)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    c = toy_model(seed=1)
    assert c.fingerprint != a.fingerprint


def test_save_and_load_round_trip(tmp_path):
    m = toy_model()
    m.save(tmp_path / "bb")
    m2 = PromptedViT.from_directory(tmp_path / "bb")
    assert m2.fingerprint == m.fingerprint
    x = _x()
    torch.testing.assert_close(m2(x), m(x))


def test_tampered_weights_detected(tmp_path):
    from safetensors.torch import load_file, save_file

    m = toy_model()
    m.save(tmp_path / "bb")
    state = load_file(str(tmp_path / "bb" / "model.safetensors"))
    state["cls_token"] += 1
    save_file(state, str(tmp_path / "bb" / "model.safetensors"))
    with pytest.raises(UserInputError, match="fingerprint"):
        PromptedViT.from_directory(tmp_path / "bb")


def test_pickle_checkpoint_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(UnsafeFileError, match="pickle"):
        PromptedViT.create("vit_tiny_patch16_224", checkpoint=str(path), **TINY)


def test_checkpoint_for_other_architecture_refused(tmp_path):
    m = toy_model(embed_dim=48, num_heads=2)
    m.save(tmp_path / "bb")
    with pytest.raises(UserInputError, match="does not fit"):
        PromptedViT.create("vit_tiny_patch16_224", checkpoint=str(tmp_path / "bb" / "model.safetensors"), **TINY)


def test_unknown_model_and_non_vit():
    with pytest.raises(UserInputError, match="no model named"):
        PromptedViT.create("vit_does_not_exist")
    with pytest.raises(UserInputError, match="not a timm VisionTransformer"):
        PromptedViT(nn.Linear(2, 2))


def test_data_config_uses_backbone_size():
    m = toy_model()
    assert m.data_config()["input_size"] == (3, 16, 16)
    from PIL import Image

    img = Image.new("RGB", (40, 30))
    assert m.transform()(img).shape == (3, 16, 16)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": False, "qk_norm": True, "init_values": 0.5}, {"reg_tokens": 2}])
@pytest.mark.parametrize("kind", ["none", "shallow", "deep"])
def test_class_token_only_last_block_gives_the_full_blocks_features_and_gradients(kw, kind):
    m = toy_model(**kw)
    assert m._cls_only_last_block()
    x = m.embed(_x(6))
    shape = {"none": None, "shallow": (4, m.embed_dim), "deep": (m.depth, 4, m.embed_dim)}[kind]
    prompt = None if shape is None else torch.randn(shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    outs = []
    for cls_only, fused in ((True, True), (True, False), (False, True)):
        m._cls_only = cls_only
        m.backbone.blocks[-1].attn.fused_attn = fused
        f = m.forward_tokens(x, prompt)
        g = None if prompt is None else torch.autograd.grad((f * torch.linspace(-1, 1, f.shape[1])).sum(), prompt)[0]
        outs.append((f.detach(), g))
    for f, g in outs[:2]:
        torch.testing.assert_close(f, outs[2][0], rtol=1e-5, atol=1e-5)
        if g is not None:
            torch.testing.assert_close(g, outs[2][1], rtol=1e-4, atol=1e-6)


def test_class_token_only_path_is_not_used_where_it_would_change_the_features():
    assert not toy_model(global_pool="avg")._cls_only_last_block()
    assert not toy_model(class_token=False, global_pool="avg")._cls_only_last_block()
    assert not toy_model(depth=0)._cls_only_last_block()
