"""Reading and writing files a user may hand us, without pickle.

Only safetensors and JSON are read. A file is checked before it is parsed:
pickle and torch-zip files are refused by their first bytes (never
unpickled), sizes are capped, the safetensors header is validated against the
file size, and tensors must be finite. Writes go to a temporary file first and
are renamed into place, so a crash never leaves a half-written file under the
final name; they get the permissions an ordinary ``open()`` would (0666 less the umask), so other users
of a shared server can read them where the umask allows.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any

import torch

from ..errors import UnsafeFileError, UserInputError

#: Largest safetensors file read as a prompt (a ViT-L deep prompt with 100 tokens is ~10 MB).
MAX_PROMPT_BYTES = 64 * 2**20
#: Largest backbone checkpoint read (ViT-g is ~4 GB in fp32).
MAX_CHECKPOINT_BYTES = 8 * 2**30
MAX_JSON_BYTES = 2**20
MAX_HEADER_BYTES = 2**20

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
            raise UnsafeFileError(f"{path!r} is too short ({size} bytes) to be a safetensors file; it is truncated or not safetensors.")
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
        raise UnsafeFileError(f"{path!r} does not start with a valid safetensors header; it is corrupt or not safetensors.") from exc
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path!r} has a malformed safetensors header.")
    return header


def load_tensors(path: str | os.PathLike, max_bytes: int = MAX_PROMPT_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a safetensors file, checked as described above."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"file {path!r} does not exist; check the path.")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UnsafeFileError(
            f"{path!r} is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.0f} MiB a file of this kind can be; refused."
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
            "Convert it once where you trust it: safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')."
        )
    return load_tensors(path, MAX_CHECKPOINT_BYTES)[0]


def load_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of bounded size with a clear message on failure."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"file {path!r} does not exist; check the path.")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UnsafeFileError(f"{path!r} is {size} bytes, more than the {max_bytes} bytes a metadata file can be; refused.")
    with open(path, "rb") as fh:
        raw = fh.read()
    _check_not_pickle(path, raw[:8])
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path!r} is not valid JSON ({exc}); fix or regenerate the file.") from exc


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)  # created 0600: opened up to FILE_MODE before the rename
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as JSON (keys sorted; tensors and arrays as lists), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n").encode("utf-8"))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
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
