"""The sidebar's "Model" section: which workspace (backbone, bank folder, targets) every page runs on.

A session opens a workspace by server paths (a saved backbone folder or a timm name with local weights, a bank
folder, a targets folder); it is checked in full before it replaces the current one (the backbone loads, the bank
fits it, every target is a task), kept for the session and after a reload, and the embedded default is one click
away. ``python -m core dashboard --backbone ... --bank ... --targets ...`` starts the server on one instead.
"""
from __future__ import annotations

import streamlit as st

from core import UserInputError
from core.evaluation.setups import Workspace
from core.model.backbones import BackboneSpec
from dashboard.settings import remember, restore, saved
from dashboard.state import WORKSPACE_KEY, backbone, current_workspace, launch_workspace, workspace_bank

#: What a run on one workspace leaves in the session that would be wrong on another: its shown run and figures, the
#: chosen sources, target and bank.
PER_WORKSPACE = ("ensemble_result", "run_figures", "restore_tried", "sources", "target", "bank_kind")


def check(ws: Workspace) -> str:
    """Load everything ``ws`` names (the backbone, its bank, every target), so a mistake is said before it is opened;
    a one-line description of what was found."""
    model = backbone(ws)
    prompts = [p for kind in ("shallow", "deep") for p in workspace_bank(kind, ws)]
    tasks = ws.tasks()
    for name in tasks:
        tasks[name]
    return (f"{model.name} (fingerprint {model.fingerprint}, width {model.embed_dim}, {model.depth} blocks); "
            f"{len(prompts)} prompts; {len(tasks)} targets")


def switch(ws: Workspace | None) -> None:
    """Open ``ws`` (None: the server's workspace) for this session and forget what belonged to the last one."""
    for key in PER_WORKSPACE:
        st.session_state.pop(key, None)
    if ws is None:
        st.session_state.pop(WORKSPACE_KEY, None)
        remember(WORKSPACE_KEY, {})
    else:
        st.session_state[WORKSPACE_KEY] = ws.to_dict()
        remember(WORKSPACE_KEY)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


def sidebar() -> None:
    """The Model section (on every page). A workspace that can no longer be opened (a folder was removed) falls back
    to the server's, saying why."""
    if WORKSPACE_KEY not in st.session_state and saved().get(WORKSPACE_KEY):
        restore(WORKSPACE_KEY)  # after a reload: the workspace this session had open
    try:
        ws = current_workspace()
    except UserInputError as exc:
        switch(None)
        st.sidebar.error(f"The workspace this session had open cannot be opened any more: {exc}")
        ws = launch_workspace()
    with st.sidebar.expander("Model", expanded=False):
        st.caption("Every page runs on: " + ("the embedded default (64 px backbone, shipped prompts and targets)"
                                             if ws.is_default else ws.describe()) + ". The lesson stays on the "
                   "embedded default.")
        source = st.text_input("Backbone", key="ws_backbone", placeholder="a saved backbone folder or a timm name",
                               help="A folder written by PromptedViT.save (config.json + model.safetensors), or a timm "
                                    "model name with its weights below. Empty: the embedded default.")
        checkpoint = st.text_input("Weights for a timm name (.safetensors)", key="ws_checkpoint",
                                   help="A local safetensors state dict; nothing is downloaded.")
        img_size = st.number_input("Image size for a timm name (0: the model's own)", 0, 4096, 0, step=16,
                                   key="ws_img_size")
        bank = st.text_input("Bank folder", key="ws_bank", placeholder="prompts tuned on this backbone",
                             help="A folder from `python -m core build-bank` or `import-prompts`. Empty with the "
                                  "embedded backbone: its shipped prompts.")
        targets = st.text_area("Targets", key="ws_targets", height=68,
                               placeholder="folders or .npz files, one per line",
                               help="VTAB-1k folders (train800.txt, val200.txt, test.txt), .npz tasks, class folders, "
                                    "or a folder holding such tasks. Empty: the shipped targets.")
        c1, c2 = st.columns(2)
        if c1.button("Open", key="ws_open", type="primary"):
            try:
                new = Workspace.from_args(BackboneSpec.from_args(source.strip() or None,
                                                                 checkpoint=checkpoint.strip() or None,
                                                                 img_size=int(img_size) or None),
                                          bank.strip() or None, _split(targets) or None)
                with st.spinner("Loading the backbone, its bank and the targets ..."):
                    found = check(new)
                switch(new)
                st.session_state["ws_opened"] = found
                st.rerun()
            except UserInputError as exc:
                st.error(str(exc))
        if WORKSPACE_KEY in st.session_state and c2.button("Server's default", key="ws_reset",
                                                            help="Back to the workspace the server was started on."):
            switch(None)
            st.rerun()
        if "ws_opened" in st.session_state:
            st.success("Opened: " + st.session_state.pop("ws_opened"))
