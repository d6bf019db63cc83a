"""HAT, hard attention to the task (Serra, Suris, Miron & Karatzoglou 2018).

Every unit of the trunk's linear and conv layers has, per task t, an embedding e_t; its output
(after the layer's BatchNorm and activation) is multiplied by the attention
a_t = sigmoid(s * e_t). While a task trains, s anneals over each epoch's batches from
1 / s_max to s_max (s = 1/s_max + (s_max - 1/s_max)(b - 1)/(B - 1), batch b of B), and at
test time the attention is the step it tends to (binarised: e_t > 0). After task t the
cumulative attention a_{<=t} = max(a_t, a_{<t}) marks the units the finished tasks use. A
later task's gradient of the weight from unit j to unit i is multiplied by
1 - min(a_{<t,i}, a_{<t,j}) (a bias or BatchNorm entry of unit i by 1 - a_{<t,i}), so a weight
between two used units never moves; a weight into a used unit from an unused one does, but no
earlier task reads the unused unit (its attention there is exactly 0). The embeddings' gradient
is compensated for the annealing: multiplied by s_max (cosh(s e) + 1) / (s (cosh(e) + 1)),
cosh's argument clamped at 50, and embeddings are clamped to [-6, 6] after each step. The loss
adds c * sum a_t (1 - a_{<t}) / sum (1 - a_{<t}) over every unit, a sparsity regulariser on
attention not yet used. Embeddings start N(0, 1) from the task's seed and train with plain SGD
at the loop's learning rate (the paper's optimizer; momentum would multiply the compensated
steps).

Heads are per task (task-incremental only); BatchNorm trains its statistics with task 0 only
(eval mode afterwards). Attention of each finished task is stored as bits
(state attention/<task>/<layer>, one entry per unit). The gates are forward hooks on the
layers' modules, installed only inside `training` and `evaluation`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from growth.errors import GraphError
from growth.layers import ACTIVATIONS
from growth.masks import Guard, batchnorms, decays, masked_names
from growth.metrics import Stored
from growth.regularizers import stored
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams, state_key
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.graph import NetGraph
    from growth.model import Model

ATTENTION = "attention"
COSH_CLAMP, EMBEDDING_CLAMP = 50.0, 6.0
_NORMS = frozenset({"batchnorm1d", "batchnorm2d"})
_PASS = ACTIVATIONS | {"maxpool2d", "avgpool2d", "adaptive_avgpool2d", "dropout", "identity"}


class HATParams(StrategyParams):
    """HAT settings (the paper's defaults)."""

    s_max: float = Field(400.0, gt=1, description="largest slope of the attention's sigmoid, "
                                                  "reached on each epoch's last batch")
    c: float = Field(0.75, ge=0, description="strength of the sparsity regulariser on new "
                                             "attention")


@dataclass(frozen=True)
class Gate:
    """One gated layer: its units' attention multiplies the output of `end` (the layer, or
    its BatchNorm and activation after it); `pre` is the gated layer whose units feed its
    input (None: the network's input), each unit `repeat` times (a flatten in between)."""

    node: str
    end: str
    units: int
    view: tuple[int, ...]  # the attention's shape against one sample's output
    pre: str | None
    repeat: int
    unit_tensors: tuple[str, ...]  # bias and BatchNorm affine parameters, one entry per unit


def gates(graph: NetGraph, trunk: list[str]) -> dict[str, Gate]:
    """The gated layers of a graph, given its trunk's masked weights (`node.weight`)."""
    shapes = graph.shapes()
    nodes = [n.rsplit(".", 1)[0] for n in trunk]
    ends: dict[str, str] = {}
    for node in nodes:
        end = node
        while len(graph.consumers(end)) == 1:
            nxt = graph.consumers(end)[0]
            if graph.node(nxt).kind not in _NORMS | ACTIVATIONS:
                break
            end = nxt
        ends[node] = end
    owner = {end: node for node, end in ends.items()}
    out = {}
    for node in nodes:
        end = ends[node]
        rank = len(shapes[end])
        if rank not in (1, 3):
            raise GraphError(f"HAT gates units of linear and conv layers on flat features or "
                             f"(C, H, W) maps; {end!r} outputs shape {shapes[end]}")
        units = shapes[end][0]
        pre, repeat = _feeding(graph, node, owner, shapes)
        chain = [node, *_between(graph, node, end)]
        unit_tensors = tuple(f"{n}.{k}" for n in chain for k in ("bias", "weight")
                             if k in graph.node(n).tensors and (n != node or k == "bias"))
        out[node] = Gate(node, end, units, (units,) + (1,) * (rank - 1), pre, repeat,
                         unit_tensors)
    return out


def _between(graph: NetGraph, node: str, end: str) -> list[str]:
    chain = []
    while node != end:
        node = graph.consumers(node)[0]
        chain.append(node)
    return chain


def _feeding(graph: NetGraph, node: str, owner: dict[str, str], shapes: dict[str, Any]
             ) -> tuple[str | None, int]:
    """The gated layer whose units a layer reads, through activations, pools and a flatten."""
    repeat = 1
    cur = graph.inputs(node)[0]
    while cur not in owner:
        kind = graph.node(cur).kind
        if kind == "input":
            return None, 1
        if kind == "flatten":
            repeat *= math.prod(shapes[graph.inputs(cur)[0]][1:])
        elif kind not in _PASS or len(graph.inputs(cur)) != 1:
            raise GraphError(f"HAT needs each layer to read one gated layer (or the input) "
                             f"through activations, pools, dropout or a flatten; {node!r} "
                             f"reads {cur!r} ({kind})")
        cur = graph.inputs(cur)[0]
    return owner[cur], repeat


class HAT(Strategy):
    name = "hat"
    description = "hard attention to the task: per-task unit attention (annealed sigmoid); " \
                  "used units' weights are protected, evaluated with the task's attention"
    Params = HATParams
    params: HATParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)

    def __init__(self, params: HATParams | None = None) -> None:
        super().__init__(params)
        self._emb: dict[str, Tensor] = {}  # the task in training: node -> embedding
        self._prev: dict[str, Tensor] = {}  # cumulative attention of finished tasks (0/1)
        self._trainable: dict[str, Tensor] = {}  # per protected parameter: where it may train
        self._fixed: dict[str, Tensor] | None = None  # attention the hooks apply, if fixed
        self._gates: tuple[weakref.ref[torch.nn.Module], dict[str, Gate]] | None = None
        self._hooks: list[Any] = []
        self._guard: Guard | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._s = 0.0  # the slope of the batch in training
        self._b = 0  # that batch's index in its epoch
        self._batches = 1

    def finished(self) -> list[int]:
        return list(self.extra.get("tasks", []))

    def layers(self, model: Model) -> dict[str, Gate]:
        """The gated layers of the model (cached per compiled module)."""
        if self._gates is None or self._gates[0]() is not model.module:
            self._gates = (weakref.ref(model.module), gates(model.graph, masked_names(model)))
        return self._gates[1]

    def cumulative(self, model: Model, device: torch.device) -> dict[str, Tensor]:
        """a_{<t}: 1 at the units some finished task attends to, per gated layer."""
        out = {}
        for node, g in self.layers(model).items():
            used = torch.zeros(g.units, dtype=torch.bool)
            for k in self.finished():
                used |= self.state[state_key(ATTENTION, k, node)]
            out[node] = used.to(device, torch.float32)
        return out

    def slope(self, batch: int) -> float:
        """s at batch `batch` (0-based) of an epoch of `self._batches` batches."""
        s_max = self.params.s_max
        if self._batches <= 1:
            return s_max
        return 1 / s_max + (s_max - 1 / s_max) * batch / (self._batches - 1)

    # ---- hooks -----------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        """Fresh embeddings; the finished tasks' cumulative attention and what it protects."""
        gen = torch.Generator().manual_seed(ctx.seed)
        self._emb = {node: torch.randn(g.units, generator=gen).to(ctx.device).requires_grad_()
                     for node, g in self.layers(ctx.model).items()}
        self._prev = self.cumulative(ctx.model, ctx.device)
        self._trainable = self.trainable(ctx.model) if self.finished() else {}

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        cfg = ctx.train_config
        if cfg is None:
            raise ValueError("HAT anneals its slope over an epoch's batches and needs the "
                             "task's training settings (Context.train_config, set by "
                             "learn_task)")
        self._batches = sum(math.ceil(len(t.train[1]) / cfg.batch_size)
                            for t in self.train_sets(ctx))
        self._b, self._s = 0, self.slope(0)
        self._opt = None
        with ExitStack() as stack:
            if self._trainable:
                stack.enter_context(_eval_norms(ctx.model))
                guard = self._guard = Guard(ctx.model.named_parameters(), self._trainable)
                stack.callback(guard.restore)
            else:
                self._guard = None
            stack.enter_context(self._gated(ctx))
            yield

    def trainable(self, model: Model) -> dict[str, Tensor]:
        """Per gated parameter: where a later task may train (1 - min(a_i, a_j) != 0)."""
        params = model.named_parameters()
        out = {}
        for node, g in self.layers(model).items():
            post = self._prev[node].bool()
            weight = params[f"{node}.weight"]
            pre = (torch.ones(weight.shape[1], dtype=torch.bool, device=post.device)
                   if g.pre is None else self._prev[g.pre].bool().repeat_interleave(g.repeat))
            used = post.view(-1, 1) & pre.view(1, -1)
            out[f"{node}.weight"] = ~used.view(*used.shape, *(1,) * (weight.dim() - 2)) \
                .expand(weight.shape).contiguous()
            for name in g.unit_tensors:
                out[name] = ~post
        return out

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        """c * sum a_t (1 - a_{<t}) / sum (1 - a_{<t}) over every gated unit."""
        if not self.params.c:
            return None
        num = den = torch.zeros((), device=ctx.device)
        for node, e in self._emb.items():
            free = 1 - self._prev[node]
            num = num + (torch.sigmoid(self._s * e) * free).sum()
            den = den + free.sum()
        return self.params.c * num / den if float(den) > 0 else None

    def after_backward(self, ctx: Context) -> None:
        """Compensate the embeddings' gradient for the annealing; protect used units."""
        s, s_max = self._s, self.params.s_max
        with torch.no_grad():
            for e in self._emb.values():
                if e.grad is not None:
                    num = torch.cosh(torch.clamp(s * e, -COSH_CLAMP, COSH_CLAMP)) + 1
                    e.grad.mul_(s_max / s * num / (torch.cosh(e) + 1))
        if self._guard is not None:
            self._guard.mask_grads()

    def after_step(self, ctx: Context) -> None:
        if self._opt is None:  # plain SGD at the loop's learning rate, as the paper
            opt = ctx.optimizer
            assert opt is not None
            self._opt = torch.optim.SGD(list(self._emb.values()), lr=opt.defaults["lr"])
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e in self._emb.values():
                e.clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)
        self._b = (self._b + 1) % self._batches
        self._s = self.slope(self._b)
        if self._guard is not None and decays(ctx.optimizer):
            self._guard.restore()

    def after_task(self, ctx: Context) -> None:
        k = ctx.task.index
        for node, e in self._emb.items():
            self.state[state_key(ATTENTION, k, node)] = (e.detach() > 0).cpu()
        self.extra["tasks"] = [*self.finished(), k]
        used = self.cumulative(ctx.model, torch.device("cpu"))
        self.extra.setdefault("used", {})[str(k)] = round(
            float(sum(u.sum() for u in used.values()) / sum(u.numel() for u in used.values())),
            6)
        self._emb, self._trainable = {}, {}

    # ---- gates -----------------------------------------------------------------------------
    def attention(self, node: str, training: bool) -> Tensor:
        """What unit `node`'s outputs are multiplied by now."""
        if self._fixed is not None:
            return self._fixed[node]
        e = self._emb[node]
        if training:
            return torch.sigmoid(self._s * e)
        return (e.detach() > 0).to(e.dtype)

    @contextmanager
    def _gated(self, ctx: Context) -> Iterator[None]:
        """Forward hooks multiplying each gated layer's output by its attention (installed
        once; a nested evaluation only changes the attention they apply)."""
        if self._hooks:
            yield
            return
        for node, g in self.layers(ctx.model).items():
            module = ctx.model.module.get_submodule(g.end)

            def hook(module: torch.nn.Module, inputs: Any, out: Tensor, node: str = node,
                     view: tuple[int, ...] = g.view) -> Tensor:
                return out * self.attention(node, module.training).view(view)

            self._hooks.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        """Task k's attention (all units open for a task not learned yet)."""
        layers = self.layers(ctx.model)
        if task.index in self.finished():
            att = stored(self.state, ATTENTION, task.index)
            fixed = {n: att[n].to(ctx.device, torch.float32) for n in layers}
        elif self._emb:  # the task in training
            fixed = {n: (e.detach() > 0).float() for n, e in self._emb.items()}
        else:
            fixed = {n: torch.ones(g.units, device=ctx.device) for n, g in layers.items()}
        saved, self._fixed = self._fixed, fixed
        try:
            with self._gated(ctx):
                yield ctx.model.head(ctx.head_of(task))
        finally:
            self._fixed = saved

    # ---- state and size --------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        return {ATTENTION: TensorSpec("tasks", "any", "bool", parameter=False)}

    def check_state(self, tensors: Any, extra: Any, graph_tensors: Any, finished: int
                    ) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        for key, t in tensors.items():
            node = key.split("/", 2)[-1]
            weight = graph_tensors.get(f"{node}.weight")
            if weight is None or weight.dim() < 2:
                problems.append(f"tensor {key!r} names {node!r}, which is not a linear or conv "
                                "layer of the graph")
            elif tuple(t.shape) != (weight.shape[0],):
                problems.append(f"tensor {key!r} has shape {tuple(t.shape)}, but {node} has "
                                f"{weight.shape[0]} units")
        if extra.get("tasks", []) != list(range(finished)):
            problems.append(f"extra 'tasks' is {extra.get('tasks')!r}, expected the "
                            f"{finished} finished tasks {list(range(finished))}")
        return problems

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """Trunk and heads, plus one attention bit per unit and task."""
        parts = super().size_parts(model)
        parts["masks"] = [Stored(t.numel(), 1, parameters=False)
                          for k, t in self.state.items() if k.startswith(f"{ATTENTION}/")]
        return parts

    def run_report(self) -> dict[str, Any]:
        """The fraction of gated units some finished task uses, after each task."""
        return {"details": {"hat": {"units_used": self.extra["used"]}}} \
            if self.extra.get("used") else {}


@contextmanager
def _eval_norms(model: Model) -> Iterator[None]:
    """BatchNorm on its running statistics (those of task 0) for the block."""
    norms = [(m, m.training) for m in batchnorms(model)]
    for m, _ in norms:
        m.eval()
    try:
        yield
    finally:
        for m, mode in norms:
            m.train(mode)
