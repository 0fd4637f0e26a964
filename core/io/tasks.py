"""Target and source tasks: in-memory arrays, class folders, and the VTAB-1k list format.

A :class:`Task` holds train / val / test splits of images and integer labels
``0..C-1``. What is computed from its images (the backbone's preprocessing, the
frozen tokens, a tune's initial state) is kept in its :class:`TaskCache`, each
entry under a typed key that names what it depends on.

VTAB-1k list format (as exported by the NOAH / SSF preparations): a folder
with ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``,
each line ``relative/path.jpg label``. Paths must stay inside the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import UserInputError
from ..options import check_seed
from .archives import check_members
from .images import MAX_IMAGE_PIXELS, array_to_pil, open_image
from .safe_io import atomic_write_bytes

SPLITS = ("train", "val", "test")
VTAB_FILES = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
#: Largest list file read (a VTAB test list has ~20k lines, ~1 MB).
MAX_LIST_BYTES = 16 * 2**20
#: Largest class index a label may be (ImageNet-21k has 21,843 classes).
MAX_LABEL = 99_999
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


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
            raise UserInputError(f"a split has {len(self.images)} images but {len(self.labels)} labels; give one label "
                                 "per image.")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Split":
        if isinstance(self.images, np.ndarray):
            return Split(self.images[index], self.labels[index])
        return Split([self.images[i] for i in index], self.labels[index])

    def pil(self, i: int):
        """Image ``i`` as an RGB PIL image, as stored (before any backbone's transform)."""
        return array_to_pil(self.images[i]) if isinstance(self.images, np.ndarray) else open_image(self.images[i])


class TaskCache:
    """What has been computed from one task's images, each entry under a typed key.

    A key is a frozen dataclass defined by the code that computes the entry, naming everything the entry depends on
    besides the task (the preprocessed images: :class:`ImagesKey`; the frozen tokens:
    :class:`core.model.tokens.TokenKey`; a tune's initial state: :class:`core.tuning.tune.InitialStateKey`), so
    no module builds another module's key by hand.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, Any] = {}

    @staticmethod
    def _check(key: Any) -> Any:
        assert dataclasses.is_dataclass(key) and not isinstance(key, type), (
            f"cache keys are dataclass instances, got {key!r}")
        return key

    def get(self, key: Any, default: Any = None) -> Any:
        return self._entries.get(self._check(key), default)

    def put(self, key: Any, value: Any) -> Any:
        self._entries[self._check(key)] = value
        return value

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The entry under ``key``, computed by ``compute()`` and kept the first time."""
        if self._check(key) not in self._entries:
            self._entries[key] = compute()
        return self._entries[key]

    def __contains__(self, key: Any) -> bool:
        return self._check(key) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Any]:
        return list(self._entries)


@dataclass(frozen=True)
class ImagesKey:
    """The preprocessed images of a split: ``preprocess`` names the transform (e.g. the backbone it belongs to)."""

    split: str
    preprocess: str


@dataclass(frozen=True)
class ResplitKey:
    """A task's train/val split redrawn for a seed (:meth:`Task.resplit`)."""

    seed: int


