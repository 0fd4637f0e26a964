"""The Weights tab: the learned weights and how they moved."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard.run_result import RunResult
from dashboard.ui import chart

EXPLAIN = {
    "average": ("Each source prompt gets one weight; the weights sum to 1 (the paper's rule). The target prompt starts as "
                "the weighted sum of the source prompts, which keeps each source's change from the shared start only "
                "in proportion to its weight. Bars above the dotted *uniform* line are sources HGPrompt trusts more "
                "than naive averaging would; the trajectory shows how the weights moved during optimisation."),
    "task_arithmetic": ("Each source prompt gets one weight in [0, lambda_max] (task arithmetic, not on the simplex): "
                        "the target prompt is the shared start P0 plus each source's change times its weight, so a "
                        "weight of 1 keeps a source's whole change and several sources can each keep theirs. With "
                        "lambda > 0 the regulariser penalises mixing sources whose gradients differ and usually keeps "
                        "the weights at one source; lambda 0 (the H-score alone) is what learns mixtures."),
    "layerwise": ("One weight per source and block (layer-wise task arithmetic); the bars are each source's mean "
                  "weight over the blocks."),
}


def selection_note(names, weights, mixing: str, lam: float = 0.0) -> str | None:
    """A sentence when the weights are one-hot: the ensemble is then a selection of one source; with task arithmetic
    and lambda > 0, that the regulariser is what keeps it there."""
    w = np.asarray(weights, dtype=float).reshape(len(names), -1).mean(1)
    if w.max() > 0.999 and (w > 1e-3).sum() == 1:
        why = "."
        if mixing == "average":
            why = (", not a mixture (the paper's average shrinks every source's change in a mixture; task arithmetic, "
                   "in the sidebar, can keep several).")
        elif mixing == "task_arithmetic" and lam > 0:
            why = (f", not a mixture: with lambda = {lam:g} the regulariser penalises mixing sources whose gradients "
                   "differ and kept the weights here. Run again with lambda 0 (the H-score alone) to learn a mixture.")
        return f"The weights are one-hot: all on **{names[int(w.argmax())]}**. The ensemble is then a selection of one source" + why
    return None


def view(res: RunResult, figs: dict) -> None:
    mixing = res.params.get("mixing", "average")
    st.caption(EXPLAIN.get(mixing, EXPLAIN["average"]))
    note = selection_note(res.names, res.weights, mixing, float(res.params.get("lam", 0.0)))
    if note:
        st.info(note)
    c1, c2 = st.columns(2)
    chart(c1, figs["weights"], key="weights_chart")
    if res.record.n_steps > 0:
        chart(c2, figs["trajectory"], key="trajectory_chart")
    else:
        c2.info(f"No steps: the fit started at its best candidate ({res.start}), and no direction from it raises "
                "the objective, so it ended there: no trajectory to draw. Choose *Start from: uniform* in the sidebar "
                "to watch a whole trajectory.")
