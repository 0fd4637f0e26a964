"""Importing prompts tuned elsewhere (issue 31, item 2): VPT's layout from torch checkpoints (restricted loader only),
safetensors and .npz; features equal to VPT's own forward; bad files refused by name with the fix."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core import IncompatiblePromptError, PromptBank, SourcePrompt, UnsafeFileError, UserInputError
from core.io.importers import add_to_bank, import_prompt, read_prompt
from core.model.toy import toy_model

T = 3


class RunsCode:
    """A pickled object whose loading would run a shell command that leaves a file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def vpt_features(model, x, prompt_embeddings, deep_prompt_embeddings=None):
    """Pooled features the way VPT's PromptedTransformer computes them (KMnP/vpt src/models/vit_prompt/vit.py):
    the (1, T, D) prompt inserted after the class token; for deep prompts, before every block after the first, the
    prompt tokens replaced by that block's set of deep_prompt_embeddings (L - 1, T, D); the class token after the
    final norm."""
    vit = model.backbone
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    b, t = h.shape[0], prompt_embeddings.shape[1]
    h = torch.cat([h[:, :1], prompt_embeddings.expand(b, -1, -1), h[:, 1:]], dim=1)
    for i, blk in enumerate(vit.blocks):
        if deep_prompt_embeddings is not None and i > 0:
            h = torch.cat([h[:, :1], deep_prompt_embeddings[i - 1].expand(b, -1, -1), h[:, 1 + t:]], dim=1)
        h = blk(h)
    return vit.norm(h)[:, 0]


@pytest.fixture(scope="module")
def vit():
    return toy_model(depth=3)


def _vpt_state(model, deep: bool, seed: int = 0, width: int | None = None, depth: int | None = None, tokens: int = T):
    g = torch.Generator().manual_seed(seed)
    d = width or model.embed_dim
    state = {"enc.transformer.prompt_embeddings": torch.randn(1, tokens, d, generator=g),
             "enc.transformer.embeddings.patch_embeddings.weight": torch.randn(d, 3, 4, 4, generator=g),
             "enc.head.weight": torch.randn(5, d, generator=g)}
    if deep:
        state["enc.transformer.deep_prompt_embeddings"] = torch.randn((depth or model.depth) - 1, tokens, d,
                                                                      generator=g)
    return state


def _checkpoint(path, state, nest="model"):
    torch.save({nest: state, "epoch": 100, "optimizer": {"param_groups": [{"lr": 0.25}]}} if nest else state, path)
    return path


