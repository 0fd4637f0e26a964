"""What an evaluation runs on: a workspace (one backbone, one bank, any number of targets) and the setup specs that
name one in a job, loaded once per process.

A :class:`Workspace` is what a user brings: a backbone (:class:`core.model.backbones.BackboneSpec`), a bank folder
and targets (shipped names, ``.npz`` files, VTAB-1k list folders, class folders, or folders holding such tasks). The
CLI (``python -m core study`` and ``dashboard``), the dashboard's "Model" section and the Ray workers all load it
here. Setup specs (a job's ``payload["setup"]``, JSON):

- ``{"kind": "workspace", "backbone": {...}, "fingerprint": ..., "bank": DIR, "bank_digest": ..., "sources": [...]
  or None, "targets": {name: path}}``: a workspace, the backbone's fingerprint and the bank's digest included so that
  a job's key changes when the weights or the prompts do (and a worker refuses weights that changed under it);
  ``sources`` names the bank's prompts a target gets (leave-one-out: every prompt but the target's own);
- ``{"kind": "embedded"}``: the embedded default (``assets/``), every shipped target;
- ``{"kind": "toy"}``: the tiny random ViT, its random bank and two synthetic targets (:mod:`core.model.toy`),
  the protocol in seconds, for the tests and ``bench/quality.py --quick``.

A worker process keeps what it loaded: one model per backbone, one bank per (folder, sources), one task per path, so
a leave-one-out suite of 19 targets holds one ViT-B, not 19.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import IncompatiblePromptError, UserInputError
from ..io import assets
from ..io.digest import settings_digest, tensor_digest
from ..io.prompt_bank import PromptBank
from ..io.tasks import SPLITS, VTAB_FILES, Task
from ..model.backbones import BackboneSpec
from ..model.device import resolve_device
from ..model.toy import toy_bank, toy_model, toy_targets

_LOADED: dict[str, Any] = {}
_MODELS: dict[str, Any] = {}
_BANKS: dict[tuple, Any] = {}
_TASKS: dict[str, Any] = {}

TARGET_HELP = ("a VTAB-1k folder (train800.txt, val200.txt, test.txt), a .npz task, a folder of class sub-folders, a "
               "shipped target's name, or a folder holding such tasks (one per .npz file or sub-folder)")


def load_setup(spec: dict[str, Any]):
    """``(model, bank, {target name: Task})`` for a setup spec, cached per process (Ray reuses its workers)."""
    kind = spec.get("kind")
    if kind == "workspace":
        return _workspace(spec)
    key = repr(sorted(spec.items()))
    if key not in _LOADED:
        if kind == "toy":
            _LOADED[key] = _toy()
        elif kind == "embedded":
            _LOADED[key] = _embedded()
        else:
            raise UserInputError(f"unknown setup kind {kind!r}; use 'workspace', 'embedded' or 'toy'.")
    return _LOADED[key]


def _embedded():
    model = BackboneSpec().load("cpu")
    bank = PromptBank.load(assets.PROMPTS_DIR, model=model)
    # on the worker's GPU where Ray gave it one (the bank is checked on the CPU, where the fingerprint is computed)
    return model.to(resolve_device("auto")), bank, {t: Task.load(assets.task_path(t))
                                                    for t in assets.shipped_tasks("target")}


def _toy():
    model = toy_model()
    return model.to(resolve_device("auto")), toy_bank(model), toy_targets()


# ------------------------------------------------------------------ workspaces
def _workspace(spec: dict[str, Any]):
    ws = Workspace.from_dict(spec)
    model = ws.load_backbone()
    if spec.get("fingerprint") and spec["fingerprint"] != model.fingerprint:
        raise UserInputError(f"the backbone ({ws.backbone.describe()}) has fingerprint {model.fingerprint}, but the "
                             f"evaluation was planned on {spec['fingerprint']}: its weights changed since. Start the "
                             "evaluation again (a new --out), or restore the weights it was planned on.")
    bank = ws.load_bank(model, spec.get("sources"))
    if spec.get("bank_digest") and spec["bank_digest"] != bank_digest(bank):
        raise UserInputError(f"the prompts in {ws.bank_folder!r} changed since the evaluation was planned; start it "
                             "again (a new --out), or restore the bank it was planned on.")
    return model, bank, ws.tasks()


def load_backbone(spec: BackboneSpec, device: Any = None):
    """The backbone ``spec`` names, loaded once per process and device (None or ``"auto"``: CUDA when present)."""
    key = f"{spec.key()}@{resolve_device(device)}"
    if key not in _MODELS:
        _MODELS[key] = spec.load(device)
    return _MODELS[key]


def bank_digest(bank) -> str:
    """A digest of a bank's prompts (names and values) and its shared start."""
    start = None if bank.start is None else tensor_digest(bank.start)
    return settings_digest([(p.name, tensor_digest(p.prompt)) for p in bank], start, length=16)


