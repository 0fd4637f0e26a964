"""The pair view: two sources, the H-score along the segment between their prompts and the slopes their
gradients predict."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import charts
from dashboard.ui import chart


def view(res: dict, r, model) -> None:
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
    chart(c2, charts.segment_curve(r.t, r.segment[i, j], r.directional[i, j], -r.directional[j, i], a, b), key="pair_chart")
