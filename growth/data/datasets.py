"""One entry point, `load_dataset`, for every dataset the engine knows.

`digits` (scikit-learn's bundled 8x8 digits) needs no download and is the offline default; the
others read the official files from `root` (torchvision downloads them when `download=True`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from growth.data.containers import Dataset, labels_to_long
from growth.data.sampling import generator, stratified_split
from growth.errors import DataError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "cub200", "imagefolder")
DIGITS_TEST_FRACTION = 0.2
LOADS = ("auto", "memory", "stream")


def load_dataset(
    name: str,
    root: str | Path = "data",
    download: bool = False,
    image_size: int = 64,
    seed: int = 0,
    load: str = "auto",
    workers: int = 2,
) -> Dataset:
    """Load dataset `name` into memory, or (folder datasets) as files read on demand.

    `image_size` applies to the folder datasets (cub200, imagefolder), which are resized to a
    square; `seed` fixes the train/test split of datasets without an official one (digits,
    imagefolder without train/test subfolders). `load` (folder datasets): "memory" reads every
    image now, "stream" keeps file paths that the training loop reads through a DataLoader with
    `workers` processes, "auto" streams when the images would take more than 1 GiB as floats.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if int(image_size) < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size}")
    if load not in LOADS:
        raise DataError(f"unknown load mode {load!r}; valid: {', '.join(LOADS)}")
    root = Path(root).expanduser()
    if key == "digits":
        return load_digits(seed)
    if key == "cub200":
        from growth.data.folders import load_cub200  # torchvision loads lazily: it is slow

        return load_cub200(root, int(image_size), load, int(workers))
    if key == "imagefolder":
        from growth.data.folders import load_imagefolder

        return load_imagefolder(root, int(image_size), seed, load, int(workers))
    from growth.data.torchvision_sets import load_torchvision

    return load_torchvision(key, root, download)


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digits (values 0..16 scaled to [0, 1]), 80/20 stratified split.

    The split depends only on `seed`, so it is the same on every run and machine.
    """
    images, target = digits_arrays()
    x = torch.as_tensor(images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = labels_to_long(target)
    train, test = stratified_split(y, DIGITS_TEST_FRACTION, generator(seed, "digits-test"))
    names = [str(c) for c in range(10)]
    return Dataset("digits", x[train], y[train], x[test], y[test], class_names=names)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' images (n, 8, 8) and labels, read from the file scikit-learn ships without
    importing scikit-learn (about a second per process: every campaign, Ray trial and test
    subprocess loads the digits); scikit-learn's own loader where the file is not found."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return bunch.images, bunch.target
