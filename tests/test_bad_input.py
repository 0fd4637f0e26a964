"""Bad or unusual input, second pass: every case of docs/BAD_INPUT.md gets its message (or warning), on tiny generated
inputs, before any expensive work where the input is known up front."""
from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest
import torch

from core import HGPromptEnsemble, IncompatiblePromptError, PromptBank, SourcePrompt, Task, UserInputError, interference
from core.cli import main
from core.model.toy import toy_model, toy_task


def _png(path, value=120, size=8, mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def _vtab(root, lines: dict[str, list[tuple[str, int]]]):
    """A VTAB-1k folder whose list files hold ``lines``; every image named is made."""
    names = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
    for split, rows in lines.items():
        for rel, label in rows:
            if not (root / rel).exists():
                _png(root / rel, 40 * (label % 5))
        (root / names[split]).write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    return root


def _rows(prefix, labels):
    return [(f"images/{prefix}{i}.png", y) for i, y in enumerate(labels)]


def _three_class(root):
    return _vtab(root, {"train": _rows("tr", [0, 1, 2] * 3), "val": _rows("va", [0, 1, 2]),
                        "test": _rows("te", [0, 1, 2])})


def _snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes' digest: a folder 'byte for byte as it was'."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# ------------------------------------------------------------- labels
def test_a_test_label_the_train_split_lacks_names_its_line(tmp_path):
    root = _vtab(tmp_path, {"train": _rows("tr", [0, 1, 2] * 3), "val": _rows("va", [0, 1, 2]),
                            "test": _rows("te", [0, 1, 7])})
    with pytest.raises(UserInputError, match=r"test.txt line 3: label 7 is no class of train800.txt"):
        Task.load(root)


def test_labels_that_skip_classes_are_refused():
    x = np.zeros((6, 8, 8), np.uint8)
    y = np.array([0, 5, 0, 5, 0, 5])
    with pytest.raises(UserInputError, match=r"labels 0, 5: the classes between them \(1, 2, 3, 4\) have no images"):
        Task.from_arrays("gaps", (x, y), (x[:2], y[:2]), (x[:2], y[:2]))


def test_a_test_class_absent_from_train_is_refused():
    x = np.zeros((6, 8, 8), np.uint8)
    with pytest.raises(UserInputError, match=r"the test split has label 2 .* which no train image has"):
        Task.from_arrays("t", (x, np.array([0, 1] * 3)), (x[:2], np.array([0, 1])), (x[:3], np.array([0, 1, 2])))


def test_an_empty_class_folder_is_refused(tmp_path):
    for cls in ("a", "b"):
        for k in range(4):
            _png(tmp_path / cls / f"{k}.png", 30 * k)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"class folder .*empty' holds no images"):
        Task.load(tmp_path)


def test_a_class_with_no_train_images_is_refused(tmp_path):
    for split, classes in (("train", "ab"), ("val", "abc"), ("test", "abc")):
        for cls in classes:
            _png(tmp_path / split / cls / "0.png")
    with pytest.raises(UserInputError, match=r"the val split has label 2 \('c'\), which no train image has"):
        Task.load(tmp_path)


def test_a_test_split_identical_to_train_warns_loudly():
    x = np.random.default_rng(0).integers(0, 255, (6, 8, 8)).astype(np.uint8)
    y = np.array([0, 1] * 3)
    with pytest.warns(UserWarning, match="the test split is the train split itself"):
        task = Task.from_arrays("same", (x, y), (x[:2], y[:2]), (x, y))
    assert any("measures how well train images are remembered" in n for n in task.notes)


def test_a_huge_label_is_refused_before_any_class_list_is_made(tmp_path):
    root = _vtab(tmp_path, {"train": _rows("tr", [0, 1, 1000000000]), "val": _rows("va", [0, 1]),
                            "test": _rows("te", [0, 1])})
    with pytest.raises(UserInputError, match=r"train800.txt line 3: label 1000000000 is larger than any class index"):
        Task.load(root)
    x = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(UserInputError, match="have no images at all"):  # in memory too, without 10^9 names
        Task.from_arrays("big", (x, np.array([0, 1, 10**9])), (x[:2], np.array([0, 1])), (x[:2], np.array([0, 1])))


def test_an_empty_val_split_is_refused(tmp_path):
    for split in ("train", "test"):
        for cls in "ab":
            _png(tmp_path / split / cls / "0.png")
    for cls in "ab":
        (tmp_path / "val" / cls).mkdir(parents=True)
    with pytest.raises(UserInputError, match="has an empty val split"):
        Task.load(tmp_path)


