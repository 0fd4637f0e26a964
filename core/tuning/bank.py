"""Building source prompts: a prompt tuned on a source task, wrapped with where it came from."""
from __future__ import annotations

from ..io.prompt_bank import SourcePrompt
from .tune import TuneConfig, tune_prompt


def build_source_prompt(model, task, config: TuneConfig | None = None, name: str | None = None, callback=None, should_stop=None):
    """Tune a prompt from random initialisation on a source task and wrap it as a :class:`SourcePrompt`."""
    config = config or TuneConfig()
    res = tune_prompt(model, task, "random", config, callback=callback, should_stop=should_stop)
    sp = SourcePrompt(
        name=name or task.name,
        prompt=res.prompt,
        source_task=task.name,
        backbone=model.name,
        backbone_fingerprint=model.fingerprint,
        source_accuracy=res.test_acc,
        train_config={**config.to_dict(), "val_acc": res.val_acc, "best_epoch": res.best_epoch},
    )
    return sp, res
