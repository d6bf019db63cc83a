"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision's own loaders.

torchvision owns the file formats, the download mirrors and the checksum checks, so data read
here is exactly what `download=True` fetched. CIFAR-100's superclass labels are not exposed by
torchvision's class; a subclass keeps them from the same single reading of each verified
pickle (no second unpickling).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torchvision import datasets as tvd
from torchvision.datasets.utils import check_integrity

from growth.data.containers import Dataset, images_to_float, labels_to_long
from growth.errors import DataError

_CLASSES: dict[str, type[tvd.VisionDataset]] = {
    "mnist": tvd.MNIST,
    "fashion_mnist": tvd.FashionMNIST,
    "cifar10": tvd.CIFAR10,
}


def _classes() -> dict[str, type[tvd.VisionDataset]]:
    return {**_CLASSES, "cifar100": CIFAR100Coarse}


def expected_folder(name: str, root: Path) -> Path:
    """Where torchvision looks for the files of dataset `name` under `root`."""
    cls = _classes()[name]
    if issubclass(cls, tvd.MNIST):
        return root / cls.__name__ / "raw"
    return root / cls.base_folder


def _open(name: str, root: Path, train: bool, download: bool) -> tvd.VisionDataset:
    """Instantiate torchvision's dataset; a failed download or missing files is a DataError
    that says what to do in the config's own terms, and folders made for a download that
    failed are removed again."""
    where = expected_folder(name, root)
    made = _missing(where)
    try:
        return _classes()[name](str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        _remove_empty(made)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1][:200] if lines else type(err).__name__  # the innermost cause
        if download:
            raise DataError(
                f"{name}: downloading into {where} failed ({reason}); without network access, "
                f"copy the official {name} files into {where} (or point data.root at a folder "
                "that has them) and set data.download: false") from None
        raise DataError(
            f"{name}: dataset files not found (or corrupted) in {where}; set "
            f"data.download: true to fetch them, or place the official files there (data.root "
            f"is {root})") from None


def _missing(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not folder.exists() and folder.parent != folder:
        out.append(folder)
        folder = folder.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first, so a parent is empty once its child is gone
        try:
            folder.rmdir()
        except OSError:  # not empty (a partial download the user may want), or not there
            pass


def load_torchvision(name: str, root: Path, download: bool) -> Dataset:
    """Load both parts of a torchvision dataset into memory as float images in [0, 1]."""
    parts = [_open(name, root, train, download) for train in (True, False)]
    channels_last = not isinstance(parts[0], tvd.MNIST)
    xs = [images_to_float(p.data, channels_last) for p in parts]
    ys = [labels_to_long(p.targets) for p in parts]
    ds = Dataset(name, xs[0], ys[0], xs[1], ys[1], class_names=list(parts[0].classes))
    if isinstance(parts[0], CIFAR100Coarse):
        ds.train_coarse, ds.test_coarse = (labels_to_long(p.coarse_targets) for p in parts)
        ds.coarse_names = list(parts[0].coarse_classes)
    return ds


class CIFAR100Coarse(tvd.CIFAR100):
    """torchvision's CIFAR-100 (same files, download and MD5 checks) that also keeps the
    superclass labels and names, reading each verified pickle once. The test part skips the
    meta file (the train part read the names)."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        tvd.VisionDataset.__init__(self, root)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to "
                               "download it")
        files = self.train_list if train else self.test_list
        entries = [_unpickle(Path(self.root, self.base_folder, f)) for f, _md5 in files]
        for (f, _md5), entry in zip(files, entries):
            missing = {"data", "fine_labels", "coarse_labels"} - set(entry)
            if missing:
                raise DataError(f"cifar100: {Path(self.root, self.base_folder, f)} lacks "
                                f"{sorted(missing)}")
        self.data = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
        self.data = self.data.transpose((0, 2, 3, 1))
        self.targets = [y for e in entries for y in e["fine_labels"]]
        self.coarse_targets = [y for e in entries for y in e["coarse_labels"]]
        self.classes: list[str] = []
        self.coarse_classes: list[str] = []
        if train:
            self._load_meta()

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not check_integrity(path, self.meta["md5"]):
            raise RuntimeError("Dataset metadata file not found or corrupted. You can use "
                               "download=True to download it")
        meta = _unpickle(Path(path))
        self.classes = list(meta["fine_label_names"])
        self.coarse_classes = list(meta["coarse_label_names"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR pickle (latin1, as the official files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"cannot read CIFAR file {path}: {err}") from err
