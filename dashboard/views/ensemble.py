"""Run HGPrompt on a target and study the result: weights, objective, H-scores, conflicts, maps, accuracy, export."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Callable

import numpy as np
import streamlit as st
import torch

from core import HGPromptEnsemble, PromptBank, SourcePrompt, TuneConfig, UserInputError, assets
from core.data import extract_zip, extracted_task_folder
from core.runs import RunWriter, history_csv, write_ensemble
from dashboard import charts
from dashboard.state import (MAX_SAMPLES, MAX_SOURCES, MAX_UPLOAD_MB, Job, backbone, digest, finished_runs, load_task, runs_dir,
                             session_dir, shipped_bank)

EXPLAIN = {
    "weights": "Each source prompt gets one weight; the weights sum to 1. The target prompt starts as the "
               "weighted sum of the source prompts. Bars above the dotted *uniform* line are sources HGPrompt trusts "
               "more than naive averaging would; the trajectory shows how the weights moved during optimisation.",
    "objective": "HGPrompt maximises J = H - lambda R. H (dashed) is the H-score of the target features under the "
                 "weighted prompt: how well the classes separate, relative to the total spread. R (lower panel) is the "
                 "regulariser: zero at a single source, positive for a mixture the regulariser penalises.",
    "hscores": "The H-score of the target's features under each source prompt alone. Higher means the classes of the "
               "target are easier to tell apart under that prompt. The red line is the learned ensemble's H-score.",
    "conflicts": "Cosine between the gradients of the target loss taken at each pair of source prompts (raw). Blue: the "
                 "two sources push the prompt the same way; red (outlined): they conflict. On a frozen backbone the "
                 "gradients share a direction that does not depend on the prompt, so raw cosines are mostly positive: "
                 "measure the interference below to see what mixing two prompts actually does.",
    "maps": "Each panel places the target images by their features under one prompt, squeezed to 2-D. Tight, separate "
            "colour clusters mean the prompt already separates the classes. The first map computes the features "
            "(seconds); PCA then takes a fraction of a second, UMAP seconds (the first UMAP also compiles numba, about "
            "25 s). UMAP shows neighbourhoods better. Select points with the box tool to see their images.",
    "tuning": "The decisive test: every method's initial prompt is tuned with a fresh linear head on the target's train "
              "split for the same number of epochs; the val split picks the epoch; the bars are test accuracy.",
}


# ------------------------------------------------------------------ inputs
def _uploaded_prompts() -> list[SourcePrompt]:
    """The prompts this session uploaded (checked against the backbone when added)."""
    return st.session_state.setdefault("uploaded_prompts", [])


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
                stem = f"upload_{len(_uploaded_prompts())}"
                for ext, f in by_ext.items():
                    with open(os.path.join(folder, stem + ext), "wb") as out:
                        out.write(f.getvalue())
                sp = SourcePrompt.load(os.path.join(folder, stem + ".safetensors"))
                sp.check_compatible(model)
                if sp.name in shipped_bank().names or sp.name in [p.name for p in _uploaded_prompts()]:
                    raise UserInputError(f"a prompt named {sp.name!r} is already in the list; rename it in its JSON.")
                _uploaded_prompts().append(sp)
                if "sources" in st.session_state:  # an added prompt is selected, not only offered
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
                    dest = os.path.join(session_dir("data"), hashlib.sha256(data).hexdigest()[:16])
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
                mine = st.session_state.setdefault("user_targets", {})
                name = task.name
                if name in assets.shipped_tasks("target") or (name in mine and mine[name] != folder):
                    # never silently replace a shipped target (or another of yours) that has the same name
                    n = 2
                    while f"{task.name} (local {n})" in mine:
                        n += 1
                    name = f"{task.name} (local {n})" if name in mine else f"{task.name} (local)"
                mine[name] = folder
                st.session_state["target"] = name
                st.success(f"added target {name!r}: {task.num_classes} classes, {task.sizes()} (selected)")
            except UserInputError as exc:
                st.error(str(exc))


def _sidebar(model):
    bank = shipped_bank()
    st.sidebar.header("Sources and target")
    # Filled out of order: uploads are handled first, so an added prompt or target is offered at once.
    choose, add = st.sidebar.container(), st.sidebar.container()
    with add:
        _add_uploads(model, st)
    uploads = _uploaded_prompts()
    all_names = bank.names + [p.name for p in uploads]
    # A default only when the session holds no choice yet (an upload selects itself through the session state).
    sources = choose.multiselect("Source prompts", all_names, default=None if "sources" in st.session_state else all_names,
                                 key="sources",
                                 help="The prompts to ensemble; each was tuned on its own source task.")
    targets = {name: assets.task_path(name) for name in assets.shipped_tasks("target")}
    targets.update(st.session_state.get("user_targets", {}))
    default = assets.default_target()
    if st.session_state.get("target") not in targets:
        st.session_state["target"] = default if default in targets else next(iter(targets))
    target = choose.selectbox("Target task", list(targets), key="target")
    st.sidebar.header("Settings")
    # No form: a run uses exactly what the sidebar shows (a form's unsubmitted values were silently ignored).
    with st.sidebar:
        reg = st.selectbox("Regulariser", ["fishr", "conflict", "interference"], key="regularizer",
                           help="fishr: spread of the sources' per-sample gradient variances (the paper's final reading); "
                           "conflict: weight on pairs whose raw gradients conflict; interference: weight on pairs whose "
                           "measured mixing loses H-score (see docs/METHOD_NOTES.md)")
        lam = st.number_input("lambda (0 = H-score only)", 0.0, 100.0, 1.0, 0.1, key="lam")
        hv = st.selectbox("H-score variant", ["shrinkage", "pinv", "trace_ratio"], key="h_variant")
        start = st.selectbox("Start from", ["best", "uniform"], key="start",
                             help="best: the best single source or the uniform point (fastest); uniform: the uniform "
                             "point, to watch the whole trajectory. The best point evaluated is returned either way.")
        optimizer = st.selectbox("Optimiser", ["eg", "adam"], key="optimizer",
                                 help="eg: exponentiated gradient on the simplex, keeps a step only when it raises the "
                                 "objective; adam: Adam on the weights' logits")
        steps = st.slider("Most steps (ends earlier once converged)", 1, 200, 30, key="steps")
        lr = st.number_input("Step size (EG: largest log-weight change per step)", 0.001, 5.0, 0.5, 0.05, format="%.3f", key="lr")
        n = st.slider("Target samples", 20, MAX_SAMPLES, 256, 4, key="n_samples",
                      help="More samples than feature dimensions (N > D) keep the H-score estimate out of its singular regime.")
        seed = st.number_input("Seed", 0, 10_000, 0, key="seed")
        st.toggle("Projector mode", key="projector", help="Larger chart text and stronger contrast, for a class.")
    params = {"lam": float(lam), "regularizer": reg, "h_variant": hv, "start": start, "optimizer": optimizer,
              "steps": int(steps), "lr": float(lr),
              "n_samples": int(n), "seed": int(seed)}
    return sources, target, targets.get(target), params


def _bank_for(names: list[str], model) -> PromptBank:
    pool = {p.name: p for p in list(shipped_bank()) + _uploaded_prompts()}
    return PromptBank(pool[n] for n in names)


# ---------------------------------------------------------------- the run
def _run_key(model, bank: PromptBank, task_path: str, params: dict) -> str:
    """What a run's result depends on: the backbone, the prompts' values, the target file, the settings and seed."""
    stat = os.stat(task_path)
    prompts = [hashlib.sha1(sp.prompt.detach().contiguous().numpy().tobytes()).hexdigest() for sp in bank]
    return digest(model.fingerprint, bank.names, prompts, os.path.realpath(task_path), stat.st_size, stat.st_mtime_ns,
                  sorted(params.items()))


def _copy_run(done: dict, folder: str) -> dict:
    """A finished run copied into this session's run folder under a new id, marked as served from the cache."""
    import shutil

    stamp = time.strftime("%Y%m%d-%H%M%S")
    new_id = f"{stamp}-learn-{os.urandom(3).hex()}"
    path = os.path.join(folder, new_id)
    shutil.copytree(done["run_path"], path)
    return {**done, "id": new_id, "run_path": path, "served_from": done["id"]}