def test_tiny_class_folders_still_get_a_val_and_a_test_image(tmp_path):
    for cls in "ab":
        for k in range(3):
            _png(tmp_path / cls / f"{k}.png", 20 + 30 * k)
    task = Task.load(tmp_path)
    assert task.sizes()["val"] >= 1 and task.sizes()["test"] >= 1


# ------------------------------------------------------------- images
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from core.io.images import open_image

    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000 of 65535
    Image.fromarray(values).save(tmp_path / "g16.png")
    rgb = np.asarray(open_image(str(tmp_path / "g16.png")))
    expected = np.round(values.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(rgb[..., 0], expected)  # not 255 almost everywhere, as clipping gave
    assert abs(rgb.mean() - expected.mean()) < 0.01 and rgb.mean() < 200


def test_floating_point_images_are_refused_by_name(tmp_path):
    from PIL import Image

    from core.io.images import open_image

    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserInputError, match=r"f.tif' is a mode-F image \(floating-point"):
        open_image(str(tmp_path / "f.tif"))


# --------------------------------------------------------------- seeds
def test_one_seed_rule_everywhere(model, bank, task):
    with pytest.raises(UserInputError, match=r"seed must be an integer in 0\.\.4294967295, got -1"):
        HGPromptEnsemble(seed=-1).fit(model, bank, task=task)
    with pytest.raises(UserInputError, match=r"seed must be an integer in 0\.\.4294967295, got -1"):
        interference(model, bank, task, seed=-1)
    with pytest.raises(UserInputError, match=r"seed must be an integer in 0\.\.4294967295, got -1"):
        task.resplit(-1)
    from core import TuneConfig

    with pytest.raises(UserInputError, match=r"seed must be an integer in 0\.\.4294967295, got 4294967296"):
        TuneConfig(seed=2**32)


def test_a_negative_seed_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["learn", "--target", "shapes_quad", "--seed", "-1"])
    assert exit_.value.code == 2 and "--seed: must be an integer in 0..4294967295" in capsys.readouterr().err


# ------------------------------------------------------- CLI, up front
@pytest.fixture
def no_backbone(monkeypatch):
    """The backbone must not load: every check below happens before it."""
    import core.cli as cli

    monkeypatch.setattr(cli, "load_backbone", lambda args: pytest.fail("the backbone was loaded first"))


def test_a_runs_dir_that_is_a_file_is_refused_before_the_backbone_loads(tmp_path, capsys, no_backbone):
    (tmp_path / "file").write_text("x")
    assert main(["learn", "--target", "shapes_quad", "--runs-dir", str(tmp_path / "file")]) == 2
    assert "--runs-dir" in (err := capsys.readouterr().err) and "is a file, not a folder" in err


def test_a_runs_dir_that_cannot_be_written_is_refused(tmp_path, capsys, no_backbone, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (tests may run as root, for whom chmod is no bar)
    assert main(["interference", "--target", "shapes_quad", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_a_chunk_size_of_zero_is_refused_as_it_is_parsed(capsys):
    with pytest.raises(SystemExit):
        main(["interference", "--target", "shapes_quad", "--chunk-size", "0"])
    assert "--chunk-size must be an integer in 1..1000000 or None, got 0" in capsys.readouterr().err


def test_a_backbone_folder_that_does_not_exist(tmp_path, capsys):
    assert main(["info", "--backbone", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder with a saved backbone" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--lam", "1e308"], r"--lam must be a finite number in \[0, 1000000\], got 1e\+308"),
    (["--ens-lr", "0"], r"--ens-lr must be a finite number > 0 and <= 100 or None, got 0.0"),
    (["--steps", "-1"], r"--steps must be an integer in 0\.\.100000"),
])
def test_size_like_options_have_limits_and_messages_name_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["learn", "--target", "shapes_quad", *argv])
    assert __import__("re").search(match, capsys.readouterr().err)


def test_interference_options_have_limits(capsys):
    with pytest.raises(SystemExit):
        main(["interference", "--target", "shapes_quad", "--points", "100001"])
    assert "--points must be an integer in 3..101, got 100001" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["interference", "--target", "shapes_quad", "--n-samples", "1"])
    assert "--n-samples must be 'auto', an integer in 2..1000000 or None, got 1" in capsys.readouterr().err


def test_interference_reports_progress_and_can_be_stopped(model, bank, task):
    from core.errors import StopRequested

    seen = []
    interference(model, bank, task, points=5, callback=seen.append)
    assert seen[0]["stage"] == "gradients" and seen[-1] == {"stage": "segments", "done": 9, "total": 9}
    with pytest.raises(StopRequested):
        interference(model, bank, task, points=5, should_stop=lambda: True)


