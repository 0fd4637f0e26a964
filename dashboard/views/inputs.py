"""The sidebar: which source prompts, which target, the settings; and adding a prompt or a target of your own.

What a session adds is kept on disk in its folder, so a reload of the page (same URL) finds it again."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import streamlit as st

from core import HGPromptEnsemble, PromptBank, SourcePrompt, UserInputError
from core.io.archives import extract_zip, extracted_task_folder
from core.io.digest import bytes_digest
from core.io.importers import import_prompt
from core.io.safe_io import SCHEMAS, atomic_write_bytes, atomic_write_json, load_json
from dashboard.settings import note, persistent, remember
from dashboard.state import (
    MAX_SOURCES,
    MAX_UPLOAD_MB,
    backbone,
    default_target,
    load_task,
    local_path,
    session_dir,
    workspace_bank,
    workspace_targets,
)
from dashboard.widgets import option_inputs


def uploaded_prompts() -> list[SourcePrompt]:
    """The prompts this session uploaded for the workspace's backbone (checked against it when added), read back
    from the session's folder after a reload; a prompt uploaded for another workspace's backbone is not offered."""
    fingerprint = backbone().fingerprint
    return [p for p in _uploads() if p.backbone_fingerprint == fingerprint]


def _uploads() -> list[SourcePrompt]:
    """Every prompt this session uploaded, whatever its backbone. Only prompts that were accepted are on disk; one that
    no longer loads or has a name of its own (a bank prompt's, or an earlier upload's) is left out, with a note."""
    if "uploaded_prompts" not in st.session_state:
        folder, found = session_dir("prompts"), []
        taken = {p.name for p in list(workspace_bank()) + list(workspace_bank("deep"))}
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if (f.startswith(".") or not f.endswith(".safetensors")
                    or not os.path.exists(os.path.join(folder, f[:-12] + ".json"))):
                continue
            try:
                sp = SourcePrompt.load(os.path.join(folder, f))
                if sp.name in taken:
                    raise UserInputError(f"a prompt named {sp.name!r} is already in the list")
            except UserInputError as exc:
                note(f"An uploaded prompt of this session ({f[:-12]}) is left out: "
                     f"{_in_upload(str(exc), os.path.join(folder, f[:-12]), f[:-12])}")
                continue
            taken.add(sp.name)
            found.append(sp)
        st.session_state["uploaded_prompts"] = found
    return st.session_state["uploaded_prompts"]


def user_targets() -> dict[str, str]:
    """The targets this session added (name -> path), read back from the session's folder after a reload: a file that
    is not such a map, or a path that is gone or outside the allowed folders, is left out with a note."""
    if "user_targets" not in st.session_state:
        path = os.path.join(session_dir("data"), "targets.json")
        saved: dict = {}
        if os.path.lexists(path):
            try:
                saved = load_json(path, schema=SCHEMAS["targets"])
            except (UserInputError, OSError) as exc:
                note("This session's added targets could not be read back "
                     f"({_in_upload(str(exc), path, 'targets.json')}).")
        kept, own = {}, os.path.realpath(session_dir("data"))
        for name, target in saved.items():
            try:
                real = os.path.realpath(target)
                if os.path.commonpath([own, real]) != own:  # an uploaded zip lives in the session's folder
                    local_path(target)
                if not os.path.exists(real):
                    raise UserInputError("gone")
                kept[name] = target
            except (UserInputError, ValueError):
                note(f"The added target {name[:80]!r} is left out: its files are gone or not in a folder this server "
                     "allows.")
        st.session_state["user_targets"] = kept
    return st.session_state["user_targets"]


def _save_targets() -> None:
    atomic_write_json(os.path.join(session_dir("data"), "targets.json"), user_targets())


def prompt_pool() -> dict[str, SourcePrompt]:
    """Every prompt this session can pick, by name: the workspace's banks and its uploads (an upload never stands in
    for a bank's prompt of the same name)."""
    pool = {p.name: p for p in uploaded_prompts()}
    pool.update({p.name: p for p in list(workspace_bank()) + list(workspace_bank("deep"))})
    return pool


