"""Issue 31's fixes for bringing your own model: seeded random backbones (a), the memory limit on CUDA (c) and a
one-step tune that moves the prompt (d). The memory guard of the no-grad passes (b) is in test_resources.py."""
import os
import subprocess
import sys

import pytest
import torch

from core import PromptedViT, TuneConfig, UserInputError, tune_prompt
from core.model.toy import TINY, toy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRINT_FINGERPRINT = ("import sys, torch; from core import PromptedViT; from core.model.toy import TINY; "
                     "torch.manual_seed(int(sys.argv[1])); torch.rand(int(sys.argv[2]));"
                     "m = PromptedViT.create('vit_tiny_patch16_224', seed=7, **TINY); print(m.fingerprint)")


def test_random_weights_come_from_the_seed_in_every_process():
    """(a) Two processes whose global RNGs are in different states make the same seeded random backbone."""
    outs = []
    for global_seed, draws in ((0, 1), (123, 1000)):
        proc = subprocess.run([sys.executable, "-c", PRINT_FINGERPRINT, str(global_seed), str(draws)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout.strip())
    assert outs[0] == outs[1] and len(outs[0]) == 16
    here = PromptedViT.create("vit_tiny_patch16_224", seed=7, **TINY)
    assert here.fingerprint == outs[0]
    assert PromptedViT.create("vit_tiny_patch16_224", seed=8, **TINY).fingerprint != outs[0]
    assert here.config["init"] == {"kind": "random", "seed": 7}


def test_seeded_creation_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    PromptedViT.create("vit_tiny_patch16_224", seed=1, **TINY)
    torch.testing.assert_close(torch.rand(4), expected)


def test_saved_backbone_says_how_its_weights_were_made(tmp_path):
    m = PromptedViT.create("vit_tiny_patch16_224", seed=2, **TINY)
    m.save(tmp_path / "bb")
    back = PromptedViT.from_directory(tmp_path / "bb")
    assert back.config["init"] == {"kind": "checkpoint", "file": "model.safetensors",
                                   "origin": {"kind": "random", "seed": 2}}
    with pytest.raises(UserInputError, match="seed must be an integer"):
        PromptedViT.create("vit_tiny_patch16_224", seed=-1, **TINY)


def test_cli_init_seed_gives_the_same_backbone_and_info_says_so():
    def info(*extra):
        proc = subprocess.run([sys.executable, "-m", "core", "info", "--backbone", "vit_tiny_patch16_224",
                               "--img-size", "32", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    first, again, other = info(), info("--init-seed", "0"), info("--init-seed", "1")
    line = [x for x in first.splitlines() if x.startswith("backbone:")][0]
    assert line == [x for x in again.splitlines() if x.startswith("backbone:")][0]
    assert line != [x for x in other.splitlines() if x.startswith("backbone:")][0]
    assert "random, from seed 1 (--init-seed)" in other


def test_memory_limit_is_honoured_on_cuda(monkeypatch):
    """(c) On CUDA the limit is the smaller of HGPROMPT_MEMORY_LIMIT_MB and the device's free memory."""
    import core.model.resources as resources

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    monkeypatch.delenv("HGPROMPT_MEMORY_LIMIT_MB", raising=False)
    assert resources.free_bytes("cuda:0") == 12 * gib  # free, plus what the caching allocator holds unused
    monkeypatch.setenv("HGPROMPT_MEMORY_LIMIT_MB", "1024")
    assert resources.free_bytes("cuda:0") == 1 * gib
    monkeypatch.setenv("HGPROMPT_MEMORY_LIMIT_MB", str(100 * 1024))  # more than the device has: the device counts
    assert resources.free_bytes("cuda") == 12 * gib


def test_a_one_step_tune_moves_the_prompt():
    """(d) One optimiser step (one epoch, a batch as large as the train split) takes the configured lr, not the
    1e-4 of it (and less) that a one-cycle schedule gives its last step."""
    from core.model.toy import toy_model

    model, task = toy_model(), toy_task()
    start = torch.randn(4, model.embed_dim, generator=torch.Generator().manual_seed(0)) * 0.1
    cfg = TuneConfig(epochs=1, batch_size=len(task.splits["train"]), select="last", lr=0.05, weight_decay=0.0)
    res = tune_prompt(model, task, start, cfg)
    moved = float((res.prompt - start).norm() / start.norm())
    # AdamW's first step moves every entry by about lr (its update is lr * sign(g) at step one): about 0.05 * sqrt(n)
    # in norm against a start of norm 0.1 * sqrt(n), so half of the start's norm.
    assert moved > 0.2, moved
