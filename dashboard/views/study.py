"""The Study page: a study folder written by ``python -m core study`` (:mod:`core.evaluation.study`), read back: which
sources each target uses (the targets x sources matrix, per method: the paper's interpretability claim in one
picture), the results with their intervals, and every target's seeds and jobs."""
from __future__ import annotations

import glob
import os

import numpy as np
import streamlit as st

from core import UserInputError
from core.evaluation.methods import METHODS
from core.evaluation.study import CSV_FILE, JOBS_DIR, MD_FILE, REFERENCES, job_result, read_study
from dashboard import charts
from dashboard.settings import persistent
from dashboard.ui import chart

STUDY_ENV = "HGPROMPT_STUDY"  # a study folder to open on (python -m core dashboard --study DIR)
EXPLAIN = ("A study is the evaluation protocol run over a suite of targets and seeds by `python -m core study` (on "
           "Ray, resumable): every method's initial prompt tuned with one recipe, test accuracy compared with paired "
           "bootstrap intervals. Give its folder (the command's --out) on this server.")


def found_studies() -> list[str]:
    """Study folders under ``runs/studies`` (of the folder the server was started in), newest first."""
    root = os.path.join(os.getcwd(), "runs", "studies")
    folders = [os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "study.json"))]
    return sorted(folders, key=lambda f: os.path.getmtime(os.path.join(f, "study.json")), reverse=True)


@st.cache_data(show_spinner="Reading the study ...", max_entries=8)
def _read(folder: str, stamp: float) -> dict:  # stamp: study.json's time, so a rerun is read again
    return read_study(folder)


def load(folder: str) -> dict:
    path = os.path.join(os.path.expanduser(folder), "study.json")
    return _read(os.path.expanduser(folder), os.path.getmtime(path) if os.path.isfile(path) else 0.0)


def _ordered(data: dict, keyed: dict) -> list[str]:
    """The methods of ``keyed`` in the study's order (the registry's), then any other key."""
    return [m for m in data["methods"] if m in keyed] + [m for m in keyed if m not in data["methods"]]


def _pct(p: dict) -> str:
    lo, hi = p["ci95"]
    ci = "" if not np.isfinite(lo) else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{100 * p['mean_diff']:+.1f}{ci}"


def header(data: dict) -> None:
    b, bank, jobs = data["backbone"], data["bank"], data["jobs"]
    loo = " Leave-one-out: each target gets the bank less its own prompt." if data.get("leave_one_out") else ""
    st.markdown(f"**{len(data['targets'])} targets** x **{len(data['seeds'])} seeds** ({data['seeds']}), "
                f"{len(data['methods'])} methods. Backbone: {b['describe']} (fingerprint `{b['fingerprint']}`). "
                f"Bank: `{bank['folder']}`, {len(bank['names'])} prompts" + (", built by the study" if bank.get("built")
                                                                              else "") + "." + loo)
    st.caption(f"{jobs['weights']} weight jobs and {jobs['tunes']} tunes, {jobs['read_from_store']} of them read back "
               f"from the store; {jobs['job_seconds'] / 60:.1f} min of job time in all.")
    if data.get("stopped"):
        st.warning("This study was stopped before every job finished: the tables hold the finished ones. Run the same "
                   "command again to resume it.")


def weights_view(data: dict) -> None:
    matrices = data.get("weights") or {}
    if not matrices:
        st.info("This study ran no method that weighs or picks sources (only random and the linear probe).")
        return
    names = _ordered(data, matrices)
    first = "hgprompt" if "hgprompt" in names else names[0]
    m = st.selectbox("Method", names, index=names.index(first), key="study_method",
                     format_func=lambda n: f"{n}: {METHODS[n].help}" if n in METHODS else n)
    w = matrices[m]
    chart(st, charts.source_matrix(w["values"], w["targets"], w["sources"], m, w["kind"]), key="study_matrix")
    st.caption("Each row is a target, each column a source prompt. " + (
        "A blank cell is the target's own prompt, left out by the leave-one-out design. " if data.get("leave_one_out")
        else "") + {"weights": "The weights sum to 1 per target (the paper's average of the prompts).",
                    "coefficients": "Coefficients of the task vectors (each in [0, 1]; they need not sum to 1).",
                    "chosen": "How often (over seeds) the method picked this single source."}.get(w["kind"], ""))


