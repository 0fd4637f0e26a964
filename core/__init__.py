"""HGPrompt: multi-source visual prompt transfer on a frozen timm ViT.

Public API::

    from core import PromptedViT, PromptBank, Task, HGPromptEnsemble, tune_prompt, interference, assets

The sub-packages are the layers, each importing only the ones above it in this list (docs/ARCHITECTURE.md):
``io`` (files: tasks, prompt banks, run folders, the embedded default), ``metrics`` (math on features: H-score,
probes, statistics), ``model`` (the prompted ViT, frozen tokens, features), ``method`` (HGPrompt: source pass,
regularisers, objective, optimisers, the estimator), ``tuning`` (prompt tuning, building source prompts),
``analysis`` (interference, 2-D maps), ``evaluation`` (methods, the protocol, Ray sweeps), then ``cli``.
"""
# The metrics first: the registries list themselves in the order their modules are imported (scripts/registries.py,
# the table in docs/ARCHITECTURE.md), and that order puts the H-score variants before the precisions.
from .metrics.h_score import h_score  # isort: split

from .analysis.interference import InterferenceConfig, InterferenceResult, interference
from .errors import IncompatiblePromptError, UnsafeFileError, UserInputError
from .evaluation import decision as _decision  # noqa: F401  registers choose_by="short_tune" (it tunes)
from .io import assets
from .io.prompt_bank import PromptBank, SourcePrompt
from .io.tasks import Task
from .method.ensemble import HGPromptEnsemble
from .method.objective import Objective, Point, PointMemo, combine_prompts
from .method.scoring import score_prompts
from .method.source_pass import SourcePass, measure_sources
from .model.prompted_vit import PromptedViT
from .model.tokens import Target, target_tokens
from .tuning.tune import TuneConfig, TuneResult, tune_prompt

#: The transferability of prompts on a target (:func:`core.method.scoring.score_prompts`), the package's public name
#: for it; the transferability of features is :func:`core.metrics.transferability.transferability`.
transferability = score_prompts

__all__ = [
    "PromptedViT", "PromptBank", "SourcePrompt", "Task", "Target", "target_tokens", "h_score", "measure_sources",
    "SourcePass", "interference", "InterferenceConfig", "InterferenceResult", "HGPromptEnsemble", "Objective", "Point",
    "PointMemo", "combine_prompts", "transferability", "TuneConfig", "TuneResult", "tune_prompt", "assets",
    "UserInputError", "IncompatiblePromptError", "UnsafeFileError",
]
__version__ = "0.2.0"
