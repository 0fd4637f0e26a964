"""The H-scores tab: each source alone on the target, against the ensemble, and per class."""
from __future__ import annotations

import streamlit as st
import torch

from core.method.scoring import class_hscores_at
from core.model.cost import scoring_work
from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.state import BackgroundJob
from dashboard.ui import chart, on_demand

EXPLAIN = ("The H-score of the target's features under each source prompt alone. Higher means the classes of the "
           "target are easier to tell apart under that prompt. The red line is the learned ensemble's H-score.")
PER_CLASS = ("The H-score is a sum over classes: each class's mean, measured against the spread of all the features, "
             "weighted by how common the class is. A row shows which of the target's classes a prompt makes stand "
             "out; two sources that are strong on different classes are the case where a mixture can beat both.")


def _per_class(job: BackgroundJob, res: RunResult, model) -> dict:
    tokens, labels, _ = res.sample(model)  # the fit's own sample: same size, same seed; labels index task.classes
    prompts = torch.cat([res.stack, res.prompt[None]])
    return {"terms": class_hscores_at(model, tokens, labels, prompts, res.params["h_variant"]),
            "classes": list(res.task().classes)}


def view(res: RunResult, figs: dict, model) -> None:
    st.caption(EXPLAIN)
    chart(st, figs["hscores"], key="hscore_chart")
    if st.toggle("Zoom in on their differences", key="hscore_zoom",
                 help="The same scores as dots on an axis that does not start at 0, labelled as such."):
        figs["hscores_zoomed"] = charts.hscore_dots(res.names, res.source_hscores, res.ensemble_hscore)
        chart(st, figs["hscores_zoomed"], key="hscore_dots")
    st.subheader("Per class")
    st.caption(PER_CLASS)
    if res.stack is None:
        st.info("The run's source prompts are not all available in this session any more.")
        return
    out = on_demand("per-class", "Split the H-scores by class", "per_class_button", f"per_class_job_{res.id}",
                    f"per_class_{res.id}", lambda job: _per_class(job, res, model),
                    "computing the features under every prompt ...", "One forward of the target sample under each "
                    "prompt.", model=model, prompt=res.stack[0],
                    work=scoring_work(len(res.names) + 1, res.sample_size(model), embed=not res.embedded(model)))
    if out is not None:
        chart(st, charts.class_hscores(out["terms"], res.names + ["ensemble"], out["classes"]), key="per_class_chart")