def _stamp(folder: str) -> tuple:
    """The files of a folder with their sizes and times: a bank written again is read again."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                            if e.is_file()))
    except OSError:
        return ()


class Targets(Mapping):
    """Target tasks by name, each loaded the first time it is asked for (once per process and path)."""

    def __init__(self, paths: dict[str, str]):
        self.paths = dict(paths)

    def __getitem__(self, name: str):
        path = self.paths[name]
        if path not in _TASKS:
            _TASKS[path] = load_target(name, path)
        return _TASKS[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def load_target(name: str, path: str):
    """The task at ``path``; a file or folder that is not a task is refused, naming the target, the path and the
    forms a task may take."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a task's notes are shown where it is opened, not in a worker's log
            return Task.load(path)
    except UserInputError as exc:
        raise UserInputError(f"target {name!r} ({path}) is not a task: {exc} A target is {TARGET_HELP}.") from exc


def _is_task_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, VTAB_FILES["train"])) or all(
        os.path.isdir(os.path.join(path, s)) for s in SPLITS)


def targets_in(spec: str) -> dict[str, str]:
    """The targets one ``--targets`` value names, by name: a shipped target, a task (``.npz``, a VTAB-1k folder,
    class folders), or a folder holding tasks (its ``.npz`` files and its VTAB-1k or train/val/test sub-folders).
    Paths come back absolute."""
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        return {spec: assets.task_path(spec)}  # a shipped name, or an error that names the missing path
    path = os.path.realpath(path)
    base = os.path.basename(os.path.normpath(path))
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise UserInputError(f"--targets {spec!r} is a file but not a .npz task; a target is {TARGET_HELP}.")
        return {base[:-4]: path}
    if _is_task_folder(path):
        return {base: path}
    entries = sorted(e for e in os.listdir(path) if not e.startswith((".", "_")))
    members = {e[:-4]: os.path.join(path, e) for e in entries if e.endswith(".npz")
               and os.path.isfile(os.path.join(path, e))}
    members.update({e: os.path.join(path, e) for e in entries
                    if os.path.isdir(os.path.join(path, e)) and _is_task_folder(os.path.join(path, e))})
    if members:
        return members
    subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    if len(subdirs) < 2:  # neither a suite nor class folders
        raise UserInputError(f"--targets {spec!r} is not a task or a folder of tasks: it holds no train800.txt "
                             "(VTAB-1k), no .npz tasks, no task folders and not two class sub-folders. Give "
                             f"{TARGET_HELP}.")
    return {base: path}  # class folders: checked when loaded


