"""Reading and writing files a user may hand us, without pickle.

Only safetensors and JSON are read. A file is checked before it is parsed:
pickle and torch-zip files are refused by their first bytes (never
unpickled), sizes are capped, the safetensors header is validated against the
file size, and tensors must be finite. JSON is refused beyond a nesting depth
before it is parsed (Python's parser recurses once per bracket: 100k brackets in
200 KB are a RecursionError, and an ``object_hook`` only runs after the recursion),
and the metadata a file supplies is checked field by field against its kind's
:class:`Schema` (:data:`SCHEMAS`), so a wrong type or range is named, never a
``TypeError`` later. A disk that is full or read-only is a message that names the
file, not a traceback. Writes go to a temporary file first and
are renamed into place, so a crash never leaves a half-written file under the
final name; they get the permissions an ordinary ``open()`` would (0666 less the umask), so other users
of a shared server can read them where the umask allows.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UnsafeFileError, UserInputError

#: Largest safetensors file read as a prompt (a ViT-L deep prompt with 100 tokens is ~10 MB).
MAX_PROMPT_BYTES = 64 * 2**20
#: Largest backbone checkpoint read (ViT-g is ~4 GB in fp32).
MAX_CHECKPOINT_BYTES = 8 * 2**30
MAX_JSON_BYTES = 2**20
MAX_HEADER_BYTES = 2**20
#: Deepest nesting of arrays and objects read from a JSON file (our deepest, a layer-wise run's history, is 4).
MAX_JSON_DEPTH = 64

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04", b"PK\x05\x06")


def _check_not_pickle(path: str, head: bytes, safetensors: bool = False) -> None:
    """Refuse a pickle or torch.save zip by its first bytes. For a safetensors file (8-byte little-endian header
    length, then the JSON header's "{") a first byte of 0x80 is a header length of 128 + 256 m, not a pickle: the
    "{" at byte 8 tells them apart (nothing is ever unpickled either way)."""
    if safetensors and len(head) >= 9 and head[8:9] == b"{":
        return
    if head[:1] == b"\x80" or head[:4] in _PICKLE_MAGIC[1:]:
        raise UnsafeFileError(
            f"{path!r} is a pickle (or torch.save zip) file, which can run code when loaded, so it is refused. "
            "Save tensors with safetensors (safetensors.torch.save_file) and metadata as JSON instead."
        )


def _read_header(path: str, size: int) -> dict[str, Any]:
    with open(path, "rb") as fh:
        head = fh.read(9)
        _check_not_pickle(path, head, safetensors=True)
        head = head[:8]
        fh.seek(8)
        if len(head) < 8:
            raise UnsafeFileError(f"{path!r} is too short ({size} bytes) to be a safetensors file; it is truncated or "
                                  "not safetensors.")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise UnsafeFileError(
                f"{path!r} has a safetensors header that claims {n} bytes in a {size}-byte file; "
                "the file is truncated or corrupt. Save it again with safetensors."
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeFileError(f"{path!r} does not start with a valid safetensors header; it is corrupt or not "
                              "safetensors.") from exc
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path!r} has a malformed safetensors header.")
    return header


def load_tensors(path: str | os.PathLike,
                 max_bytes: int = MAX_PROMPT_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a safetensors file, checked as described above."""
    from safetensors import SafetensorError  # safetensors imported lazily: `import core` stays fast
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"file {path!r} does not exist; check the path.")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UnsafeFileError(
            f"{path!r} is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.0f} MiB a file of this kind can "
            "be; refused."
        )
    header = _read_header(path, size)
    meta = header.get("__metadata__") or {}
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError) as exc:
        raise UnsafeFileError(
            f"{path!r} is not a valid safetensors file ({exc}); it is truncated, corrupt, or its header lies about "
            "sizes or dtypes. Save it again with safetensors.torch.save_file."
        ) from exc
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UnsafeFileError(f"tensor {name!r} in {path!r} holds NaN or infinite values; the file is unusable.")
    return tensors, {str(k): str(v) for k, v in meta.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A backbone state dict from a ``.safetensors`` file (pickle checkpoints are refused)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                _check_not_pickle(path, fh.read(8))
        raise UserInputError(
            f"checkpoint {path!r} is not a .safetensors file; only safetensors checkpoints are read. "
            "Convert it once where you trust it: safetensors.torch.save_file(torch.load(p, weights_only=True), "
            "'model.safetensors')."
        )
    return load_tensors(path, MAX_CHECKPOINT_BYTES)[0]


def load_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, schema: "Schema | None" = None) -> Any:
    """Parse a JSON file of bounded size and nesting depth with a clear message on failure; with ``schema``, its
    fields are checked too (:meth:`Schema.check`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise UserInputError(f"{path!r} {what}; check the path"
                             + (f" (it should be {schema.what})." if schema else "."))
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UnsafeFileError(f"{path!r} is {size} bytes, more than the {max_bytes} bytes a metadata file can be; "
                              "refused.")
    with open(path, "rb") as fh:
        raw = fh.read(max_bytes + 1)  # a file that grew since it was measured is still read no further than the cap
    if len(raw) > max_bytes:
        raise UnsafeFileError(f"{path!r} is more than the {max_bytes} bytes a metadata file can be; refused.")
    _check_not_pickle(path, raw[:8])
    depth = json_depth(raw, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise UnsafeFileError(f"{path!r} nests arrays or objects {depth} deep, more than the {MAX_JSON_DEPTH} a "
                              "metadata file needs; refused before parsing. Fix or regenerate the file.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also an integer of > 4300 digits
        raise UserInputError(f"{path!r} is not valid JSON ({str(exc)[:200]}); fix or regenerate the file.") from exc
    return data if schema is None else schema.check(data, path)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


def json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep arrays and objects nest in the JSON text ``raw`` (brackets inside strings not counted), found without
    parsing it: what ``json.loads`` would recurse through. Text with no more than ``limit`` opening brackets cannot be
    deeper than that and is not scanned (a prompt's metadata has a handful)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return min(limit, raw.count(b"[") + raw.count(b"{"))
    text = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    deepest, level, chunk = 0, 0, 8 * 2**20  # in chunks: the steps of a 64 MiB file are never all held at once
    for i in range(0, len(text), chunk):
        part = text[i:i + chunk]
        step = (np.isin(part, _OPEN).astype(np.int8) - np.isin(part, _CLOSE).astype(np.int8))
        step = step[step != 0]
        if step.size:
            levels = np.cumsum(step, dtype=np.int64) + level
            deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


# ------------------------------------------------------------------ schemas
@dataclass(frozen=True)
class Field:
    """What one JSON value a file supplies may be: its ``kind`` ("str", "int", "number", "bool", "list", "object" or
    "any"), whether it must be there and may be null, its range (numbers), length (strings, lists, objects), named
    ``choices``; a list's ``items``, an object's named ``fields`` (others are ignored) or, for a map, its ``values``."""

    kind: str
    required: bool = False
    null: bool = False
    low: float | None = None
    high: float | None = None
    max_len: int | None = None
    choices: tuple = ()
    items: "Field | None" = None
    fields: "dict[str, Field] | None" = None
    values: "Field | None" = None

    def describe(self) -> str:
        if self.choices:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind in ("int", "number"):
            what = "an integer" if self.kind == "int" else "a finite number"
            if self.low is not None and self.high is not None:
                what += f" in {_num(self.low)}..{_num(self.high)}" if self.kind == "int" else \
                    f" in [{_num(self.low)}, {_num(self.high)}]"
            elif self.low is not None:
                what += f" >= {_num(self.low)}"
        elif self.kind == "list":
            what = "a list" + (f" of {_plural(self.items)}" if self.items and self.items.kind != "any" else "")
        elif self.kind == "object":
            what = "an object" + (f" of {_plural(self.values)}" if self.values and self.values.kind != "any" else "")
        else:
            what = {"str": "a string", "bool": "true or false", "any": "a JSON value"}[self.kind]
        if self.max_len is not None and self.kind in ("str", "list", "object"):
            what += f" (at most {self.max_len} {'characters' if self.kind == 'str' else 'entries'})"
        return what + (" or null" if self.null else "")

    def check(self, value: Any, at: str = "") -> str | None:
        """Why ``value`` does not fit (a sentence naming where it is: ``at``, a dotted path), or None when it does."""
        name = f"field {at!r}" if at else "its top level"
        if value is None:
            return None if self.null else f"{name} must be {self.describe()}, got null"
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool), "list": isinstance(value, list),
              "object": isinstance(value, dict), "any": True,
              "int": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[self.kind]
        if ok and self.kind == "number":
            ok = math.isfinite(value)
        if ok and self.kind in ("int", "number"):
            ok = (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        if ok and self.choices:
            ok = value in self.choices
        if ok and self.max_len is not None and self.kind in ("str", "list", "object"):
            ok = len(value) <= self.max_len
        if not ok:
            return f"{name} must be {self.describe()}, got {_short(value)}"
        subs: list[tuple[str, Any, Field]] = []
        if self.kind == "list" and self.items is not None:
            subs = [(f"{at}[{i}]", item, self.items) for i, item in enumerate(value)]
        if self.kind == "object":
            for key, sub in (self.fields or {}).items():
                if key in value:
                    subs.append((f"{at}.{key}" if at else key, value[key], sub))
                elif sub.required:
                    return f"{name} lacks the required field {key!r}"
            if self.values is not None:
                subs += [(f"{at}.{key[:60]}" if at else key[:60], item, self.values) for key, item in value.items()]
        for where, item, sub in subs:
            why = sub.check(item, where)
            if why:
                return why
        return None


@dataclass(frozen=True)
class Schema:
    """One kind of file's metadata: ``what`` it is (for messages), its ``root`` :class:`Field`, and the ``fix``."""

    what: str
    root: Field
    fix: str = "fix the file, or write it again with the tool that made it"

    def check(self, data: Any, path: str) -> Any:
        """``data`` when it fits, else an :class:`UnsafeFileError` naming the file, the field, the value and the fix."""
        why = self.root.check(data)
        if why:
            raise UnsafeFileError(f"{path!r} is not {self.what}: {why}; {self.fix}.")
        return data


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _plural(f: "Field") -> str:
    return {"str": "strings", "int": "integers", "number": "finite numbers", "bool": "booleans", "list": "lists",
            "object": "objects"}.get(f.kind, "values") + (f" in [{_num(f.low)}, {_num(f.high)}]" if f.low is not None
                                                          and f.high is not None else
                                                          f" >= {_num(f.low)}" if f.low is not None else "")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NAME = Field("str", max_len=200)