@dataclass
class Task:
    """A classification task with ``train``, ``val`` and ``test`` splits.

    A task made by :meth:`resplit` keeps its ``parent`` (the task it was redrawn from), its ``resplit_seed`` and
    ``pooled_index`` (where each of its train / val images sits in the parent's pooled train + val images), so what
    is computed from images (preprocessing, frozen tokens) is computed once, on the parent, for every seed.
    """

    name: str
    splits: dict[str, Split]
    classes: list[str] = field(default_factory=list)
    group: str = ""
    description: str = ""
    cache: TaskCache = field(default_factory=TaskCache, repr=False, compare=False)
    parent: "Task | None" = field(default=None, repr=False, compare=False)
    resplit_seed: int | None = field(default=None, compare=False)
    pooled_index: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    # Warnings found when the task was made (a test split that repeats train images), also raised as UserWarnings.
    notes: list[str] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise UserInputError(f"task {self.name!r} lacks the split(s) {missing}; a task needs train, val and test.")
        for split in SPLITS:
            labels = self.splits[split].labels
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise UserInputError(f"task {self.name!r} has non-integer {split} labels ({labels.dtype}); labels are "
                                     "class indices 0..C-1.")
            if not len(self.splits[split]):
                raise UserInputError(
                    f"task {self.name!r} has an empty {split} split; every split needs images "
                    + ("(give it labelled images)." if split == "train" else
                       "(VTAB-1k has 200 val and thousands of test images; with class folders, put more images in each "
                       "class, or give train/val/test sub-folders)."))
        all_labels = np.concatenate([self.splits[s].labels for s in SPLITS]).astype(np.int64)
        if (all_labels < 0).any():
            raise UserInputError(f"task {self.name!r} has a negative label ({int(all_labels.min())}); labels are "
                                 "0..C-1.")
        if not self.classes:
            used = np.unique(all_labels)
            if int(used[-1]) + 1 != len(used):  # checked before a class list of max + 1 names is made
                gaps = sorted(set(range(int(used[-1]) + 1)) - set(used.tolist())) if used[-1] < 10**6 else []
                raise UserInputError(
                    f"task {self.name!r} has labels {_some(used)}: the classes between them "
                    + (f"({_some(np.array(gaps))}) " if gaps else "")
                    + "have no images at all. Labels are 0..C-1 with every class used; renumber them "
                    f"(0..{len(used) - 1} for these {len(used)} classes).")
            self.classes = [str(i) for i in range(len(used))]
        c = len(self.classes)
        bad = all_labels[all_labels >= c]
        if bad.size:
            raise UserInputError(
                f"task {self.name!r} has labels outside 0..{c - 1} (e.g. {int(bad[0])}); labels must index its {c} "
                "classes."
            )
        train = set(np.unique(self.splits["train"].labels).tolist())
        if len(train) < 2:
            raise UserInputError(
                f"task {self.name!r} has {len(train)} class in its train split; a target task needs at least two "
                "classes."
            )
        for split in ("val", "test"):
            extra = sorted(set(np.unique(self.splits[split].labels).tolist()) - train)
            if extra:
                raise UserInputError(
                    f"task {self.name!r}: the {split} split has label {extra[0]} ({self.classes[extra[0]]!r}), which "
                    "no train image has; a head trained on train cannot predict it. Every val and test label must be "
                    "a class of the train split (add train images of that class, or remove those images).")
        empty = [k for k in range(c) if k not in train]
        if empty:
            raise UserInputError(
                f"task {self.name!r}: class {self.classes[empty[0]]!r} (label {empty[0]}) has no train images"
                + (f", nor {len(empty) - 1} other class(es)" if len(empty) > 1 else "")
                + "; every class needs train images (remove the class or add its images).")
        if self.parent is None:
            self.notes = _overlaps(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.splits[s]) for s in SPLITS}

    def resplit(self, seed: int) -> "Task":
        """The same task with train and val redrawn from their pooled images for ``seed`` (sizes kept, test fixed).

        What an evaluation over seeds needs so that a seed changes the data, not only the batch order. A class
        left out of the new train split is refused, as at construction. The task is made once per seed and kept:
        a second call returns the same object, with everything computed on it.
        """
        seed = check_seed(seed)
        return self.cache.get_or_compute(ResplitKey(seed), lambda: self._redraw(seed))

    def _redraw(self, seed: int) -> "Task":
        pool = np.concatenate([np.arange(len(self.splits["train"])),
                               len(self.splits["train"]) + np.arange(len(self.splits["val"]))])
        both = _concat(self.splits["train"], self.splits["val"])
        order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(pool))
        n_tr = len(self.splits["train"])
        return Task(self.name, {"train": both.subset(order[:n_tr]), "val": both.subset(order[n_tr:]),
                                "test": self.splits["test"]}, list(self.classes), self.group, self.description,
                    parent=self, resplit_seed=seed, pooled_index={"train": order[:n_tr], "val": order[n_tr:]})

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
        for split, (x, y) in zip(SPLITS, (train, val, test), strict=True):
            x = np.asarray(x)
            if x.dtype != np.uint8 or x.ndim not in (3, 4):
                raise UserInputError(
                    f"{split} images must be a uint8 array (N, H, W) or (N, H, W, C), got {x.dtype} {x.shape}."
                )
            if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[1] * x.shape[2] > MAX_IMAGE_PIXELS or (
                    x.ndim == 4 and x.shape[3] not in (1, 3, 4)):
                raise UserInputError(
                    f"{split} images have shape {x.shape}: each image must be at least 1x1 pixels (at most "
                    f"{MAX_IMAGE_PIXELS:,}) with 1, 3 or 4 channels; give (N, H, W) or (N, H, W, C) arrays.")
            if np.ndim(y) != 1:
                raise UserInputError(
                    f"{split} labels have shape {np.shape(y)}; labels are one class index per image, shape (N,) "
                    "(for labels of shape (N, 1), give y.ravel(); one-hot labels: y.argmax(1)).")
            splits[split] = Split(x, np.asarray(y).astype(np.int64) if np.asarray(y).dtype.kind in "iu"
                                  else np.asarray(y))
        return cls(name=name, splits=splits, classes=list(classes or []), **kw)

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "Task":
        """A task saved by :meth:`save_npz` (no pickle: ``allow_pickle=False``). The archive's directory and every
        array's declared size are checked before any array is read (:func:`_read_npz`)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserInputError(f"task file {path!r} does not exist.")
        with open(path, "rb") as fh:
            if fh.read(4) not in _ZIP_MAGIC:  # np.load would read anything else as a pickle (and refuse it as one)
                raise UserInputError(f"{path!r} is not a .npz task archive (it does not start as a zip file does); "
                                     "save tasks with Task.save_npz, or give a VTAB-1k folder or class folders.")
        arrays = _read_npz(path)
        need = [f"{s}_{k}" for s in SPLITS for k in ("x", "y")]
        if any(k not in arrays for k in need):
            raise UserInputError(f"{path!r} lacks arrays {[k for k in need if k not in arrays]}; it is not a task "
                                 "archive.")
        text = {k: _npz_text(arrays[k], k, path) for k in ("name", "group", "description") if k in arrays}
        classes = arrays.get("classes", np.array([]))
        if classes.ndim != 1 or (classes.size and classes.dtype.kind not in "US"):
            raise UserInputError(f"{path!r}: 'classes' must be a list of class names (strings), got a {classes.dtype} "
                                 f"array of shape {classes.shape}; save the task again with Task.save_npz.")
        name = check_task_name(text.pop("name", os.path.splitext(os.path.basename(path))[0]), path)
        return cls.from_arrays(
            name, *[(arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in SPLITS], classes=[str(c) for c in classes], **text
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
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

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
        read = {s: _read_list(root, f) for s, f in VTAB_FILES.items()}
        splits = {s: sp for s, (sp, _) in read.items()}
        _same_image_one_label(root, read)
        train = set(np.unique(splits["train"].labels).tolist())
        for s in ("val", "test"):  # named by line here; Task itself checks the same without line numbers
            sp, lines = read[s]
            stray = np.flatnonzero(~np.isin(sp.labels, list(train)))
            if len(stray):
                i = int(stray[0])
                raise UserInputError(
                    f"{VTAB_FILES[s]} line {lines[i]}: label {int(sp.labels[i])} is no class of {VTAB_FILES['train']} "
                    f"(its labels are {_some(np.array(sorted(train)))}); {len(stray)} {s} line(s) have labels the "
                    "train split lacks. Every val and test label must be a class of the train split.")
        return cls(name=name or os.path.basename(os.path.normpath(root)), splits=splits)

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike, name: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
        seed: int = 0
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
        empty = [c for k, c in enumerate(classes) if not (whole.labels == k).any()]
        if empty:
            raise UserInputError(f"class folder {os.path.join(root, empty[0])!r} holds no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images.")
        rng = np.random.default_rng(check_seed(seed))
        order = rng.permutation(len(whole))
        # At least one val and one test image where there are three images or more (a rounding to 0 left val empty).
        n_val, n_test = (max(1, int(round(f * len(whole)))) if len(whole) >= 3 else 0
                         for f in (val_fraction, test_fraction))
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
    def tensors(self, split: str, transform: Callable,
                preprocess: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, C, H, W)`` of ``split`` put through ``transform``, and labels ``(N,)``. With ``preprocess``
        (the transform's name, e.g. :func:`core.model.tokens.preprocess_name`) they are kept in the task's cache; a
        resplit task then takes them from its parent's."""
        if split not in self.splits:
            raise UserInputError(f"unknown split {split!r}; use one of {SPLITS}.")
        labels = torch.as_tensor(self.splits[split].labels, dtype=torch.long)
        if preprocess is None:
            sp = self.splits[split]
            return (torch.stack([transform(sp.pil(i)) for i in range(len(sp))]) if len(sp) else torch.empty(0)), labels
        return self.cache.get_or_compute(ImagesKey(split, preprocess),
                                         lambda: self._preprocess(split, transform, preprocess)), labels

    def _preprocess(self, split: str, transform: Callable, preprocess: str) -> torch.Tensor:
        if self.parent is not None:
            if split == "test":
                return self.parent.tensors("test", transform, preprocess)[0]
            pooled = torch.cat([self.parent.tensors(s, transform, preprocess)[0] for s in ("train", "val")])
            return pooled[torch.as_tensor(self.pooled_index[split])]
        sp = self.splits[split]
        return torch.stack([transform(sp.pil(i)) for i in range(len(sp))]) if len(sp) else torch.empty(0)

    def image(self, split: str, index: int):
        """Image ``index`` of ``split`` as an RGB PIL image, as stored (before the backbone's transform)."""
        return self.splits[split].pil(int(index))

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
#: A task's name: what a prompt built on it is called, so nothing that leaves a folder or hides a file.
_TASK_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f/\\.][^\x00-\x1f\x7f/\\]{0,99}$")


