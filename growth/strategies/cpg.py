"""CPG, compacting, picking and growing (Hung et al. 2019), on PackNet's owner indices.

Task t trains, through its effective weights W_t = W * own + W_old * binarise(pick):
- own: the free weights (owner 0), trained by the task's optimizer;
- pick: a real-valued mask over the weights earlier tasks own, initialised 0.01, binarised at
  5e-3 with a straight-through gradient, trained with its own Adam (`pick_lr`); the old
  weights themselves never move.
After training, the task's accuracy goal is checked on its validation split (the training
split when it has none): goal = the accuracy of a fresh copy of the network trained on the
task alone (same training settings) minus `margin`. While the goal is missed and the network
is below `budget` x the base network's parameters, every resizable trunk layer grows by
`grow` x its base width with the project's net2wider: the new units' incoming rows copy old
units' (with `noise` to break symmetry), their outgoing columns start at zero and every old
weight keeps its exact value, so no task's function changes; the new weights are free for the
task, which then trains again. Then the task's own weights are pruned gradually by magnitude,
stage by stage through `ratios`, each stage over `prune_epochs` epochs of the cubic schedule
s = s_f + (s_i - s_f)(1 - p)^3 with retraining; after each stage the goal is checked and the
largest ratio that meets it is kept (a stage that misses it is undone). The task then owns
what is left; its binarised picks are stored (pick/<t>/<param>). Evaluating task k uses the
weights task k owns plus those it picked from tasks before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor

from growth.compile import compile_graph
from growth.errors import DivergedError
from growth.masks import Guard, decays, smallest, swapped
from growth.metrics import Stored
from growth.ops import net2wider, prune_units, resizable, units
from growth.regularizers import stored
from growth.remap import MASK, remap
from growth.strategies.base import Context, Scorer, state_key
from growth.strategies.packnet import OWNER, SHARED, PackNet, PackNetParams
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.graph import NetGraph
    from growth.model import Model
    from growth.ops.registry import ChangeRecord

PICK = "pick"
PICK_INIT, PICK_THRESHOLD = 0.01, 5e-3


class CPGParams(PackNetParams):
    """CPG settings (`prune` and `retrain_epochs` of PackNet are not used: pruning is gradual).

    ratios: the pruning stages (fractions of the task's own weights, increasing); the largest
    one whose accuracy meets the goal is kept. budget: parameters of the whole network (trunk
    and heads) relative to the base network's. grow: units added per growth step, relative
    to each layer's base width.
    """

    ratios: list[float] = Field([0.5, 0.75, 0.9], description="gradual pruning stages")
    prune_epochs: int = Field(2, ge=1, description="epochs of gradual pruning per stage")
    pick_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the picks")
    margin: float = Field(0.01, ge=0, le=1, description="goal = individual accuracy - margin")
    budget: float = Field(1.5, ge=1, description="largest network relative to the base's size")
    grow: float = Field(0.25, gt=0, description="units added per growth, x base width")
    noise: float = Field(0.01, ge=0, description="net2wider noise on the new units' rows")
    max_grow: int = Field(4, ge=0, description="growth steps at most per task")

    @field_validator("ratios")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r < 1 for r in v) or v != sorted(set(v)):
            raise ValueError(f"ratios must be increasing fractions in (0, 1), got {v}")
        return v


class CPG(PackNet):
    name = "cpg"
    description = "compacting, picking, growing: PackNet plus learned picks of old weights " \
                  "and net2wider growth up to a budget"
    Params = CPGParams
    params: CPGParams
    state_roles: ClassVar[dict[str, str]] = {OWNER: MASK, SHARED: "weight", PICK: MASK}

    def __init__(self, params: CPGParams | None = None) -> None:
        super().__init__(params)
        self._picks: dict[str, Tensor] = {}
        self._pick_opt: torch.optim.Optimizer | None = None
        self._active: int | None = None
        self._old: dict[str, Tensor] = {}
        self._buffer: dict[str, Tensor] = {}

    # ---- task set-up -----------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self._active = ctx.task.index
        self.extra.setdefault("base_params", ctx.model.graph.param_count())
        self.extra.setdefault("base_widths", _widths(ctx.model.graph))
        self._new_picks(ctx)
        goals = self.extra.setdefault("goals", {})
        if str(ctx.task.index) not in goals:
            goals[str(ctx.task.index)] = self._goal(ctx)

    def _new_picks(self, ctx: Context) -> None:
        owners = self.owners(ctx.model)
        params = ctx.model.named_parameters()
        self._picks = {n: torch.full(params[n].shape, PICK_INIT, device=ctx.device,
                                     requires_grad=True)
                       for n, o in owners.items() if bool((o > 0).any())}
        self._pick_opt = _adam(list(self._picks.values()), self.params.pick_lr)

    def _goal(self, ctx: Context) -> float:
        """Accuracy of a fresh copy of the network trained on the task alone, minus margin."""
        from growth.model import Model
        from growth.strategies.base import Strategy
        from growth.train import evaluate, fit

        alone = Model(ctx.model.graph, ctx.device)
        with torch.random.fork_rng(devices=[]):  # the campaign's random stream is untouched
            torch.manual_seed(ctx.seed)
            for m in alone.module.modules():
                if m is not alone.module and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            solo = Context(alone, ctx.task, [], ctx.head_of, ctx.label_of, ctx.device,
                           seed=ctx.seed)
            fit(solo, Strategy(), ctx.train_config, seed=ctx.seed)
            accuracy = evaluate(solo, ctx.task, _split(ctx.task))
        return accuracy - self.params.margin

    def goal(self, task: int) -> float:
        return float(self.extra["goals"][str(task)])

    # ---- training --------------------------------------------------------------------------
    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        """During a fit the masked parameters hold task t's effective weights: their own
        entries train as usual, the others hold W_old * binarise(pick) (rewritten after every
        step), so the loop runs the plain network; the true values come back at the end."""
        with ExitStack() as stack:
            stack.enter_context(self._shared_frozen(ctx))
            guard = self._guard = Guard(ctx.model.named_parameters(), self._trainable)
            stack.callback(guard.restore)
            owners = self.owners(ctx.model)
            self._old = {n: guard.values[n] * (owners[n] > 0).to(guard.values[n])
                         for n in self._picks}
            self._buffer = {n: torch.empty_like(v) for n, v in self._old.items()}
            self._write_picked()
            yield
            self._check_picks(ctx)

    def _check_picks(self, ctx: Context) -> None:
        """Picks train by their own optimiser, outside the loop's loss: non-finite picks are a
        divergence the loss cannot show (a NaN pick reads as "not picked")."""
        bad = [n for n, pick in self._picks.items() if not bool(torch.isfinite(pick).all())]
        if bad:
            raise DivergedError(f"CPG's picks diverged on task {ctx.task.name!r}: {bad[0]} "
                                "holds NaN or infinite values; lower strategy.pick_lr")

    @torch.no_grad()
    def _write_picked(self) -> None:
        """Entries the task does not own <- old weight * [pick > 5e-3] (own entries kept)."""
        guard = self._guard
        for n, pick in self._picks.items():
            picked = torch.mul(self._old[n], pick > PICK_THRESHOLD, out=self._buffer[n])
            guard.params[n].mul_(guard.scale[n]).add_(picked)

    def after_backward(self, ctx: Context) -> None:
        """The gradient at a picked entry is the gradient of its effective weight times the old
        weight (straight-through: d binarise(pick) / d pick = 1); only own entries train."""
        guard = self._guard
        for n, pick in self._picks.items():
            g = guard.params[n].grad
            pick.grad = None if g is None else g * self._old[n]
        guard.mask_grads()

    def after_step(self, ctx: Context) -> None:
        if self._pick_opt is not None:
            self._pick_opt.step()
        self._write_picked()
        if decays(ctx.optimizer):  # entries without picks: released (zero) weights
            self._guard.restore(skip=set(self._picks))

    # ---- after training: grow, then compact ------------------------------------------------
    def after_task(self, ctx: Context) -> None:
        k = ctx.task.index
        grown = 0
        while self._accuracy(ctx) < self.goal(k) and grown < self.params.max_grow:
            if not self._grow(ctx, grown):
                break
            grown += 1
            ctx.train_fit()
        self.extra.setdefault("grown", {})[str(k)] = grown
        self.extra.setdefault("size", {})[str(k)] = ctx.model.graph.param_count()
        kept = self._compact(ctx)
        self.extra.setdefault("pruned", {})[str(k)] = kept
        owners = self.owners(ctx.model)
        for n, own in self._trainable.items():
            owners[n][own.cpu()] = k + 1
        for n, o in owners.items():  # every task stores its picks (none for the first)
            earlier = (o > 0) & (o <= k)
            pick = self._picks.get(n)
            chosen = (torch.zeros_like(earlier) if pick is None
                      else pick.detach().cpu() > PICK_THRESHOLD)
            self.state[state_key(PICK, k, n)] = chosen & earlier
        self.store_shared(ctx, k)
        self.extra.setdefault("widths", {})[str(k)] = {
            n: w for n, w in _widths(ctx.model.graph).items() if f"{n}.weight" in owners}
        self.extra["tasks"] = [*self.finished(), k]
        self._active = None
        self._picks, self._pick_opt = {}, None

    def _accuracy(self, ctx: Context) -> float:
        from growth.train import evaluate

        return evaluate(ctx, ctx.task, _split(ctx.task), strategy=self)

    def _compact(self, ctx: Context) -> float:
        """Gradual magnitude pruning of the task's own weights, stage by stage; returns the
        largest ratio kept (0 if even the first stage misses the goal)."""
        k = ctx.task.index
        params = ctx.model.named_parameters()
        start = {n: int(t.sum()) for n, t in self._trainable.items()}
        done = 0.0
        for ratio in self.params.ratios:
            saved = ({n: t.clone() for n, t in self._trainable.items()},
                     {n: params[n].detach().clone() for n in self._trainable},
                     {n: p.detach().clone() for n, p in self._picks.items()})
            epochs = self.params.prune_epochs
            for e in range(1, epochs + 1):
                target = ratio + (done - ratio) * (1 - e / epochs) ** 3
                self._prune_to(params, start, target)
                ctx.train_fit(epochs=1)
            if self._accuracy(ctx) >= self.goal(k):
                done = ratio
                continue
            self._trainable = saved[0]
            with torch.no_grad():
                for n, v in saved[1].items():
                    params[n].copy_(v)
                for n, v in saved[2].items():
                    self._picks[n].copy_(v)
            break
        return done

    @torch.no_grad()
    def _prune_to(self, params: dict[str, Tensor], start: dict[str, int], ratio: float) -> None:
        """Release own weights (smallest first) until `ratio` of each layer's own are gone."""
        for n, own in self._trainable.items():
            gone = start[n] - int(own.sum())
            want = int(round(ratio * start[n])) - gone
            if want <= 0:
                continue
            cut = smallest(params[n], own.to(params[n].device), want)
            params[n][cut] = 0
            own[cut.to(own.device)] = False

    def _grow(self, ctx: Context, step: int) -> bool:
        """Widen every resizable trunk layer by `grow` x its base width, if the result stays
        within the budget; old weights keep their values, new units' outputs start at zero."""
        graph = ctx.model.graph
        trunk = set(ctx.model.trunk_parameter_names())
        base = self.extra["base_widths"]
        records: list[ChangeRecord] = []
        for i, layer in enumerate(n for n in resizable(graph) if f"{n}.weight" in trunk):
            if any(f"{layer}.weight" in r.index_maps and 0 in r.index_maps[f"{layer}.weight"]
                   for r in records):
                continue  # widened with an earlier layer's channel group (a residual add)
            width = units(graph, layer) + max(1, math.ceil(self.params.grow
                                                            * base.get(layer, 1)))
            result = net2wider(graph, layer, width, noise=self.params.noise,
                               seed=ctx.seed + 1000 * step + i)
            graph = _keep_old_values(graph, result.graph, result.record)
            records.append(result.record)
        if not records or graph.param_count() > self.params.budget * self.extra["base_params"]:
            return False
        ctx.strategy = self
        ctx.replace_graph(graph, records)
        self._trainable = {n: o == 0 for n, o in self.owners(ctx.model).items()}
        return True

    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        """State by role; the live picks as masks (new positions are the task's own)."""
        super().follow(ctx, records)
        if self._picks:
            self._picks = {n: remap(p.detach(), n, records, MASK).requires_grad_(True)
                           for n, p in self._picks.items()}
            self._pick_opt = _adam(list(self._picks.values()), self.params.pick_lr)

    # ---- evaluation ------------------------------------------------------------------------
    def task_weights(self, ctx: Context, task: Task) -> dict[str, Tensor]:
        """Task k's effective weights: its own plus the earlier ones it picked."""
        params = ctx.model.named_parameters()
        owners = self.owners(ctx.model)
        out = {}
        for n, o in owners.items():
            w = params[n].detach()
            if task.index == self._active:  # the task in training
                own = self._trainable[n].to(w.device)
                pick = self._picks.get(n)
                picked = (torch.zeros_like(own) if pick is None
                          else (pick.detach() > PICK_THRESHOLD) & (o > 0).to(w.device))
            elif task.index in self.finished():
                own = (o == task.index + 1).to(w.device)
                picked = self.state.get(state_key(PICK, task.index, n))
                picked = torch.zeros_like(own) if picked is None else picked.to(w.device)
            else:  # not learned yet: every weight owned so far
                own, picked = (o > 0).to(w.device), torch.zeros_like(o, dtype=torch.bool)
            out[n] = w * (own | picked.to(w.device)).to(w.dtype)
        return out

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        """Task k's weights swapped in; if the network grew since task k, its scores come
        from the network cut back to the widths task k had (its own weights, exactly as they
        were), compiled for the split: zero-weight units would change floating-point sums."""
        values = {**self.task_weights(ctx, task), **self.task_shared(ctx, task)}
        widths = self.extra.get("widths", {}).get(str(task.index))
        params = ctx.model.named_parameters()
        if widths and any(params[f"{n}.weight"].shape[0] != w for n, w in widths.items()):
            yield self._narrowed(ctx, task, values, widths)
            return
        tensors = dict(ctx.model.module.state_dict(keep_vars=True))
        with swapped(tensors, values):
            yield ctx.model.head(ctx.head_of(task))

    def _narrowed(self, ctx: Context, task: Task, values: dict[str, Tensor],
                  widths: dict[str, int]) -> torch.nn.Module:
        graph = ctx.model.graph
        for name, v in values.items():
            node, key = name.split(".", 1)
            graph.node(node).tensors[key] = v.detach().cpu().to(graph.node(node).tensors[key])
        for layer, width in widths.items():
            now = units(graph, layer)
            if now > width:  # net2wider appends units: keep the first `width`
                graph = prune_units(graph, layer, width, scores=-torch.arange(now)).graph
        return compile_graph(graph, head=ctx.head_of(task)).to(ctx.device).eval()

    # ---- state and size --------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        spec = super().state_spec()
        spec[PICK] = TensorSpec("tasks", "same", "bool")
        return spec

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """PackNet's parts plus each task's picks, one bit per weight it could pick."""
        parts = super().size_parts(model)
        owners = self.owners(model)
        for k in self.finished():
            for n in stored(self.state, PICK, k):
                earlier = int(((owners[n] > 0) & (owners[n] <= k)).sum())
                parts["masks"].append(Stored(earlier, 1, parameters=False))
        return parts


def _adam(picks: list[Tensor], lr: float) -> torch.optim.Optimizer | None:
    """Adam over the picks: the fused kernel (one pass over each tensor) where torch has it."""
    if not picks:
        return None
    try:
        return torch.optim.Adam(picks, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(picks, lr=lr)


def _split(task: Task) -> str:
    return "val" if len(task.val[1]) else "train"


def _widths(graph: NetGraph) -> dict[str, int]:
    return {n: units(graph, n) for n in resizable(graph)}


def _keep_old_values(old: NetGraph, new: NetGraph, record: ChangeRecord) -> NetGraph:
    """After net2wider: divided consumer columns get their old values back at the old units
    and zero at the copies (so no function changes: old tasks never see the new units, the
    current task sees them at zero output until it trains them)."""
    before = old.named_tensors()
    for name, divisors in record.divisors.items():
        node, key = name.split(".", 1)
        kept = remap(before[name], name, record, MASK)
        assert kept is not None and divisors
        new.node(node).tensors[key] = kept
    return new
