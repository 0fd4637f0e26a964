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
    return _vtab(root, {"train": _rows("tr", [0, 1, 2] * 3), "val": _rows("va", [0, 1, 2]), "test": _rows("te", [0, 1, 2])})


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
    assert _snapshot(out) == before  # the first, finished prompt was not moved in either: the bank is whole or unchanged
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".bank-")]  # no scratch folder left


def test_build_bank_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    common = _cli_workspace(tmp_path)
    (tmp_path / "afile").write_text("x")
    import core.tuning.bank as bank_mod

    monkeypatch.setattr(bank_mod, "tune_prompt", lambda *a, **k: pytest.fail("trained before refusing"))
    assert main(["build-bank", "--task", str(tmp_path / "good.npz"), "--out", str(tmp_path / "afile"), "--epochs", "1", *common]) == 2
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