BANKS = {"shallow": "shallow prompts", "deep": "deep prompts (one per block: per-layer views)"}


def _bank_changed() -> None:
    """Switching banks selects every prompt of the new one (shallow and deep prompts cannot be mixed)."""
    kind = st.session_state["bank_kind"]
    st.session_state["sources"] = workspace_bank(kind).names + [p.name for p in uploaded_prompts() if p.kind == kind]


def bank_for(names: list[str]) -> PromptBank | None:
    """The chosen prompts as a bank; it keeps the workspace bank's shared start when every one of them comes from it
    (task arithmetic and TIES need the start; uploaded prompts have none that is known). None when one of them is not
    in this session any more (an upload of a session that was reloaded without it)."""
    for kind in BANKS:
        shipped = workspace_bank(kind)
        if names and all(n in shipped.names for n in names):
            return shipped.subset(names)
    pool = prompt_pool()
    if not all(n in pool for n in names):
        return None
    return PromptBank(pool[n] for n in names)


def _add_uploads(model, where) -> None:
    with where.expander("Add your own prompt or target"):
        files = st.file_uploader("Prompt: a .safetensors file and its .json metadata, or a VPT checkpoint (.pth)",
                                 type=["safetensors", "json", "pth", "pt"], accept_multiple_files=True,
                                 key="prompt_files")
        if files and st.button("Add prompt", key="add_prompt"):
            _add_prompt(model, files)
        zfile = st.file_uploader("Target: a zip of a VTAB-1k folder or of class folders", type=["zip"],
                                 key="target_zip")
        path = st.text_input("... or a local path (VTAB-1k folder, class folders, or .npz)", key="target_path")
        if st.button("Add target", key="add_target"):
            try:
                if zfile is not None:
                    if zfile.size > MAX_UPLOAD_MB * 2**20:
                        raise UserInputError(f"{zfile.name} is larger than {MAX_UPLOAD_MB} MB.")
                    data = zfile.getvalue()
                    dest = os.path.join(session_dir("data"), bytes_digest(data))
                    try:
                        if os.path.isdir(dest):  # the same archive again: already extracted and checked
                            folder = extracted_task_folder(dest)
                        else:
                            atomic_write_bytes(dest + ".zip", data)
                            try:
                                folder = extract_zip(dest + ".zip", dest)
                            finally:
                                os.remove(dest + ".zip")
                        task = load_task(folder)
                    except UserInputError as exc:  # name the user's file, never the server's folders
                        raise UserInputError(_in_upload(str(exc), dest, zfile.name)) from exc
                elif path:
                    folder = local_path(path)  # inside the folders this server allows, or refused naming nothing else
                    task = load_task(folder)
                else:
                    raise UserInputError("upload a zip or give a local path first.")
                mine = user_targets()
                name = task.name
                if name in workspace_targets() or (name in mine and mine[name] != folder):
                    # never silently replace a workspace's target (or another of yours) that has the same name
                    n = 2
                    while f"{task.name} (local {n})" in mine:
                        n += 1
                    name = f"{task.name} (local {n})" if name in mine else f"{task.name} (local)"
                mine[name] = folder
                _save_targets()
                st.session_state["target"] = name
                remember("target")
                sizes = task.sizes()
                st.success(f"added target {name!r}: {task.num_classes} classes, {sizes['train']} train / "
                           f"{sizes['val']} val / {sizes['test']} test images (selected)")
                for msg in task.notes:
                    st.warning(msg)
            except UserInputError as exc:
                st.error(str(exc))


