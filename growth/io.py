"""File helpers every writer shares: atomic writes, checked tensor reads, digests, names that
become paths, and outputs that may be written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from growth.errors import CheckpointError, RunDirError


def file_mode() -> int:
    """The mode a plain `open()` gives a new file under the process's umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) then rename over `path`, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the user's umask decides instead
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} is missing")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p} is corrupt or not a safetensors file ({exc})") from None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- names that become paths ------------------------------------------------------------------
def name_problem(name: object) -> str | None:
    """What keeps `name` from naming one entry of a folder (None: it is a plain name): it must
    be a non-empty string with no path separator or NUL, not `.` or `..`, with no leading `~`
    and no surrounding spaces."""
    if not isinstance(name, str) or not name.strip():
        return f"{name!r} is not a name"
    if any(c in name for c in ("/", "\\", "\0")) or name in (".", "..") \
            or name.startswith("~") or name != name.strip():
        return (f"{name!r} is not a plain name (no path separators, `..`, leading `~` or "
                "surrounding spaces): it names a folder")
    return None


def plain_name(name: object, what: str) -> str:
    """`name` if it is a plain name (see name_problem), else a RunDirError naming `what`."""
    problem = name_problem(name)
    if problem is not None:
        raise RunDirError(f"{what}: {problem}")
    return str(name)


def resolve_under(root: Path, path: Path, what: str) -> Path:
    """`path` with symlinks resolved, if it lies inside `root` (also resolved); else a
    RunDirError naming `what`: a folder the engine writes never escapes its root."""
    top, full = Path(root).resolve(), Path(path).resolve()
    if full != top and top not in full.parents:
        raise RunDirError(f"{what} {path} resolves to {full}, outside {top}; remove the link "
                          "or choose another name")
    return full


def check_output(path: Path, *markers: str, what: str = "--out") -> None:
    """An output folder may be written only if it is new, empty, or holds one of `markers`
    (files the same command writes there): outputs never overwrite what they do not own."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise RunDirError(f"{what} {path} is not a folder; choose another path")
    if any((path / m).is_file() for m in markers) or not any(path.iterdir()):
        return
    raise RunDirError(f"{what} {path} already holds files this command did not write (no "
                      f"{markers[0]}); choose a new folder")
