"""Untrusted dataset archives: every bad archive is refused with a message and leaves nothing behind; a bomb is refused
before anything is decompressed."""
import io
import os
import stat
import struct
import zipfile

import pytest
from test_data import _write_vtab

from core import Task, UserInputError
from core.io.archives import extract_zip


def _zip(path, entries, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries:
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, b"target")
            else:
                zf.writestr(name, data)
    return path


def _symlink_info(name):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _assert_clean(tmp_path, dest):
    assert not os.path.exists(dest) or not os.listdir(dest), "a refused archive left files behind"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".extract-")], "the scratch folder was left behind"


def test_good_archive_with_a_top_folder_loads(tmp_path):
    src = tmp_path / "src" / "mytask"
    _write_vtab(src)
    zpath = tmp_path / "mytask.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for root, _, files in os.walk(src):
            for f in files:
                full = os.path.join(root, f)
                zf.write(full, os.path.relpath(full, tmp_path / "src"))
    folder = extract_zip(zpath, tmp_path / "out")
    assert os.path.basename(folder) == "mytask"
    assert Task.load(folder).sizes() == {"train": 8, "val": 4, "test": 6}


@pytest.mark.parametrize("entries,match", [
    ([("../evil.txt", b"x")], "points outside"),
    ([("a/../../evil.txt", b"x")], "points outside"),
    ([("/tmp/evil_abs.txt", b"x")], "points outside"),
    ([("C:/evil.txt", b"x")], "points outside"),
    ([("link", _symlink_info("link"))], "symbolic link"),
    ([("ok.txt", b"x"), ("images/link.png", _symlink_info("images/link.png"))], "symbolic link"),
])
def test_paths_out_of_the_folder_and_links_refused(tmp_path, entries, match):
    zpath = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(UserInputError, match=match):
        extract_zip(zpath, tmp_path / "out")
    _assert_clean(tmp_path, tmp_path / "out")
    assert not (tmp_path.parent / "evil.txt").exists() and not os.path.exists("/tmp/evil_abs.txt")


def test_zip_bomb_refused_before_extracting(tmp_path, monkeypatch):
    import zipfile

    zpath = _zip(tmp_path / "bomb.zip", [("zeros.bin", b"\0" * (64 * 2**20))])  # 64 MiB -> about 64 KiB
    assert os.path.getsize(zpath) < 2**20
    # Refused from the archive's directory alone: no member is ever opened (decompressed).
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was decompressed"))
    with pytest.raises(UserInputError, match="zip bomb"):
        extract_zip(zpath, tmp_path / "out")
    _assert_clean(tmp_path, tmp_path / "out")


def test_total_size_and_member_count_caps(tmp_path):
    zpath = _zip(tmp_path / "big.zip", [(f"f{i}.bin", os.urandom(4096)) for i in range(20)], zipfile.ZIP_STORED)
    with pytest.raises(UserInputError, match="unpacks to"):
        extract_zip(zpath, tmp_path / "out", max_bytes=40_000)
    with pytest.raises(UserInputError, match="20 entries"):
        extract_zip(zpath, tmp_path / "out", max_members=10)
    _assert_clean(tmp_path, tmp_path / "out")


def _lie_about_size(zpath, claimed: int):
    """Rewrite the uncompressed size in the local header and the central directory."""
    raw = bytearray(open(zpath, "rb").read())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.find(sig)
        raw[i + offset : i + offset + 4] = struct.pack("<I", claimed)
    open(zpath, "wb").write(bytes(raw))