# ------------------------------------------------------- the bank builder
def _cli_workspace(tmp_path):
    from core.io.runs import check_output_folder  # noqa: F401 - the module the CLI checks with

    model = toy_model()
    model.save(tmp_path / "backbone")
    for i, name in enumerate(("good", "other")):
        toy_task(name, seed=10 * i).save_npz(tmp_path / f"{name}.npz")
    return ["--backbone", str(tmp_path / "backbone"), "--runs-dir", str(tmp_path / "runs")]


def test_build_bank_never_overwrites_a_prompt_without_asking(tmp_path, capsys, monkeypatch):
    common = _cli_workspace(tmp_path)
    out = tmp_path / "bank"
    assert main(["build-bank", "--task", str(tmp_path / "good.npz"), "--out", str(out), "--epochs", "2", *common]) == 0
    before = _snapshot(out)
    import core.tuning.bank as bank_mod

    monkeypatch.setattr(bank_mod, "tune_prompt", lambda *a, **k: pytest.fail("trained before refusing"))
    assert main(["build-bank", "--task", str(tmp_path / "good.npz"), "--out", str(out), "--epochs", "2", *common]) == 2
    err = capsys.readouterr().err
    assert "already holds a prompt named 'good'" in err and "pass --overwrite to replace them" in err
    assert _snapshot(out) == before  # byte for byte as it was


def test_a_failed_build_bank_leaves_the_bank_folder_as_it_was(tmp_path, capsys, monkeypatch):
    common = _cli_workspace(tmp_path)
    out = tmp_path / "bank"
    assert main(["build-bank", "--task", str(tmp_path / "good.npz"), "--out", str(out), "--epochs", "2", *common]) == 0
    before = _snapshot(out)
    import core.tuning.bank as bank_mod

    calls = []
    original = bank_mod.build_source_prompt

    def second_fails(model, task, *a, **k):
        calls.append(task.name)
        if len(calls) == 2:
            raise UserInputError(f"task {task.name!r} is broken")
        return original(model, task, *a, **k)

    monkeypatch.setattr(bank_mod, "build_source_prompt", second_fails)
    argv = ["build-bank", "--task", str(tmp_path / "other.npz"), "--task", str(tmp_path / "good.npz"), "--out",
            str(out), "--overwrite", "--epochs", "2", *common]
    assert main(argv) == 2 and calls == ["other", "good"]
    assert "is broken" in capsys.readouterr().err
    # the first, finished prompt was not moved in either: the bank is whole or unchanged
    assert _snapshot(out) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".bank-")]  # no scratch folder left


