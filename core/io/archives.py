"""Dataset archives a user uploads: extracted safely, into a scratch folder moved into place only when complete."""
from __future__ import annotations

import os

from ..errors import UserInputError

#: Limits for an uploaded dataset archive.
MAX_ZIP_MEMBERS = 50_000
MAX_ZIP_BYTES = 2 * 2**30
MAX_ZIP_RATIO = 200


def extract_zip(path: str | os.PathLike, dest: str | os.PathLike, max_bytes: int = MAX_ZIP_BYTES, max_members: int = MAX_ZIP_MEMBERS) -> str:
    """Extract a dataset archive safely and return the folder that holds the task.

    Refuses members that leave ``dest`` (``../``, absolute paths), symbolic
    links, more than ``max_members`` entries, more than ``max_bytes``
    uncompressed, and members compressed more than ``MAX_ZIP_RATIO``:1 (zip
    bombs), before writing anything; writes are also capped as they happen,
    so a header that lies about sizes cannot exceed the limit.
    """
    import shutil
    import stat
    import tempfile
    import zipfile
    import zlib

    path, dest = os.fspath(path), os.fspath(dest)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserInputError(f"{os.path.basename(path)!r} is not a readable zip archive ({exc}).") from exc
    with zf:
        members = zf.infolist()
        if len(members) > max_members:
            raise UserInputError(f"the archive has {len(members)} entries, more than the {max_members} allowed.")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise UserInputError(f"the archive unpacks to {total / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB allowed.")
        real_dest = os.path.realpath(dest)
        for m in members:
            name = m.filename.replace("\\", "/")
            if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
                raise UserInputError(f"archive entry {m.filename!r} points outside the archive's folder; refused.")
            if stat.S_ISLNK(m.external_attr >> 16):
                raise UserInputError(f"archive entry {m.filename!r} is a symbolic link; links are refused.")
            if m.compress_size and m.file_size / max(1, m.compress_size) > MAX_ZIP_RATIO and m.file_size > 2**20:
                raise UserInputError(f"archive entry {m.filename!r} expands {m.file_size // max(1, m.compress_size)}x; refused as a zip bomb.")
        # Extract into a scratch folder beside ``dest`` and move it into place only when everything was
        # read: a refused or broken archive leaves nothing behind, and never a half-extracted task.
        scratch = tempfile.mkdtemp(prefix=".extract-", dir=os.path.dirname(real_dest) or ".")
        try:
            written = 0
            for m in members:
                target = os.path.realpath(os.path.join(scratch, m.filename))
                if os.path.commonpath([scratch, target]) != scratch:
                    raise UserInputError(f"archive entry {m.filename!r} points outside the archive's folder; refused.")
                if m.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    with zf.open(m) as src, open(target, "wb") as out:
                        while chunk := src.read(2**20):
                            written += len(chunk)
                            if written > max_bytes:
                                raise UserInputError(f"the archive unpacks to more than {max_bytes / 2**20:.0f} MiB; refused.")
                            out.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                    raise UserInputError(f"archive entry {m.filename!r} is damaged or lies about its size ({exc}); refused.") from exc
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

