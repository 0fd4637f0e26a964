import json
import os
import pickle
import struct

import pytest
import torch

from core import IncompatiblePromptError, PromptBank, SourcePrompt, UnsafeFileError, UserInputError
from core.model.toy import toy_model


def _sp(model, name="a", shape=(4,), seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return SourcePrompt(name, torch.randn(*shape, model.embed_dim, generator=g), source_task="t", backbone=model.name,
                        backbone_fingerprint=model.fingerprint, source_accuracy=0.5, train_config={"epochs": 3}, **kw)


def test_round_trip_is_exact_and_writes_no_pickle(tmp_path, model):
    sp = _sp(model, shape=(model.depth, 4))
    sp.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]
    back = SourcePrompt.load(tmp_path / "a.safetensors")
    assert torch.equal(back.prompt, sp.prompt)
    assert back.metadata() == sp.metadata()
    meta = json.loads((tmp_path / "a.json").read_text())
    for key in ("name", "source_task", "backbone", "backbone_fingerprint", "num_tokens", "embed_dim", "kind",
                "source_accuracy", "train_config"):
        assert key in meta
    assert meta["kind"] == "deep" and meta["num_tokens"] == 4 and meta["embed_dim"] == model.embed_dim


def test_bank_load_checks_backbone(tmp_path, model):
    PromptBank([_sp(model, "a"), _sp(model, "b", seed=1)]).save(tmp_path)
    bank = PromptBank.load(tmp_path, model=model)
    assert bank.names == ["a", "b"] and bank.stack().shape == (2, 4, model.embed_dim)
    other = toy_model(seed=5)
    with pytest.raises(IncompatiblePromptError) as err:
        PromptBank.load(tmp_path, model=other)
    assert model.fingerprint in str(err.value) and other.fingerprint in str(err.value)


def test_width_mismatch_names_both_sides(tmp_path, model):
    other = toy_model(embed_dim=48)
    sp = _sp(other)
    sp.backbone_fingerprint = model.fingerprint  # a metadata file that claims this backbone: the shape still refuses it
    with pytest.raises(IncompatiblePromptError, match="width D=48.*width 32"):
        sp.check_compatible(model)


def test_pickle_under_any_name_refused_without_unpickling(tmp_path, model):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("p.safetensors", "p.json"):
        (tmp_path / name).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeFileError, match="pickle"):
        SourcePrompt.load(tmp_path / "p.safetensors")
    _sp(model, "q").save(tmp_path)
    with pytest.raises(UnsafeFileError, match="pickle"):
        SourcePrompt.load(tmp_path / "q.safetensors", tmp_path / "p.json")
    assert not marker.exists()


def test_truncated_and_lying_files_refused(tmp_path, model):
    _sp(model).save(tmp_path)
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(raw[: len(raw) - 7])
    with pytest.raises(UnsafeFileError, match="truncated|corrupt|not a valid"):
        SourcePrompt.load(tmp_path / "a.safetensors")
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["prompt"]["shape"] = [400, 32]  # claims far more data than there is
    hb = json.dumps(header).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    with pytest.raises(UnsafeFileError):
        SourcePrompt.load(tmp_path / "a.safetensors")
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(UnsafeFileError, match="claims"):
        SourcePrompt.load(tmp_path / "a.safetensors")


def test_nan_and_metadata_mismatch_refused(tmp_path, model):
    sp = _sp(model)
    sp.prompt[0, 0] = float("nan")
    sp.save(tmp_path)
    with pytest.raises(UnsafeFileError, match="NaN"):
        SourcePrompt.load(tmp_path / "a.safetensors")
    _sp(model, "b").save(tmp_path)
    meta = json.loads((tmp_path / "b.json").read_text())
    meta["num_tokens"] = 9
    (tmp_path / "b.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeFileError, match="num_tokens=9"):
        SourcePrompt.load(tmp_path / "b.safetensors")


def test_bank_refuses_mixed_shapes_and_duplicates(model):
    bank = PromptBank([_sp(model, "a")])
    with pytest.raises(IncompatiblePromptError, match="one shape"):
        bank.add(_sp(model, "b", shape=(5,)))
    with pytest.raises(UserInputError, match="already holds"):
        bank.add(_sp(model, "a"))
    with pytest.raises(UserInputError, match="not allowed"):
        _sp(model, "../evil")


def test_missing_names_listed(tmp_path, model):
    _sp(model).save(tmp_path)
    with pytest.raises(UserInputError, match="available: \\['a'\\]"):
        PromptBank.load(tmp_path, names=["zzz"])
