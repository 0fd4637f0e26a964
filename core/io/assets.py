"""The embedded default: the backbone, source prompts and target tasks shipped in ``assets/``."""
from __future__ import annotations

import os

from ..errors import UserInputError

#: The repository's root: the folder that holds core/ and assets/.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.environ.get("HGPROMPT_ASSETS") or os.path.join(ROOT, "assets")
BACKBONE_DIR = os.path.join(ASSETS, "backbone")
PROMPTS_DIR = os.path.join(ASSETS, "prompts")
DEEP_PROMPTS_DIR = os.path.join(ASSETS, "prompts_deep")  # one prompt per block: the per-layer views need them
TASKS_DIR = os.path.join(ASSETS, "tasks")
# The target the dashboard and the speed benchmark open on: a structured task where one source (shapes_xpos)
# clearly helps and others do not, so the learned weights have something to show.
DEFAULT_TARGET = "shapes_quad"
#: The designed targets and the bank sources that carry their label's factors, one factor each: the third edition's
#: known-answer case and the fourth edition's compositions, fixed before any of them was tuned (assets/README.md).
#: ``shapes_xthird`` relabels one source's factor on fresh images: that source alone is the answer.
COMPOSITIONS: dict[str, tuple[str, ...]] = {
    "shapes_quad": ("shapes_xpos", "shapes_yhalf"),
    "shapes_kind_yhalf": ("shapes_kind", "shapes_yhalf"),
    "shapes_xpos_yhalf": ("shapes_xpos", "shapes_yhalf"),
    "shapes_count_yhalf": ("shapes_count", "shapes_yhalf"),
    "shapes_xthird": ("shapes_xpos",),
}


def available() -> bool:
    return os.path.isfile(os.path.join(BACKBONE_DIR, "config.json")) and os.path.isdir(PROMPTS_DIR)


def shipped_tasks(kind: str = "target") -> list[str]:
    """Names of the shipped tasks of ``kind`` (``"target"`` or ``"source"``)."""
    folder = os.path.join(TASKS_DIR, kind)
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npz"))


def default_target() -> str | None:
    """The shipped target to open on: DEFAULT_TARGET when shipped, else the first shipped target (None if none)."""
    names = shipped_tasks("target")
    return DEFAULT_TARGET if DEFAULT_TARGET in names else (names[0] if names else None)


def task_path(name_or_path: str) -> str:
    """A shipped task's file by name, or the given path (``~`` expanded) when it exists."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return expanded
    for kind in ("target", "source"):
        p = os.path.join(TASKS_DIR, kind, f"{name_or_path}.npz")
        if os.path.isfile(p):
            return p
    if os.sep in name_or_path or name_or_path.endswith(".npz") or name_or_path.startswith("~"):
        raise UserInputError(f"{expanded!r} does not exist; give the path of a task file or folder, or the name of a "
                             f"shipped target ({', '.join(shipped_tasks('target'))}).")
    raise UserInputError(
        f"no task {name_or_path!r}: it is neither a path nor a shipped task "
        f"(targets: {shipped_tasks('target')}, sources: {shipped_tasks('source')})."
    )


def require() -> None:
    if not available():
        raise UserInputError(
            f"the embedded default is not built: {BACKBONE_DIR} is missing. Build it with "
            "`python -m scripts.build_assets` or give --backbone and --bank explicitly."
        )
