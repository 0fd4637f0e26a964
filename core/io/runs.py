"""Run folders: every run's config, environment, results and prompts, written atomically.

A run is written into ``RUNS/ID.partial/`` and renamed to ``RUNS/ID/`` only
when everything is on disk, with ``run.json`` saying ``"status": "complete"``.
A run that fails or is interrupted keeps its ``.partial`` folder (with
``run.json`` saying ``"incomplete"`` and why), so it can never be taken for a
complete one; earlier runs are never touched.
"""
from __future__ import annotations

import csv
import importlib.metadata
import io
import os
import platform
import secrets
import shutil
import sys
import time
from typing import Any

import torch

from ..errors import UserInputError
from .safe_io import (
    SCHEMAS,
    StorageError,
    atomic_write_bytes,
    atomic_write_json,
    load_json,
    makedirs,
    save_tensors,
    storage_error,
)

PARTIAL = ".partial"


def environment() -> dict[str, Any]:
    """Versions and hardware, stored with every run so results can be reproduced."""
    import numpy

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
    # Read from the installed distributions' metadata: importing umap to ask its version costs ~3 s (numba).
    for key, dist in (("timm", "timm"), ("safetensors", "safetensors"), ("sklearn", "scikit-learn"),
                      ("umap", "umap-learn")):
        try:
            env[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # optional packages
            env[key] = None
    return env


def history_csv(rows: list[dict[str, Any]], names: list[str] | None = None) -> str:
    """History rows as CSV; a ``weights`` list becomes one column per source."""
    out = io.StringIO()
    if not rows:
        return ""
    flat = []
    for r in rows:
        r = dict(r)
        w = r.pop("weights", None)
        if w is not None:
            for i, v in enumerate(w):
                r[f"w_{names[i] if names else i}"] = v
        flat.append(r)
    fields = list(flat[0])
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def check_output_folder(path: str | os.PathLike, flag: str) -> str:
    """``path`` if it is a folder this process can write into (or can create), else a :class:`UserInputError` that
    names ``flag``: checked before anything is loaded or computed."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"{flag} {path!r} is a file, not a folder; give a folder (it is made if it is missing).")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserInputError(f"{flag} {path!r} cannot be made: {existing!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} {path!r} cannot be written ({existing!r} is not writable for this user); choose "
                             "a folder you can write to.")
    return path


class RunWriter:
    """Context manager that writes one run folder atomically.

    >>> with RunWriter("runs", "learn", config) as run:
    ...     run.write_json("metrics.json", {...})

    A run refused with a :class:`UserInputError` before it wrote anything of its own (a bad argument found late) leaves
    no folder; any other failure, or one after a result was written, keeps ``ID.partial`` with ``run.json`` saying why.
    """

    #: The runs being written in this process, and the folders of those an interrupt ended (the CLI names them).
    open_runs: list["RunWriter"] = []
    interrupted: list[str] = []

    def __init__(self, root: str | os.PathLike, command: str, config: dict[str, Any], run_id: str | None = None):
        self.root = os.fspath(root)
        self.command = command
        self.config = config
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_id = run_id or f"{stamp}-{command}-{secrets.token_hex(3)}"
        self.final = os.path.join(self.root, self.run_id)
        self.path = self.final + PARTIAL
        self.started = time.time()
        self.wrote = False  # whether anything besides the run's config, environment and status was written

    def __enter__(self) -> "RunWriter":
        makedirs(self.root)
        if os.path.exists(self.final) or os.path.exists(self.path):
            raise UserInputError(f"run {self.run_id!r} already exists in {self.root!r}; pick another run id.")
        try:
            os.makedirs(self.path)
            self._status("incomplete", "running")
            atomic_write_json(os.path.join(self.path, "config.json"), {"command": self.command, **self.config})
            atomic_write_json(os.path.join(self.path, "env.json"), environment())
        except (OSError, StorageError) as exc:  # a full disk: no run folder is left, least of all one without run.json
            shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(exc, StorageError):
                raise
            raise (storage_error(self.path, exc) or exc) from exc
        RunWriter.open_runs.append(self)
        return self

    def _status(self, status: str, note: str = "") -> None:
        atomic_write_json(os.path.join(self.path, "run.json"), {
            "id": self.run_id, "command": self.command, "status": status, "note": note,
            "started": self.started, "finished": time.time() if status != "incomplete" or note != "running" else None,
        })

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self in RunWriter.open_runs:
            RunWriter.open_runs.remove(self)
        if exc_type is None:
            self._status("complete")  # a full disk here raises, and the run stays ID.partial, marked "running"
            os.replace(self.path, self.final)
            self.path = self.final
        elif issubclass(exc_type, UserInputError) and not self.wrote:  # refused before it made anything: no folder
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            reason = "interrupted" if exc_type is KeyboardInterrupt else f"failed: {exc_type.__name__}: {exc}"
            if exc_type is KeyboardInterrupt:
                RunWriter.interrupted.append(self.path)
            try:
                self._status("incomplete", reason[:500])
            except (OSError, StorageError):  # (a full disk: run.json keeps saying "running", still incomplete)
                pass
        return False

    def file(self, name: str) -> str:
        """The path of a file (or folder) in the run; whoever asks for one writes it."""
        self.wrote = True
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.file(name), obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.file(name), text.encode("utf-8"))

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
        save_tensors(self.file(name), tensors, metadata)


def list_runs(root: str | os.PathLike, include_incomplete: bool = False) -> list[dict[str, Any]]:
    """The runs under ``root``, newest first: ``run.json`` plus ``config.json`` and ``path``. A run's id is its folder's
    name (a copied run folder whose ``run.json`` kept the original's id is still told apart)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    runs = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        try:
            info = load_json(os.path.join(path, "run.json"), schema=SCHEMAS["run"])
            config = load_json(os.path.join(path, "config.json"), schema=SCHEMAS["config"])
        except UserInputError:
            if include_incomplete:
                runs.append({"id": name, "status": "incomplete", "note": "unreadable", "path": path, "config": {}})
            continue
        complete = info.get("status") == "complete" and not name.endswith(PARTIAL)
        if complete or include_incomplete:
            runs.append({**info, "id": name.removesuffix(PARTIAL), "status": "complete" if complete else "incomplete",
                         "path": path, "config": config})
    runs.sort(key=lambda r: r.get("started") or 0, reverse=True)
    return runs


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """Everything JSON in a complete run folder, keyed by file name without extension."""
    path = os.fspath(path)
    info = load_json(os.path.join(path, "run.json"), schema=SCHEMAS["run"])
    if info.get("status") != "complete" or path.rstrip("/").endswith(PARTIAL):
        raise UserInputError(f"run {path!r} is incomplete ({info.get('note', '')}); it cannot be loaded as a result.")
    out: dict[str, Any] = {"path": path}
    for f in sorted(os.listdir(path)):
        if f.endswith(".json"):
            out[f[:-5]] = load_json(os.path.join(path, f), max_bytes=64 * 2**20)
    return out
