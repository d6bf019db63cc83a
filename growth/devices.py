"""The torch device a config names, checked against the machine."""

from __future__ import annotations

import torch

from growth.errors import ConfigError


def resolve_device(name: str, source: str = "<config>") -> torch.device:
    """"auto" (CUDA when present), "cpu" or "cuda"; CUDA on a machine without it is a
    ConfigError naming `source` (the config file)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: device: cuda was asked for but no CUDA device is "
                          "available; use device: cpu or auto")
    return torch.device(name)
