"""Which backbone: one JSON-able spec that the CLI, the Ray workers and the dashboard load in the same way.

A backbone is one of

- the embedded default (``assets/backbone``, what every command uses when told nothing);
- a folder saved by :meth:`core.model.prompted_vit.PromptedViT.save` (``config.json`` + ``model.safetensors``);
- a timm model name with local safetensors weights (``checkpoint``), timm's hub weights (``pretrained``, needs the
  hub), or random weights drawn from ``init_seed`` (the same weights, and so the same fingerprint, in every process).

A :class:`BackboneSpec` says which, with absolute paths, so that it means the same in a Ray worker started elsewhere;
``to_dict`` / ``from_dict`` carry it in a job's payload or an environment variable, and :meth:`BackboneSpec.load`
is the one loader (``core.cli.load_backbone``, ``core.evaluation.setups`` and ``dashboard.state`` call it).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import UserInputError
from ..io import assets
from ..io.digest import settings_digest
from ..options import check_seed
from .device import resolve_device
from .prompted_vit import PromptedViT

EMBEDDED = "embedded"


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith((".", "~")) or os.path.exists(text)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone to load: ``source`` is ``"embedded"``, a saved backbone folder (absolute) or a timm model name.

    ``checkpoint`` (a local ``.safetensors`` state dict), ``pretrained`` (timm's hub weights), ``img_size`` and
    ``init_seed`` (random weights from this seed) apply to a timm model name only.
    """

    source: str = EMBEDDED
    checkpoint: str | None = None
    pretrained: bool = False
    img_size: int | None = None
    init_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise UserInputError("a backbone is 'embedded', a saved backbone folder or a timm model name, got "
                                 f"{self.source!r}.")
        timm_only = {"--checkpoint": self.checkpoint, "--pretrained": self.pretrained or None,
                     "--img-size": self.img_size, "--init-seed": self.init_seed}
        given = [flag for flag, v in timm_only.items() if v is not None]
        if self.kind != "timm" and given:
            where = "the embedded default" if self.kind == "embedded" else f"the saved backbone folder {self.source!r}"
            raise UserInputError(f"{given[0]} applies to a timm model name only; {where} brings its own weights and "
                                 f"input size. Drop {given[0]}, or give --backbone a timm name such as "
                                 "vit_base_patch16_224.")
        if self.pretrained and self.checkpoint is not None:
            raise UserInputError("give either --pretrained (timm's hub weights) or --checkpoint FILE.safetensors, not "
                                 "both.")
        if self.init_seed is not None and (self.pretrained or self.checkpoint is not None):
            raise UserInputError("--init-seed draws random weights; it cannot go with --checkpoint or --pretrained.")
        if self.init_seed is not None:
            check_seed(self.init_seed, "--init-seed")
        if self.img_size is not None and (not isinstance(self.img_size, int) or self.img_size < 1):
            raise UserInputError(f"--img-size must be a positive number of pixels, got {self.img_size!r}.")
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise UserInputError(f"--checkpoint {self.checkpoint!r} does not exist; give a local .safetensors file "
                                 "of the model's weights.")

    # ------------------------------------------------------------- making
    @classmethod
    def from_args(cls, backbone: str | None = None, *, checkpoint: str | None = None, pretrained: bool = False,
                  img_size: int | None = None, init_seed: int | None = None) -> "BackboneSpec":
        """The spec the flags ``--backbone --checkpoint --pretrained --img-size --init-seed`` describe (paths made
        absolute; a path that is not a backbone folder refused, naming it)."""
        if backbone in (None, "", EMBEDDED):
            source = EMBEDDED
        elif os.path.isdir(os.path.expanduser(backbone)):
            source = os.path.realpath(os.path.expanduser(backbone))
        elif _looks_like_path(backbone):
            raise UserInputError(f"--backbone {backbone!r} is not a folder with a saved backbone (config.json and "
                                 "model.safetensors); give such a folder, or a timm model name such as "
                                 "vit_tiny_patch16_224.")
        else:
            source = backbone
        ckpt = None if checkpoint is None else os.path.realpath(os.path.expanduser(checkpoint))
        return cls(source, ckpt, bool(pretrained), img_size, init_seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "BackboneSpec":
        """The spec :meth:`to_dict` wrote (None or ``{}``: the embedded default)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise UserInputError(f"a backbone spec has no field {bad[0]!r}; its fields are {', '.join(sorted(known))}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---------------------------------------------------------- what it is
    @property
    def kind(self) -> str:
        """``"embedded"``, ``"folder"`` or ``"timm"``."""
        if self.source == EMBEDDED:
            return "embedded"
        return "folder" if os.path.isabs(self.source) else "timm"

    @property
    def folder(self) -> str | None:
        """The folder the weights are read from (the embedded default's or a saved one), None for a timm name."""
        if self.kind == "embedded":
            return assets.BACKBONE_DIR
        return self.source if self.kind == "folder" else None

    def key(self) -> str:
        """A cache key: the spec and the size and time of its weight file, so a backbone saved again into the same
        folder is loaded again, never served stale (the fingerprint, read after loading, names the weights)."""
        weights = os.path.join(self.folder, "model.safetensors") if self.folder else self.checkpoint
        stat = os.stat(weights) if weights and os.path.isfile(weights) else None
        return settings_digest(self.to_dict(), stat and (stat.st_size, stat.st_mtime_ns), length=16)

    def describe(self) -> str:
        """One line for a page or a log: what is loaded."""
        if self.kind == "embedded":
            return "the embedded default (assets/backbone)"
        if self.kind == "folder":
            return f"the saved backbone in {self.source}"
        how = ("timm's hub weights" if self.pretrained else f"weights from {self.checkpoint}" if self.checkpoint
               else f"random weights (seed {self.init_seed if self.init_seed is not None else 'default'})")
        return f"timm {self.source} with {how}" + (f" at {self.img_size} px" if self.img_size else "")

    # ------------------------------------------------------------- loading
    def load(self, device: Any = None):
        """The :class:`PromptedViT` this spec names, on ``device`` (None or ``"auto"``: CUDA when present)."""
        if self.kind == "embedded":
            assets.require()
        if self.kind in ("embedded", "folder"):
            model = PromptedViT.from_directory(self.folder)
        else:
            kw: dict[str, Any] = {"img_size": self.img_size} if self.img_size else {}
            if self.init_seed is not None:
                kw["seed"] = self.init_seed
            model = PromptedViT.create(self.source, pretrained=self.pretrained, checkpoint=self.checkpoint, **kw)
        return model.to(resolve_device(device))