def _run_ensemble(job: Job, model, bank: PromptBank, task, task_path: str, params: dict, folder: str,
                  key: str | None = None) -> dict:
    ens = HGPromptEnsemble(**params).fit(model, bank, task=task, callback=job.report, should_stop=job.stop)
    config = {**params, "sources": bank.names, "target": task.name, "target_path": task_path,
              "backbone_name": model.name, "backbone_fingerprint": model.fingerprint, "source": "dashboard"}
    with RunWriter(folder, "learn", config) as run:
        write_ensemble(run, ens, model)
        run.write_json("metrics.json", {"ensemble_hscore": ens.ensemble_hscore_, "seconds": ens.fit_seconds_,
                                        "stopped": ens.stopped_})
    c = ens.conflicts_
    res = {
        "id": os.path.basename(run.path), "run_path": run.path, "params": params, "names": ens.names_,
        "weights": ens.weights_.tolist(), "history": ens.history_, "cosine": c.cosine.numpy(),
        "layer_cosine": None if c.layer_cosine is None else c.layer_cosine.numpy(),
        "source_hscores": ens.source_hscores_.tolist(), "ensemble_hscore": ens.ensemble_hscore_,
        "prompt": ens.prompt_, "stack": bank.stack(), "target": task.name, "target_path": task_path,
        "stopped": ens.stopped_, "seconds": ens.fit_seconds_, "start": ens.start_, "converged": ens.converged_,
        "candidates": ens.candidates_, "warnings": ens.warnings_, "n_classes": task.num_classes,
    }
    if key is not None and not ens.stopped_:
        cache = finished_runs()
        while len(cache) >= 64:  # the oldest go first; their run folders stay on disk
            cache.pop(next(iter(cache)))
        cache[key] = res
    return res


