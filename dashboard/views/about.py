"""What the method does, in a page a teacher can project."""
from __future__ import annotations

import streamlit as st

from core import assets


def page() -> None:
    st.title("How HGPrompt works")
    st.markdown(
        """
**Setting.** A frozen Vision Transformer is adapted to a new task by a few learnable *prompt tokens* inserted
after its class token (visual prompt tuning). We already have several prompts tuned on other *source* tasks.
Which of them should start the new *target* prompt?

**Idea** (Zhang et al., *Learning Optimal Prompt Ensemble for Multi-source Visual Prompt Transfer*, AAAI 2026,
[arXiv 2504.12311](https://arxiv.org/abs/2504.12311)). Mix the source prompts with one weight per source on the
simplex, and choose the weights that maximise
"""
    )
    st.latex(r"J(\alpha) = H_s\big(f(X;\, P(\alpha)),\, y\big) \;-\; \lambda\, R(\alpha), \qquad "
             r"P(\alpha) = \sum_k \alpha_k P_k,\quad \alpha_k \ge 0,\ \sum_k \alpha_k = 1")
    st.markdown(
        """
* **Transferability** $H_s$: the H-score of the target images' features under $P(\\alpha)$, the between-class
  spread relative to the total spread (shrinkage covariance; it lies in $[0, C-1]$ for $C$ classes).
* **Regulariser** $R$, zero for a single source. The default (*fishr*) reads the final abstract's "matching gradient
  variances": per source, the variance over target images of the per-image gradients of the target loss,
"""
    )
    st.latex(r"R(\alpha) = \sum_k \alpha_k \Big\lVert F_k - \sum_j \alpha_j F_j \Big\rVert^2, \qquad "
             r"F_k = \operatorname{Var}_n\, \nabla_P\, \ell(x_n;\, P_k)")
    st.markdown(
        """
  *conflict* penalises pairs whose gradients point in opposite directions; *interference* penalises pairs whose
  measured mixing loses H-score.

The fit scores every single source and the uniform mixture first, starts from the best, and never returns a
worse point. The weighted prompt then initialises ordinary prompt tuning on the target.

**What to look at.** *Weights*: which sources the target trusts. *H-scores*: each source alone. *Conflicts*: the
gradient cosines and, one click away, the **measured interference**: how much transferability a 50/50 mix of two
prompts loses. On the embedded default most pairs lose, which is why the paper's average usually ends on a single
source; the *task arithmetic* rule lets complementary sources each keep their whole change (the Lesson's last step,
and `bench/mixing.py`'s known-answer case).

**Where this tool goes beyond the paper** (its equations are not public): every choice is listed in the
method notes (linked below, `docs/METHOD_NOTES.md`); the measured figures behind these statements are in the README's
*Results* section (`bench/method.py`, `bench/quality.py`).

**The embedded default** ships with the app: a small hybrid ViT built here (EfficientNet-Lite0 convolution stages with
ImageNet weights, plus transformer blocks distilled from that network: *not* an ImageNet-pretrained ViT), seven source
prompts tuned from one shared start (shallow and deep banks) and six target tasks in VTAB's three groups. See
`assets/README.md`.
"""
    )
    st.page_link("app_pages/docs.py", label="Method notes: every choice beyond the paper, with the figures",
                 icon=":material/description:")
    st.page_link("app_pages/lesson.py", label="The lesson: five steps on the embedded default, for a class",
                 icon=":material/cast_for_education:")
    st.page_link("app_pages/data.py", label="The data: images of every source task and target",
                 icon=":material/photo_library:")
    if assets.available():
        st.write("Shipped targets:", ", ".join(assets.shipped_tasks("target")))
        st.write("Shipped source tasks:", ", ".join(assets.shipped_tasks("source")))
