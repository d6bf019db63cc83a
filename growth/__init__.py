"""growth: lifelong learning by network growth and architecture search on one graph IR."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("growth")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