BUSY = "Busy: another run is using the machine. Yours is queued and starts as soon as it finishes."


@st.fragment(run_every=2.0)
def _job_view(job_key: str, result_key: str, progress: Callable[[Job], tuple[float, str]],
              live: Callable[[Job], None] | None = None) -> None:
    """A background job's status, refreshed every two seconds: queued, progress with a Stop button, then its result.

    Every refresh runs in the server process that also runs the job: at one per second the default run on
    2 cores took 27-30 s instead of 22-24 s, so the view refreshes every two seconds (about 3 steps).

    When the job ends its result goes to ``st.session_state[result_key]`` (an error is shown instead) and
    the whole page reruns to draw it.
    """
    job: Job | None = st.session_state.get(job_key)
    if job is None:
        return
    if job.status == "queued":
        pos = job.queue_position
        st.info(BUSY + (f" Place in the queue: {pos}; about {15 * pos} s to wait (a default run takes about 15 s)."
                        if pos else ""))
    elif job.status == "running":
        fraction, label = progress(job)
        st.progress(min(1.0, max(0.0, fraction)), text=label)
        if st.button("Stop", key=f"stop-{job.id}", help="Stops after the current step and keeps what was computed."):
            job.stop.set()
    if live is not None:
        live(job)
    if job.finished:
        if job.status == "failed":
            st.error(job.error)
        else:
            st.session_state[result_key] = job.result
        del st.session_state[job_key]
        st.rerun()


def _ensemble_progress(job: Job) -> tuple[float, str]:
    steps = [p for p in job.progress if p.get("stage") == "step"]
    total = max(1, job.progress[0]["steps"] if job.progress else 1)
    if not steps:
        return 0.0, "computing the sources' gradients (one batched pass) ..."
    return len(steps) / (total + 1), f"step {steps[-1]['step']} of {total}"


def _ensemble_live(job: Job) -> None:
    # Native elements, not plotly: redrawing two plotly charts every second cost headless Chromium about a CPU
    # core, which on a 2-core machine serving its own browser slowed the run itself by a third.
    steps = [p for p in job.progress if p.get("stage") == "step"]
    if not steps:
        return
    last, lam = steps[-1], st.session_state.get("lam_running", 0.0)
    c1, c2 = st.columns([3, 2])
    with c1:
        st.markdown("**Ensemble weights** (live; ▲ above uniform)")
        uniform = 1 / len(last["names"])
        for name, w in zip(last["names"], last["weights"]):
            st.progress(min(1.0, w), text=f"{name}: {w:.3f}" + ("  ▲" if w > uniform else ""))
    with c2:
        st.metric("objective J = H - lambda R", f"{last['objective']:.4f}",
                  delta=f"{last['objective'] - steps[0]['objective']:+.4f} since step 0")
        st.metric("H-score", f"{last['hscore']:.4f}")
        st.metric("regulariser R", f"{last['regularizer']:.4f}", help=f"lambda = {lam}")