# ------------------------------------------------------------------ safety
def test_a_checkpoint_that_carries_code_is_refused_without_running_it(vit, tmp_path):
    marker = tmp_path / "code_ran"
    state = _vpt_state(vit, deep=False)
    path = tmp_path / "vpt.pth"
    torch.save({"model": state, "config": RunsCode(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"Python objects besides tensors \(it names posix.system\).*nothing in "
                                               r"it was run"):
        import_prompt(path, vit)
    raw = tmp_path / "raw.pkl"  # a plain pickle (torch.load's legacy format) too
    raw.write_bytes(pickle.dumps({"prompt_embeddings": RunsCode(marker)}))
    with pytest.raises(UnsafeFileError, match="nothing in it was run"):
        import_prompt(raw, vit)
    assert not marker.exists()
    # Everywhere else a torch checkpoint is still refused unread, whatever its name.
    torch.save({"prompt": torch.zeros(T, vit.embed_dim)}, tmp_path / "p.safetensors")
    (tmp_path / "p.json").write_text(json.dumps({"name": "p", "backbone_fingerprint": vit.fingerprint}))
    with pytest.raises(UnsafeFileError, match="pickle"):
        SourcePrompt.load(tmp_path / "p.safetensors")


# ------------------------------------------------------------------ equivalence with VPT's forward
@pytest.mark.parametrize("deep", [False, True])
def test_imported_prompt_gives_vpt_features(vit, tmp_path, deep):
    state = _vpt_state(vit, deep)
    sp = import_prompt(_checkpoint(tmp_path / "vpt.pth", state), vit)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = vit(x, sp.prompt)
    ref = vpt_features(vit, x, state["enc.transformer.prompt_embeddings"],
                       state.get("enc.transformer.deep_prompt_embeddings"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert sp.kind == ("deep" if deep else "shallow") and sp.num_tokens == T and sp.name == "vpt"
    assert sp.backbone_fingerprint == vit.fingerprint
    prov = sp.provenance
    assert prov["format"] == "vpt" and prov["container"] == "torch" and len(prov["sha256"]) == 64
    assert prov["keys"][0] == "model.enc.transformer.prompt_embeddings"
    assert ("model.enc.transformer.deep_prompt_embeddings" in prov["keys"]) == deep
    # Written and read back: the bank loads against the backbone, provenance included.
    add_to_bank(tmp_path / "bank", [sp], vit)
    back = PromptBank.load(tmp_path / "bank", model=vit)["vpt"]
    assert torch.equal(back.prompt, sp.prompt) and back.provenance == prov


def test_prompt_projection_and_other_containers(vit, tmp_path):
    """VPT with PROJECT: the prompt is kept narrower and mapped by prompt_proj; the same keys in safetensors or .npz;
    a checkpoint nested under state_dict; a plain tensor by key."""
    g = torch.Generator().manual_seed(3)
    small = torch.randn(1, T, 8, generator=g)
    w, b = torch.randn(vit.embed_dim, 8, generator=g), torch.randn(vit.embed_dim, generator=g)
    state = {"prompt_embeddings": small, "prompt_proj.weight": w, "prompt_proj.bias": b}
    sp = import_prompt(_checkpoint(tmp_path / "proj.pth", state, nest="state_dict"), vit)
    torch.testing.assert_close(sp.prompt, (small[0] @ w.T + b).float())
    assert "projected by prompt_proj (8 -> 32)" in sp.provenance["layout"]

    deep = _vpt_state(vit, deep=True)
    save_file(deep, str(tmp_path / "deep.safetensors"))
    np.savez(tmp_path / "deep.npz", **{k: v.numpy() for k, v in deep.items()})
    a = import_prompt(tmp_path / "deep.safetensors", vit)
    c = import_prompt(tmp_path / "deep.npz", vit)
    assert torch.equal(a.prompt, c.prompt) and a.prompt.shape == (vit.depth, T, vit.embed_dim)
    assert (a.provenance["container"], c.provenance["container"]) == ("safetensors", "npz")

    plain = torch.randn(vit.depth, T, vit.embed_dim, generator=g)
    save_file({"mine": plain, "other": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    got = import_prompt(tmp_path / "plain.safetensors", vit, "safetensors", key="mine", name="p1")
    assert torch.equal(got.prompt, plain) and got.name == "p1"
    np.savez(tmp_path / "one.npz", prompt=plain[0].numpy())
    assert import_prompt(tmp_path / "one.npz", vit, "npz").kind == "shallow"  # one array: no --key needed


# ------------------------------------------------------------------ bad input
def test_bad_files_are_refused_with_the_file_the_key_and_the_fix(vit, tmp_path):
    def refused(match, path, **kw):
        with pytest.raises(UserInputError, match=match):
            import_prompt(path, vit, **kw)

    no_prompt = _checkpoint(tmp_path / "weights.pth", {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    refused(r"'.*weights.pth' holds no VPT prompt: none of its 1 tensors has a key ending in 'prompt_embeddings'",
            no_prompt)
    wide = _checkpoint(tmp_path / "wide.pth", _vpt_state(vit, False, width=48))
    refused(r"width D=48 but backbone 'vit_tiny_patch16_224' has width 32: it was tuned on another ViT.*--backbone",
            wide)
    deeper = _checkpoint(tmp_path / "deeper.pth", _vpt_state(vit, True, depth=12))
    refused(r"holds 11 sets of deep prompts, so the prompt was tuned on a ViT of 12 blocks, but backbone "
            r"'vit_tiny_patch16_224' has 3 blocks", deeper)
    state = _vpt_state(vit, True)
    state["enc.transformer.deep_prompt_embeddings"] = torch.zeros(vit.depth - 1, T + 2, vit.embed_dim)
    refused(r"has shape \(2, 5, 32\) but .*prompt_embeddings' has \(1, 3, 32\): the deep sets must have the input "
            "prompt's token count", _checkpoint(tmp_path / "tokens.pth", state))
    two = {**{f"student.{k}": v for k, v in _vpt_state(vit, False).items()},
           **{f"teacher.{k}": v for k, v in _vpt_state(vit, False, seed=1).items()}}
    refused(r"holds 2 VPT prompts \('model.student.enc.transformer.prompt_embeddings', "
            r"'model.teacher.enc.transformer.prompt_embeddings'\); choose one with --key",
            _checkpoint(tmp_path / "two.pth", two))
    chosen = import_prompt(tmp_path / "two.pth", vit, key="model.teacher.enc.transformer")  # a prefix will do
    assert torch.equal(chosen.prompt, _vpt_state(vit, False, seed=1)["enc.transformer.prompt_embeddings"][0])
    (tmp_path / "notes.pth").write_text("these are my notes, not a checkpoint")
    refused(r"'.*notes.pth' is not a checkpoint: it is neither a torch.save file", tmp_path / "notes.pth")
    data = (tmp_path / "wide.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    refused(r"'.*cut.pth' .*(truncated or corrupt)", tmp_path / "cut.pth")
    save_file({"a": torch.zeros(T, 32), "b": torch.zeros(T, 32)}, str(tmp_path / "ab.safetensors"))
    refused(r"holds 2 tensors \('a', 'b'\); choose the prompt with --key", tmp_path / "ab.safetensors",
            fmt="safetensors")
    refused(r"is a torch file, not safetensors; use --from vpt", wide, fmt="safetensors")
    save_file({"deep": torch.zeros(vit.depth - 1, T, 32)}, str(tmp_path / "vptdeep.safetensors"))
    refused(r"VPT's deep layout without its input prompt.*--from vpt", tmp_path / "vptdeep.safetensors",
            fmt="safetensors")
    with pytest.raises(UserInputError, match=r"'my upload.pth' holds no VPT prompt"):  # an upload's own name
        read_prompt(no_prompt, vit, shown="my upload.pth")


def test_bank_rules_for_imported_prompts(vit, tmp_path):
    first = import_prompt(_checkpoint(tmp_path / "a.pth", _vpt_state(vit, False)), vit)
    add_to_bank(tmp_path / "bank", [first], vit)
    with pytest.raises(UserInputError, match="already holds a prompt named 'a'.*--overwrite"):
        add_to_bank(tmp_path / "bank", [first], vit)
    longer = import_prompt(_checkpoint(tmp_path / "b.pth", _vpt_state(vit, False, tokens=T + 1)), vit)
    with pytest.raises(IncompatiblePromptError, match=r"prompt 'b' has shape \(4, 32\) but the bank's other prompts"):
        add_to_bank(tmp_path / "bank", [longer], vit)
    other = toy_model(depth=3, seed=9)
    with pytest.raises(IncompatiblePromptError, match="fingerprint"):
        PromptBank.load(tmp_path / "bank", model=other)
    # A bank that records its shared start takes a prompt only with that start.
    start = torch.zeros(T, vit.embed_dim)
    add_to_bank(tmp_path / "bank2", [first], vit, start=start)
    second = import_prompt(_checkpoint(tmp_path / "c.pth", _vpt_state(vit, False, seed=4)), vit)
    with pytest.raises(UserInputError, match="records the shared start .* give --start FILE"):
        add_to_bank(tmp_path / "bank2", [second], vit)
    assert PromptBank.load(tmp_path / "bank2", model=vit).names == ["a"]
    add_to_bank(tmp_path / "bank2", [second], vit, start=start)
    assert PromptBank.load(tmp_path / "bank2", model=vit).names == ["a", "c"]
    with pytest.raises(UserInputError, match="record no shared start"):
        add_to_bank(tmp_path / "bank", [second], vit, start=start)


def test_cli_import_prompts(vit, tmp_path, capsys):
    from core.cli import main

    vit.save(tmp_path / "backbone")
    _checkpoint(tmp_path / "cifar.pth", _vpt_state(vit, True, seed=1))
    _checkpoint(tmp_path / "dtd.pth", _vpt_state(vit, True, seed=2))
    args = ["--backbone", str(tmp_path / "backbone"), "--out", str(tmp_path / "bank")]
    assert main(["import-prompts", "--from", "vpt", str(tmp_path / "cifar.pth"), str(tmp_path / "dtd.pth"), *args]) == 0
    out = capsys.readouterr().out
    assert "cifar: deep T=3 D=32 depth=3 from" in out and "no shared start" in out
    bank = PromptBank.load(tmp_path / "bank", model=PromptedViT_from(tmp_path / "backbone"))
    assert bank.names == ["cifar", "dtd"]
    meta = json.loads((tmp_path / "bank" / "dtd.json").read_text())
    assert (meta["provenance"]["imported_from"] == str(tmp_path / "dtd.pth")
            and meta["backbone_fingerprint"] == vit.fingerprint)
    assert not any(f.endswith((".pth", ".pt", ".pkl")) for f in os.listdir(tmp_path / "bank"))
    np.savez(tmp_path / "x.npz", p=np.zeros((vit.depth, T, 16), np.float32))
    assert main(["import-prompts", "--from", "npz", str(tmp_path / "x.npz"), "--key", "p", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "width D=16" in err and "Traceback" not in err


def PromptedViT_from(path):
    from core import PromptedViT

    return PromptedViT.from_directory(path)
