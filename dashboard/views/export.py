"""The Export tab: the run's weights, history, prompt, config, tuning results and figures as files."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import streamlit as st

from core import SourcePrompt, assets
from core.io.runs import history_csv
from dashboard.run_result import RunResult


def weights_csv(names, weights, hscores) -> str:
    """One row per source: its weight (a layer-wise run: one weight column per block) and its H-score."""
    w = np.asarray(weights, dtype=float).reshape(len(names), -1)
    cols = ["weight"] if w.shape[1] == 1 else [f"weight_block{b}" for b in range(w.shape[1])]
    rows = [",".join([n, *(repr(float(v)) for v in ws), repr(float(h))])
            for n, h, ws in zip(names, hscores, w, strict=False)]
    return "\n".join([",".join(["source", *cols, "hscore"]), *rows]) + "\n"


def prompt_files(res: RunResult) -> tuple[str, bytes, bytes]:
    """The ensembled prompt as a source prompt another session can upload: its name (``ensemble-<run id>``, so two
    runs' prompts never clash), the ``.safetensors`` file and its ``.json`` metadata (backbone, fingerprint, where it
    came from), written by :meth:`SourcePrompt.save` as every prompt is."""
    sp = SourcePrompt.load(os.path.join(res.run_path, "ensemble.safetensors"))
    name = f"ensemble-{res.id}"[:100]
    sp = SourcePrompt(name=name, prompt=sp.prompt, source_task=f"hgprompt ensemble on {res.target}",
                      backbone=sp.backbone, backbone_fingerprint=sp.backbone_fingerprint, train_config=sp.train_config)
    with tempfile.TemporaryDirectory() as tmp:
        path = sp.save(tmp)
        with open(path, "rb") as fh, open(path[: -len(".safetensors")] + ".json", "rb") as meta:
            return name, fh.read(), meta.read()


def config_json(res: RunResult) -> str:
    """The run's settings, its sources, and its target with where the target's data came from."""
    data = os.path.realpath(res.target_path) if res.target_path else None
    shipped = data is not None and data.startswith(os.path.realpath(assets.ASSETS) + os.sep)
    return json.dumps({**res.params, "sources": res.names, "target": res.target, "target_path": data,
                       "target_data": ("the embedded default's target, shipped with the app" if shipped else
                                       "a target added in the dashboard (an uploaded zip, extracted on the server, or "
                                       "a local path)" if data else "unknown")}, indent=2)


def view(res: RunResult, figs: dict, rows) -> None:
    st.caption("The weights, history, ensembled prompt and config are also in the run folder on the server, and the "
               "tuning results once a tuning finishes (tuning.json): " + res.run_path + ". The figures are "
               "here only; their HTML files carry plotly.js, so they open offline.")
    names = res.names
    weights_json = json.dumps({"names": names, "weights": res.weights, "source_hscores": res.source_hscores,
                               "cosine": np.asarray(res.cosine).tolist()}, indent=2)
    c1, c2, c3 = st.columns(3)
    c1.download_button("Weights (JSON)", weights_json, f"{res.id}-weights.json", "application/json")
    c1.download_button("Weights (CSV)", weights_csv(names, res.weights, res.source_hscores), f"{res.id}-weights.csv",
                       "text/csv")
    c2.download_button("History (CSV)", history_csv(res.history, names), f"{res.id}-history.csv", "text/csv")
    c2.download_button("History (JSON)", json.dumps(res.history, indent=1), f"{res.id}-history.json",
                       "application/json")
    name, tensor, meta = prompt_files(res)
    c3.download_button("Ensembled prompt (safetensors)", tensor, f"{name}.safetensors",
                       help="Upload it with its metadata (JSON) under *Add your own prompt* to use it as a source.")
    c3.download_button("Ensembled prompt's metadata (JSON)", meta, f"{name}.json", "application/json")
    c3.download_button("Run config (JSON)", config_json(res), f"{res.id}-config.json", "application/json")
    if rows:
        c3.download_button("Tuning results (JSON)", json.dumps(rows, indent=2), f"{res.id}-tuning.json",
                           "application/json")
    for name, fig in figs.items():
        if name == "trajectory" and res.record.n_steps == 0:  # a run of no step has no trajectory to export
            continue
        st.download_button(f"Figure: {name} (HTML)", fig.to_html(include_plotlyjs=True), f"{res.id}-{name}.html",
                           "text/html",
                           key=f"fig-{name}")
