"""Prompts tuned elsewhere, brought into a bank: the VPT layout, or one tensor of a safetensors or ``.npz`` file.

The official VPT code (Jia et al., ECCV 2022; github.com/KMnP/vpt, ``src/models/vit_prompt/vit.py``) and the many
projects built on it keep a prompted ViT's prompt as ``prompt_embeddings`` of shape ``(1, T, D)``, inserted after the
class token, and, for deep prompts, ``deep_prompt_embeddings`` of shape ``(L - 1, T, D)``: one set per block after
the first, each replacing the prompt tokens before its block. With ``PROJECT > -1`` the prompt is kept at a smaller
width and mapped to ``D`` by ``prompt_proj`` (a linear layer), which is applied here. This project's shapes are
``(T, D)`` (shallow) and ``(L, T, D)`` (deep: the input prompt for block 0, then the ``L - 1`` sets), so the two are
one :func:`torch.cat` apart. The result is checked against the backbone (width, depth, token count) and written as
safetensors + JSON (:class:`core.io.prompt_bank.SourcePrompt`) with the backbone's fingerprint and the file's
provenance (its name, SHA-256, the keys read, the layout).

Only here may a torch checkpoint be opened, and only with PyTorch's restricted unpickler
(``torch.load(weights_only=True)``): tensors, dicts, lists and numbers load; a file that names any other Python
object (which could run code) is refused before that object is made. Everything else in the project still refuses
pickle (:mod:`core.io.safe_io`).
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import numpy as np
import torch

from ..errors import IncompatiblePromptError, UnsafeFileError, UserInputError
from .prompt_bank import PromptBank, SourcePrompt, check_name, load_start, save_start
from .safe_io import MAX_CHECKPOINT_BYTES, load_tensors

Format = Literal["vpt", "safetensors", "npz"]
FORMATS: tuple[str, ...] = ("vpt", "safetensors", "npz")
#: What the file is, read from its first bytes (never from its name).
Container = Literal["torch", "safetensors", "npz"]
SHALLOW, DEEP, PROJ = "prompt_embeddings", "deep_prompt_embeddings", "prompt_proj"


@dataclass
class ImportedTensor:
    """A prompt read from a file, in this project's layout, with what was read to make it."""

    prompt: torch.Tensor  # (T, D) or (L, T, D)
    keys: list[str]  # the file's keys it was made from
    layout: str  # how they were mapped, in words
    container: Container


