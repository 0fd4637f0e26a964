"""The Data page: a few images per class of every source task and target, and the split sizes per class."""
from __future__ import annotations

import numpy as np
import streamlit as st

from core import UserInputError, assets
from dashboard.state import current_workspace, default_target, load_task, workspace_targets


@st.cache_data(show_spinner=False, max_entries=64)
def thumbnails(path: str, per_class: int, seed: int) -> list[tuple[str, list[np.ndarray]]]:
    """``per_class`` train images of every class of the task at ``path``, drawn with ``seed``."""
    task = load_task(path)
    labels = np.asarray(task.splits["train"].labels)
    rng = np.random.default_rng(seed)
    out = []
    for c, name in enumerate(task.classes):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        out.append((str(name), [np.asarray(task.image("train", i)) for i in sorted(pick)]))
    return out


#: The images' column and the count table's: a third of the page holds the class names and all three splits at
#: 1280 px (a quarter hid the test column).
COLUMNS = [2, 1]


def _counts(task) -> list[dict]:
    rows = []
    for c, name in enumerate(task.classes):
        row = {"class": str(name)}
        for s in ("train", "val", "test"):
            row[s] = int((np.asarray(task.splits[s].labels) == c).sum()) if s in task.splits else 0
        rows.append(row)
    return rows


def page(targets: dict[str, str]) -> None:
    """The page, for the shipped tasks and ``targets`` (name -> path: the ones this session added)."""
    st.title("Data")
    st.caption("What the prompts were tuned on (source tasks) and what they are transferred to (targets): a few "
               "training images per class, and how many images each class has in each split.")
    try:
        ws = current_workspace()
        if ws.is_default:
            assets.require()
    except UserInputError as exc:
        st.error(str(exc))
        return
    # the embedded default's source tasks are shipped; a workspace's bank records only its sources' names
    tasks = {f"source · {n}": assets.task_path(n) for n in assets.shipped_tasks("source")} if ws.is_default else {}
    tasks.update({f"target · {n}": p for n, p in workspace_targets(ws).items()})
    tasks.update({f"your target · {n}": p for n, p in targets.items()})
    default = f"target · {default_target(ws)}"
    c1, c2, c3 = st.columns([3, 2, 1])
    name = c1.selectbox("Task", list(tasks), index=list(tasks).index(default) if default in tasks else 0,
                        key="data_task")
    per_class = c2.slider("Images per class", 2, 12, 8, key="data_per_class")
    seed = c3.number_input("Draw", 0, 999, 0, key="data_seed", help="Another number draws other images.")
    try:
        task = load_task(tasks[name])
    except UserInputError as exc:
        st.error(str(exc))
        return
    st.markdown(f"**{task.name}**: {task.num_classes} classes"
                + (f", VTAB group *{task.group}*" if task.group else "")
                + (f". {task.description}" if task.description else ""))
    left, right = st.columns(COLUMNS)
    with left:
        for cname, images in thumbnails(tasks[name], per_class, int(seed)):
            st.markdown(f"**{cname}**")
            cols = st.columns(12)
            for k, img in enumerate(images):
                cols[k].image(img, width=64)
    right.dataframe(_counts(task), hide_index=True, width="stretch",
                    column_config={s: st.column_config.NumberColumn(s, width="small")
                                   for s in ("train", "val", "test")})