_SEED = Field("int", low=0, high=2**32 - 1)
#: One schema per kind of file whose metadata we read; every field read from such a file is checked here.
SCHEMAS: dict[str, Schema] = {
    "prompt": Schema("a prompt's metadata (NAME.json beside NAME.safetensors)", Field("object", fields={
        "format_version": Field("int", low=1, high=1000),
        "name": Field("str", required=True, max_len=100),
        "source_task": _NAME, "backbone": _NAME,
        "backbone_fingerprint": Field("str", required=True, max_len=200),
        "kind": Field("str", choices=("shallow", "deep")),
        "num_tokens": Field("int", low=1, high=100_000), "embed_dim": Field("int", low=1, high=100_000),
        "depth": Field("int", null=True, low=1, high=10_000),
        "source_accuracy": Field("number", null=True, low=0, high=1),
        "train_config": Field("object", null=True, max_len=1000),
    }), "write it again with SourcePrompt.save (source_accuracy is a fraction in [0, 1], train_config an object)"),
    "bank": Schema("a bank's start record (_bank.json)", Field("object", fields={
        "format_version": Field("int", low=1, high=1000),
        "start": Field("object", required=True, fields={
            "digest": Field("str", required=True, max_len=300), "rule": _NAME, "seed": _SEED,
            "num_tokens": Field("int", low=1, high=100_000), "deep": Field("bool"),
            "backbone_fingerprint": Field("str", max_len=200)}),
    }), "rebuild the bank with `python -m core build-bank`"),
    "weights": Schema("a weights file (names and weights, as a run's weights.json)", Field("object", fields={
        "names": Field("list", required=True, max_len=10_000, items=Field("str", max_len=200)),
        "weights": Field("list", required=True, max_len=10_000, items=Field("number", low=0)),
    }), "give 'names' (the sources) and 'weights' (one non-negative number per name), as `learn` writes them"),
    "run": Schema("a run's record (run.json)", Field("object", fields={
        "id": Field("str", required=True, max_len=300), "command": _NAME,
        "status": Field("str", required=True, choices=("complete", "incomplete")), "note": Field("str", max_len=10_000),
        "started": Field("number", null=True, low=0), "finished": Field("number", null=True, low=0),
    }), "the run folder was damaged; run it again"),
    "config": Schema("a run's settings (config.json)", Field("object"), "the run folder was damaged; run it again"),
    "targets": Schema("the targets a dashboard session added (targets.json)", Field(
        "object", max_len=1000, values=Field("str", max_len=4096)), "add the targets again"),
    "settings": Schema("a dashboard session's settings (settings.json)", Field("object", max_len=1000),
                       "the sidebar starts from its defaults"),
}


