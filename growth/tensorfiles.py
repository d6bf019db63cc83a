"""Strategy tensors that live in files: each written once, read when it is needed.

A run's checkpoints share one folder of tensor files (`TensorStore`, RUNDIR/tensors/): a file
holds the tensors of one kind and slot that a checkpoint wrote (e.g. the Fisher of task 3, the
keys `fisher/3/*`) and is named by the SHA-256 of its bytes. A file is never rewritten, and a
later checkpoint that holds the same tensors names the file instead of writing them again, so
a run's disk grows with its work (tasks x parameters), not with the square of its task count.

`StateDict` is a strategy's state whose entries may be `TensorRef`s to such files. Such an
entry is read from its file each time it is accessed and is not kept, so per-task state that
only a penalty build reads (once per task) stays out of memory between builds; assigning an
entry replaces the reference. An entry read this way is a fresh tensor: changing it in place
changes nothing stored (`Strategy.offload` says which entries become references).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from growth.errors import CheckpointError
from growth.io import atomic_write, sha256

SUFFIX = ".safetensors"
_DIGEST = re.compile(r"[0-9a-f]{64}$")


@dataclass(frozen=True)
class TensorRef:
    """The tensor `key` of the safetensors file `path`."""

    path: Path
    key: str

    @property
    def digest(self) -> str:
        """The SHA-256 its file is named by."""
        return self.path.name[: -len(SUFFIX)]

    def load(self) -> Tensor:
        """Read the tensor (memory-mapped by safetensors: pages are read as they are used)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(self.key)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is missing; it holds the strategy tensor "
                                  f"{self.key!r}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: cannot read the strategy tensor "
                                  f"{self.key!r} ({exc})") from None


class StateDict(MutableMapping[str, Tensor]):
    """A strategy's state: tensors held in memory, or references read on each access."""

    def __init__(self, entries: Mapping[str, Tensor] | None = None) -> None:
        self._data: dict[str, Tensor | TensorRef] = {}
        if isinstance(entries, StateDict):
            self._data.update(entries._data)
        elif entries is not None:
            self._data.update(entries)

    def __getitem__(self, key: str) -> Tensor:
        value = self._data[key]
        return value.load() if isinstance(value, TensorRef) else value

    def __setitem__(self, key: str, value: Tensor) -> None:
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        held = sum(1 for v in self._data.values() if not isinstance(v, TensorRef))
        return f"StateDict({len(self._data)} entries, {held} in memory)"

    def ref(self, key: str) -> TensorRef | None:
        """The file an entry is read from, or None for an entry held in memory."""
        value = self._data[key]
        return value if isinstance(value, TensorRef) else None

    def refer(self, key: str, ref: TensorRef) -> None:
        """Read the entry from `ref` from now on (its tensor in memory is dropped)."""
        self._data[key] = ref

    def refs(self) -> dict[str, TensorRef]:
        """Every entry read from a file, with its file."""
        return {k: v for k, v in self._data.items() if isinstance(v, TensorRef)}

    def copy(self) -> StateDict:
        """A new mapping with the same entries (references stay references)."""
        return StateDict(self)


def copy_state(state: Mapping[str, Tensor]) -> MutableMapping[str, Tensor]:
    """A shallow copy that keeps a StateDict's references (a plain dict copy would read
    every one of them into memory)."""
    return state.copy() if isinstance(state, StateDict) else dict(state)


def group_of(key: str) -> str:
    """The file a new tensor goes to within one checkpoint: "<what>/<slot>"."""
    return "/".join(key.split("/", 2)[:2])


class TensorStore:
    """A folder of safetensors files named by their SHA-256 (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._where = str(self.folder)

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}{SUFFIX}"

    def digest_of(self, path: Path) -> str | None:
        """The digest a file of this store is named by, or None for a file elsewhere (a
        folder spelt another way counts as elsewhere: its tensors are then stored again,
        under the same content-addressed names). String work only: a checkpoint asks this
        of every tensor it names."""
        folder, name = os.path.split(str(path))
        stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
        return stem if folder == self._where and _DIGEST.match(stem) else None

    def save(self, tensors: Mapping[str, Tensor]) -> dict[str, TensorRef]:
        """Store every entry; return where each lies.

        An entry of a StateDict read from a file of this store keeps its file (and its
        reference). The others are grouped by "<what>/<slot>" (one file per group), and a
        group whose file exists with the same bytes is not written again.
        """
        from safetensors.torch import save

        out: dict[str, TensorRef] = {}
        groups: dict[str, dict[str, Tensor]] = {}
        for key in tensors:
            ref = tensors.ref(key) if isinstance(tensors, StateDict) else None
            if ref is not None and self.digest_of(ref.path) is not None:
                out[key] = ref
            else:
                t = tensors[key]
                groups.setdefault(group_of(key), {})[key] = t.detach().cpu().contiguous()
        for group in groups.values():
            data = save(group)
            digest = hashlib.sha256(data).hexdigest()
            path = self.path(digest)
            if not (path.is_file() and sha256(path) == digest):
                atomic_write(path, lambda p, data=data: p.write_bytes(data))
            out.update({key: TensorRef(path, key) for key in group})
        return out

    def files(self) -> list[Path]:
        """The store's tensor files (temp files of interrupted writes are not among them)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))
