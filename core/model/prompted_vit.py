"""A frozen timm Vision Transformer with visual prompts (VPT).

Visual Prompt Tuning (Jia et al., ECCV 2022): ``T`` learnable tokens of width
``D`` are inserted after the class/prefix tokens and before the patch tokens.
Shallow prompts ``(T, D)`` enter at the input only; deep prompts
``(depth, T, D)`` replace the prompt tokens before every block. Prompt tokens
are dropped again before pooling, so the pooled features are timm's own
pre-logits features computed with the prompt in the sequence.

The backbone never changes: its parameters do not require gradients and it
stays in eval mode whatever ``train()`` is called with.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import IncompatiblePromptError, UserInputError
from ..io.safe_io import atomic_write_json, load_state_dict, save_tensors


def _import_timm():
    import timm  # imported lazily: timm imports torchvision, which is slow to import
    from timm.models.vision_transformer import VisionTransformer

    from . import hybrid  # noqa: F401 - registers the embedded default's architecture with timm

    return timm, VisionTransformer


def prompt_kind(prompt: torch.Tensor) -> str:
    """``"shallow"`` for ``(T, D)``, ``"deep"`` for ``(depth, T, D)``."""
    if prompt.dim() == 2:
        return "shallow"
    if prompt.dim() == 3:
        return "deep"
    raise UserInputError(
        f"a prompt must have shape (T, D) (shallow) or (depth, T, D) (deep), got {tuple(prompt.shape)}."
    )


class PromptedViT(nn.Module):
    """A frozen timm ``VisionTransformer`` that evaluates one or many visual prompts.

    ``backbone``: a timm ``VisionTransformer``; its classifier head is ignored
    (features are the pooled pre-logits features, ``(B, D)``).
    ``name``: the timm model name, kept for the prompt bank's metadata.
    ``config``: keyword arguments that recreate the backbone with :meth:`create`.
    """

    def __init__(self, backbone: nn.Module, name: str = "custom", config: dict[str, Any] | None = None):
        super().__init__()
        _, VisionTransformer = _import_timm()
        if not isinstance(backbone, VisionTransformer):
            raise UserInputError(
                f"{type(backbone).__name__} is not a timm VisionTransformer; visual prompts need one "
                "(e.g. 'vit_tiny_patch16_224', 'vit_base_patch16_224.augreg_in21k')."
            )
        if getattr(backbone, "dynamic_img_size", False):
            raise UserInputError("dynamic_img_size=True ViTs are not supported; create the model with a fixed "
                                 "img_size.")
        self.backbone = backbone
        self.name = name
        self.config = dict(config or {})
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self._fingerprint: str | None = None
        self._cls_only: bool | None = None
        # Convolutions run in channels-last layout (see embed): the embedded default's EfficientNet stem is 1.6x
        # faster on the CPU (depthwise convolutions); a plain ViT's patch convolution is unchanged.
        self.backbone.patch_embed.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        name: str,
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> "PromptedViT":
        """A prompted ViT from a timm model name.

        ``pretrained=True`` downloads timm's hub weights (needs internet);
        ``checkpoint`` loads a local ``.safetensors`` state dict (pickle
        checkpoints are refused: convert them once with safetensors); neither
        gives a randomly initialised model whose weights come from ``seed``
        alone (drawn in a forked RNG: the caller's global RNG state is left as
        it was), so the same name, arguments and seed give the same weights
        and fingerprint in every process. ``config["init"]`` records which of
        the three it was. ``kwargs`` go to ``timm.create_model``
        (``img_size``, ``patch_size``, ``depth``, ...).
        """
        timm, _ = _import_timm()
        if pretrained and checkpoint is not None:
            raise UserInputError("give either pretrained=True or a checkpoint file, not both.")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UserInputError(f"seed must be an integer in 0..2**63-1, got {seed!r}.")
        try:
            # timm initialises with torch's global RNG: fork it, so the random weights are a function of the seed
            # (not of whatever ran before in this process) and the caller's RNG stream is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise UserInputError(
                    f"timm has no model named {name!r}; list them with timm.list_models('vit_*')."
                ) from exc
            raise
        except OSError as exc:  # hub unreachable
            raise UserInputError(
                f"could not download pretrained weights for {name!r} ({exc.__class__.__name__}); "
                "this machine cannot reach the model hub. Use a local checkpoint (--checkpoint FILE."
                "safetensors), the embedded default backbone, or pretrained=False."
            ) from exc
        if checkpoint is not None:
            state = load_state_dict(checkpoint)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            mismatch = ""
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
                missing = [k for k in missing if not k.startswith("head.")]
                if missing or unexpected:
                    mismatch = f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            except RuntimeError as exc:  # shape mismatches
                mismatch = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            if mismatch:
                raise UserInputError(
                    f"checkpoint {os.fspath(checkpoint)!r} does not fit timm model {name!r} with "
                    f"{kwargs or 'default arguments'}: {mismatch}. Create the model with the arguments it was trained "
                    "with."
                )
        if checkpoint is not None:
            init = {"kind": "checkpoint", "file": os.path.basename(os.fspath(checkpoint))}
        elif pretrained:
            init = {"kind": "pretrained"}
        else:
            init = {"kind": "random", "seed": seed}
        config = {"model_name": name, "kwargs": kwargs, "init": init}
        return cls(model, name=name, config=config)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> "PromptedViT":
        """Load a backbone saved by :meth:`save` (``config.json`` + ``model.safetensors``)."""
        path = os.fspath(path)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserInputError(f"{path!r} holds no backbone: config.json is missing. Save one with "
                                 "PromptedViT.save().")
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
        model = cls.create(
            config["model_name"], checkpoint=os.path.join(path, "model.safetensors"), **config.get("kwargs", {})
        )
        model.config.update({k: v for k, v in config.items() if k not in ("model_name", "kwargs", "init")})
        if "init" in config:  # the weights come from the folder's file; say how they were first made
            model.config["init"] = {**model.config["init"], "origin": config["init"]}
        if "data_config" in config:
            model.backbone.pretrained_cfg = {**getattr(model.backbone, "pretrained_cfg", {}), **config["data_config"]}
        expected = config.get("fingerprint")
        if expected and expected != model.fingerprint:
            raise UserInputError(
                f"backbone in {path!r} has fingerprint {model.fingerprint} but its config.json records "
                f"{expected}: the weights file was changed or truncated. Rebuild or re-download it."
            )
        return model

    def save(self, path: str | os.PathLike, **extra: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``."""
        os.makedirs(path, exist_ok=True)
        save_tensors(os.path.join(path, "model.safetensors"), self.backbone.state_dict())
        cfg = {**self.config, **extra, "fingerprint": self.fingerprint}
        cfg.setdefault("model_name", self.name)
        atomic_write_json(os.path.join(path, "config.json"), cfg)

    # --------------------------------------------------------------- properties
    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.backbone.num_prefix_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def fingerprint(self) -> str:
        """A short SHA-256 digest of the backbone's weights (names, shapes, values)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key, value in sorted(self.backbone.state_dict().items()):
                t = value.detach().to("cpu", torch.float32).contiguous()
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout, drop-path and norms never switch to training
        return self

    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing config for this backbone, at the backbone's own input size."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(self.backbone)
        cfg["input_size"] = (int(getattr(self.backbone, "in_chans", 3)), *self.backbone.patch_embed.img_size)
        return cfg

    def transform(self):
        """timm's eval transform (resize, crop, normalise) for PIL images."""
        from timm.data import create_transform

        return create_transform(**self.data_config(), is_training=False)

    # --------------------------------------------------------------- checking
    def check_prompt(self, prompt: torch.Tensor, what: str = "prompt") -> str:
        """Raise unless ``prompt`` is a shallow ``(T, D)`` or deep ``(depth, T, D)`` prompt for this backbone."""
        kind = prompt_kind(prompt)
        if prompt.shape[-1] != self.embed_dim:
            raise IncompatiblePromptError(
                f"{what} has width D={prompt.shape[-1]} but the backbone {self.name!r} has width {self.embed_dim}; "
                "use prompts tuned on this backbone."
            )
        if kind == "deep" and prompt.shape[0] != self.depth:
            raise IncompatiblePromptError(
                f"deep {what} has {prompt.shape[0]} layers but the backbone {self.name!r} has {self.depth} blocks; "
                "use prompts tuned on this backbone."
            )
        if prompt.shape[-2] < 1:
            raise UserInputError(f"{what} has no tokens (T=0); use T >= 1.")
        return kind

    # ---------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, P + L, D)`` before the blocks (P prefix, L patches).

        The embedding does not depend on the prompt, so callers may compute it
        once and reuse it (it is frozen).
        """
        if x.dim() != 4:
            raise UserInputError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}.")
        expected = tuple(self.backbone.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise UserInputError(
                f"images are {tuple(x.shape[-2:])} pixels but the backbone expects {expected}; "
                "preprocess them with PromptedViT.transform()."
            )
        vit = self.backbone
        t = vit.patch_embed(x.contiguous(memory_format=torch.channels_last))
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        return vit.norm_pre(t)

    def forward_rows(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features ``(M, D)`` of tokens ``(M, P + L, D)``, each row with its own prompt.

        ``rows``: ``None`` (no prompt), ``(M, T, D)`` shallow or ``(M, depth, T, D)`` deep prompts.
        This is the one place prompts meet the blocks; every other forward is built on it.
        """
        vit = self.backbone
        p = self.num_prefix_tokens
        x = tokens
        blocks = list(vit.blocks)
        # With class-token pooling only the class token leaves the last block: it alone gets the last block's
        # query, attention output and MLP (the other tokens still give keys and values). Same features, about
        # a seventh fewer FLOPs on this backbone, forward and backward.
        last_cls_only = self._cls_only_last_block() and not vit.training

        def run(i, blk, x):
            return _class_token_block(blk, x) if last_cls_only and i == len(blocks) - 1 else blk(x)

        if rows is None:
            for i, blk in enumerate(blocks):
                x = run(i, blk, x)
        else:
            deep = rows.dim() == 4
            rows = rows.to(x.dtype)
            first = rows[:, 0] if deep else rows  # (M, T, D)
            n_prompt = first.shape[1]
            x = torch.cat([x[:, :p], first, x[:, p:]], dim=1)  # (M, P + T + L, D)
            for i, blk in enumerate(blocks):
                if deep and i > 0:
                    x = torch.cat([x[:, :p], rows[:, i], x[:, p + n_prompt :]], dim=1)
                x = run(i, blk, x)
            if not last_cls_only:  # (the class-token block already returns the class token alone)
                x = torch.cat([x[:, :p], x[:, p + n_prompt :]], dim=1)  # prompts are not pooled
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)

    def _cls_only_last_block(self) -> bool:
        """True when the pooled features depend on the last block's class-token output alone and that block
        is timm's plain pre-norm ``Block`` with its plain ``Attention`` (anything else runs the usual way)."""
        if self._cls_only is None:
            from timm.layers.attention import Attention
            from timm.models.vision_transformer import Block

            vit = self.backbone
            blk = vit.blocks[-1] if len(vit.blocks) else None
            self._cls_only = bool(
                blk is not None and type(blk) is Block and type(blk.attn) is Attention
                and getattr(blk.attn, "gate", None) is None and getattr(vit, "global_pool", None) == "token"
                and getattr(vit, "attn_pool", None) is None and getattr(vit, "cls_token", None) is not None
                and self.num_prefix_tokens >= 1
            )
        return self._cls_only

    def forward_tokens(self, tokens: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``(B, D)`` of embedded tokens ``(B, P + L, D)`` under one prompt (or none)."""
        if prompt is None:
            return self.forward_rows(tokens, None)
        self.check_prompt(prompt)
        rows = prompt.unsqueeze(0).expand(tokens.shape[0], *prompt.shape)
        return self.forward_rows(tokens, rows)

    def forward_tokens_batched(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Features ``(K, B, D)`` of tokens ``(B, P + L, D)`` under K prompts in one pass.

        ``prompts``: ``(K, T, D)`` shallow or ``(K, depth, T, D)`` deep. The K
        prompts are stacked along the batch axis, so a single forward (and a
        single backward) serves all of them.
        """
        if prompts.dim() not in (3, 4):
            raise UserInputError(
                f"a stack of prompts must have shape (K, T, D) or (K, depth, T, D), got {tuple(prompts.shape)}."
            )
        self.check_prompt(prompts[0], "prompts")
        k, b = prompts.shape[0], tokens.shape[0]
        rows = prompts.unsqueeze(1).expand(k, b, *prompts.shape[1:]).reshape(k * b, *prompts.shape[1:])
        x = tokens.unsqueeze(0).expand(k, *tokens.shape).reshape(k * b, *tokens.shape[1:])
        return self.forward_rows(x, rows).reshape(k, b, -1)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> features ``(B, D)`` under ``prompt`` (``(T, D)``, ``(depth, T, D)`` or None)."""
        return self.forward_tokens(self.embed(x), prompt)


def _class_token_block(blk, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward(x)[:, :1]`` (eval mode) without computing the other tokens' outputs.

    Keys and values come from every token; the query, the attention output, the projection and the MLP
    only from the class token (position 0). Mirrors timm's ``Block`` and ``Attention`` forward.
    """
    attn = blk.attn
    b, n, _ = x.shape
    h = blk.norm1(x)
    a = attn.attn_dim if hasattr(attn, "attn_dim") else attn.num_heads * attn.head_dim
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], w[:a], None if bias is None else bias[:a])
    kv = F.linear(h, w[a:], None if bias is None else bias[a:])
    q = q.reshape(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    o = attn.proj(attn.norm(o.transpose(1, 2).reshape(b, 1, a)))
    y = x[:, :1] + blk.drop_path1(blk.ls1(o))
    return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