def _read_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it to read it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


#: Mode of every file written here: what ``open(path, "w")`` would give under the umask at import.
FILE_MODE = 0o666 & ~_read_umask()


#: Why a write fails that no retry fixes, by errno: said in words, with what to do.
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the disk is read-only", errno.EACCES: "this user may not write there",
               errno.EPERM: "this user may not write there", errno.EFBIG: "the file is too large for the disk"}


class StorageError(UserInputError):
    """A file or folder that cannot be written: the disk is full or read-only, or the folder is not writable."""


def storage_error(path: str, exc: OSError) -> StorageError | None:
    """The :class:`StorageError` for an ``OSError`` that a full, read-only or forbidden disk raised while writing
    ``path`` (None for any other error, which stays a bug with its traceback)."""
    reason = DISK_ERRORS.get(exc.errno)
    if reason is None:
        return None
    return StorageError(f"cannot write {path!r}: {reason} ({os.strerror(exc.errno)}). Free space there, or write to "
                        "a folder on another disk (the --runs-dir or --out flag, or HGPROMPT_RUNS for the dashboard).")


def makedirs(path: str | os.PathLike) -> str:
    """``os.makedirs(path, exist_ok=True)``, with a full or read-only disk said as a :class:`StorageError`."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise (storage_error(path, exc) or exc) from exc
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename; a full or read-only
    disk is a :class:`StorageError` that leaves no temporary file."""
    path = os.fspath(path)
    folder = makedirs(os.path.dirname(os.path.abspath(path)))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)  # created 0600: opened up to FILE_MODE before the rename
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and storage_error(path, exc) is not None:
            raise storage_error(path, exc) from exc
        raise


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9\-]", "_", socket.gethostname())[:60] or "host"


