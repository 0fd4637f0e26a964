"""The embedded default's backbone: a small hybrid ViT registered with timm.

A timm ``VisionTransformer`` whose patch embedding is timm's ``HybridEmbed``
over the conv stem and first four stages of EfficientNet-Lite0 (stride 16,
80 channels): a 64 px image becomes 4 x 4 = 16 tokens of width 192, then
6 transformer blocks. This is the hybrid design of timm's ``vit_*_r26_*``
models (and of ViT's own R50 hybrids, Dosovitskiy et al. 2021). Visual
prompts enter as tokens after the embedding, exactly as in VPT.

It is NOT an ImageNet-pretrained ViT: the CNN stages carry ImageNet
EfficientNet-Lite0 weights, and the transformer blocks were distilled here
from that network's pooled features (``scripts/build_assets.py``).
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

MODEL_NAME = "vit_lite0hybrid_s16_64"
DATA_CONFIG = {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}


def lite0_stem() -> nn.Module:
    """EfficientNet-Lite0's stem and stages 0-3 (stride 16, 80 channels), randomly initialised."""
    import timm

    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return nn.Sequential(cnn.conv_stem, cnn.bn1, *cnn.blocks[:4])


def _register() -> None:
    from timm.layers import HybridEmbed
    from timm.models import register_model
    from timm.models._registry import is_model
    from timm.models.vision_transformer import VisionTransformer

    if is_model(MODEL_NAME):
        return

    @register_model
    def vit_lite0hybrid_s16_64(pretrained: bool = False, **kwargs):  # weights come from assets/
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = dict(img_size=64, patch_size=1, embed_dim=192, depth=6, num_heads=3)
        args.update(kwargs)
        model = VisionTransformer(embed_layer=partial(HybridEmbed, backbone=lite0_stem()), **args)
        model.pretrained_cfg = {**DATA_CONFIG, "input_size": (3, args["img_size"], args["img_size"])}
        return model


_register()