# ------------------------------------------------------------------ containers
def sniff(path: str, shown: str) -> Container:
    """The kind of file ``path`` is, from its first bytes: a torch checkpoint (zip or legacy pickle), safetensors or
    ``.npz``; anything else is refused with what it would take."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise UnsafeFileError(f"{shown!r} starts like a zip file (a torch checkpoint or .npz) but is not a "
                                  "readable one; it is truncated or corrupt. Copy it again.") from exc
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch"
    if head[:1] == b"\x80":
        return "torch"  # a legacy torch.save (a pickle): only the restricted unpickler reads it
    raise UserInputError(
        f"{shown!r} is not a checkpoint: it is neither a torch.save file (.pth/.pt), nor safetensors, nor .npz "
        f"(its first bytes are {head[:8]!r}). Give the checkpoint the prompt was saved in.")


def read_tensors(path: str | os.PathLike, shown: str | None = None) -> tuple[dict[str, torch.Tensor], Container]:
    """Every tensor in a checkpoint, a safetensors or an ``.npz`` file, by its dotted key (nested dicts such as
    ``{"model": state_dict}`` are flattened: ``model.enc.transformer.prompt_embeddings``). ``shown``: the name to
    give the file in messages (an upload's own name, not the server's path)."""
    path = os.fspath(path)
    shown = shown or path
    if not os.path.isfile(path):
        raise UserInputError(f"file {shown!r} does not exist; check the path.")
    size = os.path.getsize(path)
    if size > MAX_CHECKPOINT_BYTES:
        raise UnsafeFileError(f"{shown!r} is {size / 2**30:.1f} GiB, more than the "
                              f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB a checkpoint can be; refused.")
    container = sniff(path, shown)
    if container == "safetensors":
        try:
            tensors, _ = load_tensors(path, MAX_CHECKPOINT_BYTES)
        except UserInputError as exc:
            raise type(exc)(str(exc).replace(path, shown)) from exc
    elif container == "npz":
        tensors = _read_npz(path, shown)
    else:
        tensors = _flatten(_torch_load(path, shown))
    return tensors, container


def _torch_load(path: str, shown: str) -> Any:
    import pickle

    zipped = open(path, "rb").read(4) == b"PK\x03\x04"
    try:
        # weights_only=True: PyTorch's restricted unpickler. Passed explicitly, so no environment variable can turn it
        # off. mmap: a ViT-B checkpoint's 350 MB of weights are not read for the prompt's few kilobytes.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        what = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        named = f" (it names {what.group(1)})" if what else ""
        raise UnsafeFileError(
            f"{shown!r} holds Python objects besides tensors{named}, which could run code when loaded, so it was "
            "refused and nothing in it was run. Where you trust the file, save only its tensors once: "
            "safetensors.torch.save_file({k: v for k, v in torch.load(FILE, weights_only=False)['model'].items() "
            "if 'prompt' in k}, 'prompt.safetensors'), then import that file.") from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        raise UnsafeFileError(f"{shown!r} is not a readable torch checkpoint ({str(exc).splitlines()[0][:120]}); "
                              "it is truncated or corrupt. Copy it again, or save it again with torch.save.") from exc


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def _read_npz(path: str, shown: str) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise UnsafeFileError(f"{shown!r} holds arrays of Python objects, which need pickle to load, so it is "
                              "refused; save plain numeric arrays (np.savez(FILE, prompt=array)).") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UnsafeFileError(f"{shown!r} is not a readable .npz file ({exc}); it is truncated or corrupt.") from exc


# ------------------------------------------------------------------ layouts
def _is_shallow_key(k: str) -> bool:
    return (k == SHALLOW or k.endswith("." + SHALLOW)) and not k.endswith(DEEP)


def _keys_list(keys: Iterable[str], n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def vpt_prompt(tensors: dict[str, torch.Tensor], model, shown: str,
               key: str | None = None) -> tuple[torch.Tensor, list[str], str]:
    """The prompt of a VPT-layout state dict in this project's layout: ``(T, D)``, or ``(L, T, D)`` when the
    file also holds ``deep_prompt_embeddings``; with the keys read and the layout in words."""
    candidates = [k for k in tensors if _is_shallow_key(k)]
    if not candidates and key is None:
        deep_only = [k for k in tensors if k == DEEP or k.endswith("." + DEEP)]
        if deep_only:
            raise UserInputError(f"{shown!r} holds {deep_only[0]!r} but not the input prompt {SHALLOW!r} that goes "
                                 "with it (VPT keeps both); give the whole prompt-tuned checkpoint.")
    if key is not None:
        if key not in tensors and key + "." + SHALLOW in tensors:
            key += "." + SHALLOW  # a prefix, such as "enc.transformer"
        if key not in candidates:
            raise UserInputError(f"--key {key!r} is not a VPT prompt in {shown!r}; its VPT prompts are "
                                 f"{_keys_list(candidates) or 'none'}.")
        candidates = [key]
    if not candidates:
        near = [k for k in tensors if "prompt" in k.lower()]
        hint = (f" It does hold {_keys_list(near)}: for a plain tensor use --from safetensors/npz --key K."
                if near else "")
        raise UserInputError(f"{shown!r} holds no VPT prompt: none of its {len(tensors)} tensors has a key ending in "
                             f"{SHALLOW!r} (VPT's layout).{hint} Give the checkpoint of a prompt-tuned model.")
    if len(candidates) > 1:
        raise UserInputError(f"{shown!r} holds {len(candidates)} VPT prompts ({_keys_list(candidates)}); choose one "
                             "with --key.")
    k_in = candidates[0]
    prefix = k_in[: -len(SHALLOW)]
    first = tensors[k_in]
    if first.dim() == 3 and first.shape[0] == 1:
        first = first[0]
    if first.dim() != 2:
        raise IncompatiblePromptError(f"{k_in!r} in {shown!r} has shape {tuple(tensors[k_in].shape)}; VPT's input "
                                      "prompt is (1, T, D). This is not a VPT prompt.")
    keys, layout = [k_in], "VPT shallow: prompt_embeddings (1, T, D) -> (T, D)"
    deep = tensors.get(prefix + DEEP)
    prompt = first
    if deep is not None:
        keys.append(prefix + DEEP)
        if deep.dim() != 3:
            raise IncompatiblePromptError(f"{prefix + DEEP!r} in {shown!r} has shape {tuple(deep.shape)}; VPT's deep "
                                          "prompts are (L - 1, T, D).")
        if deep.shape[1] != first.shape[0] or deep.shape[2] != first.shape[1]:
            raise IncompatiblePromptError(
                f"{prefix + DEEP!r} in {shown!r} has shape {tuple(deep.shape)} but {k_in!r} has "
                f"{tuple(tensors[k_in].shape)}: the deep sets must have the input prompt's token count and width.")
        want = model.depth - 1
        if deep.shape[0] != want:
            extra = (" (VPT keeps one set per block after the first; a file with one per block has no room for "
                     "prompt_embeddings)" if deep.shape[0] == model.depth else "")
            raise IncompatiblePromptError(
                f"{prefix + DEEP!r} in {shown!r} holds {deep.shape[0]} sets of deep prompts, so the prompt was tuned "
                f"on a ViT of {deep.shape[0] + 1} blocks, but backbone {model.name!r} has {model.depth} blocks and "
                f"needs {want}{extra}. Import it with the backbone it was tuned on (--backbone).")
        prompt = torch.cat([first[None], deep])
        layout = ("VPT deep: prompt_embeddings (1, T, D) for block 0, then deep_prompt_embeddings (L - 1, T, D) "
                  "-> (L, T, D)")
    proj_w, proj_b = tensors.get(prefix + PROJ + ".weight"), tensors.get(prefix + PROJ + ".bias")
    if proj_w is not None:
        if proj_w.dim() != 2 or proj_w.shape[1] != prompt.shape[-1]:
            raise IncompatiblePromptError(
                f"{prefix + PROJ + '.weight'!r} in {shown!r} has shape {tuple(proj_w.shape)}, which does not map "
                f"prompts of width {prompt.shape[-1]}; the file's prompt projection does not fit its prompt.")
        prompt = prompt.double() @ proj_w.double().T + (0 if proj_b is None else proj_b.double())
        keys += [prefix + PROJ + ".weight"] + ([prefix + PROJ + ".bias"] if proj_b is not None else [])
        layout += f"; projected by prompt_proj ({proj_w.shape[1]} -> {proj_w.shape[0]})"
    return prompt, keys, layout


def keyed_prompt(tensors: dict[str, torch.Tensor], model, shown: str,
                 key: str | None) -> tuple[torch.Tensor, list[str], str]:
    """One tensor of a file, in this project's layout already: ``(T, D)`` (or ``(1, T, D)``) shallow, ``(L, T, D)``
    deep."""
    if key is None:
        if len(tensors) != 1:
            vpt = [k for k in tensors if _is_shallow_key(k)]
            hint = " It holds VPT's layout: use --from vpt." if vpt else ""
            raise UserInputError(f"{shown!r} holds {len(tensors)} tensors ({_keys_list(tensors)}); choose the prompt "
                                 f"with --key.{hint}")
        key = next(iter(tensors))
    if key not in tensors:
        raise UserInputError(f"{shown!r} has no tensor {key!r}; it holds {_keys_list(tensors)}.")
    t = tensors[key]
    shape = tuple(t.shape)
    if t.dim() == 3 and shape[0] == 1:
        t = t[0]
    if t.dim() == 3 and shape[0] == model.depth - 1 and model.depth > 1:
        raise IncompatiblePromptError(
            f"{key!r} in {shown!r} has shape {shape}: one set per block after the first, VPT's deep layout without "
            "its input prompt. Import the VPT checkpoint (or a file with both prompt_embeddings and "
            "deep_prompt_embeddings) with --from vpt.")
    if t.dim() not in (2, 3):
        raise IncompatiblePromptError(f"{key!r} in {shown!r} has shape {shape}; a prompt is (T, D) shallow or "
                                      "(L, T, D) deep.")
    return t, [key], "shallow (T, D)" if t.dim() == 2 else "deep (L, T, D)"


# ------------------------------------------------------------------ the importer
def read_prompt(path: str | os.PathLike, model, fmt: Format = "vpt", key: str | None = None,
                shown: str | None = None) -> ImportedTensor:
    """A prompt in this project's layout from ``path`` (``fmt``: ``"vpt"``: VPT's keys, in a torch checkpoint,
    safetensors or .npz; ``"safetensors"`` / ``"npz"``: the tensor ``key``), checked against ``model``."""
    if fmt not in FORMATS:
        raise UserInputError(f"format {fmt!r} is not known; use one of {', '.join(FORMATS)}.")
    path = os.fspath(path)
    shown = shown or path
    tensors, container = read_tensors(path, shown)
    if fmt in ("safetensors", "npz") and container != fmt:
        other = ("--from vpt (a torch checkpoint is read only in VPT's layout)" if container == "torch"
                 else f"--from {container}")
        raise UserInputError(f"{shown!r} is a {container} file, not {fmt}; use {other}.")
    if fmt == "vpt":
        prompt, keys, layout = vpt_prompt(tensors, model, shown, key)
    else:
        prompt, keys, layout = keyed_prompt(tensors, model, shown, key)
    if not prompt.is_floating_point():
        raise UnsafeFileError(f"the prompt {keys[0]!r} in {shown!r} has dtype {prompt.dtype}; prompts are floating "
                              "point.")
    prompt = prompt.detach().float().cpu().clone()  # a copy: nothing stays mapped from the file
    if not torch.isfinite(prompt).all():
        raise UnsafeFileError(f"the prompt {keys[0]!r} in {shown!r} holds NaN or infinite values; it is unusable.")
    if prompt.shape[-1] != model.embed_dim:
        raise IncompatiblePromptError(
            f"the prompt {keys[0]!r} in {shown!r} has width D={prompt.shape[-1]} but backbone {model.name!r} has "
            f"width {model.embed_dim}: it was tuned on another ViT. Import it with the backbone it was tuned on "
            "(--backbone NAME --checkpoint WEIGHTS).")
    if prompt.dim() == 3 and prompt.shape[0] != model.depth:
        raise IncompatiblePromptError(
            f"the deep prompt {keys[0]!r} in {shown!r} has {prompt.shape[0]} layers but backbone {model.name!r} has "
            f"{model.depth} blocks: it was tuned on another ViT. Import it with the backbone it was tuned on.")
    model.check_prompt(prompt, f"the prompt in {shown!r}")
    return ImportedTensor(prompt, keys, layout, container)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def default_name(shown: str) -> str:
    """A prompt name from a file's name: its stem, with anything a name may not hold replaced by ``_``."""
    stem = os.path.basename(shown)
    for ext in (".safetensors", ".pth", ".pt", ".npz", ".bin", ".ckpt", ".tar"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem).lstrip("._-")[:100] or "imported"
    return stem


