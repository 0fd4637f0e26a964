"""The Export tab: the run's weights, history, prompt, config, tuning results and figures as files."""
from __future__ import annotations

import json

import numpy as np
import streamlit as st

from dashboard.run_result import RunResult

from core.io.runs import history_csv


def weights_csv(names, weights, hscores) -> str:
    """One row per source: its weight (a layer-wise run: one weight column per block) and its H-score."""
    w = np.asarray(weights, dtype=float).reshape(len(names), -1)
    cols = ["weight"] if w.shape[1] == 1 else [f"weight_block{b}" for b in range(w.shape[1])]
    rows = [",".join([n, *(repr(float(v)) for v in ws), repr(float(h))]) for n, h, ws in zip(names, hscores, w)]
    return "\n".join([",".join(["source", *cols, "hscore"]), *rows]) + "\n"


def view(res: RunResult, figs: dict, rows) -> None:
    from safetensors.torch import save

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
    c2.download_button("History (JSON)", json.dumps(res.history, indent=1), f"{res.id}-history.json", "application/json")
    c3.download_button("Ensembled prompt (safetensors)", save({"prompt": res.prompt.contiguous()}), f"{res.id}-prompt.safetensors")
    c3.download_button("Run config (JSON)", json.dumps({**res.params, "sources": names, "target": res.target}, indent=2),
                       f"{res.id}-config.json", "application/json")
    if rows:
        c3.download_button("Tuning results (JSON)", json.dumps(rows, indent=2), f"{res.id}-tuning.json", "application/json")
    for name, fig in figs.items():
        st.download_button(f"Figure: {name} (HTML)", fig.to_html(include_plotlyjs=True), f"{res.id}-{name}.html", "text/html",
                           key=f"fig-{name}")
