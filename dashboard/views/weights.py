"""The Weights tab: the learned weights and how they moved."""
from __future__ import annotations

import numpy as np
import streamlit as st

from core.evaluation.decision import SHORT, short_tune_choice
from core.model.device import DEFAULT_PRECISION
from dashboard.run_result import RunResult
from dashboard.state import BackgroundJob, digest
from dashboard.ui import chart, on_demand

EXPLAIN = {
    "average": ("Each source prompt gets one weight; the weights sum to 1 (the paper's rule). The target prompt starts "
                "as the weighted sum of the source prompts, which keeps each source's change from the shared start "
                "only in proportion to its weight. Bars above the dotted *uniform* line are sources HGPrompt trusts "
                "more than naive averaging would; the trajectory shows how the weights moved during optimisation."),
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
        return (f"The weights are one-hot: all on **{names[int(w.argmax())]}**. The ensemble is then a selection of "
                "one source" + why)
    return None


SHORT_EPOCHS = SHORT["epochs"]  # the decision's short schedule (core.evaluation.decision.SHORT)
EPOCHS = f"{SHORT_EPOCHS} epoch{'s' if SHORT_EPOCHS != 1 else ''}"
#: What the decision measured (docs/METHOD_NOTES.md, "Fourth edition"), said beside every check.
MEASURED = ("The H-score ranks mixtures as tuning does on the case built for it (`shapes_quad`), not everywhere: on "
            "new compositions a mixture it ranks first has lost to the best single source after tuning, and on others "
            "won. The fourth edition's figures and where each was measured: docs/METHOD_NOTES.md, \"Fourth edition\".")


def mixes(names, weights) -> bool:
    """The weights put something on two sources or more."""
    w = np.asarray(weights, dtype=float).reshape(len(names), -1).mean(1)
    return int((w > 1e-3).sum()) >= 2


def _check(job: BackgroundJob, res: RunResult, model):
    """Short-tune the best single source by H-score and the learned mixture (the fourth edition's short schedule of
    the full recipe) and choose by validation: the estimator's ``choose_by="short_tune"`` on these two candidates."""
    best = int(np.argmax(res.source_hscores))
    candidates = {res.names[best]: res.stack[best], "the learned mixture": res.prompt}
    return short_tune_choice(model, res.task(), candidates, seed=int(res.params.get("seed", 0)),
                             precision=DEFAULT_PRECISION, should_stop=job.stop)


def agreement(res: RunResult, decision) -> str:
    """Whether the short tunes agree with the objective that ranked the mixture first, in one sentence."""
    best = res.names[int(np.argmax(res.source_hscores))]
    mix, single = decision.val_acc["the learned mixture"], decision.val_acc[best]
    told = (f"after {EPOCHS} the mixture reaches {100 * mix:.1f} % on validation and **{best}** alone "
            f"{100 * single:.1f} %")
    if decision.chosen == "the learned mixture":
        return f"The short tunes **agree** with the objective: {told}; tune from the mixture."
    return (f"The short tunes **disagree** with the objective: {told} (a tie keeps the single source); tune from "
            f"**{best}**, the safer start here.")


def tuning_check(res: RunResult, model) -> None:
    """For a run whose weights mix sources: does a short tune agree with the objective that preferred the mixture?"""
    if not mixes(res.names, res.weights) or res.stack is None:
        return
    st.markdown("**Does tuning agree with the objective?** The objective ranks this mixture above every single "
                f"source. A short tune of each ({EPOCHS} of the full recipe, judged on the validation "
                "split) checks that ranking where it matters: " + MEASURED)
    key = f"check_{digest(res.id)}"
    out = on_demand("check", "Check with a short tune", "check_button", f"{key}_job", key,
                    lambda job: _check(job, res, model), "short-tuning the best source and the mixture ...",
                    f"Two tunes of {EPOCHS} on the target's train split, judged on its validation split.")
    if out is not None:
        if out.chosen == "the learned mixture":
            st.success(agreement(res, out))
        else:
            st.warning(agreement(res, out))


def view(res: RunResult, figs: dict, model=None) -> None:
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
    if model is not None:
        tuning_check(res, model)
