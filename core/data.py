"""Target and source tasks: in-memory arrays, class folders, and the VTAB-1k list format.

A :class:`Task` holds train / val / test splits of images and integer labels
``0..C-1``. Images are turned into tensors with the backbone's own timm
preprocessing (``PromptedViT.transform()``), once per split.

VTAB-1k list format (as exported by the NOAH / SSF preparations): a folder
with ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``,
each line ``relative/path.jpg label``. Paths must stay inside the folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import UserInputError

SPLITS = ("train", "val", "test")
VTAB_FILES = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
#: Largest image (in pixels) decoded; larger ones are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 40_000_000
#: Largest list file read (a VTAB test list has ~20k lines, ~1 MB).
MAX_LIST_BYTES = 16 * 2**20


@dataclass
class Split:
    """Images and labels of one split.

    ``images``: a uint8 array ``(N, H, W)`` or ``(N, H, W, C)``, or a list of file paths.
    ``labels``: ``(N,)`` integers in ``0..C-1``.
    """

    images: np.ndarray | list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        if len(self.images) != len(self.labels):
            raise UserInputError(f"a split has {len(self.images)} images but {len(self.labels)} labels; give one label per image.")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Split":
        if isinstance(self.images, np.ndarray):
            return Split(self.images[index], self.labels[index])
        return Split([self.images[i] for i in index], self.labels[index])


@dataclass
class Task:
    """A classification task with ``train``, ``val`` and ``test`` splits."""

    name: str
    splits: dict[str, Split]
    classes: list[str] = field(default_factory=list)
    group: str = ""
    description: str = ""
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # After resplit(): where each new train / val image sits in the pooled (train + val) images of the parent.
    pooled_index: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise UserInputError(f"task {self.name!r} lacks the split(s) {missing}; a task needs train, val and test.")
        all_labels = np.concatenate([self.splits[s].labels for s in SPLITS])
        if all_labels.size == 0 or len(self.splits["train"]) == 0:
            raise UserInputError(f"task {self.name!r} has an empty train split; give it labelled images.")
        if not np.issubdtype(all_labels.dtype, np.integer):
            raise UserInputError(f"task {self.name!r} has non-integer labels ({all_labels.dtype}); labels are class indices 0..C-1.")
        if not self.classes:
            self.classes = [str(i) for i in range(int(all_labels.max()) + 1)]
        c = len(self.classes)
        bad = all_labels[(all_labels < 0) | (all_labels >= c)]
        if bad.size:
            raise UserInputError(
                f"task {self.name!r} has labels outside 0..{c - 1} (e.g. {int(bad[0])}); labels must index its {c} classes."
            )
        n_train_classes = len(np.unique(self.splits["train"].labels))
        if n_train_classes < 2:
            raise UserInputError(
                f"task {self.name!r} has {n_train_classes} class in its train split; a target task needs at least two classes."
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.splits[s]) for s in SPLITS}

    def resplit(self, seed: int) -> "Task":
        """The same task with train and val redrawn from their pooled images for ``seed`` (sizes kept, test fixed).

        What an evaluation over seeds needs so that a seed changes the data, not only the batch order. A class
        left out of the new train split is refused, as at construction.
        """
        pool = np.concatenate([np.arange(len(self.splits["train"])), len(self.splits["train"]) + np.arange(len(self.splits["val"]))])
        both = _concat(self.splits["train"], self.splits["val"])
        order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(pool))
        n_tr = len(self.splits["train"])
        return Task(self.name, {"train": both.subset(order[:n_tr]), "val": both.subset(order[n_tr:]),
                                "test": self.splits["test"]}, list(self.classes), self.group, self.description,
                    pooled_index={"train": order[:n_tr], "val": order[n_tr:]})

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(
        cls,
        name: str,
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
        classes: Sequence[str] | None = None,
        **kw: Any,
    ) -> "Task":
        """A task from uint8 image arrays ``(N, H, W[, C])`` and label vectors ``(N,)``."""
        splits = {}
        for split, (x, y) in zip(SPLITS, (train, val, test)):
            x = np.asarray(x)
            if x.dtype != np.uint8 or x.ndim not in (3, 4):
                raise UserInputError(
                    f"{split} images must be a uint8 array (N, H, W) or (N, H, W, C), got {x.dtype} {x.shape}."
                )
            splits[split] = Split(x, np.asarray(y).astype(np.int64) if np.asarray(y).dtype.kind in "iu" else np.asarray(y))
        return cls(name=name, splits=splits, classes=list(classes or []), **kw)

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "Task":
        """A task saved by :meth:`save_npz` (no pickle: ``allow_pickle=False``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserInputError(f"task file {path!r} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as exc:
            raise UserInputError(f"{path!r} is not a task archive of plain arrays ({exc}); pickled arrays are refused.") from exc
        need = [f"{s}_{k}" for s in SPLITS for k in ("x", "y")]
        if any(k not in arrays for k in need):
            raise UserInputError(f"{path!r} lacks arrays {[k for k in need if k not in arrays]}; it is not a task archive.")
        classes = [str(c) for c in arrays.get("classes", np.array([]))]
        meta = {k: str(arrays[k]) for k in ("group", "description") if k in arrays}
        name = str(arrays["name"]) if "name" in arrays else os.path.splitext(os.path.basename(path))[0]
        return cls.from_arrays(
            name, *[(arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in SPLITS], classes=classes, **meta
        )

    def save_npz(self, path: str | os.PathLike) -> None:
        """Save an in-memory task as a compressed ``.npz`` of plain arrays."""
        arrays: dict[str, np.ndarray] = {}
        for s in SPLITS:
            sp = self.splits[s]
            if not isinstance(sp.images, np.ndarray):
                raise UserInputError("only tasks of in-memory arrays can be saved as .npz.")
            arrays[f"{s}_x"], arrays[f"{s}_y"] = sp.images, sp.labels.astype(np.int64)
        arrays["classes"] = np.array(self.classes)
        arrays["name"] = np.array(self.name)
        arrays["group"] = np.array(self.group)
        arrays["description"] = np.array(self.description)
        tmp = os.fspath(path) + ".tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def from_vtab(cls, root: str | os.PathLike, name: str | None = None) -> "Task":
        """A task in the VTAB-1k list format (``train800.txt``, ``val200.txt``, ``test.txt``)."""
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise UserInputError(f"VTAB-1k folder {root!r} does not exist.")
        missing = [f for f in VTAB_FILES.values() if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise UserInputError(
                f"{root!r} is not a VTAB-1k folder: {', '.join(missing)} missing. It needs train800.txt, val200.txt "
                "and test.txt with lines 'relative/path.jpg label'."
            )
        splits = {s: _read_list(root, f) for s, f in VTAB_FILES.items()}
        n_classes = int(max(int(sp.labels.max()) for sp in splits.values() if len(sp))) + 1
        return cls(name=name or os.path.basename(os.path.normpath(root)), splits=splits, classes=[str(i) for i in range(n_classes)])

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike, name: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
    ) -> "Task":
        """A task from class folders: ``root/{train,val,test}/CLASS/*.png``, or ``root/CLASS/*.png`` split by seed."""
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise UserInputError(f"image folder {root!r} does not exist.")
        name = name or os.path.basename(os.path.normpath(root))
        if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
            classes = sorted(set().union(*[_class_dirs(os.path.join(root, s)) for s in SPLITS]))
            splits = {s: _scan_classes(os.path.join(root, s), classes) for s in SPLITS}
            return cls(name=name, splits=splits, classes=classes)
        classes = sorted(_class_dirs(root))
        if len(classes) < 2:
            raise UserInputError(
                f"{root!r} has {len(classes)} class folder(s); put the images of each class in its own sub-folder "
                "(at least two), or use train/val/test sub-folders."
            )
        whole = _scan_classes(root, classes)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(whole))
        n_val, n_test = int(round(val_fraction * len(whole))), int(round(test_fraction * len(whole)))
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        return cls(name=name, splits={s: whole.subset(np.sort(ix)) for s, ix in parts.items()}, classes=classes)

    @classmethod
    def load(cls, path: str | os.PathLike, **kw: Any) -> "Task":
        """A task from a ``.npz`` archive, a VTAB-1k folder or a class-folder tree, by what ``path`` holds."""
        path = os.path.expanduser(os.fspath(path))
        if not os.path.exists(path):
            raise UserInputError(f"{path!r} does not exist; check the path (a .npz task archive, a VTAB-1k folder or a "
                                 "folder of class sub-folders).")
        if path.endswith(".npz"):
            return cls.from_npz(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, VTAB_FILES["train"])):
            return cls.from_vtab(path, **kw)
        if os.path.isdir(path):
            return cls.from_folder(path, **kw)
        raise UserInputError(
            f"{path!r} is not a task: give a .npz task archive, a VTAB-1k folder (train800.txt, val200.txt, test.txt) "
            "or a folder of class sub-folders."
        )

    # ------------------------------------------------------------ tensors
    def tensors(self, split: str, transform: Callable, key: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images ``(N, C, H, W)`` and labels ``(N,)`` of ``split``; cached per ``key``."""
        if split not in self.splits:
            raise UserInputError(f"unknown split {split!r}; use one of {SPLITS}.")
        cache_key = (split, key if key is not None else id(transform))
        if cache_key not in self._cache:
            sp = self.splits[split]
            self._cache[cache_key] = torch.stack([transform(_to_pil(sp, i)) for i in range(len(sp))]) if len(sp) else torch.empty(0)
        return self._cache[cache_key], torch.as_tensor(self.splits[split].labels, dtype=torch.long)

    def sample(self, model, split: str, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(n, C, H, W)`` preprocessed for ``model`` and labels ``(n,)`` of a stratified subset of ``split``."""
        x, y = self.tensors(split, model.transform(), key=("model", model.fingerprint))
        idx = self.subsample(split, n, seed)
        return x[idx], y[idx]

    def image(self, split: str, index: int):
        """Image ``index`` of ``split`` as an RGB PIL image, as stored (before the backbone's transform)."""
        return _to_pil(self.splits[split], int(index))

    def subsample(self, split: str, n: int | None, seed: int) -> np.ndarray:
        """Indices of a class-stratified random subset of ``n`` samples of ``split`` (all when ``n`` is None)."""
        return stratified_subset(self.splits[split].labels, n, seed)


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples drawn round-robin over the classes in random order (all when ``n`` is None).

    Every class keeps at least one sample while ``n`` allows it.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise UserInputError(f"number of samples must be at least 1, got {n}.")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for idx in per_class:
            if depth < len(idx) and len(picked) < n:
                picked.append(int(idx[depth]))
        depth += 1
    return np.sort(np.array(picked))


# ---------------------------------------------------------------- helpers
def _concat(a: Split, b: Split) -> Split:
    if isinstance(a.images, np.ndarray) and isinstance(b.images, np.ndarray):
        return Split(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]))
    return Split(list(a.images) + list(b.images), np.concatenate([a.labels, b.labels]))


