"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision's own loaders.

torchvision owns the file formats, the download mirrors and the checksum checks, so data read
here is exactly what `download=True` fetched. CIFAR-100's superclass labels are not exposed by
torchvision; they are read from the same pickles it just verified.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torchvision import datasets as tvd

from growth.data.containers import Dataset, images_to_float, labels_to_long
from growth.errors import DataError

_CLASSES: dict[str, type[tvd.VisionDataset]] = {
    "mnist": tvd.MNIST,
    "fashion_mnist": tvd.FashionMNIST,
    "cifar10": tvd.CIFAR10,
    "cifar100": tvd.CIFAR100,
}


def expected_folder(name: str, root: Path) -> Path:
    """Where torchvision looks for the files of dataset `name` under `root`."""
    cls = _CLASSES[name]
    if issubclass(cls, tvd.MNIST):
        return root / cls.__name__ / "raw"
    return root / cls.base_folder


def _open(name: str, root: Path, train: bool, download: bool) -> tvd.VisionDataset:
    """Instantiate torchvision's dataset, turning its missing-data errors into DataError."""
    where = expected_folder(name, root)
    try:
        return _CLASSES[name](str(root), train=train, download=download)
    except RuntimeError as err:
        if download:
            raise DataError(f"{name}: download into {where} failed: {err}") from err
        raise DataError(
            f"{name}: dataset files not found (or corrupted) in {where}; "
            "pass download=True (config key `download: true`) to fetch them, "
            f"or place the official files there"
        ) from err
    except OSError as err:
        raise DataError(f"{name}: cannot read {where}: {err}") from err


def load_torchvision(name: str, root: Path, download: bool) -> Dataset:
    """Load both parts of a torchvision dataset into memory as float images in [0, 1]."""
    parts = [_open(name, root, train, download) for train in (True, False)]
    channels_last = not isinstance(parts[0], tvd.MNIST)
    xs = [images_to_float(p.data, channels_last) for p in parts]
    ys = [labels_to_long(p.targets) for p in parts]
    ds = Dataset(name, xs[0], ys[0], xs[1], ys[1], class_names=list(parts[0].classes))
    if name == "cifar100":
        _attach_coarse(ds, root)
    return ds


def _attach_coarse(ds: Dataset, root: Path) -> None:
    """Add CIFAR-100 superclass labels and names from the pickles torchvision verified."""
    cls = tvd.CIFAR100
    folder = root / cls.base_folder
    ds.train_coarse = labels_to_long(_coarse_of(folder, cls.train_list))
    ds.test_coarse = labels_to_long(_coarse_of(folder, cls.test_list))
    ds.coarse_names = list(_unpickle(folder / cls.meta["filename"])["coarse_label_names"])


def _coarse_of(folder: Path, files: list[list[str]]) -> list[int]:
    labels: list[int] = []
    for file_name, _md5 in files:
        entry = _unpickle(folder / file_name)
        if "coarse_labels" not in entry:
            raise DataError(f"cifar100: {folder / file_name} has no 'coarse_labels'")
        labels.extend(entry["coarse_labels"])
    return labels


def _unpickle(path: Path) -> dict:
    """Read one CIFAR pickle (latin1, as the official files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"cannot read CIFAR file {path}: {err}") from err
