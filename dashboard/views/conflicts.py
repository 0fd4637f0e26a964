"""The Conflicts tab: the raw gradient cosines of the run, then the interference lab below them."""
from __future__ import annotations

import streamlit as st

from dashboard import charts
from dashboard.run_result import RunResult
from dashboard.ui import chart
from dashboard.views import interference

EXPLAIN = ("Cosine between the gradients of the target loss taken at each pair of source prompts (raw). Blue: the two "
           "sources push the prompt the same way; red (outlined): they point apart. On a frozen backbone the gradients "
           "share a direction that does not depend on the prompt, so raw cosines are mostly positive: measure the "
           "interference below, where each cosine is coloured against the range random prompts give.")


def layer_choice(res: RunResult):
    """The one layer control of the tab (deep prompts): "all" or a block index; the measured views below read it."""
    if res.layer_cosine is None:
        return "all"
    return st.select_slider("Layer (deep prompts): the cosines of one block's prompt tokens, or of all of them",
                            ["all"] + list(range(len(res.layer_cosine))), key="layer")


def view(res: RunResult, figs: dict, model, drawn: dict | None = None) -> None:
    st.caption(EXPLAIN)
    names, cos = res.names, res.cosine
    for note in (res.flags or []):
        st.warning(note)
    if cos is None:
        st.info("This run was stopped during the sources' gradient pass, so it has no gradient cosines. The "
                "measured interference below does not need them.")
        return interference.view(res, model, "all", drawn if drawn is not None else {})
    layer = layer_choice(res)
    if layer != "all":
        cos = res.layer_cosine[layer]
        figs["conflicts"] = charts.conflict_heatmap(cos, names, f"Gradient cosine between sources, layer {layer}")
    chart(st, figs["conflicts"], key="conflict_chart")
    pairs = [(names[i], names[j], float(cos[i, j])) for i in range(len(names)) for j in range(i + 1, len(names))
             if cos[i, j] < 0]
    st.write("Pairs with a negative raw cosine: "
             + (", ".join(f"{a} / {b} ({c:+.2f})" for a, b, c in sorted(pairs, key=lambda p: p[2]))
                or "none (see the measured interference)"))
    interference.view(res, model, layer, drawn if drawn is not None else {})