def _tune_progress(job: Job) -> tuple[float, str]:
    """Per epoch: which method, which epoch, how many methods are done, and the time left at the pace so far."""
    last = job.progress[-1] if job.progress else {"method": "...", "done": 0, "total": 1, "epoch": 0, "epochs": 1}
    units = last.get("units", 1)
    f = (last["done"] + last.get("epoch", 0) / max(1, last.get("epochs", 1)) / units) / max(1, last["total"])
    left = ""
    if f > 0:
        elapsed = time.time() - job.started
        left = f", about {elapsed * (1 - f) / f:.0f} s left at this pace"
    return f, (f"tuning {last['method']}: epoch {last.get('epoch', 0)}/{last.get('epochs', '?')} "
               f"({last['done']}/{last['total']} methods done{left})")


# ----------------------------------------------------------------- results
def _chart(where, fig, **kw):
    """``where.plotly_chart(fig, ...)``, in projector style (large text, high contrast) when the sidebar asks for it.
    The stored figure is left as it is: the style applies to a copy."""
    if st.session_state.get("projector"):
        fig = charts.projector(fig)
    return where.plotly_chart(fig, **kw)



# Cached by a digest of their inputs, with caps: 16 feature sets (at most 800 points x 33 prompts x D floats
# each) and 32 maps per process; the oldest entries are dropped first.
@st.cache_data(show_spinner="Computing the prompt-induced features ...", max_entries=16)
def _features(key: str, _model, _task, _stack, _prompt, names: tuple, n: int, seed: int):
    from core.features import extract_features, source_features

    x, y = _task.tensors("train", _model.transform(), key=("model", _model.fingerprint))
    idx = _task.subsample("train", n, seed)
    xs = x[idx]
    feats = dict(zip(names, source_features(_model, xs, _stack)))
    feats["ensemble"] = extract_features(_model, xs, _prompt)
    return feats, y[idx].numpy(), idx


@st.cache_data(show_spinner=False, max_entries=32)  # the view says what is being computed, with the time
def _embed(key: str, method: str, _feats: dict, seed: int) -> dict:
    from core.features import embed_2d

    return {name: embed_2d(f, method, seed=seed) for name, f in _feats.items()}


def _image(task, index: int) -> np.ndarray:
    from core.data import _to_pil

    return np.asarray(_to_pil(task.splits["train"], int(index)))


def _tune_job(job: Job, model, bank, task, methods, epochs, params, seed, run_path: str | None = None):
    from core.baselines import run_method

    rows = []
    for m in methods:
        if job.stop.is_set():
            break
        # the oracle tunes every source, each a unit of its epochs
        units = len(bank) if m == "oracle" else 1
        base = {"stage": "method", "method": m, "done": len(rows), "total": len(methods), "epochs": epochs, "units": units}
        job.report({**base, "epoch": 0})
        cfg = TuneConfig(epochs=epochs, seed=seed)
        seen = [0]  # epochs finished in this method (the oracle's tunes one after another)

        def per_epoch(info, b=base, seen=seen):
            seen[0] += 1
            job.report({**b, "epoch": seen[0], "epochs": b["epochs"] * b["units"], "units": 1})

        r = run_method(m, model, bank, task, cfg, params, should_stop=job.stop, callback=per_epoch)
        rows.append({"method": m, "test_acc": r.test_acc, "val_acc": r.val_acc})
    if run_path and os.path.isdir(run_path):  # the run folder holds the tuning results too
        with open(os.path.join(run_path, "tuning.json"), "w") as fh:
            json.dump({"epochs": epochs, "seed": seed, "stopped": job.stop.is_set(), "results": rows}, fh, indent=1)
    return rows


TABS = ["Weights", "Objective", "H-scores", "Conflicts", "Feature maps", "Tuning", "Export"]


def _figures(res: dict) -> tuple[dict, dict]:
    """The shown run's figures, kept per session for that run only: the small ones built once, and a dict
    where the maps and accuracy bars go once drawn. The small ones come as a copy (a view may replace one)."""
    kept = st.session_state.get("run_figures")
    if kept is None or kept[0] != res["id"]:
        names = res["names"]
        small = {
            "weights": charts.weights_bar(names, res["weights"]),
            "trajectory": charts.weights_trajectory(res["history"], names),
            "objective": charts.objective_curves(res["history"], res["params"]["lam"]),
            "hscores": charts.hscore_bar(names, res["source_hscores"], res["ensemble_hscore"], res.get("n_classes")),
            "conflicts": charts.conflict_heatmap(res["cosine"], names),
        }
        kept = st.session_state["run_figures"] = (res["id"], small, {})
    return dict(kept[1]), kept[2]


