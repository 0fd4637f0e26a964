"""The H-scores tab: each source alone on the target, against the ensemble, and per class."""
from __future__ import annotations

import streamlit as st
import torch

from dashboard import charts
from dashboard.state import Job, load_task
from dashboard.ui import chart, on_demand

EXPLAIN = ("The H-score of the target's features under each source prompt alone. Higher means the classes of the "
           "target are easier to tell apart under that prompt. The red line is the learned ensemble's H-score.")
PER_CLASS = ("The H-score is a sum over classes: each class's mean, measured against the spread of all the features, "
             "weighted by how common the class is. A row shows which of the target's classes a prompt makes stand "
             "out; two sources that are strong on different classes are the case where a mixture can beat both.")


def _per_class(job: Job, res: dict, model) -> dict:
    from core.features import source_class_hscores
    from core.h_score import resolve_n_samples

    task = load_task(res["target_path"])  # the fit's own sample: same size, same seed
    n = resolve_n_samples(res["params"].get("n_samples", "auto"), model.embed_dim, len(task.splits["train"]))
    images, labels = task.sample(model, "train", n, res["params"]["seed"])
    prompts = torch.cat([res["stack"], res["prompt"][None]])
    return {"terms": source_class_hscores(model, images, labels, prompts, res["params"].get("h_variant", "shrinkage")),
            "classes": list(task.classes)}


def view(res: dict, figs: dict, model) -> None:
    st.caption(EXPLAIN)
    chart(st, figs["hscores"], key="hscore_chart")
    st.subheader("Per class")
    st.caption(PER_CLASS)
    if res.get("stack") is None:
        st.info("The run's source prompts are not all available in this session any more.")
        return
    out = on_demand("per-class", "Split the H-scores by class", "per_class_button", f"per_class_job_{res['id']}",
                    f"per_class_{res['id']}", lambda job: _per_class(job, res, model),
                    "computing the features under every prompt ...", "One forward of the target sample under each "
                    "prompt (a few seconds).")
    if out is not None:
        chart(st, charts.class_hscores(out["terms"], res["names"] + ["ensemble"], out["classes"]), key="per_class_chart")
