"""The shipped embedded default: its parts match each other, and the CLI runs end to end on it."""
import json
import os

import numpy as np
import pytest

from core import PromptBank, PromptedViT, Task, assets
from core.cli import main
from core.io.runs import list_runs, load_run

pytestmark = pytest.mark.skipif(not assets.available(), reason="the embedded default is not built")


@pytest.fixture(scope="module")
def default():
    model = PromptedViT.from_directory(assets.BACKBONE_DIR)
    return model, PromptBank.load(assets.PROMPTS_DIR, model=model)


def test_backbone_is_honest_about_what_it_is(default):
    model, _ = default
    cfg = json.load(open(os.path.join(assets.BACKBONE_DIR, "config.json")))
    assert cfg["fingerprint"] == model.fingerprint
    assert "NOT an ImageNet-pretrained ViT" in cfg["provenance"]["what"]
    assert model.data_config()["input_size"] == (3, 64, 64)


def test_bank_matches_backbone_and_sources(default):
    model, bank = default
    assert len(bank) >= 6
    assert sorted(bank.names) == sorted(assets.shipped_tasks("source"))
    for sp in bank:
        assert sp.backbone_fingerprint == model.fingerprint and sp.embed_dim == model.embed_dim
        assert sp.source_task == sp.name and 0 < sp.source_accuracy <= 1
    assert len({tuple(sp.prompt.shape) for sp in bank}) == 1


def test_the_deep_bank_has_one_prompt_per_block_for_every_source(default):
    model, shallow = default
    deep = PromptBank.load(assets.DEEP_PROMPTS_DIR, model=model)
    assert sorted(deep.names) == sorted(f"{n}_deep" for n in assets.shipped_tasks("source"))
    for sp in deep:
        assert sp.kind == "deep" and tuple(sp.prompt.shape) == (model.depth, 10, model.embed_dim)
        assert sp.source_task == sp.name[: -len("_deep")] and 0 < sp.source_accuracy <= 1
        assert sp.backbone_fingerprint == model.fingerprint
    with pytest.raises(Exception, match="deep|shape|kind"):  # the two banks cannot be mixed
        PromptBank([shallow["mnist"], deep["mnist_deep"]])


@pytest.mark.parametrize("kind", ["source", "target"])
def test_tasks_have_vtab_shape(kind):
    names = assets.shipped_tasks(kind)
    assert len(names) >= 6  # six sources; six targets (natural, specialized, structured)
    groups = set()
    for name in names:
        task = Task.load(assets.task_path(name))
        sizes = task.sizes()
        if kind == "target":
            assert sizes["train"] + sizes["val"] <= 1000 and sizes["val"] == 200
            groups.add(task.group)
        assert sizes["test"] >= 200
        for split in ("train", "val", "test"):
            labels = task.splits[split].labels
            assert labels.min() >= 0 and labels.max() < task.num_classes
        assert len(np.unique(task.splits["train"].labels)) == task.num_classes
    if kind == "target":
        assert groups == {"natural", "specialized", "structured"}


def test_cli_end_to_end_on_the_embedded_default(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert main(["info"]) == 0
    assert main(["learn", "--target", "fashion_tops", "--steps", "3", "--n-samples", "40", "--runs-dir", runs]) == 0
    assert main(["tune", "--target", "textile", "--init", "uniform", "--epochs", "1", "--n-train", "100", "--runs-dir",
                 runs]) == 0
    out = capsys.readouterr().out
    assert "fashion" in out and "test" in out
    done = {r["command"]: r for r in list_runs(runs)}
    assert set(done) == {"learn", "tune"}
    w = load_run(done["learn"]["path"])["weights"]
    assert sorted(w["names"]) == sorted(assets.shipped_tasks("source")) and abs(sum(w["weights"]) - 1) < 1e-6