def _results(res: dict, model) -> None:
    names = res["names"]
    head = (f"Run `{res['id']}` on **{res['target']}**: {len(names)} sources, {len(res['history']) - 1} steps in "
            f"{res['seconds']:.1f} s, started from the best candidate ({res.get('start', 'uniform')})")
    if res.get("converged"):
        head += ", converged"
    if res.get("served_from"):
        head += (f"; identical to run `{res['served_from']}` on this server, so served from its result "
                 "(copied into your own run folder) instead of computed again")
    st.success(head + (" (stopped early; the best point so far is kept)" if res["stopped"] else ""))
    p = res["params"]
    st.caption("Ran with: " + ", ".join(f"{k} = {p[k]}" for k in ("regularizer", "lam", "h_variant", "start", "optimizer",
                                                                   "steps", "lr", "n_samples", "seed") if k in p))
    for msg in res.get("warnings", []):
        st.warning(msg)
    # Only the open tab runs (on_change="rerun"): the feature maps cost seconds and are drawn when asked for.
    tabs = dict(zip(TABS, st.tabs(TABS, key="result_tab", on_change="rerun")))
    figs, drawn = _figures(res)
    if tabs["Weights"].open:
        with tabs["Weights"]:
            st.caption(EXPLAIN["weights"])
            c1, c2 = st.columns(2)
            _chart(c1, figs["weights"], key="weights_chart")
            if len(res["history"]) > 1:
                _chart(c2, figs["trajectory"], key="trajectory_chart")
            else:
                c2.info(f"No steps: the fit started at its best candidate ({res.get('start')}), and no direction from "
                        "it raises the objective, so it ended there. Choose *Start from: uniform* in the sidebar to "
                        "watch a whole trajectory.")
    if tabs["Objective"].open:
        with tabs["Objective"]:
            st.caption(EXPLAIN["objective"])
            _chart(st, figs["objective"], key="objective_chart")
    if tabs["H-scores"].open:
        with tabs["H-scores"]:
            st.caption(EXPLAIN["hscores"])
            _chart(st, figs["hscores"], key="hscore_chart")
    if tabs["Conflicts"].open:
        with tabs["Conflicts"]:
            _conflicts(res, figs, model)
    if tabs["Feature maps"].open:
        with tabs["Feature maps"]:
            _feature_maps(res, model, drawn)
    if tabs["Tuning"].open:
        with tabs["Tuning"]:
            _tuning(res, model, drawn)
    if tabs["Export"].open:
        with tabs["Export"]:
            _export(res, {**figs, **drawn}, st.session_state.get(f"tune_result_{res['id']}"))


def _conflicts(res: dict, figs: dict, model) -> None:
    st.caption(EXPLAIN["conflicts"])
    names, cos = res["names"], res["cosine"]
    if res["layer_cosine"] is not None:
        layer = st.select_slider("Layer (deep prompts)", ["all"] + list(range(len(res["layer_cosine"]))), key="layer")
        if layer != "all":
            cos = res["layer_cosine"][layer]
            figs["conflicts"] = charts.conflict_heatmap(cos, names)
    _chart(st, figs["conflicts"], key="conflict_chart")
    pairs = [(names[i], names[j], float(cos[i, j])) for i in range(len(names)) for j in range(i + 1, len(names)) if cos[i, j] < 0]
    st.write("Pairs with a negative raw cosine: " + (", ".join(f"{a} / {b} ({c:+.2f})" for a, b, c in sorted(pairs, key=lambda p: p[2]))
                                                     or "none (see the measured interference)"))
    _interference(res, model)