def check_task_name(name: str, where: str) -> str:
    """``name`` when it can name a task (1-100 characters, no ``/``, ``\\`` or control characters, not starting with
    ``.``), else a :class:`UserInputError` that names ``where`` it came from."""
    if not isinstance(name, str) or not _TASK_NAME_RE.match(name) or ".." in name:
        raise UserInputError(f"{where!r} names its task {name[:80]!r}, which is not allowed: a task's name names the "
                             "prompts and files made from it, so it is 1-100 characters without '/', '\\', '..' or "
                             "control characters, not starting with '.'. Save the task again under a plain name.")
    return name


def _npz_text(value: np.ndarray, key: str, path: str) -> str:
    """A text field of a task archive (``name``, ``group``, ``description``): one string of at most 10,000
    characters."""
    if value.ndim != 0 or value.dtype.kind not in "US" or value.dtype.itemsize > 40_000:
        raise UserInputError(f"{path!r}: {key!r} must be one string, got a {value.dtype} array of shape {value.shape}; "
                             "save the task again with Task.save_npz.")
    return str(value)


def _npy_nbytes(zf, member) -> int:
    """The bytes an ``.npy`` entry's header declares its array to hold (read from the header alone)."""
    fmt = np.lib.format
    with zf.open(member) as fh:
        version = fmt.read_magic(fh)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape, _, dtype = read(fh) if read else fmt._read_array_header(fh, version)  # (3, 0): utf-8 field names
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` task archive, read only after the zip caps of an uploaded archive
    (:func:`core.io.archives.check_members`) and each array's declared size against its entry's: a small file that
    declares a huge array is refused before anything is allocated. A truncated or damaged archive is said as such."""
    try:
        with zipfile.ZipFile(path) as zf:
            for m in check_members(zf, f"task archive {path!r}"):
                if m.filename.endswith(".npy") and _npy_nbytes(zf, m) > m.file_size:
                    raise UserInputError(
                        f"task archive {path!r}: {m.filename!r} declares an array of {_npy_nbytes(zf, m) / 2**20:.1f} "
                        f"MiB in an entry of {m.file_size / 2**20:.2f} MiB; the archive is damaged or forged. Save the "
                        "task again with Task.save_npz.")
        with np.load(path, allow_pickle=False) as z:  # (an entry that is no .npy comes back as bytes: not an array)
            return {k: v for k in z.files if isinstance(v := z[k], np.ndarray)}
    except UserInputError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UserInputError(f"{path!r} is not a task archive of plain arrays ({exc}); pickled arrays are "
                                 "refused.") from exc
        raise UserInputError(f"{path!r} is a damaged or truncated task archive ({str(exc)[:200]}); save or copy "
                             "it again.") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise UserInputError(f"{path!r} is a damaged or truncated task archive ({exc.__class__.__name__}: "
                             f"{str(exc)[:200]}); save or copy it again.") from exc


def _some(values: np.ndarray, most: int = 6) -> str:
    """A few values of a sorted array, for a message: ``0, 5`` or ``0, 1, 2, ..., 999``."""
    v = [int(x) for x in values[:most]]
    return ", ".join(map(str, v)) + (f", ... {int(values[-1])}" if len(values) > most else "")


def _image_ids(split: Split) -> list:
    """One identity per image: its real path, or a digest of an in-memory image's bytes."""
    if isinstance(split.images, np.ndarray):
        return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in split.images]
    return [os.path.realpath(p) for p in split.images]


def _overlaps(task: "Task") -> list[str]:
    """Warnings for a test (or val) split that repeats train images: its accuracy then measures memorisation."""
    if sum(len(task.splits[s]) for s in SPLITS) > 200_000:
        return []
    train = set(_image_ids(task.splits["train"]))
    notes = []
    for split in ("test", "val"):
        ids = _image_ids(task.splits[split])
        shared = sum(i in train for i in ids)
        if shared > 0.01 * len(ids):  # a stray duplicate (two identical blank patches) is not a leak worth a warning
            what = "is the train split itself" if shared == len(ids) == len(train) else (
                f"shares {shared} of its {len(ids)} images with the train split")
            notes.append(f"task {task.name!r}: the {split} split {what}; its accuracy then measures how well train "
                         "images are remembered, not how well the task is learned. Give it images the train split "
                         "lacks.")
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=4)
    return notes


def _concat(a: Split, b: Split) -> Split:
    if isinstance(a.images, np.ndarray) and isinstance(b.images, np.ndarray):
        return Split(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]))
    return Split(list(a.images) + list(b.images), np.concatenate([a.labels, b.labels]))


def _inside(root: str, path: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


_LABEL_RE = re.compile(r"^-?[0-9]+$")  # ASCII digits only: int() also reads "1_0" as 10 and "\u0661" as 1


def _list_text(root: str, filename: str) -> str:
    """The text of a list file, refused before it is read when it leaves the folder (a link to a file elsewhere) or is
    too large, and refused by name when it is not UTF-8 text (UTF-16, as Windows tools save it, included)."""
    path = os.path.join(root, filename)
    if not _inside(root, path):
        raise UserInputError(f"{filename} in {root!r} is a link to a file outside the dataset folder; list files must "
                             "be in the folder itself (copy the file there). It was not read.")
    if os.path.getsize(path) > MAX_LIST_BYTES:
        raise UserInputError(f"{path!r} is larger than {MAX_LIST_BYTES // 2**20} MiB; a split list cannot be that "
                             "long.")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_LIST_BYTES + 1)
    utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) >= 4 and raw.count(0) > len(raw) // 4)
    if utf16:
        raise UserInputError(f"{filename} is UTF-16 (or UTF-32) text, not UTF-8: save it as UTF-8 (e.g. iconv -f "
                             "UTF-16 -t UTF-8, or 'UTF-8' in your editor's save dialog).")
    try:
        return raw.decode("utf-8-sig")  # utf-8-sig: a byte-order mark is not part of the first path
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserInputError(f"{filename} line {line}: byte {raw[exc.start]:#04x} is not UTF-8 text; save the file as "
                             "UTF-8.") from None


def _read_list(root: str, filename: str) -> tuple[Split, list[int]]:
    """The images and labels a VTAB list file names, and the line number of each."""
    path = os.path.join(root, filename)
    images, labels, linenos = [], [], []
    first: dict[str, tuple[int, int]] = {}  # image (real path) -> (its label, the line that first listed it)
    for lineno, line in enumerate(_list_text(root, filename).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserInputError(f"{filename} line {lineno}: expected 'relative/path label', got {line[:80]!r}.")
        rel, lab = parts
        if not _LABEL_RE.match(lab):
            raise UserInputError(f"{filename} line {lineno}: label {lab[:20]!r} is not an integer (digits 0-9 only).")
        label = int(lab)
        if label < 0:
            raise UserInputError(f"{filename} line {lineno}: label {label} is negative; labels are 0..C-1.")
        if label > MAX_LABEL:
            raise UserInputError(f"{filename} line {lineno}: label {label} is larger than any class index can be "
                                 f"(at most {MAX_LABEL}); labels are 0..C-1 for C classes.")
        if "\x00" in rel:
            raise UserInputError(f"{filename} line {lineno}: path {rel[:80]!r} holds a NUL byte, which no file name "
                                 "can; fix that line.")
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise UserInputError(f"{filename} line {lineno}: path {rel[:80]!r} leaves the dataset folder; paths must "
                                 "be relative and inside it.")
        full = os.path.join(root, rel)
        if not _inside(root, full):
            raise UserInputError(f"{filename} line {lineno}: path {rel[:80]!r} points outside the dataset folder (a "
                                 "symlink?); refused.")
        if not os.path.isfile(full):
            raise UserInputError(f"{filename} line {lineno}: image {rel[:80]!r} does not exist in {root!r}.")
        seen = first.setdefault(os.path.realpath(full), (label, lineno))
        if seen[0] != label:
            raise UserInputError(f"{filename} line {lineno}: image {rel[:80]!r} is labelled {label}, but line "
                                 f"{seen[1]} labels it {seen[0]}; an image has one class. Remove one of the two lines.")
        images.append(full)
        labels.append(label)
        linenos.append(lineno)
    if not images:
        raise UserInputError(f"{path!r} lists no images; each line is 'relative/path.jpg label'.")
    return Split(images, np.array(labels, dtype=np.int64)), linenos


def _same_image_one_label(root: str, read: dict[str, tuple[Split, list[int]]]) -> None:
    """Refuse an image that two list files give two labels (each file alone was checked as it was read)."""
    seen: dict[str, tuple[int, str, int]] = {}
    for split, (sp, lines) in read.items():
        for image, label, line in zip(sp.images, sp.labels.tolist(), lines, strict=True):
            other = seen.setdefault(os.path.realpath(image), (label, split, line))
            if other[0] != label:
                raise UserInputError(
                    f"{VTAB_FILES[split]} line {line}: image {os.path.relpath(image, root)!r} is "
                    f"labelled {label}, but {VTAB_FILES[other[1]]} line {other[2]} labels it {other[0]}; an image has "
                    "one class. Fix one of the two lines.")


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
            # Hidden files are not images of the class: ".DS_Store", and macOS's AppleDouble "._x.png" companions.
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(full):
                if not _inside(root, full):
                    raise UserInputError(f"{full!r} points outside the dataset folder (a symlink?); refused.")
                images.append(full)
                labels.append(c)
    return Split(images, np.array(labels, dtype=np.int64))


