"""HGPrompt: multi-source visual prompt transfer on a frozen timm ViT.

Public API::

    from core import PromptedViT, PromptBank, h_score, gradient_conflicts, interference, HGPromptEnsemble
"""
from .conflicts import ConflictResult, gradient_conflicts
from .data import Task
from .ensemble import HGPromptEnsemble, combine_prompts
from .errors import IncompatiblePromptError, UnsafeFileError, UserInputError
from .h_score import h_score
from .interference import InterferenceResult, interference
from .prompt_bank import PromptBank, SourcePrompt
from .prompted_vit import PromptedViT
from .tuning import TuneConfig, TuneResult, tune_prompt

__all__ = [
    "PromptedViT", "PromptBank", "SourcePrompt", "h_score", "gradient_conflicts", "ConflictResult",
    "interference", "InterferenceResult",
    "HGPromptEnsemble", "combine_prompts", "Task", "TuneConfig", "TuneResult", "tune_prompt",
    "UserInputError", "IncompatiblePromptError", "UnsafeFileError",
]
__version__ = "0.1.0"
