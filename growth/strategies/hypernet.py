"""Task-conditioned hypernetworks (von Oswald, Henning, Grewe, Sacramento 2020).

A hypernetwork h(e_t; phi) maps a learned task embedding e_t to the weights of the target
network for task t: every trunk parameter of the engine's own compiled graph (each task keeps
its own head, an ordinary parameter that no later task trains).
Chunked: h reads [e_t, c_i] for learned chunk embeddings c_1..c_K and writes the i-th chunk of
`chunk` weights; the flat output, cut to the target's size and scaled per tensor by the
standard deviation torch's default init gives that layer (1 / sqrt(3 fan_in)), is the target's
weights. Training task T learns phi and e_T (old embeddings stay fixed; the strategy's own
Adam, `lr`) with the task's loss plus the output regulariser
    (beta / (T - 1)) sum_{t < T} || h(e_t; phi) - h(e_t; phi*) ||^2,
phi* the hypernetwork as task T began (its outputs for the old embeddings are computed then).

How the weights reach the compiled model, in the one loop: the `training` seam takes each
target parameter out of its layer and puts a tensor computed by the hypernetwork in its place,
so the loop's optimiser sees only the head. Each backward reaches phi and e_T through those
tensors; `after_step` steps the hypernetwork's Adam and runs h again (one batched pass over
e_T and the old embeddings; the old outputs are what the next `penalty` compares), so every
forward uses the weights of the current phi. When the fit ends the parameters come back,
holding h(e_T). Evaluating task k swaps h(e_k) in for the split.
State: hnet/all/<name> (the hypernetwork) and embedding/<k>/vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from growth.data.sampling import generator
from growth.errors import GraphError
from growth.masks import swapped
from growth.regularizers import stored
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams, state_key
from growth.strategies.cwr import check_tasks
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.model import Model
    from growth.ops.registry import ChangeRecord

GENERATED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose tensors h writes


class HypernetParams(StrategyParams):
    """Hypernetwork settings.

    beta: 0.01 and Adam at lr 0.001 (the paper's). embedding 32, chunk embedding 32, chunks
    of 1000 weights, hidden widths [50, 50] (57k parameters for the MLP 64-100-100's trunk).
    Split digits, task-incremental (experiments/split_digits_task.yaml; seeds 0-4): ACC 0.993 ±
    0.002 at 3.3x the base network's parameters; permuted digits (the quickstart): 0.935 ±
    0.007 at 2.9x (README).
    """

    beta: float = Field(0.01, ge=0, description="strength of the output regulariser")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the hypernetwork and e_t")
    embedding: int = Field(32, ge=1, description="size of a task embedding")
    chunk_embedding: int = Field(32, ge=1, description="size of a chunk embedding")
    chunk: int = Field(1000, ge=1, description="weights the hypernetwork writes per chunk")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [50, 50], description="hidden widths of the hypernetwork")


class HyperNet(nn.Module):
    """h: task embeddings [B, E] -> flat weights [B, size], one chunk per chunk embedding."""

    def __init__(self, params: HypernetParams, size: int) -> None:
        super().__init__()
        self.size = size
        self.chunks = nn.Parameter(torch.zeros(math.ceil(size / params.chunk),
                                               params.chunk_embedding))
        widths = [params.embedding + params.chunk_embedding, *params.hidden, params.chunk]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, e: Tensor) -> Tensor:
        b, k = len(e), len(self.chunks)
        h = torch.cat([e[:, None, :].expand(b, k, -1), self.chunks[None].expand(b, -1, -1)], 2)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i + 1 < len(self.layers):
                h = torch.relu(h)
        return h.reshape(b, -1)[:, :self.size]

    @torch.no_grad()
    def initialise(self, gen: torch.Generator, probe: Tensor) -> None:
        """Seeded init: chunk embeddings N(0, 1), layers U(-1/sqrt(fan_in), 1/sqrt(fan_in));
        then the last layer is divided by the spread of the outputs for `probe`, so a first
        embedding yields outputs of unit variance (times each tensor's scale: its default
        init's spread)."""
        self.chunks.copy_(torch.randn(self.chunks.shape, generator=gen))
        for layer in self.layers:
            bound = 1 / math.sqrt(layer.in_features)
            for t in (layer.weight, layer.bias):
                t.copy_(torch.rand(t.shape, generator=gen) * 2 * bound - bound)
        spread = float(self(probe[None].to(self.chunks)).std())
        self.layers[-1].weight.div_(spread)
        self.layers[-1].bias.div_(spread)


@dataclass
class Target:
    """The parameters h writes (the trunk's), their shapes and each entry's scale."""

    names: list[str]
    shapes: list[torch.Size]
    scale: Tensor  # [size]

    @property
    def size(self) -> int:
        return len(self.scale)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, at = {}, 0
        for n, shape in zip(self.names, self.shapes):
            k = math.prod(shape)
            out[n] = flat[at:at + k].view(shape)
            at += k
        return out


def target_of(model: Model, names: list[str]) -> Target:
    """The layout of `names` and the scale of each entry: 1 / sqrt(3 fan_in) of its layer (the
    spread of torch's default init of linear and convolution layers)."""
    layers = dict(model.module.named_modules())
    params = model.named_parameters()
    scales, shapes = [], []
    for n in names:
        layer_name, attr = n.rsplit(".", 1)
        layer = layers[layer_name]
        if not isinstance(layer, GENERATED):
            raise GraphError(f"the hypernetwork writes linear and convolution layers only; "
                             f"{n!r} belongs to a {type(layer).__name__} (build the network "
                             "without BatchNorm, e.g. model.batchnorm: false)")
        w = layer.weight
        fan_in = math.prod(w.shape[1:])
        shapes.append(params[n].shape)
        scales.append(torch.full((params[n].numel(),), 1 / math.sqrt(3 * fan_in)))
    return Target(names, shapes, torch.cat(scales))


class Hypernetwork(Strategy):
    name = "hnet"
    description = ("task-conditioned hypernetwork: a network writes the trunk's weights from "
                   "each task's embedding; old embeddings' outputs held in place (task scenario)")
    Params = HypernetParams
    params: HypernetParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)

    def __init__(self, params: HypernetParams | None = None) -> None:
        super().__init__(params)
        self._net: HyperNet | None = None
        self._live: dict[str, tuple[nn.Module, str]] | None = None  # during a fit
        self._opt: torch.optim.Optimizer | None = None

    # ---- the hypernetwork ----------------------------------------------------------------
    def target(self, ctx: Context) -> Target:
        """The layout of the trunk's weights, which h writes."""
        if len(ctx.model.heads) < 2:
            raise GraphError("the hypernetwork writes the trunk and leaves each task its own "
                             "head: it needs a network with a head per task (two or more)")
        target = target_of(ctx.model, ctx.model.trunk_parameter_names())
        if self._net is not None and target.size != self._net.size:
            raise GraphError(f"the trunk has {target.size} weights but the hypernetwork writes "
                             f"{self._net.size}; its layout is fixed when it is built")
        return target

    def network(self, ctx: Context, target: Target, probe: Tensor | None = None) -> HyperNet:
        """The hypernetwork: from the state, or new (seeded from the task's seed, calibrated
        on `probe`)."""
        if self._net is None:
            net = HyperNet(self.params, target.size)
            saved = stored(self.state, "hnet", "all")
            if saved:
                net.load_state_dict(saved)
            else:
                net.initialise(generator(ctx.seed, "hypernetwork"),
                               probe if probe is not None else torch.zeros(self.params.embedding))
            self._net = net.to(ctx.device)
        return self._net

    def generate(self, target: Target, e: Tensor) -> Tensor:
        """Flat target weights [B, size] for embeddings [B, E]."""
        assert self._net is not None
        return self._net(e) * target.scale.to(e)

    def embeddings(self, tasks: list[int], device: torch.device) -> Tensor:
        """The stored embeddings of `tasks`, stacked [len, E]."""
        rows = [self.state[state_key("embedding", k, "vector")] for k in tasks]
        return torch.stack(rows).to(device) if rows else torch.zeros(0, self.params.embedding,
                                                                     device=device)

    # ---- hooks ---------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        gen = generator(ctx.seed, "hypernetwork-embedding")
        e = torch.randn(self.params.embedding, generator=gen)
        self._target = self.target(ctx)
        net = self.network(ctx, self._target, e)
        self._embedding = nn.Parameter(e.to(ctx.device))
        self._opt = torch.optim.Adam([*net.parameters(), self._embedding], lr=self.params.lr)
        self._old = self.embeddings(self.extra.get("tasks", []), ctx.device)
        with torch.no_grad():
            self._targets = self.generate(self._target, self._old) if len(self._old) else None

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        """Trunk parameters out, generated tensors in (the loop's optimiser sees the head)."""
        layers = dict(ctx.model.module.named_modules())
        self._live = {n: (layers[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1])
                      for n in self._target.names}
        originals = {n: layer._parameters.pop(attr) for n, (layer, attr) in self._live.items()}
        try:
            self._regenerate()
            yield
        finally:
            with torch.no_grad():
                for n, (layer, attr) in self._live.items():
                    value = layer.__dict__.pop(attr, None)  # the generated tensor, if any
                    if value is not None:
                        originals[n].copy_(value)
                    layer.register_parameter(attr, originals[n])
            self._live = None

    def _regenerate(self) -> None:
        """One pass of h over e_T and the old embeddings: e_T's weights go into the layers, the
        old ones' outputs wait for the penalty."""
        assert self._live is not None
        out = self.generate(self._target, torch.cat([self._embedding[None], self._old]))
        for n, value in self._target.unflatten(out[0]).items():
            layer, attr = self._live[n]
            setattr(layer, attr, value)
        self._outputs = out[1:]

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if self._targets is None or self._live is None:
            return None
        drift = (self._outputs - self._targets).square().sum()
        return self.params.beta / len(self._targets) * drift

    def after_step(self, ctx: Context) -> None:
        """The hypernetwork's step, then the weights of the new phi."""
        if self._live is None or self._opt is None:
            return
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        self._regenerate()

    def after_task(self, ctx: Context) -> None:
        assert self._net is not None
        self.state[state_key("embedding", ctx.task.index, "vector")] = \
            self._embedding.detach().cpu().clone()
        for n, t in self._net.state_dict().items():
            self.state[state_key("hnet", "all", n)] = t.detach().cpu().clone()
        self.extra["tasks"] = [*self.extra.get("tasks", []), ctx.task.index]
        self._opt = None

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        """Task k's weights h(e_k) swapped in (a task without an embedding yet, or a call
        during a fit, scores with the weights as they are)."""
        view = ctx.model.head(ctx.head_of(task))
        key = state_key("embedding", task.index, "vector")
        if key not in self.state or self._live is not None:
            yield view
            return
        target = self.target(ctx)
        net = self.network(ctx, target)
        with torch.no_grad():
            flat = net(self.state[key][None].to(ctx.device))[0] * target.scale.to(ctx.device)
        with swapped(ctx.model.named_parameters(), target.unflatten(flat)):
            yield view

    # ---- state ---------------------------------------------------------------------------
    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        super().load_state_dict(tensors, extra)
        self._net = None

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"hnet": TensorSpec(("all",), "any", parameter=False),
                "embedding": TensorSpec("tasks", "any", parameter=False)}

    def check_state(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any],
                    graph_tensors: Mapping[str, Tensor], finished: int) -> list[str]:
        return (super().check_state(tensors, extra, graph_tensors, finished)
                + check_tasks(extra, finished))

    def follow(self, ctx: Context, records: list[ChangeRecord]) -> None:
        raise GraphError("the hypernetwork writes a fixed layout of weights; a graph change "
                         "(growth, pruning) cannot be followed")

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """The deployed model: the heads, the hypernetwork and the task embeddings (the trunk
        is generated from them, not stored)."""
        parts = super().size_parts(model)
        hnet = list(stored(self.state, "hnet", "all").values())
        if not hnet:
            return parts
        emb = [t for k, t in self.state.items() if k.startswith("embedding/")]
        return {"heads": parts["heads"], "hypernetwork": hnet, "embeddings": emb}
