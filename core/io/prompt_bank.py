"""A bank of source prompts: safetensors tensors with JSON metadata.

Each prompt is two files, ``NAME.safetensors`` (one tensor, ``"prompt"``) and
``NAME.json`` (name, source task, backbone name and weight fingerprint, T, D,
shallow or deep, source accuracy, training config). A prompt is only
meaningful for the exact backbone weights it was tuned on, so loading checks
the fingerprint and the shape against the backbone in use and refuses a
mismatch, naming both sides. Nothing is ever unpickled.

A bank whose prompts were all tuned from one shared start ``P0`` records it (``_start.safetensors`` and
``_bank.json``: how it was made, and its digest, checked on load), so that each source's task vector
``P_k - P0`` is defined (:mod:`core.method.mixing`). A prompt equal to the start (never tuned) or to another prompt
of the bank is flagged (``bank.notes`` and a ``UserWarning``).
"""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..errors import IncompatiblePromptError, UnsafeFileError, UserInputError
from .digest import tensor_digest
from .safe_io import SCHEMAS, atomic_write_json, load_json, load_tensors, save_tensors

FORMAT_VERSION = 1
START_FILE, BANK_FILE = "_start.safetensors", "_bank.json"
#: Two prompts closer than this (relative to their norm) are the same prompt for the bank's flags.
SAME = 1e-6
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith((".json", ".safetensors")):
        raise UserInputError(
            f"prompt name {name!r} is not allowed; use 1-100 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit."
        )
    return name


@dataclass
class SourcePrompt:
    """One source prompt and where it came from.

    ``prompt``: ``(T, D)`` shallow or ``(depth, T, D)`` deep.
    """

    name: str
    prompt: torch.Tensor
    source_task: str = "unknown"
    backbone: str = "unknown"
    backbone_fingerprint: str = ""
    source_accuracy: float | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # where an imported prompt came from (core.io.importers)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.prompt.dim() not in (2, 3):
            raise UserInputError(
                f"prompt {self.name!r} has shape {tuple(self.prompt.shape)}; expected (T, D) or (depth, T, D)."
            )
        self.prompt = self.prompt.detach().float().cpu()

    @property
    def kind(self) -> str:
        return "shallow" if self.prompt.dim() == 2 else "deep"

    @property
    def num_tokens(self) -> int:
        return int(self.prompt.shape[-2])

    @property
    def embed_dim(self) -> int:
        return int(self.prompt.shape[-1])

    @property
    def depth(self) -> int | None:
        return int(self.prompt.shape[0]) if self.kind == "deep" else None

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "source_task": self.source_task,
            "backbone": self.backbone,
            "backbone_fingerprint": self.backbone_fingerprint,
            "kind": self.kind,
            "num_tokens": self.num_tokens,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "source_accuracy": self.source_accuracy,
            "train_config": self.train_config,
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def save(self, folder: str | os.PathLike) -> str:
        """Write ``NAME.safetensors`` and ``NAME.json`` into ``folder``; returns the tensor file's path."""
        os.makedirs(folder, exist_ok=True)
        tensor_path = os.path.join(folder, f"{self.name}.safetensors")
        save_tensors(tensor_path, {"prompt": self.prompt},
                     {"name": self.name, "backbone_fingerprint": self.backbone_fingerprint})
        atomic_write_json(os.path.join(folder, f"{self.name}.json"), self.metadata())
        return tensor_path

    @classmethod
    def load(cls, tensor_path: str | os.PathLike, json_path: str | os.PathLike | None = None) -> "SourcePrompt":
        """Read a prompt and its metadata; refuse files that do not agree with each other."""
        tensor_path = os.fspath(tensor_path)
        if json_path is None:
            json_path = os.path.splitext(tensor_path)[0] + ".json"
        tensors, _ = load_tensors(tensor_path)
        meta = load_json(json_path, schema=SCHEMAS["prompt"])  # every field checked by type and range
        if set(tensors) != {"prompt"}:
            raise UnsafeFileError(
                f"{tensor_path!r} must hold exactly one tensor named 'prompt', found {sorted(tensors)[:5]}."
            )
        prompt = tensors["prompt"]
        if not prompt.is_floating_point():
            raise UnsafeFileError(f"the prompt in {tensor_path!r} has dtype {prompt.dtype}; prompts are floating "
                                  "point.")
        shape = tuple(prompt.shape)
        expect = {"num_tokens": shape[-2] if len(shape) >= 2 else None, "embed_dim": shape[-1] if shape else None}
        expect["kind"] = {2: "shallow", 3: "deep"}.get(len(shape))
        expect["depth"] = shape[0] if len(shape) == 3 else None
        for key, value in expect.items():
            if key in meta and meta[key] != value:
                raise UnsafeFileError(
                    f"metadata {os.fspath(json_path)!r} says {key}={meta[key]!r} but the tensor in {tensor_path!r} "
                    f"has shape {shape} ({key}={value!r}); the two files do not belong together."
                )
        acc = meta.get("source_accuracy")
        return cls(
            name=meta["name"],
            prompt=prompt,
            source_task=meta.get("source_task") or "unknown",
            backbone=meta.get("backbone") or "unknown",
            backbone_fingerprint=meta["backbone_fingerprint"],
            source_accuracy=None if acc is None else float(acc),
            train_config=dict(meta.get("train_config") or {}),
            provenance=dict(meta.get("provenance") or {}),
        )

    def check_compatible(self, model: Any) -> None:
        """Refuse this prompt unless it was tuned on ``model`` (a :class:`PromptedViT`)."""
        if not self.backbone_fingerprint:
            raise IncompatiblePromptError(
                f"prompt {self.name!r} records no backbone fingerprint, so nothing says which weights it was tuned on; "
                "a prompt only works with the exact weights it was tuned on. Save it again with "
                "backbone_fingerprint set to the backbone's (PromptedViT.fingerprint; this one is "
                f"{model.fingerprint}).")
        if self.backbone_fingerprint != model.fingerprint:
            raise IncompatiblePromptError(
                f"prompt {self.name!r} was tuned on backbone {self.backbone!r} (fingerprint "
                f"{self.backbone_fingerprint}) but the backbone in use is {model.name!r} (fingerprint "
                f"{model.fingerprint}); a prompt only works "
                "with the exact weights it was tuned on. Load the matching backbone or use prompts tuned on this one."
            )
        model.check_prompt(self.prompt, f"prompt {self.name!r}")


