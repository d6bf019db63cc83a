"""Images read from disk on demand, for datasets too large to hold as one tensor.

`ImageFiles` stands where a split's x tensor [N, C, S, S] would be: indexing it with a slice,
a list or an index tensor reads those images now (decoded, RGB, resized to S x S, in [0, 1]),
so evaluation and importance measurements work on it unchanged; `subset` makes a lazy view
(how streams cut tasks without reading anything). The training loop reads it through a torch
DataLoader (`loader_batches`): worker processes decode and resize, the loop's own generator
fixes the order, so a run is reproducible and resumes exactly whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from growth.errors import DataError

STREAM_BYTES = 1 << 30  # "auto": stream a dataset whose decoded float tensors exceed 1 GiB


class ImageFiles:
    """A lazy x: image files, read on demand as float32 [C, S, S] in [0, 1]."""

    def __init__(self, paths: Sequence[str | Path], size: int, workers: int = 2) -> None:
        self.paths = [str(p) for p in paths]
        self.size = int(size)
        self.workers = int(workers)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size, self.size))

    @property
    def nbytes(self) -> int:
        """What the split would take as one float32 tensor."""
        return len(self.paths) * 3 * self.size * self.size * 4

    def subset(self, idx: Tensor | Sequence[int]) -> ImageFiles:
        """A lazy view of the images at positions `idx` (nothing is read)."""
        positions = torch.as_tensor(idx, dtype=torch.long).tolist()
        return ImageFiles([self.paths[i] for i in positions], self.size, self.workers)

    def read(self, i: int) -> Tensor:
        """Image `i` as float32 [3, S, S] in [0, 1]."""
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(rgb, dtype=np.uint8).copy()
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from err
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Tensor:
        if isinstance(index, int):
            return self.read(index)
        if isinstance(index, slice):
            positions = range(len(self))[index]
        else:
            positions = torch.as_tensor(index, dtype=torch.long).flatten().tolist()
        if not positions:
            return torch.empty((0, 3, self.size, self.size))
        return torch.stack([self.read(i) for i in positions])

    def to(self, device: torch.device | str) -> ImageFiles:
        """Files stay on disk; batches are moved to the device as they are read."""
        return self


class _Items(Dataset):
    """(image, position) pairs for a DataLoader: labels stay with the loop, in memory."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.files.read(i), i


def loader_batches(files: ImageFiles, batches: Sequence[Tensor], device: torch.device
                   ) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, positions) for the given batches of positions, in order, read by
    `files.workers` processes."""
    loader = DataLoader(_Items(files), batch_sampler=[b.tolist() for b in batches],
                        num_workers=files.workers, pin_memory=device.type == "cuda")
    for x, positions in loader:
        yield x.to(device, non_blocking=True), positions.to(device)


def is_lazy(x: object) -> bool:
    return isinstance(x, ImageFiles)


def take(x: Tensor | ImageFiles, idx: Tensor) -> Tensor | ImageFiles:
    """Rows `idx` of a split's x: a tensor indexed, or a lazy view of files."""
    return x.subset(idx) if isinstance(x, ImageFiles) else x[idx]