def _inside(root: str, path: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _read_list(root: str, filename: str) -> Split:
    path = os.path.join(root, filename)
    if os.path.getsize(path) > MAX_LIST_BYTES:
        raise UserInputError(f"{path!r} is larger than {MAX_LIST_BYTES // 2**20} MiB; a split list cannot be that long.")
    images, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise UserInputError(f"{filename} line {lineno}: expected 'relative/path label', got {line[:80]!r}.")
            rel, lab = parts
            try:
                label = int(lab)
            except ValueError:
                raise UserInputError(f"{filename} line {lineno}: label {lab[:20]!r} is not an integer.") from None
            if label < 0:
                raise UserInputError(f"{filename} line {lineno}: label {label} is negative; labels are 0..C-1.")
            if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
                raise UserInputError(f"{filename} line {lineno}: path {rel[:80]!r} leaves the dataset folder; paths must be relative and inside it.")
            full = os.path.join(root, rel)
            if not _inside(root, full):
                raise UserInputError(f"{filename} line {lineno}: path {rel[:80]!r} points outside the dataset folder (a symlink?); refused.")
            if not os.path.isfile(full):
                raise UserInputError(f"{filename} line {lineno}: image {rel[:80]!r} does not exist in {root!r}.")
            images.append(full)
            labels.append(label)
    if not images:
        raise UserInputError(f"{path!r} lists no images; each line is 'relative/path.jpg label'.")
    return Split(images, np.array(labels, dtype=np.int64))


def _class_dirs(root: str) -> list[str]:
    return [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]


def _scan_classes(root: str, classes: list[str]) -> Split:
    images, labels = [], []
    for c, cls_name in enumerate(classes):
        folder = os.path.join(root, cls_name)
        if not os.path.isdir(folder):
            continue
        for f in sorted(os.listdir(folder)):
            full = os.path.join(folder, f)
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(full):
                if not _inside(root, full):
                    raise UserInputError(f"{full!r} points outside the dataset folder (a symlink?); refused.")
                images.append(full)
                labels.append(c)
    return Split(images, np.array(labels, dtype=np.int64))


def _to_pil(split: Split, i: int):
    from PIL import Image

    if isinstance(split.images, np.ndarray):
        arr = split.images[i]
        img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr[..., 0])
        return img.convert("RGB")
    return open_image(split.images[i])


def open_image(path: str):
    """Open an image file as RGB, refusing decompression bombs and naming unreadable files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserInputError(
                    f"image {path!r} is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; refused as a possible decompression bomb."
                )
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, img).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserInputError(f"image {path!r} cannot be read ({exc.__class__.__name__}: {exc}); it is truncated or not an image.") from exc


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

