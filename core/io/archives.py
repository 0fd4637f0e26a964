"""Dataset archives a user uploads: extracted safely, into a scratch folder moved into place only when complete.

The caps on an archive's directory (:func:`check_members`: entries, declared sizes, compression ratio, encryption, names
the file system cannot hold or that clash) are checked before anything is decompressed, for an uploaded zip and for a
``.npz`` task (a zip of ``.npy`` files) alike.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib

from ..errors import UserInputError
from .safe_io import clean_stale_scratch, scratch_dir

#: Limits for an uploaded dataset archive (and a .npz task, which is a zip too).
MAX_ZIP_MEMBERS = 50_000
MAX_ZIP_BYTES = 2 * 2**30
MAX_ZIP_RATIO = 200
#: Longest file or folder name (bytes) most file systems hold, and the longest entry path read.
MAX_NAME_BYTES = 255
MAX_PATH_CHARS = 1024
SCRATCH = ".extract-"


def _shown(name: str) -> str:
    """An entry's name for a message: quoted, and shortened when long."""
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-15:])


def check_members(zf, what: str, max_bytes: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS) -> list:
    """The entries of the open ``zipfile.ZipFile`` ``zf`` (``what`` names it in messages), refused before anything is
    decompressed when there are more than ``max_members``, more than ``max_bytes`` declared, an entry compressed more
    than ``MAX_ZIP_RATIO``:1 (a zip bomb), an encrypted entry, a name longer than a file system holds, or two entries
    that clash (the same name twice, or a file ``t`` beside a folder ``t/``)."""
    members = zf.infolist()
    if len(members) > max_members:
        raise UserInputError(f"{what} has {len(members)} entries, more than the {max_members} allowed.")
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise UserInputError(f"{what} unpacks to {total / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB "
                             "allowed.")
    files: set[str] = set()
    folders: set[str] = set()
    for m in members:
        name = m.filename.replace("\\", "/")
        if m.file_size / max(1, m.compress_size) > MAX_ZIP_RATIO and m.file_size > 2**20:
            raise UserInputError(f"{what}: entry {_shown(m.filename)} declares {m.file_size / 2**20:.0f} MiB in "
                                 f"{m.compress_size / 2**20:.2f} MiB (it expands "
                                 f"{m.file_size // max(1, m.compress_size)}x, more than {MAX_ZIP_RATIO}x); refused as "
                                 "a zip bomb before anything is decompressed.")
        if m.flag_bits & 0x1:
            raise UserInputError(f"{what}: entry {_shown(m.filename)} is encrypted; give an archive made without a "
                                 "password.")
        parts = [p for p in name.split("/") if p]
        long = [p for p in parts if len(p.encode("utf-8")) > MAX_NAME_BYTES]
        if long or len(name) > MAX_PATH_CHARS:
            raise UserInputError(f"{what}: entry {_shown(m.filename)} has a name of "
                                 f"{len(long[0]) if long else len(name)} characters; file names can be at most "
                                 f"{MAX_NAME_BYTES} bytes (and paths {MAX_PATH_CHARS} characters). Rename it and make "
                                 "the archive again.")
        key = "/".join(parts)
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if m.is_dir():
            parents.append(key)
        elif key in files:
            raise UserInputError(f"{what} holds the entry {_shown(key)} twice; keep one of them.")
        else:
            files.add(key)
        folders.update(parents)
    clash = sorted(files & folders)
    if clash:
        inside = next(m.filename for m in members if m.filename.replace("\\", "/").startswith(clash[0] + "/"))
        raise UserInputError(f"{what}: {_shown(clash[0])} is both a file and a folder (entry {_shown(inside)}); "
                             "rename one of them and make the archive again.")
    return members


def extract_zip(path: str | os.PathLike, dest: str | os.PathLike, max_bytes: int = MAX_ZIP_BYTES,
                max_members: int = MAX_ZIP_MEMBERS) -> str:
    """Extract a dataset archive safely and return the folder that holds the task.

    Refuses members that leave ``dest`` (``../``, absolute paths), symbolic
    links, and whatever :func:`check_members` refuses, before writing anything;
    writes are also capped as they happen, so a header that lies about sizes
    cannot exceed the limit. A message names the archive's entries, never the
    server's scratch folder.
    """
    path, dest = os.fspath(path), os.fspath(dest)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserInputError(f"{os.path.basename(path)!r} is not a readable zip archive ({exc}).") from exc
    with zf:
        members = check_members(zf, "the archive", max_bytes, max_members)
        real_dest = os.path.realpath(dest)
        for m in members:
            name = m.filename.replace("\\", "/")
            if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
                raise UserInputError(f"archive entry {_shown(m.filename)} points outside the archive's folder; "
                                     "refused.")
            if stat.S_ISLNK(m.external_attr >> 16):
                raise UserInputError(f"archive entry {_shown(m.filename)} is a symbolic link; links are refused.")
        # Extract into a scratch folder beside ``dest`` and move it into place only when everything was
        # read: a refused or broken archive leaves nothing behind, and never a half-extracted task.
        parent = os.path.dirname(real_dest) or "."
        clean_stale_scratch(parent, SCRATCH)  # what an extraction killed mid-way (kill -9) left
        scratch = scratch_dir(parent, SCRATCH)
        try:
            written = 0
            for m in members:
                target = os.path.realpath(os.path.join(scratch, m.filename))
                if os.path.commonpath([scratch, target]) != scratch:
                    raise UserInputError(f"archive entry {_shown(m.filename)} points outside the archive's folder; "
                                         "refused.")
                try:
                    if m.is_dir():
                        os.makedirs(target, exist_ok=True)
                        continue
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as out:
                        while chunk := src.read(2**20):
                            written += len(chunk)
                            if written > max_bytes:
                                raise UserInputError(f"the archive unpacks to more than {max_bytes / 2**20:.0f} MiB; "
                                                     "refused.")
                            out.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                    raise UserInputError(f"archive entry {_shown(m.filename)} is damaged or lies about its size "
                                         f"({str(exc).replace(scratch, '')}); refused.") from exc
                except OSError as exc:  # named by the entry and the reason, never by the server's scratch path
                    raise UserInputError(f"archive entry {_shown(m.filename)} cannot be written here "
                                         f"({exc.strerror or exc.__class__.__name__}); refused.") from exc
            if os.path.isdir(real_dest):
                if os.listdir(real_dest):
                    raise UserInputError(f"{dest!r} is not empty; extract the archive into a new folder.")
                os.rmdir(real_dest)
            os.replace(scratch, real_dest)
        finally:
            if os.path.isdir(scratch):
                shutil.rmtree(scratch, ignore_errors=True)
    return extracted_task_folder(dest)


def extracted_task_folder(dest: str) -> str:
    """The folder of an extracted archive that holds the task (archives often wrap it in one top folder)."""
    entries = [e for e in os.listdir(dest) if not e.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and os.path.isdir(os.path.join(dest, entries[0])):
        return os.path.join(dest, entries[0])
    return dest