def resolve_targets(specs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """Every target the ``--targets`` values name (see :func:`targets_in`), by name; two of one name are refused."""
    out: dict[str, str] = {}
    for spec in specs or []:
        for name, path in targets_in(spec).items():
            if name in out and out[name] != path:
                raise UserInputError(f"two targets are named {name!r} ({out[name]} and {path}); a target is known by "
                                     "its file or folder name, so rename one of them.")
            out[name] = path
    return out


@dataclass
class Workspace:
    """One backbone, one bank folder and the targets (name -> path) that an evaluation or the dashboard runs on.

    ``bank`` None: the embedded default's shipped prompts; ``targets`` None: the shipped targets."""

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    bank: str | None = None
    targets: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.bank is not None:
            self.bank = os.path.realpath(os.path.expanduser(self.bank))
            if not os.path.isdir(self.bank):
                raise UserInputError(f"--bank {self.bank!r} is not a folder; give the folder build-bank or "
                                     "import-prompts wrote (NAME.safetensors + NAME.json per prompt).")
        if self.bank is None and self.backbone.kind != "embedded":
            raise UserInputError(f"{self.backbone.describe()} needs a bank of prompts tuned on it: give --bank DIR "
                                 "(made by `python -m core build-bank --backbone ...` or `import-prompts`); the "
                                 "shipped prompts only fit the embedded default.")
        if self.targets is not None and not self.targets:
            raise UserInputError(f"give at least one target: {TARGET_HELP}.")

    @classmethod
    def from_args(cls, backbone: BackboneSpec | None = None, bank: str | None = None,
                  targets: list[str] | None = None) -> "Workspace":
        """The workspace the flags ``--backbone ... --bank DIR --targets ...`` describe."""
        return cls(backbone or BackboneSpec(), bank, resolve_targets(targets) if targets else None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workspace":
        """A workspace from :meth:`to_dict` or a ``workspace`` setup spec (its other fields are left out)."""
        if not isinstance(data, dict):
            raise UserInputError("a workspace is a JSON object with backbone, bank and targets, got "
                                 f"{type(data).__name__}.")
        targets = data.get("targets")
        if targets is not None and not (isinstance(targets, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in targets.items())):
            raise UserInputError("a workspace's targets are a JSON object of name -> path.")
        return cls(BackboneSpec.from_dict(data.get("backbone")), data.get("bank"), targets)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.to_dict(), "bank": self.bank, "targets": self.targets}

    @property
    def is_default(self) -> bool:
        """The embedded default: its backbone, its shipped banks (shallow and deep) and targets."""
        return self.backbone.kind == "embedded" and self.bank is None and self.targets is None

    @property
    def bank_folder(self) -> str:
        return self.bank if self.bank is not None else assets.PROMPTS_DIR

    def key(self) -> str:
        """A cache key of what is loaded: the backbone's key (its weight file included), the bank and the targets."""
        return settings_digest(self.backbone.key(), self.bank_folder, self.target_paths(), length=16)

    def target_paths(self) -> dict[str, str]:
        if self.targets is not None:
            return dict(self.targets)
        return {t: assets.task_path(t) for t in assets.shipped_tasks("target")}

    def describe(self) -> str:
        n = len(self.target_paths())
        return (f"backbone: {self.backbone.describe()}; bank: {self.bank_folder}; "
                f"{n} target{'s' if n != 1 else ''}")

    # ------------------------------------------------------------- loading
    def load_backbone(self, device: Any = None):
        """The backbone, once per process and device."""
        return load_backbone(self.backbone, device)

    def load_bank(self, model, sources: list[str] | None = None):
        """The bank's prompts (or only ``sources``), checked against ``model``: a bank tuned on other weights is
        refused, naming the folder and what to do."""
        folder = self.bank_folder
        key = (folder, tuple(sources) if sources is not None else None, model.fingerprint, _stamp(folder))
        if key not in _BANKS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the bank's notes are kept on it (bank.notes) and shown there
                    bank = PromptBank.load(folder, model=model, names=sources)
            except IncompatiblePromptError as exc:
                raise IncompatiblePromptError(
                    f"the bank {folder!r} does not fit the backbone ({self.backbone.describe()}, fingerprint "
                    f"{model.fingerprint}): {exc} Open the backbone the bank was tuned on, or make a bank for this "
                    "one (python -m core build-bank, or import-prompts).") from exc
            if len(bank) == 0:
                raise UserInputError(f"prompt bank {folder!r} holds no prompts (NAME.safetensors + NAME.json); build "
                                     "one with `python -m core build-bank` or bring one with `import-prompts`.")
            _BANKS[key] = bank
        return _BANKS[key]

    def tasks(self) -> Targets:
        """The targets by name, each loaded when first asked for."""
        return Targets(self.target_paths())

    def load(self, device: Any = None):
        """``(model, bank, targets)``: what :class:`core.evaluation.protocol.Context` takes."""
        model = self.load_backbone(device)
        return model, self.load_bank(model), self.tasks()

    def setup(self, model, bank, sources: list[str] | None = None, targets: list[str] | None = None) -> dict[str, Any]:
        """The setup spec of jobs on this workspace (``sources``: the prompts they get; ``targets``: the ones they
        may load), with the backbone's fingerprint and the bank's digest."""
        paths = self.target_paths()
        chosen = paths if targets is None else {t: paths[t] for t in targets}
        return {"kind": "workspace", "backbone": self.backbone.to_dict(), "fingerprint": model.fingerprint,
                "bank": self.bank_folder, "bank_digest": bank_digest(bank if sources is None else bank.subset(sources)),
                "sources": sources, "targets": chosen}