def scratch_dir(parent: str | os.PathLike, prefix: str) -> str:
    """A new hidden scratch folder in ``parent`` whose name says which process made it
    (``PREFIX<host>.<pid>.<random>``), so that :func:`clean_stale_scratch` can tell one a killed process left from one
    still in use."""
    parent = makedirs(parent)
    try:
        return tempfile.mkdtemp(prefix=f"{prefix}{_host()}.{os.getpid()}.", dir=parent)
    except OSError as exc:
        raise (storage_error(parent, exc) or exc) from exc


#: A scratch folder whose maker cannot be told (made by an older version) is stale after this long.
STALE_SCRATCH_SECONDS = 24 * 3600


def clean_stale_scratch(parent: str | os.PathLike, prefix: str) -> list[str]:
    """Remove the scratch folders (:func:`scratch_dir`) in ``parent`` whose process is gone (``kill -9`` skips every
    ``finally``); one of another host, or of unknown origin, only when older than a day. Returns their names."""
    parent = os.fspath(parent)
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix) and os.path.isdir(os.path.join(parent, n))]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(parent, name)
        parts = name[len(prefix):].rsplit(".", 2)
        if len(parts) == 3 and parts[0] == _host() and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
                continue  # its process is alive: in use
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
        else:
            try:
                if time.time() - os.path.getmtime(path) < STALE_SCRATCH_SECONDS:
                    continue
            except OSError:
                continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(name)
    return removed


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as JSON (keys sorted; tensors and arrays as lists), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True, default=_json_default)
                              + "\n").encode("utf-8"))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors as safetensors."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