def test_header_that_lies_about_sizes_refused(tmp_path):
    payload = os.urandom(3 * 2**20)
    zpath = _zip(tmp_path / "liar.zip", [("data.bin", payload)], zipfile.ZIP_STORED)
    _lie_about_size(zpath, 100)  # claims 100 bytes: size checks pass, the data does not
    with pytest.raises(UserInputError, match="damaged or lies"):
        extract_zip(zpath, tmp_path / "out")
    _assert_clean(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04" + b"\0" * 20, b""])
def test_not_a_zip(tmp_path, content):
    (tmp_path / "x.zip").write_bytes(content)
    with pytest.raises(UserInputError, match="not a readable zip"):
        extract_zip(tmp_path / "x.zip", tmp_path / "out")


def test_pickle_inside_an_archive_is_never_loaded(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    buf = io.BytesIO()
    pickle.dump(Boom(), buf)
    zpath = _zip(tmp_path / "p.zip", [("task/train800.txt", b"images/a.png 0\n"), ("task/data.npz", buf.getvalue()),
                                      ("task/data.pkl", buf.getvalue())])
    folder = extract_zip(zpath, tmp_path / "out")
    with pytest.raises(UserInputError):
        Task.load(folder)
    with pytest.raises(UserInputError):
        Task.load(os.path.join(folder, "data.npz"))
    assert not (tmp_path / "pwned").exists()


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's shape)."""
    import zlib as _z

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    i = raw.find(b"IHDR")
    raw[i + 4 : i + 12] = struct.pack(">II", width, height)
    raw[i + 17 : i + 21] = struct.pack(">I", _z.crc32(bytes(raw[i : i + 17])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


def test_decompression_bomb_image_refused_without_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from core.io.images import open_image

    bomb = _png_claiming(tmp_path / "bomb.png", 50_000, 50_000)  # 2.5 Gpixel claimed, a few bytes on disk
    assert os.path.getsize(bomb) < 200
    with monkeypatch.context() as m:  # refused from the header: the pixels are never decoded
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the image was decoded"))
        with pytest.raises(UserInputError, match="decompression bomb"):
            open_image(str(bomb))
    # Inside a dataset, the refusal names the file.
    root = tmp_path / "task"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(4):
            from PIL import Image

            Image.new("L", (8, 8), 40 * k).save(root / cls / f"{k}.png")
    _png_claiming(root / "b" / "9.png", 30_000, 30_000)
    task = Task.load(root)
    from core.model.toy import toy_model

    holds = [s for s in ("train", "val", "test") if any(p.endswith("9.png") for p in task.splits[s].images)]
    assert len(holds) == 1
    transform = toy_model().transform()
    for split in ("train", "val", "test"):
        if split in holds:  # the split that holds the bomb names it
            with pytest.raises(UserInputError, match="9.png"):
                task.tensors(split, transform)
        else:  # the others read as usual
            assert len(task.tensors(split, transform)[0]) == len(task.splits[split])


# ------------------------------------------------------------------ third pass (issue 36)
def _encrypt_flag(zpath):
    """Set the 'encrypted' bit of every entry (local header and central directory), as a password-protected zip has."""
    raw = bytearray(open(zpath, "rb").read())
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.find(sig)
        while i != -1:
            raw[i + offset] |= 0x1
            i = raw.find(sig, i + 4)
    open(zpath, "wb").write(bytes(raw))


@pytest.mark.parametrize("entries,match", [
    ([("t", b"a file"), ("t/x.png", b"x")], r"'t' is both a file and a folder \(entry 't/x.png'\)"),
    ([("t/x.png", b"x"), ("t", b"a file")], r"'t' is both a file and a folder \(entry 't/x.png'\)"),
    ([("task/" + "a" * 300 + ".png", b"x")], r"has a name of 304 characters; file names can be at most 255 bytes"),
    ([("t/x.png", b"x"), ("t/x.png", b"y")], r"holds the entry 't/x.png' twice"),
])
def test_entries_the_file_system_cannot_hold_are_refused_before_extracting(tmp_path, entries, match):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        zpath = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(UserInputError, match=match) as err:
        extract_zip(zpath, tmp_path / "out")
    assert ".extract-" not in str(err.value)  # never the server's scratch folder
    _assert_clean(tmp_path, tmp_path / "out")


def test_an_encrypted_entry_is_refused_by_name(tmp_path):
    zpath = _zip(tmp_path / "locked.zip", [("task/train800.txt", b"images/a.png 0\n")])
    _encrypt_flag(zpath)
    with pytest.raises(UserInputError,
                       match=r"entry 'task/train800.txt' is encrypted; give an archive made without a password"):
        extract_zip(zpath, tmp_path / "out")
    _assert_clean(tmp_path, tmp_path / "out")


def test_an_extraction_killed_midway_leaves_a_scratch_folder_the_next_one_removes(tmp_path):
    import subprocess
    import sys

    from core.io.archives import SCRATCH
    from core.io.safe_io import scratch_dir

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = scratch_dir(tmp_path, SCRATCH)
    dead = tmp_path / os.path.basename(live).replace(f".{os.getpid()}.", f".{int(gone.stdout)}.")
    os.rename(live, dead)  # what kill -9 during an extraction leaves: no finally ran
    src = tmp_path / "src" / "mytask"
    _write_vtab(src)
    zpath = tmp_path / "mytask.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for root, _, files in os.walk(src):
            for f in files:
                zf.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), tmp_path / "src"))
    extract_zip(zpath, tmp_path / "out")
    assert not dead.exists()