class PromptBank:
    """An ordered set of :class:`SourcePrompt` s of one shape, for one backbone.

    ``start``: the shared initial prompt ``P0`` every source was tuned from (None when unknown); ``start_info``: how
    it was made (``{"rule": "vpt_uniform", "seed": 0, ...}``). ``notes``: the prompts flagged as untuned or duplicated.
    """

    def __init__(self, prompts: Iterable[SourcePrompt] = (), start: torch.Tensor | None = None,
                 start_info: dict[str, Any] | None = None):
        self._prompts: dict[str, SourcePrompt] = {}
        self.start = None if start is None else torch.as_tensor(start).detach().float().cpu()
        self.start_info = dict(start_info or {})
        prompts = list(prompts)
        twice = [n for n, c in Counter(p.name for p in prompts).items() if c > 1]
        if twice:  # one list naming a source twice (--sources a,a; a plane of a source with itself), not a clash
            raise UserInputError(f"prompt {twice[0]!r} is named twice among the sources; name each source once.")
        shapes = Counter(tuple(p.prompt.shape) for p in prompts)
        if len(shapes) > 1:  # name the odd ones out, not whichever prompt happened to come after the first
            common = shapes.most_common(1)[0][0]
            odd = [p for p in prompts if tuple(p.prompt.shape) != common]
            raise IncompatiblePromptError(
                f"prompt {odd[0].name!r} has shape {tuple(odd[0].prompt.shape)} but the bank's other prompts have "
                f"shape {common}" + (f" ({len(odd) - 1} more prompt(s) differ too)" if len(odd) > 1 else "")
                + "; an ensemble needs prompts of one shape (shallow and deep prompts, or prompts of other depths, "
                "cannot be mixed).")
        for p in prompts:
            self.add(p)
        if self.start is not None and prompts and tuple(self.start.shape) != tuple(prompts[0].prompt.shape):
            raise IncompatiblePromptError(f"the bank's start has shape {tuple(self.start.shape)} but its prompts have "
                                          f"shape {tuple(prompts[0].prompt.shape)}; they cannot share a start.")
        self.notes = self._flags()
        for note in self.notes:
            warnings.warn(note, UserWarning, stacklevel=2)

    def _flags(self) -> list[str]:
        """Prompts that equal the start (never tuned) or another prompt of the bank."""
        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            return float((a - b).norm()) <= SAME * max(float(a.norm()), float(b.norm()), 1e-12)

        prompts = list(self._prompts.values())
        notes = []
        if self.start is not None:
            notes += [f"prompt {p.name!r} equals the bank's start P0: it was never tuned, so it carries nothing of its "
                      "source task; rebuild it (python -m core build-bank) or leave it out." for p in prompts
                      if same(p.prompt, self.start)]
        for i, a in enumerate(prompts):
            for b in prompts[i + 1:]:
                if same(a.prompt, b.prompt):
                    notes.append(f"prompts {a.name!r} and {b.name!r} are the same tensor: their cosine is +1 and their "
                                 "mixing loss 0 by construction, not because the sources agree; keep one of them.")
        return notes

    def add(self, prompt: SourcePrompt) -> None:
        if prompt.name in self._prompts:
            raise UserInputError(f"the bank already holds a prompt named {prompt.name!r}; rename one of them.")
        if self._prompts:
            first = next(iter(self._prompts.values()))
            if first.prompt.shape != prompt.prompt.shape:
                raise IncompatiblePromptError(
                    f"prompt {prompt.name!r} has shape {tuple(prompt.prompt.shape)} but the bank's prompts have shape "
                    f"{tuple(first.prompt.shape)} (prompt {first.name!r}); an ensemble needs prompts of one shape."
                )
            if first.backbone_fingerprint != prompt.backbone_fingerprint:
                raise IncompatiblePromptError(
                    f"prompt {prompt.name!r} was tuned on backbone fingerprint {prompt.backbone_fingerprint} but "
                    f"{first.name!r} on {first.backbone_fingerprint}; a bank holds prompts of one backbone."
                )
        self._prompts[prompt.name] = prompt

    @classmethod
    def load(cls, folder: str | os.PathLike, model: Any | None = None,
             names: Iterable[str] | None = None) -> "PromptBank":
        """Every ``*.safetensors`` prompt in ``folder`` (or only ``names``), checked against ``model`` if given."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise UserInputError(f"prompt bank folder {folder!r} does not exist; check the path.")
        available = sorted(f[: -len(".safetensors")] for f in os.listdir(folder)
                           if f.endswith(".safetensors") and not f.startswith((".", "_")))
        files = [_find(folder, n, available) for n in names] if names is not None else available
        prompts = [SourcePrompt.load(os.path.join(folder, f"{stem}.safetensors")) for stem in files]
        if model is not None:  # each prompt against the backbone first: a wrong one is named by its own fault
            for p in prompts:
                p.check_compatible(model)
        start, info = load_start(folder)
        return cls(prompts, start, info)

    def save(self, folder: str | os.PathLike) -> None:
        for p in self:
            p.save(folder)
        if self.start is not None:
            save_start(folder, self.start, self.start_info)

    def check_compatible(self, model: Any) -> None:
        for p in self:
            p.check_compatible(model)

    def subset(self, names: Iterable[str]) -> "PromptBank":
        """The prompts called ``names`` (their metadata names), in that order."""
        names = list(names)
        missing = [n for n in names if n not in self._prompts]
        if missing:
            raise UserInputError(f"no prompt named {missing} in the bank; available: {self.names}.")
        return PromptBank((self._prompts[n] for n in names), self.start, self.start_info)

    def stack(self) -> torch.Tensor:
        """All prompts stacked: ``(K, T, D)`` or ``(K, depth, T, D)``."""
        if not self._prompts:
            raise UserInputError("the prompt bank is empty; add source prompts first.")
        return torch.stack([p.prompt for p in self])

    @property
    def names(self) -> list[str]:
        return list(self._prompts)

    def __len__(self) -> int:
        return len(self._prompts)

    def __iter__(self) -> Iterator[SourcePrompt]:
        return iter(self._prompts.values())

    def __getitem__(self, key: str | int) -> SourcePrompt:
        if isinstance(key, int):
            return list(self._prompts.values())[key]
        return self._prompts[key]

    def __repr__(self) -> str:
        return f"PromptBank({self.names})"


def _find(folder: str, name: str, stems: list[str]) -> str:
    """The file stem of the prompt called ``name``: its file name, or the name in its metadata."""
    if name in stems:
        return name
    for stem in stems:
        try:
            meta = load_json(os.path.join(folder, f"{stem}.json"))
        except UserInputError:
            continue
        if isinstance(meta, dict) and meta.get("name") == name:
            return stem
    raise UserInputError(f"no prompt named {name!r} in {folder!r} (by file name or by the name in its .json); "
                         f"available: {stems}.")


def save_start(folder: str | os.PathLike, start: torch.Tensor, info: dict[str, Any]) -> None:
    """Write a bank's shared start: the tensor and a ``_bank.json`` that says how it was made, with its digest."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, START_FILE), {"prompt": start.detach().float().cpu()})
    atomic_write_json(os.path.join(folder, BANK_FILE), {"format_version": FORMAT_VERSION,
                                                        "start": {**info, "digest": tensor_digest(start.float())}})