def _add_prompt(model, files) -> None:
    """Add an uploaded prompt (a .safetensors file and its JSON, or a VPT checkpoint through the importer): it is
    checked under a scratch name and kept only when accepted, so a refused prompt leaves nothing behind (it is not
    offered after a reload, nor used by a restored run). Every refusal names the user's own files."""
    folder = session_dir("prompts")
    by_ext = {os.path.splitext(f.name)[1].lower(): f for f in files}
    pending = os.path.join(folder, f".pending-{uuid.uuid4().hex[:8]}")
    try:
        for f in files:
            if f.size > MAX_UPLOAD_MB * 2**20:
                raise UserInputError(f"{f.name} is larger than {MAX_UPLOAD_MB} MB." + (
                    " A whole model's checkpoint is: import it on the server with `python -m core import-prompts`, or "
                    "upload a file of its prompt tensors only." if f.name.endswith((".pth", ".pt")) else ""))
        checkpoint = [e for e in (".pth", ".pt") if e in by_ext]
        if checkpoint and len(files) == 1:
            sp = _import_checkpoint(model, by_ext[checkpoint[0]], pending)
        elif set(by_ext) != {".safetensors", ".json"} or len(files) != 2:
            raise UserInputError("upload exactly one .safetensors file and its .json metadata together, or one VPT "
                                 "checkpoint (.pth / .pt) on its own.")
        else:
            for ext, f in by_ext.items():
                atomic_write_bytes(pending + ext, f.getvalue())
            try:
                sp = SourcePrompt.load(pending + ".safetensors")
            except UserInputError as exc:  # named by the uploaded files, not the server's folder
                raise UserInputError(_in_upload(_in_upload(str(exc), pending + ".json", by_ext[".json"].name),
                                                pending + ".safetensors", by_ext[".safetensors"].name)) from exc
        sp.check_compatible(model)
        if sp.name in prompt_pool():
            raise UserInputError(f"a prompt named {sp.name!r} is already in the list; rename it in its JSON.")
        with open(pending + ".safetensors", "rb") as fh:
            stem = os.path.join(folder, f"upload_{bytes_digest(fh.read())}")
        for ext in (".safetensors", ".json"):  # the tensor first: a prompt is never listed without it
            os.replace(pending + ext, stem + ext)
    except (UserInputError, OSError) as exc:
        st.error(str(exc) if isinstance(exc, UserInputError) else f"the prompt could not be saved ({exc.strerror}).")
        return
    finally:
        for ext in (".safetensors", ".json"):
            if os.path.exists(pending + ext):
                os.remove(pending + ext)
    _uploads().append(sp)
    if sp.kind != st.session_state.get("bank_kind", "shallow"):  # its bank is shown, everything in it picked
        st.session_state["bank_kind"] = sp.kind
        _bank_changed()
    elif "sources" in st.session_state:  # an added prompt is selected, not only offered
        st.session_state["sources"] = list(st.session_state["sources"]) + [sp.name]
    remember("sources")
    st.success(f"added prompt {sp.name!r} (selected)")


def _import_checkpoint(model, upload, pending: str) -> SourcePrompt:
    """A VPT checkpoint uploaded as ``upload``, converted by the importer (core.io.importers: PyTorch's restricted
    loader, messages that name the user's file) and written as ``pending.safetensors`` + ``pending.json``."""
    scratch = tempfile.mkdtemp(prefix=".import-", dir=os.path.dirname(pending))
    try:
        path = os.path.join(scratch, "checkpoint" + os.path.splitext(upload.name)[1].lower())
        with open(path, "wb") as out:
            out.write(upload.getvalue())
        sp = import_prompt(path, model, "vpt", shown=upload.name)
        os.remove(path)
        sp.save(scratch)
        for ext in (".safetensors", ".json"):
            os.replace(os.path.join(scratch, sp.name + ext), pending + ext)
        return sp
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _in_upload(message: str, dest: str, upload: str) -> str:
    """``message`` with the server's extraction folder (and its scratch zip) replaced by the uploaded file's name."""
    for server, shown in ((dest + ".zip", upload), (dest + os.sep, upload + "/"), (dest, upload),
                          (os.path.basename(dest) + ".zip", upload)):
        message = message.replace(server, shown)
    return message


