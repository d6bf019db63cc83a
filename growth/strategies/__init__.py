"""Continual-learning strategies, one file each, behind a name registry.

Built-ins register here; plug-ins come from the "growth.strategies" entry-point group (a
Strategy subclass per entry, see docs/plugins.md).
"""

from __future__ import annotations

from typing import Any

from growth.errors import ConfigError
from growth.plugins import load_plugins
from growth.strategies.agem import AGEM
from growth.strategies.base import Context, Strategy, StrategyParams, state_key
from growth.strategies.cpg import CPG
from growth.strategies.cwr import AR1, CWRStar
from growth.strategies.den import DEN
from growth.strategies.dgr import DGR, DGRNegative
from growth.strategies.er import ER
from growth.strategies.ewc import EWC
from growth.strategies.expert_gate import ExpertGate
from growth.strategies.gdumb import GDumb
from growth.strategies.gem import GEM
from growth.strategies.hat import HAT
from growth.strategies.hypernet import Hypernetwork
from growth.strategies.icarl import ICaRL
from growth.strategies.joint import Joint
from growth.strategies.l2 import L2
from growth.strategies.latent_replay import LatentReplay
from growth.strategies.learn_to_grow import LearnToGrow
from growth.strategies.lwf import LwF
from growth.strategies.mas import MAS
from growth.strategies.mir import MIR
from growth.strategies.mwc import MWC
from growth.strategies.packnet import PackNet
from growth.strategies.piggyback import Piggyback
from growth.strategies.pnn import ProgressiveNets
from growth.strategies.progress_compress import ProgressCompress
from growth.strategies.rcl import RCL
from growth.strategies.rec import REC
from growth.strategies.rwalk import RWalk
from growth.strategies.scp import SCP
from growth.strategies.si import SI
from growth.strategies.supsup import SupSup

ENTRY_POINT_GROUP = "growth.strategies"
STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class under its `name` (usable as a decorator)."""
    STRATEGIES[cls.name] = cls
    return cls


def _as_strategy(obj: Any, entry: str) -> type[Strategy]:
    if isinstance(obj, type) and issubclass(obj, Strategy) and obj is not Strategy:
        if not isinstance(obj.__dict__.get("name"), str):
            raise TypeError(f"{entry}: the class must set its own `name`")
        return obj
    raise TypeError(f"{entry} is not a subclass of growth.strategies.Strategy")


def available_strategies() -> dict[str, type[Strategy]]:
    """Every strategy by name: the built-ins, then installed plug-ins."""
    return {**STRATEGIES, **load_plugins(ENTRY_POINT_GROUP, _as_strategy, STRATEGIES)}


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class called `name`, or a ConfigError listing the available ones."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    found = available_strategies()
    if name not in found:
        raise ConfigError(f"unknown strategy {name!r}; available: {sorted(found)}")
    return found[name]


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Build a strategy from its name and raw settings (validated by its Params model)."""
    cls = get_strategy(name)
    return cls(cls.Params.model_validate(params or {}))


for _cls in (Strategy, Joint, EWC, SI, MAS, L2, LwF, MWC, ER, GEM, AGEM, MIR, PackNet, CPG,
             ProgressiveNets, ICaRL, GDumb, LatentReplay, DGR, DGRNegative, REC, LearnToGrow,
             DEN, ProgressCompress, ExpertGate, RCL):
    register(_cls)
# regularisers and output-layer methods of the wider field (docs/methods.md)
for _cls in (RWalk, SCP, CWRStar, AR1, Hypernetwork):
    register(_cls)
for _cls in (HAT, Piggyback, SupSup):  # mask-based methods
    register(_cls)

__all__ = ["Context", "STRATEGIES", "Strategy", "StrategyParams", "available_strategies",
           "get_strategy", "make_strategy", "register", "state_key"]