def load_start(folder: str | os.PathLike) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """A bank's shared start and how it was made; ``(None, {})`` for a bank that records none. A start whose
    tensor does not match the digest ``_bank.json`` records is refused (the file was changed or swapped)."""
    folder = os.fspath(folder)
    meta_path = os.path.join(folder, BANK_FILE)
    if not os.path.isfile(meta_path):
        return None, {}
    info = load_json(meta_path, schema=SCHEMAS["bank"])["start"]
    if not os.path.isfile(os.path.join(folder, START_FILE)):
        raise UserInputError(
            f"the bank in {folder!r} records a shared start ({BANK_FILE}) but its start tensor {START_FILE} is "
            "missing, so its task vectors are undefined. Restore that file from where the bank came from, or rebuild "
            f"the bank: python -m core build-bank --out {folder} --overwrite --seed {info.get('seed', 0)} --task ... "
            f"(one --task per source).")
    tensors, _ = load_tensors(os.path.join(folder, START_FILE))
    if set(tensors) != {"prompt"}:
        raise UnsafeFileError(f"{os.path.join(folder, START_FILE)!r} must hold one tensor named 'prompt'.")
    start = tensors["prompt"].float()
    if tensor_digest(start) != info["digest"]:
        raise UnsafeFileError(f"the start in {os.path.join(folder, START_FILE)!r} is not the one {meta_path!r} records "
                              "(its digest differs): the file was changed or swapped. Rebuild the bank, or restore "
                              "the start it was tuned from.")
    return start, {k: v for k, v in info.items() if k != "digest"}