def sidebar(model):
    """The sidebar's choices: (sources, their bank or None, target name, target path or None, the fit's settings).
    The bank is built once here; the page and its views receive it."""
    st.sidebar.header("Sources and target")
    # Filled out of order: uploads are handled first, so an added prompt or target is offered at once.
    choose, add = st.sidebar.container(), st.sidebar.container()
    with add:
        _add_uploads(model, st)
    kinds = [k for k in BANKS if len(workspace_bank(k))]
    kind = persistent("bank_kind", lambda **kw: choose.radio("Prompt bank", kinds, format_func=BANKS.get,
                                                              on_change=_bank_changed, horizontal=True, **kw),
                      allowed=lambda v: isinstance(v, str) and v in kinds, what=f"one of {kinds}",
                      index=0) if len(kinds) > 1 else (kinds or ["shallow"])[0]
    uploads = [p for p in uploaded_prompts() if p.kind == kind]
    all_names = workspace_bank(kind).names + [p.name for p in uploads]
    # A default only when the session holds no choice yet (an upload selects itself through the session state).
    sources = persistent("sources", lambda **kw: choose.multiselect(
        "Source prompts", all_names, help="The prompts to ensemble; each was tuned on its own source task.", **kw),
        allowed=lambda v: isinstance(v, list) and len(v) <= MAX_SOURCES and all(n in all_names for n in v),
        what=f"a list of at most {MAX_SOURCES} distinct prompt names offered here", default=all_names)
    bank = bank_for(sources) if sources else None
    flags = bank.notes if bank is not None else []
    for flag in flags:  # an untuned prompt, or two that are the same tensor: a cosine of +1 would mean nothing
        choose.warning(flag)
    targets = workspace_targets()
    targets.update(user_targets())
    default = default_target()
    first = default if default in targets else next(iter(targets))
    target = persistent("target", lambda **kw: choose.selectbox("Target task", list(targets), **kw),
                        allowed=lambda v: isinstance(v, str) and v in targets, what="the name of a target offered here",
                        index=list(targets).index(first))
    if target not in targets:  # a target removed since the session chose it
        target = first
    st.sidebar.header("Settings")
    # No form: a run uses exactly what the sidebar shows (a form's unsubmitted values were silently ignored). Every
    # widget is read from the estimator's options: label, help, default and range; their values persist.
    with st.sidebar:
        params = option_inputs(st, HGPromptEnsemble)
        note = rule_note(params.get("mixing", "average"), bank)
        if note:
            st.warning(note)
        elif params.get("mixing") == "task_arithmetic" and params.get("lam", 0) > 0:
            st.caption(TA_LAMBDA)
    return sources, bank, target, targets.get(target), params


#: What the benchmarks found (README, docs/METHOD_NOTES.md): with task arithmetic the regulariser keeps the weights at
#: one source; lambda 0 is what learns mixtures.
TA_LAMBDA = ("With task arithmetic and lambda > 0 the regulariser usually keeps the weights at one source (one-hot): "
             "it penalises mixing sources whose gradients differ. Set lambda to 0 (the H-score alone) to learn "
             "mixtures; the README's results compare the two.")


def rule_note(mixing: str, bank) -> str | None:
    """Why the chosen mixing rule cannot run on these sources (said before Run, not after), or None."""
    if bank is None or mixing == "average":
        return None
    if mixing == "layerwise" and bank.stack().dim() != 4:  # (K, depth, T, D)
        return ("The layer-wise rule needs deep prompts (one set per block): pick the deep bank, or the "
                "task-arithmetic rule for these shallow prompts.")
    if bank.start is None:
        return (f"The {mixing.replace('_', '-')} rule needs the shared start the sources were tuned from, and these "
                "prompts do not record one (an uploaded prompt, or a bank built before starts were recorded): use the "
                "paper's average, or rebuild the bank with `python -m core build-bank`.")
    return None