def _interference(res: dict, model) -> None:
    """The interference lab: the measured mixing loss beside raw and centred cosines with their random-prompt null."""
    st.subheader("Measured interference")
    st.caption("For every pair of sources: the H-score at the midpoint of their prompts minus the mean of their own "
               "H-scores (I < 0: mixing the pair loses transferability), next to the gradient cosines, raw and with the "
               "shared direction removed (centred), each with the range the same cosines take for random prompts. "
               "Where a cosine and I disagree, trust I: it is measured, the cosine only predicts it.")
    r = _on_demand("interference", "Measure interference", "inter_button", f"inter_job_{res['id']}", f"inter_result_{res['id']}",
                   lambda job: _interference_job(job, res, model), "measuring: gradient pass and pair midpoints ...",
                   "One gradient pass over the sources and as many random prompts, and one forward of every pair's "
                   "points (30-45 s on 2 CPU cores).")
    if r is None:
        return
    names = r.names
    c1, c0 = st.columns(2)  # two per row: three heatmaps side by side are unreadable at 1280 px
    _chart(c1, charts.conflict_heatmap(r.mixing_loss, names, "Measured mixing loss I (H-score units)", zrange=None),
                    key="inter_mix")
    c2, c3 = st.columns(2)
    for col, v in ((c2, "raw"), (c3, "centred")):
        lo, hi = r.null_band[v]
        _chart(col, charts.conflict_heatmap(r.cosine[v], names, f"{v.capitalize()} cosine (random prompts: {lo:+.2f} to {hi:+.2f})"),
                         key=f"inter_{v}")
    rho = r.spearman()
    iu = np.triu_indices(len(names), 1)
    c0.write(f"Pairs whose midpoint loses H-score: {int((r.mixing_loss[iu] < 0).sum())} of {len(iu[0])}. "
             f"Pairs whose centred cosine is below every random pair's: {int(r.below_null('centred')[iu].sum())}. "
             "How well each reading ranks the measured loss (Spearman): "
             + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items()) + f". ({r.n_samples} samples, {r.seconds:.0f} s)")
    _pair_view(r)
    _simplex_view(res, model)
    if r.layer_cosine is not None:
        layer = st.select_slider("Layer (deep prompts)", list(range(len(r.layer_cosine["centred"]))), key="inter_layer")
        lo, hi = r.layer_null_band["centred"][layer]
        _chart(st, charts.conflict_heatmap(r.layer_cosine["centred"][layer], names,
                                                f"Centred cosine, layer {layer} (random prompts: {lo:+.2f} to {hi:+.2f})"),
                        key="inter_layer_chart")


def _on_demand(kind: str, label: str, button_key: str, job_key: str, result_key: str, target: Callable[[Job], object],
               running: str, help: str):
    """A computation the user asks for with a button, run as a background job; its result once there (else None).

    The result is kept in the session under ``result_key``, so the button goes once it has been computed."""
    if result_key not in st.session_state and st.button(label, key=button_key, disabled=job_key in st.session_state, help=help):
        st.session_state[job_key] = Job(kind, target).start()
    if job_key in st.session_state:
        _job_view(job_key, result_key, lambda job: (0.5, running))
    return st.session_state.get(result_key)


def _pair_view(r) -> None:
    """Two sources: the H-score along the segment between their prompts, and the slopes their gradients predict."""
    names = r.names
    c1, c2 = st.columns([1, 3])
    iu = np.triu_indices(len(names), 1)
    worst = int(np.argmin(r.mixing_loss[iu]))
    a = c1.selectbox("First source", names, index=int(iu[0][worst]), key="pair_a")
    others = [n for n in names if n != a]
    suggested = names[int(iu[1][worst])]
    b = c1.selectbox("Second source", others, index=others.index(suggested) if suggested in others else 0, key="pair_b")
    i, j = names.index(a), names.index(b)
    c1.caption("Dots: H-score measured along the segment; dashed: the slope the gradient at each end predicts "
               f"(<grad H(P_i), P_j - P_i>: {r.directional[i, j]:+.3f} and {r.directional[j, i]:+.3f}); dotted: no "
               "interference. The pair opened first is the one whose mix loses most.")
    _chart(c2, charts.segment_curve(r.t, r.segment[i, j], r.directional[i, j], -r.directional[j, i], a, b), key="pair_chart")


def _simplex_view(res: dict, model) -> None:
    """Three sources: the H-score over every mixture of them (a grid of 66), with the run's path when it stays there."""
    names = res["names"]
    if len(names) < 3:
        return
    st.subheader("Simplex view")
    default = [names[i] for i in np.argsort(res["source_hscores"])[::-1][:3]]
    chosen = st.multiselect("Three sources", names, default=default, max_selections=3, key="simplex_sources")
    if len(chosen) != 3:
        st.info("Pick three sources.")
        return
    idx = [names.index(n) for n in chosen]
    out = _on_demand("simplex", "Compute the simplex", "simplex_button", f"simplex_job_{res['id']}",
                     f"simplex_{res['id']}_{'|'.join(chosen)}", lambda job: _simplex_job(res, model, idx),
                     "computing the H-score at 66 mixtures ...", "66 mixtures in one batched forward (about 30 s on 2 CPU cores).")
    if out is None:
        return
    hist = np.array([h["weights"] for h in res["history"]])[:, idx]
    outside = float(1 - hist.sum(1).min()) if len(hist) else 0.0
    path = hist / np.clip(hist.sum(1, keepdims=True), 1e-12, None) if outside < 0.05 else None
    _chart(st, charts.simplex_map(out["weights"], out["hscores"], chosen, path), key="simplex_chart")
    st.caption(f"Computed in {out['seconds']:.1f} s, kept for this run. "
               + ("The red path is the run's weights on these three sources." if path is not None else
                  f"The run's path is not drawn: up to {outside:.0%} of its weight sat on other sources."))


