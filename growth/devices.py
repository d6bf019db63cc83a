"""The torch device a config names, checked against the machine."""

from __future__ import annotations

import re

import torch

from growth.errors import ConfigError

DEVICE_PATTERN = r"^(cpu|cuda|auto|cuda:\d+)$"  # what `device:` accepts


def resolve_device(name: str, source: str = "<config>") -> torch.device:
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N" (the N-th visible GPU); CUDA on a
    machine without it, or a GPU index the machine does not have, is a ConfigError naming
    `source` (the config file)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ConfigError(f"{source}: device: {name!r} is not a device; use cpu, cuda, cuda:N "
                          "(a GPU index) or auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: device: {name} was asked for but no CUDA device is "
                              "available; use device: cpu or auto")
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"{source}: device: {name}, but this machine has {count} CUDA "
                              f"device(s) (cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES "
                              "renumbers them)")
    return torch.device(name)