def results_view(data: dict, folder: str) -> None:
    targets, table = data["targets"], data["table"]
    rows = []
    for m in _ordered(data, table):
        row = table[m]
        label = f"{m} (upper bound)" if m in METHODS and METHODS[m].upper_bound else m
        rows.append({"method": label, **{t: f"{100 * row[t]['mean']:.1f} ± {100 * row[t]['std']:.1f}" for t in targets},
                     "mean": round(100 * row["mean_over_targets"], 2)})
    st.markdown("**Test accuracy (%)**, mean ± std over seeds")
    st.dataframe(rows, hide_index=True, key="study_table")
    against = data.get("against") or {}
    for ref in REFERENCES:
        lines = [{"method": m, "pooled (points) [95 % interval]": _pct(refs[ref]),
                  "wins / ties / losses": f"{refs[ref]['wins']} / {refs[ref]['ties']} / {refs[ref]['losses']}",
                  **{t: _pct(refs[ref]["per_target"][t]) for t in targets if t in refs[ref].get("per_target", {})}}
                 for m, refs in ((m, against[m]) for m in _ordered(data, against)) if ref in refs]
        if lines:
            what = ("selection by H-score" if ref == "best_hscore"
                    else "the single source chosen on test (an upper bound)")
            st.markdown(f"**Every method minus {ref}** ({what}): paired over target x seed, bootstrap 95 % interval")
            st.dataframe(lines, hide_index=True, key=f"study_against_{ref}")
    c1, c2 = st.columns(2)
    for col, name, mime in ((c1, CSV_FILE, "text/csv"), (c2, MD_FILE, "text/markdown")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                col.download_button(f"Download {name}", fh.read(), file_name=name, mime=mime, key=f"study_dl_{name}")


def target_view(data: dict, folder: str) -> None:
    target = st.selectbox("Target", data["targets"], key="study_target")
    runs = data["per_target"].get(target, [])
    if data.get("sources_by_target"):
        st.caption(f"Sources of {target}: " + ", ".join(data["sources_by_target"].get(target, [])))
    for r in runs:
        st.markdown(f"**Seed {r['seed']}**")
        c1, c2 = st.columns([1, 2])
        c1.dataframe([{"source": n, "H-score": round(h, 4)} for n, h in r["source_hscores"].items()], hide_index=True,
                     key=f"study_h_{target}_{r['seed']}")
        c2.dataframe([{"method": m, "test acc": v["test_acc"], "val acc": v["val_acc"], "epoch": v.get("best_epoch"),
                       "chosen": v.get("chosen", ""), "job": v.get("job", "")}
                      for m, v in ((m, r["methods"][m]) for m in _ordered(data, r["methods"]))],
                     hide_index=True, key=f"study_m_{target}_{r['seed']}")
    store = os.path.join(folder, JOBS_DIR)
    files = sorted(glob.glob(os.path.join(store, "*", glob.escape(target), "**", "*.json"), recursive=True))
    keys = [os.path.relpath(f, store)[:-5] for f in files]
    if keys:
        key = st.selectbox(f"Jobs of {target} ({len(keys)} in {store})", keys, key="study_job")
        st.json(job_result(folder, key) or {}, expanded=False)


def page() -> None:
    st.title("Study")
    st.caption(EXPLAIN)
    found = found_studies()
    start = os.environ.get(STUDY_ENV) or (found[0] if found else "")
    folder = persistent("study_folder", lambda **kw: st.text_input(
        "Study folder", help="The --out folder of `python -m core study` (a path on this server)."
        + (" Found here: " + ", ".join(found[:5]) if found else ""), **kw), value=start)
    if not folder:
        st.info("No study yet: run `python -m core study --targets ... --out FOLDER` and give FOLDER here.")
        return
    try:
        data = load(folder)
    except UserInputError as exc:
        st.error(str(exc))
        return
    header(data)
    tabs = st.tabs(["Sources per target", "Results", "Targets and jobs"])
    with tabs[0]:
        weights_view(data)
    with tabs[1]:
        results_view(data, os.path.expanduser(folder))
    with tabs[2]:
        target_view(data, os.path.expanduser(folder))