def import_prompt(path: str | os.PathLike, model, fmt: Format = "vpt", key: str | None = None, name: str | None = None,
                  source_task: str | None = None, shown: str | None = None) -> SourcePrompt:
    """A :class:`SourcePrompt` for ``model`` from a prompt tuned elsewhere (see :func:`read_prompt`), named ``name``
    (default: the file's stem), its provenance (file, SHA-256, keys, layout) in its metadata."""
    path = os.fspath(path)
    shown = shown or path
    got = read_prompt(path, model, fmt, key, shown)
    name = check_name(name if name is not None else default_name(shown))
    provenance = {"imported_from": os.path.basename(shown) if shown != path else os.path.abspath(path),
                  "sha256": file_sha256(path), "format": fmt, "container": got.container, "keys": got.keys,
                  "layout": got.layout}
    return SourcePrompt(name, got.prompt, source_task=source_task or name, backbone=model.name,
                        backbone_fingerprint=model.fingerprint, provenance=provenance)


def add_to_bank(folder: str | os.PathLike, prompts: list[SourcePrompt], model, start: torch.Tensor | None = None,
                start_info: dict[str, Any] | None = None, overwrite: bool = False) -> PromptBank:
    """Write ``prompts`` into the bank ``folder`` (made if missing) once every check has passed: names free (or
    ``overwrite``), one shape and one backbone with the prompts already there, and the shared start kept honest. A
    bank that records a start ``P0`` takes an imported prompt only with that same ``start`` (its task vector
    ``P - P0`` would be meaningless otherwise); a ``start`` is recorded only in a bank that has none and holds no
    other prompt. Returns the bank as it is now."""
    folder = os.fspath(folder)
    names = [p.name for p in prompts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserInputError(f"two imported prompts are named {twice[0]!r}; give each its own --name (one file at a "
                             "time) or rename the files.")
    existing = PromptBank.load(folder, model=model) if os.path.isdir(folder) else PromptBank()
    clash = [n for n in names if n in existing.names]
    if clash and not overwrite:
        raise UserInputError(f"{folder!r} already holds a prompt named {clash[0]!r}; choose another --name or --out, "
                             "or pass --overwrite to replace it.")
    kept = [p for p in existing if p.name not in names]
    old_start, old_info = load_start(folder) if os.path.isdir(folder) else (None, {})
    if old_start is not None:
        if start is None:
            raise UserInputError(
                f"the bank {folder!r} records the shared start its prompts were tuned from; a prompt tuned elsewhere "
                "was not, so its task vector would be measured from the wrong point. Import into another --out, or "
                "give --start FILE if the prompt was tuned from that same start.")
        if tuple(start.shape) != tuple(old_start.shape) or not torch.equal(start.float(), old_start):
            raise UserInputError(f"--start is not the start the bank {folder!r} records; import into another --out.")
        start, start_info = old_start, old_info
    elif start is not None and kept:
        raise UserInputError(f"the bank {folder!r} holds prompts ({_keys_list(p.name for p in kept)}) that record no "
                             "shared start; a --start would claim they were tuned from it. Import with --start into "
                             "a new --out.")
    bank = PromptBank(kept + list(prompts), start, start_info if start is not None else None)  # shapes, backbones
    for p in prompts:
        p.save(folder)
    if start is not None and old_start is None:
        save_start(folder, start, start_info or {"rule": "imported"})
    return bank