def test_build_bank_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    common = _cli_workspace(tmp_path)
    (tmp_path / "afile").write_text("x")
    import core.tuning.bank as bank_mod

    monkeypatch.setattr(bank_mod, "tune_prompt", lambda *a, **k: pytest.fail("trained before refusing"))
    assert main(["build-bank", "--task", str(tmp_path / "good.npz"), "--out", str(tmp_path / "afile"), "--epochs", "1",
                 *common]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file, not a folder" in err


# ------------------------------------------------------------ weak messages
def test_a_byte_order_mark_in_a_list_file_is_not_part_of_a_path(tmp_path):
    root = _three_class(tmp_path)
    text = (root / "train800.txt").read_text()
    (root / "train800.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert Task.load(root).sizes()["train"] == 9


def test_appledouble_files_are_skipped_like_ds_store(tmp_path):
    for cls in "ab":
        for k in range(4):
            _png(tmp_path / cls / f"{k}.png", 30 * k)
        (tmp_path / cls / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / cls / ".DS_Store").write_bytes(b"\x00")
    task = Task.load(tmp_path)
    assert sum(task.sizes().values()) == 8


def _prompt(model, name, shape, fingerprint=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SourcePrompt(name, torch.randn(*shape, generator=g) * 0.1, source_task="t", backbone=model.name,
                        backbone_fingerprint=model.fingerprint if fingerprint is None else fingerprint)


def test_a_wrong_depth_prompt_is_named_not_the_good_ones(tmp_path, model):
    d = model.embed_dim
    _prompt(model, "bad", (model.depth + 1, 4, d)).save(tmp_path)  # sorts first
    for i in range(3):
        _prompt(model, f"good{i}", (model.depth, 4, d), seed=i).save(tmp_path)
    with pytest.raises(IncompatiblePromptError, match=r"prompt 'bad' has 3 layers"):
        PromptBank.load(tmp_path, model=model)
    with pytest.raises(IncompatiblePromptError, match=r"prompt 'bad' has shape \(3, 4, 32\) but the bank's other"):
        PromptBank.load(tmp_path)  # without a model: the odd one out by shape


def test_a_prompt_without_a_backbone_fingerprint_is_refused(tmp_path, model):
    _prompt(model, "anon", (4, model.embed_dim), fingerprint="").save(tmp_path)
    with pytest.raises(IncompatiblePromptError, match="'anon' records no backbone fingerprint"):
        PromptBank.load(tmp_path, model=model)


def test_a_prompt_is_found_by_the_name_in_its_json(tmp_path, model):
    _prompt(model, "xpos", (4, model.embed_dim)).save(tmp_path)
    os.rename(tmp_path / "xpos.safetensors", tmp_path / "renamed.safetensors")
    os.rename(tmp_path / "xpos.json", tmp_path / "renamed.json")
    assert PromptBank.load(tmp_path, model=model, names=["xpos"]).names == ["xpos"]
    assert PromptBank.load(tmp_path, model=model, names=["renamed"]).names == ["xpos"]  # or by its file name
    with pytest.raises(UserInputError, match=r"no prompt named 'ypos' .* available: \['renamed'\]"):
        PromptBank.load(tmp_path, names=["ypos"])


def test_a_prompt_whose_features_overflow_is_named(model, bank, task):
    huge = PromptBank([*bank, _prompt(model, "huge", (4, model.embed_dim))])
    huge["huge"].prompt.fill_(1e30)
    with pytest.raises(UserInputError, match=r"'huge' makes the backbone's features overflow .* 1e\+30"):
        HGPromptEnsemble(steps=1, n_samples=30).fit(model, huge, task=task)
    from core import TuneConfig, tune_prompt

    with pytest.raises(UserInputError, match="'the initial prompt' makes the backbone's features overflow"):
        tune_prompt(model, task, huge["huge"].prompt, TuneConfig(epochs=1))


def test_a_file_that_is_no_archive_is_not_called_a_pickle(tmp_path):
    (tmp_path / "t.npz").write_text("just some text")
    with pytest.raises(UserInputError, match="is not a .npz task archive"):
        Task.load(tmp_path / "t.npz")


def test_a_refused_argument_leaves_no_run_folder(tmp_path, capsys):
    common = _cli_workspace(tmp_path)
    model = toy_model()
    toy_bank_dir = tmp_path / "bank"
    from core.model.toy import toy_bank

    toy_bank(model).save(toy_bank_dir)
    argv = ["--target", str(tmp_path / "good.npz"), "--bank", str(toy_bank_dir)]
    assert main(["tune", *argv, "--init", "source:nope", *common]) == 2  # an unknown source, found before a run folder
    assert "no prompt named ['nope']" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")
    # A refusal found inside the run (two samples cannot score two classes) removes the folder it had made.
    assert main(["learn", *argv, "--n-samples", "2", *common]) == 2
    assert "more samples than classes" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "runs")


def test_files_follow_the_umask(tmp_path):
    from core.io.safe_io import FILE_MODE, atomic_write_json

    atomic_write_json(tmp_path / "x.json", {"a": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode)
    old = os.umask(0)
    os.umask(old)
    assert mode == FILE_MODE == 0o666 & ~old and mode & 0o044 == 0o644 & ~old & 0o044


def test_an_error_is_printed_on_its_own_line_after_the_progress_bar(tmp_path, capsys, monkeypatch):
    from tqdm.auto import tqdm

    import core.cli as cli

    def fails(args):
        bar = tqdm(total=10, desc="working")
        bar.update(3)
        raise UserInputError("something the user can fix")

    monkeypatch.setitem(cli.COMMANDS, "info", fails)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: something the user can fix" in err and not getattr(tqdm, "_instances", set())


def test_the_memory_limit_files_are_closed(monkeypatch):
    import builtins

    from core.model import resources

    opened = []
    real_open = builtins.open

    def tracking(*a, **k):
        fh = real_open(*a, **k)
        opened.append(fh)
        return fh

    monkeypatch.setattr(builtins, "open", tracking)
    resources.free_bytes("cpu")
    assert opened and all(fh.closed for fh in opened)


def test_ctrl_c_says_where_the_partial_run_is(tmp_path, capsys, monkeypatch):
    common = _cli_workspace(tmp_path)
    from core.model.toy import toy_bank

    toy_bank(toy_model()).save(tmp_path / "bank")

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(HGPromptEnsemble, "fit", interrupt)
    assert main(["learn", "--target", str(tmp_path / "good.npz"), "--bank", str(tmp_path / "bank"), *common]) == 130
    err = capsys.readouterr().err
    partial = [n for n in os.listdir(tmp_path / "runs") if n.endswith(".partial")]
    assert len(partial) == 1 and partial[0] in err and "interrupted" in err


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The header length is the file's first 8 bytes (little-endian): one of 128 + 256 m starts the file with 0x80,
    a pickle's first byte; the JSON header's "{" at byte 8 tells them apart."""
    from core.io.safe_io import load_tensors, save_tensors

    for pad in range(300):
        path = tmp_path / f"p{pad}.safetensors"
        save_tensors(path, {"prompt": torch.ones(2, 3)}, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["prompt"], torch.ones(2, 3)) and meta["pad"] == "x" * pad
    (tmp_path / "real.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 40)  # a real pickle is still refused
    from core import UnsafeFileError

    with pytest.raises(UnsafeFileError, match="is a pickle"):
        load_tensors(tmp_path / "real.safetensors")


# =================================================================== third pass (issue 36)
def _deep_json(n: int = 100_000) -> str:
    """``n`` nested arrays in 2n bytes: under every size cap, and a RecursionError for Python's JSON parser."""
    return "[" * n + "]" * n


# ------------------------------------------------------------ metadata a file supplies
@pytest.mark.parametrize("field,value,match", [
    ("source_accuracy", "high", r"field 'source_accuracy' must be a finite number in \[0, 1\] or null, got \"high\""),
    ("source_accuracy", [0.5], r"field 'source_accuracy' must be a finite number in \[0, 1\] or null, got \[0.5\]"),
    ("source_accuracy", 87.5, r"field 'source_accuracy' must be a finite number in \[0, 1\]"),
    ("train_config", [1, 2], r"field 'train_config' must be an object .* got \[1, 2\]"),
    ("num_tokens", "4", r"field 'num_tokens' must be an integer in 1\.\.100000, got \"4\""),
    ("backbone_fingerprint", 12, r"field 'backbone_fingerprint' must be a string"),
])
def test_a_prompt_metadata_field_of_the_wrong_type_or_range_is_named(tmp_path, model, field, value, match):
    import json

    from core import UnsafeFileError

    _prompt(model, "p", (4, model.embed_dim)).save(tmp_path)
    meta = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(UnsafeFileError, match=match):
        SourcePrompt.load(tmp_path / "p.safetensors")


def test_a_prompt_metadata_error_is_a_message_in_the_cli(tmp_path, capsys):
    import json

    common = _cli_workspace(tmp_path)
    from core.model.toy import toy_bank

    toy_bank(toy_model()).save(tmp_path / "bank")
    first = sorted(p for p in os.listdir(tmp_path / "bank") if p.endswith(".json") and not p.startswith("_"))[0]
    meta = json.loads((tmp_path / "bank" / first).read_text())
    (tmp_path / "bank" / first).write_text(json.dumps({**meta, "train_config": [1, 2]}))
    assert main(["learn", "--target", str(tmp_path / "good.npz"), "--bank", str(tmp_path / "bank"), *common]) == 2
    err = capsys.readouterr().err
    assert "field 'train_config' must be an object" in err and "Traceback" not in err


def test_a_bank_record_field_of_the_wrong_type_is_named(tmp_path, model, bank):
    import json

    from core import UnsafeFileError

    bank.save(tmp_path)
    record = json.loads((tmp_path / "_bank.json").read_text())
    record["start"]["seed"] = "zero"
    (tmp_path / "_bank.json").write_text(json.dumps(record))
    with pytest.raises(UnsafeFileError,
                       match=r"_bank.json'? is not a bank's start record.*field 'start.seed' must be an integer"):
        PromptBank.load(tmp_path)


@pytest.mark.parametrize("kind", ["prompt", "bank"])
def test_deeply_nested_json_is_refused_before_parsing(tmp_path, model, bank, kind):
    from core import UnsafeFileError

    bank.save(tmp_path)
    name = "_bank.json" if kind == "bank" else f"{bank.names[0]}.json"
    (tmp_path / name).write_text(_deep_json())  # 200 KB, far under the 1 MiB cap
    with pytest.raises(UnsafeFileError, match=r"nests arrays or objects 100000 deep, more than the 64"):
        PromptBank.load(tmp_path)


def test_the_depth_scan_skips_brackets_inside_strings_and_measures_what_the_parser_would():
    import json

    from core.io.safe_io import json_depth

    text = json.dumps({"note": "[" * 500, "a": [[1, {"b": [2]}]]}).encode()
    assert json_depth(text, limit=3) == 5  # {, [, [, {, [ ... the string's 500 brackets not counted
    with pytest.raises(RecursionError):  # why the scan exists: an object_hook runs only after the recursion
        json.loads(_deep_json(), object_hook=lambda d: d)


def test_a_json_integer_of_5000_digits_is_a_message(tmp_path):
    from core.io.safe_io import load_json

    (tmp_path / "x.json").write_text("9" * 5000)
    with pytest.raises(UserInputError, match=r"is not valid JSON \(Exceeds the limit"):
        load_json(tmp_path / "x.json")


@pytest.mark.parametrize("content,match", [
    ('{"names": ["a"], "weights": ["heavy"]}', r"field 'weights\[0\]' must be a finite number >= 0, got \"heavy\""),
    (_deep_json(), r"nests arrays or objects 100000 deep"),
])
def test_a_weights_file_is_checked_by_its_schema(tmp_path, capsys, content, match):
    import re

    common = _cli_workspace(tmp_path)
    from core.model.toy import toy_bank

    toy_bank(toy_model()).save(tmp_path / "bank")
    (tmp_path / "w.json").write_text(content)
    argv = ["tune", "--target", str(tmp_path / "good.npz"), "--bank", str(tmp_path / "bank"), "--init",
            f"weights:{tmp_path / 'w.json'}", *common]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


def test_a_run_record_of_the_wrong_type_is_left_out_of_the_list(tmp_path):
    import json

    from core.io.runs import RunWriter, list_runs

    for _ in range(2):
        with RunWriter(tmp_path, "learn", {"target": "t"}) as run:
            run.write_json("metrics.json", {})
    broken = list_runs(tmp_path)[0]["path"]
    info = json.loads(open(os.path.join(broken, "run.json")).read())
    open(os.path.join(broken, "run.json"), "w").write(json.dumps({**info, "status": ["complete"]}))
    assert [r["path"] for r in list_runs(tmp_path)] != [broken] and len(list_runs(tmp_path)) == 1
    with pytest.raises(UserInputError, match=r"is not a run's record \(run.json\): field 'status' must be one of"):
        __import__("core.io.runs", fromlist=["load_run"]).load_run(broken)


def test_a_copied_run_folder_is_listed_under_its_own_id(tmp_path):
    import shutil

    from core.io.runs import RunWriter, list_runs

    with RunWriter(tmp_path, "learn", {"target": "t"}) as run:
        run.write_json("metrics.json", {})
    shutil.copytree(run.path, tmp_path / "20990101-000000-learn-copy01")  # its run.json keeps the first id
    ids = [r["id"] for r in list_runs(tmp_path)]
    assert sorted(ids) == sorted([run.run_id, "20990101-000000-learn-copy01"])


# ------------------------------------------------------------------ list files
def test_a_list_file_that_links_outside_the_folder_is_refused_before_it_is_read(tmp_path):
    root = _three_class(tmp_path / "task")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE: the server's password\n")
    (root / "test.txt").unlink()
    (root / "test.txt").symlink_to(secret)
    with pytest.raises(UserInputError, match=r"test.txt in .* is a link to a file outside the dataset folder") as err:
        Task.load(root)
    assert "TOP-SECRET" not in str(err.value)


def test_a_utf16_list_file_is_an_encoding_problem_not_a_bad_label(tmp_path):
    root = _three_class(tmp_path)
    text = (root / "val200.txt").read_text()
    (root / "val200.txt").write_bytes(text.encode("utf-16"))
    with pytest.raises(UserInputError, match=r"val200.txt is UTF-16 \(or UTF-32\) text, not UTF-8: save it as UTF-8"):
        Task.load(root)


def test_a_nul_byte_in_a_list_file_path_is_named(tmp_path):
    root = _three_class(tmp_path)
    (root / "test.txt").write_text("images/te0.png 0\nimages/te\x001.png 1\nimages/te2.png 2\n")
    with pytest.raises(UserInputError, match=r"test.txt line 2: path .* holds a NUL byte"):
        Task.load(root)


@pytest.mark.parametrize("label", ["1_0", "\u0661", "+1", "1.0"])
def test_a_label_that_python_would_read_as_a_number_is_refused(tmp_path, label):
    root = _three_class(tmp_path)
    lines = (root / "train800.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + f" {label}"
    (root / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match=r"train800.txt line 2: label .* is not an integer \(digits 0-9 only\)"):
        Task.load(root)


def test_the_same_image_listed_twice_with_two_labels_is_refused(tmp_path):
    root = _three_class(tmp_path)
    with open(root / "train800.txt", "a") as fh:
        fh.write("images/tr0.png 2\n")  # line 10: tr0 is label 0 on line 1
    with pytest.raises(UserInputError,
                       match=r"train800.txt line 10: image 'images/tr0.png' is labelled 2, but line 1 labels it 0"):
        Task.load(root)


def test_the_same_image_in_two_list_files_with_two_labels_is_refused(tmp_path):
    root = _three_class(tmp_path)
    (root / "test.txt").write_text("images/tr0.png 1\nimages/te1.png 1\nimages/te2.png 2\n")
    with pytest.raises(UserInputError,
                       match=r"test.txt line 1: image 'images/tr0.png' is labelled 1, but train800.txt line 1 labels "
                       r"it 0"):
        Task.load(root)


# ------------------------------------------------------------------ .npz tasks
def _npz(path, **override):
    """A small valid task archive with some arrays replaced."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (6, 8, 8)).astype(np.uint8)
    y = np.array([0, 1] * 3)
    arrays = {"train_x": x, "train_y": y, "val_x": x[:2] + 1, "val_y": y[:2], "test_x": x[:2] + 2, "test_y": y[:2],
              "name": np.array("t")}
    np.savez_compressed(path, **{**arrays, **override})
    return path


def test_npz_labels_of_shape_n_by_1_are_named(tmp_path):
    path = _npz(tmp_path / "t.npz", train_y=np.array([0, 1] * 3).reshape(6, 1))
    with pytest.raises(UserInputError, match=r"train labels have shape \(6, 1\); .* give y.ravel\(\)"):
        Task.load(path)


def test_a_truncated_npz_is_named_as_damaged(tmp_path):
    path = _npz(tmp_path / "t.npz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserInputError, match=r"is a damaged or truncated task archive"):
        Task.load(path)


def test_npz_images_of_0x0_pixels_are_refused(tmp_path):
    path = _npz(tmp_path / "t.npz", train_x=np.zeros((6, 0, 0), np.uint8))
    with pytest.raises(UserInputError, match=r"train images have shape \(6, 0, 0\): each image must be at least 1x1"):
        Task.load(path)


def test_an_npz_bomb_is_refused_before_any_array_is_read(tmp_path, monkeypatch):
    """A small file declaring a huge array: the zip caps of an uploaded archive apply to a .npz given by path."""
    path = _npz(tmp_path / "bomb.npz", train_x=np.zeros((1000, 256, 256), np.uint8))  # 62.5 MiB of zeros
    assert os.path.getsize(path) < 0.5 * 2**20
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the archive was loaded"))
    with pytest.raises(UserInputError,
                       match=r"entry 'train_x.npy' declares 63 MiB in 0.06 MiB .* refused as a zip bomb"):
        Task.load(path)


def test_an_npz_whose_array_header_lies_about_its_size_is_refused_before_reading(tmp_path, monkeypatch):
    import io
    import zipfile

    path = _npz(tmp_path / "t.npz")
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (400_000, 1000)})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as zf:  # 381 MiB declared in a few bytes, stored
        zf.writestr("huge.npy", buf.getvalue() + b"\0" * 64)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the archive was loaded"))
    with pytest.raises(UserInputError, match=r"'huge.npy' declares an array of 381.5 MiB in an entry of 0.00 MiB"):
        Task.load(path)


def test_an_npz_entry_that_is_no_array_is_not_taken_for_one(tmp_path):
    import zipfile

    path = _npz(tmp_path / "t.npz")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("classes", b"not an .npy file")  # np.load hands such an entry back as bytes
    assert Task.load(path).classes == ["0", "1"]


def test_a_task_name_that_leaves_a_folder_is_refused_when_the_npz_is_loaded(tmp_path):
    path = _npz(tmp_path / "t.npz", name=np.array("../../evil name"))
    with pytest.raises(UserInputError, match=r"names its task '\.\./\.\./evil name', which is not allowed"):
        Task.load(path)


def test_build_bank_refuses_a_task_name_that_cannot_name_a_prompt_before_training(tmp_path, capsys, monkeypatch):
    common = _cli_workspace(tmp_path)
    _npz(tmp_path / "spaced.npz", name=np.array("my task"))
    import core.tuning.bank as bank_mod

    monkeypatch.setattr(bank_mod, "tune_prompt", lambda *a, **k: pytest.fail("trained before refusing"))
    assert main(["build-bank", "--task", str(tmp_path / "spaced.npz"), "--out", str(tmp_path / "b"), *common]) == 2
    assert "source task 'my task' cannot name a prompt" in capsys.readouterr().err


# ------------------------------------------------------------------ weak ones
def test_a_missing_start_tensor_says_the_banks_start_is_missing_and_how_to_rebuild(tmp_path, bank):
    bank.save(tmp_path)
    (tmp_path / "_start.safetensors").unlink()
    with pytest.raises(UserInputError, match=r"records a shared start \(_bank.json\) but its start tensor "
                                             r"_start.safetensors is missing.*python -m core build-bank --out"):
        PromptBank.load(tmp_path)


def test_a_jpeg_is_read_upright_as_its_exif_orientation_says(tmp_path):
    from PIL import Image

    from core.io.images import open_image

    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :4] = 255  # a landscape 8x4 image, white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": how a phone stores a portrait photo
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    img = open_image(str(tmp_path / "phone.jpg"))
    assert img.size == (4, 8)  # portrait, as the phone showed it
    assert np.asarray(img)[:4].mean() > 200 and np.asarray(img)[4:].mean() < 50  # white on top after the turn


def test_a_killed_build_banks_scratch_folder_is_cleaned_and_a_live_ones_is_kept(tmp_path):
    import subprocess
    import sys

    from core.evaluation.study import BANK_SCRATCH
    from core.io.safe_io import clean_stale_scratch, scratch_dir

    live = scratch_dir(tmp_path, BANK_SCRATCH)  # this process's: in use
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = os.path.basename(live).replace(f".{os.getpid()}.", f".{int(gone.stdout)}.")
    os.mkdir(tmp_path / dead)
    (tmp_path / dead / "half.safetensors").write_bytes(b"x")
    assert clean_stale_scratch(tmp_path, BANK_SCRATCH) == [dead]
    assert os.path.isdir(live) and not os.path.exists(tmp_path / dead)


def test_build_bank_says_it_removed_a_killed_runs_scratch(tmp_path, capsys):
    import subprocess
    import sys

    from core.evaluation.study import BANK_SCRATCH
    from core.io.safe_io import scratch_dir

    common = _cli_workspace(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = scratch_dir(tmp_path, BANK_SCRATCH)
    dead = os.path.basename(live).replace(f".{os.getpid()}.", f".{int(gone.stdout)}.")
    os.rename(live, tmp_path / dead)
    assert main(["build-bank", "--task", str(tmp_path / "good.npz"), "--out", str(tmp_path / "bank"), "--epochs", "2",
                 *common]) == 0
    assert f"removed 1 scratch folder(s) a killed build-bank left beside --out ({dead})" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(BANK_SCRATCH)]


def test_a_negative_img_size_is_refused_as_it_is_parsed(capsys):
    with pytest.raises(SystemExit):
        main(["learn", "--target", "shapes_quad", "--img-size", "-5"])
    assert "--img-size: must be an integer in 8..4096 (pixels), got '-5'" in capsys.readouterr().err


def test_img_size_with_a_backbone_folder_is_refused_not_ignored(tmp_path, capsys):
    common = _cli_workspace(tmp_path)
    assert main(["learn", "--target", str(tmp_path / "good.npz"), "--img-size", "64", *common]) == 2
    assert "--img-size applies to a timm model name only" in capsys.readouterr().err


def test_a_source_named_twice_is_said_so(tmp_path, capsys, model, bank):
    common = _cli_workspace(tmp_path)
    from core.model.toy import toy_bank

    toy_bank(toy_model()).save(tmp_path / "bank")
    name = PromptBank.load(tmp_path / "bank").names[0]
    assert main(["learn", "--target", str(tmp_path / "good.npz"), "--bank", str(tmp_path / "bank"), "--sources",
                 f"{name},{name}", *common]) == 2
    assert f"--sources names {name!r} twice; name each source once" in capsys.readouterr().err
    with pytest.raises(UserInputError, match=f"prompt {name!r} is named twice among the sources"):
        bank.subset([name, name])


def test_the_plane_of_a_source_with_itself_is_said_so(model, bank, task):
    from core.analysis.plane import task_vector_plane

    with pytest.raises(UserInputError, match=rf"the plane needs two different sources; got {bank.names[0]!r} twice"):
        task_vector_plane(model, bank, task, bank.names[0], bank.names[0], grid=3)


# ------------------------------------------------------------------ disks
def test_learn_on_a_full_disk_is_a_message_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    common = _cli_workspace(tmp_path)
    from core.model.toy import toy_bank

    toy_bank(toy_model()).save(tmp_path / "bank")
    (tmp_path / "runs").mkdir()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)  # every atomic write: run.json is the first
    assert main(["learn", "--target", str(tmp_path / "good.npz"), "--bank", str(tmp_path / "bank"), *common]) == 2
    err = capsys.readouterr().err
    assert "the disk is full (No space left on device)" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "runs") == []  # no ID.partial without its run.json


def test_a_disk_that_fills_during_a_run_keeps_a_partial_folder_with_its_run_json(tmp_path, monkeypatch):
    import errno
    import json

    import core.io.runs as runs
    from core.io.safe_io import storage_error

    real = runs.atomic_write_bytes

    def full_at_metrics(path, data):
        if path.endswith("metrics.json"):
            raise storage_error(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, data)

    monkeypatch.setattr(runs, "atomic_write_bytes", full_at_metrics)
    with pytest.raises(UserInputError, match="the disk is full"):
        with runs.RunWriter(tmp_path, "learn", {}) as run:
            run.write_text("metrics.json", "{}")
    (folder,) = os.listdir(tmp_path)
    info = json.loads(open(tmp_path / folder / "run.json").read())
    assert folder.endswith(".partial") and info["status"] == "incomplete" and "the disk is full" in info["note"]
