"""The sidebar: which source prompts, which target, the settings; and adding a prompt or a target of your own.

What a session adds is kept on disk in its folder, so a reload of the page (same URL) finds it again."""
from __future__ import annotations

import json
import os

import streamlit as st

from core import HGPromptEnsemble, PromptBank, SourcePrompt, UserInputError, assets
from core.io.archives import extract_zip, extracted_task_folder
from core.io.digest import bytes_digest
from core.io.safe_io import atomic_write_json
from dashboard.state import MAX_UPLOAD_MB, load_task, session_dir, shipped_bank
from dashboard.widgets import option_inputs


def uploaded_prompts() -> list[SourcePrompt]:
    """The prompts this session uploaded (checked against the backbone when added), read back from the session's
    folder after a reload."""
    if "uploaded_prompts" not in st.session_state:
        folder, found = session_dir("prompts"), []
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors") and os.path.exists(os.path.join(folder, f[:-12] + ".json")):
                try:
                    found.append(SourcePrompt.load(os.path.join(folder, f)))
                except UserInputError:
                    continue
        st.session_state["uploaded_prompts"] = found
    return st.session_state["uploaded_prompts"]


def user_targets() -> dict[str, str]:
    """The targets this session added (name -> path), read back from the session's folder after a reload."""
    if "user_targets" not in st.session_state:
        path = os.path.join(session_dir("data"), "targets.json")
        try:
            with open(path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError):
            saved = {}
        st.session_state["user_targets"] = {k: v for k, v in saved.items() if isinstance(v, str) and os.path.exists(v)}
    return st.session_state["user_targets"]


def _save_targets() -> None:
    atomic_write_json(os.path.join(session_dir("data"), "targets.json"), user_targets())


def prompt_pool() -> dict[str, SourcePrompt]:
    """Every prompt this session can pick, by name: the shipped banks and its uploads."""
    return {p.name: p for p in list(shipped_bank()) + list(shipped_bank("deep")) + uploaded_prompts()}


BANKS = {"shallow": "shallow prompts", "deep": "deep prompts (one per block: per-layer views)"}


def _bank_changed() -> None:
    """Switching banks selects every prompt of the new one (shallow and deep prompts cannot be mixed)."""
    kind = st.session_state["bank_kind"]
    st.session_state["sources"] = shipped_bank(kind).names + [p.name for p in uploaded_prompts() if p.kind == kind]


def bank_for(names: list[str]) -> PromptBank:
    pool = prompt_pool()
    return PromptBank(pool[n] for n in names)