def _simplex_job(res: dict, model, idx: list[int]) -> dict:
    from core.interference import simplex_hscores

    t0 = time.perf_counter()
    task = load_task(res["target_path"])
    w, h = simplex_hscores(model, res["stack"][idx], task, n_samples=res["params"].get("n_samples", "auto"),
                           seed=res["params"]["seed"])
    return {"weights": w, "hscores": h, "seconds": time.perf_counter() - t0}


def _interference_job(job: Job, res: dict, model):
    from core.interference import interference

    task = load_task(res["target_path"])
    return interference(model, res["stack"], task, n_samples=res["params"].get("n_samples", "auto"), points=5,
                        seed=res["params"]["seed"], names=res["names"])


_UMAP_COMPILED = [False]  # numba compiles UMAP once per server process


@st.fragment
def _feature_maps(res: dict, model, drawn: dict) -> None:
    """A fragment: changing the method or the number of points redraws only this view."""
    st.caption(EXPLAIN["maps"])
    task = load_task(res["target_path"])
    c1, c2 = st.columns([1, 3])
    method = c1.radio("Method", ["pca", "umap"], format_func=str.upper, key="map_method", horizontal=True)
    n = c1.slider("Points", 50, 800, 300, 50, key="map_points")
    slot = c2.empty()  # the old map gives way at once to a message saying what is being computed
    fkey = digest(res["id"], n)
    mkey = digest(fkey, method)
    figs = st.session_state.setdefault("map_figures", {})
    if mkey not in figs:
        t0 = time.perf_counter()
        first_umap = method == "umap" and not _UMAP_COMPILED[0]
        slot.info(f"Computing {method.upper()} maps of {n} target images under {len(res['names']) + 1} prompts"
                  + (" (the first UMAP also compiles numba: about 25 s)" if first_umap else "") + " ...")
    feats, labels, idx = _features(fkey, model, task, res["stack"], res["prompt"], tuple(res["names"]), n, res["params"]["seed"])
    if mkey not in figs:
        while len(figs) >= 4:  # a few drawn figures per session; the coordinates stay in the process cache
            figs.pop(next(iter(figs)))
        figs[mkey] = charts.feature_maps(_embed(mkey, method, feats, res["params"]["seed"]), labels, task.classes, method)
        _UMAP_COMPILED[0] = _UMAP_COMPILED[0] or method == "umap"
        c1.caption(f"{method.upper()} maps computed in {time.perf_counter() - t0:.1f} s")
    drawn["maps"] = figs[mkey]
    event = _chart(slot, drawn["maps"], key="map_chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else getattr(getattr(event, "selection", None), "points", [])
    if points:
        picked = [int(idx[int(p["customdata"])]) if "customdata" in p else None for p in points[:12]]
        picked = [p for p in picked if p is not None]
        c1.write(f"{len(points)} selected")
        cols = c1.columns(3)
        for k, i in enumerate(picked):
            cols[k % 3].image(_image(task, i), caption=f"#{i} {task.classes[task.splits['train'].labels[i]]}", width=64)


def _tuning(res: dict, model, drawn: dict) -> None:
    from core.baselines import METHODS

    st.caption(EXPLAIN["tuning"])
    names = res["names"]
    methods = st.multiselect("Methods", list(METHODS), default=["random", "uniform", "best_hscore", "hgprompt"], key="tune_methods")
    epochs = st.slider("Tuning epochs (same for every method)", 1, 50, 10, key="tune_epochs")
    jkey, rkey = f"tune_job_{res['id']}", f"tune_result_{res['id']}"
    if st.button("Tune and compare", key="tune_button", disabled=jkey in st.session_state):
        bank, task = _bank_for(names, model), load_task(res["target_path"])
        st.session_state[jkey] = Job("tune", lambda job: _tune_job(job, model, bank, task, methods, epochs, res["params"],
                                                                 res["params"]["seed"], res["run_path"])).start()
    if jkey in st.session_state:
        _job_view(jkey, rkey, _tune_progress)
    rows = st.session_state.get(rkey)
    if rows:
        drawn["accuracy"] = charts.accuracy_bars(rows)
        _chart(st, drawn["accuracy"], key="acc_chart")
        st.dataframe(rows, hide_index=True)


def _export(res: dict, figs: dict, rows) -> None:
    from safetensors.torch import save

    st.caption("The weights, history, ensembled prompt and config are also in the run folder on the server, and the "
               "tuning results once a tuning finishes (tuning.json): " + res["run_path"] + ". The figures are "
               "here only; their HTML files carry plotly.js, so they open offline.")
    names = res["names"]
    weights_json = json.dumps({"names": names, "weights": res["weights"], "source_hscores": res["source_hscores"],
                               "cosine": np.asarray(res["cosine"]).tolist()}, indent=2)
    c1, c2, c3 = st.columns(3)
    c1.download_button("Weights (JSON)", weights_json, f"{res['id']}-weights.json", "application/json")
    c1.download_button("Weights (CSV)", "source,weight,hscore\n" + "\n".join(
        f"{n},{w},{h}" for n, w, h in zip(names, res["weights"], res["source_hscores"])), f"{res['id']}-weights.csv", "text/csv")
    c2.download_button("History (CSV)", history_csv(res["history"], names), f"{res['id']}-history.csv", "text/csv")
    c2.download_button("History (JSON)", json.dumps(res["history"], indent=1), f"{res['id']}-history.json", "application/json")
    c3.download_button("Ensembled prompt (safetensors)", save({"prompt": res["prompt"].contiguous()}), f"{res['id']}-prompt.safetensors")
    c3.download_button("Run config (JSON)", json.dumps({**res["params"], "sources": names, "target": res["target"]}, indent=2),
                       f"{res['id']}-config.json", "application/json")
    if rows:
        c3.download_button("Tuning results (JSON)", json.dumps(rows, indent=2), f"{res['id']}-tuning.json", "application/json")
    for name, fig in figs.items():
        st.download_button(f"Figure: {name} (HTML)", fig.to_html(include_plotlyjs=True), f"{res['id']}-{name}.html", "text/html",
                           key=f"fig-{name}")


# -------------------------------------------------------------------- page
def page() -> None:
    st.title("HGPrompt: learn a prompt ensemble")
    st.write("Pick source prompts and a target task, then learn one weight per source by maximising the target's "
             "H-score minus a regulariser on the sources' gradients. Defaults run in one click; the Conflicts tab "
             "measures where mixing two prompts loses transferability.")
    try:
        model = backbone()
    except UserInputError as exc:
        st.error(str(exc))
        return
    sources, target, target_path, params = _sidebar(model)
    job_key, result_key = "ensemble_job", "ensemble_result"
    problems = []
    if len(sources) < 1:
        problems.append("pick at least one source prompt")
    if len(sources) > MAX_SOURCES:
        problems.append(f"pick at most {MAX_SOURCES} sources")
    if target_path is None:
        problems.append("pick a target task")
    running = job_key in st.session_state
    if problems:
        st.warning("To run: " + "; ".join(problems) + ".")
    elif st.button("Run ensemble learning", type="primary", disabled=running, key="run_button"):
        try:
            task = load_task(target_path)
            bank = _bank_for(sources, model)
            folder = runs_dir()
            st.session_state.lam_running = params["lam"]
            key = _run_key(model, bank, target_path, params)
            done = finished_runs().get(key)
            st.session_state.pop(result_key, None)
            if done is not None and os.path.isdir(done["run_path"]):  # the same run finished on this server: a copy of it, in this session's own folder
                st.session_state[result_key] = _copy_run(done, folder)
            else:
                st.session_state[job_key] = Job("ensemble", lambda job: _run_ensemble(job, model, bank, task, target_path,
                                                                                      params, folder, key)).start()
                running = True
        except UserInputError as exc:
            st.error(str(exc))
    if running:
        _job_view(job_key, result_key, _ensemble_progress, _ensemble_live)
    res = st.session_state.get(result_key)
    if res is not None and not running:
        _results(res, model)
