"""growth: lifelong learning by network growth and architecture search on one graph IR.

The Python API (imported on first use, so `import growth` stays light):
  run_config(config, out, overrides)   run a YAML config into a run directory -> metrics
  resume_run(run_dir)                  continue a run from its newest checkpoint -> metrics
  Campaign(cfg, run_dir, progress)     the same from a Config (start() / resume())
  load_config(path, overrides), validate_config(dict) -> Config
  read_metrics(run_dir), write_report(run_dirs, out)
  make_strategy(name, settings), available_strategies(), Strategy, StrategyParams
"""

from importlib import import_module
from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("growth")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_API = {
    "run_config": "growth.campaign", "resume_run": "growth.campaign",
    "Campaign": "growth.campaign", "Progress": "growth.campaign",
    "load_config": "growth.config", "validate_config": "growth.config",
    "read_metrics": "growth.metrics", "write_report": "growth.report",
    "make_strategy": "growth.strategies", "available_strategies": "growth.strategies",
    "Strategy": "growth.strategies", "StrategyParams": "growth.strategies",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'growth' has no attribute {name!r}")
