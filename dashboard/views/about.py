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

**Idea** (Zhang et al., *Learning Optimal Prompt Ensemble for Multi-source Visual Prompt Transfer*, AAAI 2026).
Mix the source prompts, `P(a) = sum_k a_k P_k`, with one weight per source on the simplex, and choose the weights by

* **transferability**: the H-score of the target images' features under `P(a)`: between-class spread relative to
  the total spread, with a shrinkage estimate of the covariance so few samples suffice;
* **minus a stability penalty**: the gradients of the target loss at each source prompt are compared pairwise; mixing
  sources whose gradients point in opposite directions (negative cosine) is penalised.

One forward and one backward pass of the target batch per step learns the weights; the weighted prompt then
initialises ordinary prompt tuning on the target.

**Where this tool goes beyond the paper** (the paper's equations are not public): the exact regulariser forms, the
H-score normalisation and the Fisher variant are our formulation; see `docs/METHOD_NOTES.md`.

**The embedded default** ships with the app: a small hybrid ViT built here (EfficientNet-Lite0 convolution stages with
ImageNet weights, plus transformer blocks distilled from that network: *not* an ImageNet-pretrained ViT), six source
prompts and four target tasks in VTAB's three groups. See `assets/README.md`.
"""
    )
    if assets.available():
        st.write("Shipped targets:", ", ".join(assets.shipped_tasks("target")))
        st.write("Shipped source tasks:", ", ".join(assets.shipped_tasks("source")))
