"""Image datasets read from folders: CUB-200-2011 (official layout) and any ImageFolder tree.

Images are converted to RGB and resized to a square `image_size` (aspect ratio not kept), read
into one tensor, or kept as files that the training loop streams (`load`: memory | stream |
auto, see `growth.data.streaming`); the pixel reading is shared by both layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from growth.data.containers import Dataset, images_to_float, labels_to_long
from growth.data.sampling import generator, stratified_split
from growth.data.streaming import STREAM_BYTES, ImageFiles, take
from growth.errors import DataError

CUB_FOLDER = "CUB_200_2011"
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
TEST_FRACTION = 0.2


def read_images(paths: Sequence[Path | str], image_size: int) -> torch.Tensor:
    """Read images as float32 [N, 3, S, S] in [0, 1] (RGB, bilinear resize to S x S)."""
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                out[i] = np.asarray(rgb)
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from err
    return images_to_float(out, channels_last=True)


def images(paths: Sequence[Path | str], image_size: int, load: str, workers: int
           ) -> torch.Tensor | ImageFiles:
    """The images as one tensor, or as files read on demand (see load_dataset's `load`)."""
    files = ImageFiles(paths, image_size, workers)
    if load == "stream" or (load == "auto" and files.nbytes > STREAM_BYTES):
        return files
    return read_images(paths, image_size)


def load_cub200(root: Path, image_size: int, load: str = "memory", workers: int = 2
                ) -> Dataset:
    """CUB-200-2011 from `<root>/CUB_200_2011` with its official train/test split."""
    base = root / CUB_FOLDER
    missing = [f for f in CUB_FILES if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"cub200: {', '.join(missing)} not found in {base}; download CUB_200_2011.tgz "
            f"(Caltech-UCSD Birds-200-2011) and extract it under {root} (no automatic download)"
        )
    paths = _table(base / "images.txt")
    labels = {k: int(v) - 1 for k, v in _table(base / "image_class_labels.txt").items()}
    is_train = {k: v == "1" for k, v in _table(base / "train_test_split.txt").items()}
    names = [_strip_number(v) for _, v in sorted(_table(base / "classes.txt").items(), key=_num)]
    parts = {}
    for train in (True, False):
        ids = sorted((k for k in paths if is_train.get(k) == train), key=int)
        x = images([base / "images" / paths[k] for k in ids], image_size, load, workers)
        parts[train] = (x, labels_to_long([labels[k] for k in ids]))
    return Dataset("cub200", *parts[True], *parts[False], class_names=names)


def load_imagefolder(root: Path, image_size: int, seed: int, load: str = "memory",
                     workers: int = 2) -> Dataset:
    """An ImageFolder tree: `<root>/train` + `<root>/test`, or one tree split by `seed`."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _folder(root / "train"), _folder(root / "test")
        if train.classes != test.classes:
            raise DataError(
                f"imagefolder: class folders differ between {root / 'train'} and "
                f"{root / 'test'}: {train.classes} vs {test.classes}"
            )
        tr_x, tr_y = _folder_tensors(train, image_size, load, workers)
        te_x, te_y = _folder_tensors(test, image_size, load, workers)
        return Dataset("imagefolder", tr_x, tr_y, te_x, te_y, class_names=list(train.classes))
    tree = _folder(root)
    x, y = _folder_tensors(tree, image_size, load, workers)
    keep, held = stratified_split(y, TEST_FRACTION, generator(seed, "imagefolder-test"))
    return Dataset("imagefolder", take(x, keep), y[keep], take(x, held), y[held],
                   list(tree.classes))


def _folder(path: Path) -> ImageFolder:
    if not path.is_dir():
        raise DataError(f"imagefolder: folder {path} not found (expected one subfolder per class)")
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"imagefolder: no usable class folders in {path}: {err}") from err


def _folder_tensors(tree: ImageFolder, image_size: int, load: str, workers: int
                    ) -> tuple[torch.Tensor | ImageFiles, torch.Tensor]:
    paths = [p for p, _ in tree.samples]
    return images(paths, image_size, load, workers), labels_to_long([c for _, c in
                                                                      tree.samples])


def _table(path: Path) -> dict[str, str]:
    """A CUB index file ("<id> <value>" per line) as a dict id -> value."""
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            rows[parts[0]] = parts[1].strip()
        elif parts:
            raise DataError(f"cub200: {path} line {number} is not '<id> <value>': {line!r}")
    return rows


def _num(item: tuple[str, str]) -> int:
    return int(item[0])


def _strip_number(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black_footed_Albatross'."""
    head, _, tail = name.partition(".")
    return tail if head.isdigit() and tail else name