def _add_uploads(model, where) -> None:
    with where.expander("Add your own prompt or target"):
        files = st.file_uploader("Prompt: a .safetensors file and its .json metadata", type=["safetensors", "json"],
                                 accept_multiple_files=True, key="prompt_files")
        if files and st.button("Add prompt", key="add_prompt"):
            folder = session_dir("prompts")
            try:
                by_ext = {os.path.splitext(f.name)[1]: f for f in files}
                if set(by_ext) != {".safetensors", ".json"}:
                    raise UserInputError("upload exactly one .safetensors file and its .json metadata together.")
                for f in files:
                    if f.size > MAX_UPLOAD_MB * 2**20:
                        raise UserInputError(f"{f.name} is larger than {MAX_UPLOAD_MB} MB.")
                stem = f"upload_{len(uploaded_prompts())}"
                for ext, f in by_ext.items():
                    with open(os.path.join(folder, stem + ext), "wb") as out:
                        out.write(f.getvalue())
                sp = SourcePrompt.load(os.path.join(folder, stem + ".safetensors"))
                sp.check_compatible(model)
                if sp.name in prompt_pool():
                    raise UserInputError(f"a prompt named {sp.name!r} is already in the list; rename it in its JSON.")
                uploaded_prompts().append(sp)
                if sp.kind != st.session_state.get("bank_kind", "shallow"):  # its bank is shown, everything in it picked
                    st.session_state["bank_kind"] = sp.kind
                    _bank_changed()
                elif "sources" in st.session_state:  # an added prompt is selected, not only offered
                    st.session_state["sources"] = list(st.session_state["sources"]) + [sp.name]
                st.success(f"added prompt {sp.name!r} (selected)")
            except UserInputError as exc:
                st.error(str(exc))
        zfile = st.file_uploader("Target: a zip of a VTAB-1k folder or of class folders", type=["zip"], key="target_zip")
        path = st.text_input("... or a local path (VTAB-1k folder, class folders, or .npz)", key="target_path")
        if st.button("Add target", key="add_target"):
            try:
                if zfile is not None:
                    if zfile.size > MAX_UPLOAD_MB * 2**20:
                        raise UserInputError(f"{zfile.name} is larger than {MAX_UPLOAD_MB} MB.")
                    data = zfile.getvalue()
                    dest = os.path.join(session_dir("data"), bytes_digest(data))
                    if os.path.isdir(dest):  # the same archive again: already extracted and checked
                        folder = extracted_task_folder(dest)
                    else:
                        with open(dest + ".zip", "wb") as out:
                            out.write(data)
                        try:
                            folder = extract_zip(dest + ".zip", dest)
                        finally:
                            os.remove(dest + ".zip")
                elif path:
                    folder = os.path.expanduser(path)
                else:
                    raise UserInputError("upload a zip or give a local path first.")
                task = load_task(folder)
                mine = user_targets()
                name = task.name
                if name in assets.shipped_tasks("target") or (name in mine and mine[name] != folder):
                    # never silently replace a shipped target (or another of yours) that has the same name
                    n = 2
                    while f"{task.name} (local {n})" in mine:
                        n += 1
                    name = f"{task.name} (local {n})" if name in mine else f"{task.name} (local)"
                mine[name] = folder
                _save_targets()
                st.session_state["target"] = name
                sizes = task.sizes()
                st.success(f"added target {name!r}: {task.num_classes} classes, {sizes['train']} train / "
                           f"{sizes['val']} val / {sizes['test']} test images (selected)")
                for note in task.notes:
                    st.warning(note)
            except UserInputError as exc:
                st.error(str(exc))


def sidebar(model):
    """The sidebar's choices: (sources, target name, target path or None, the fit's settings)."""
    st.sidebar.header("Sources and target")
    # Filled out of order: uploads are handled first, so an added prompt or target is offered at once.
    choose, add = st.sidebar.container(), st.sidebar.container()
    with add:
        _add_uploads(model, st)
    kinds = [k for k in BANKS if len(shipped_bank(k))]
    kind = choose.radio("Prompt bank", kinds, format_func=BANKS.get, key="bank_kind", on_change=_bank_changed,
                        horizontal=True) if len(kinds) > 1 else "shallow"
    uploads = [p for p in uploaded_prompts() if p.kind == kind]
    all_names = shipped_bank(kind).names + [p.name for p in uploads]
    # A default only when the session holds no choice yet (an upload selects itself through the session state).
    sources = choose.multiselect("Source prompts", all_names, default=None if "sources" in st.session_state else all_names,
                                 key="sources",
                                 help="The prompts to ensemble; each was tuned on its own source task.")
    targets = {name: assets.task_path(name) for name in assets.shipped_tasks("target")}
    targets.update(user_targets())
    default = assets.default_target()
    if st.session_state.get("target") not in targets:
        st.session_state["target"] = default if default in targets else next(iter(targets))
    target = choose.selectbox("Target task", list(targets), key="target")
    st.sidebar.header("Settings")
    # No form: a run uses exactly what the sidebar shows (a form's unsubmitted values were silently ignored). Every
    # widget is read from the estimator's options: label, help, default and range.
    with st.sidebar:
        params = option_inputs(st, HGPromptEnsemble)
        st.toggle("Projector mode", key="projector", help="Larger chart text and stronger contrast, for a class.")
    return sources, target, targets.get(target), params
