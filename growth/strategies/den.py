"""DEN, dynamically expandable networks (Yoon, Yang, Lee & Hwang, ICLR 2018), on MLP trunks.

Every hidden unit has a timestamp: the task that created it (state stamp/all/<layer>.bias, one
per unit, 0 while its task trains, k + 1 = task k). Evaluating task j uses only the units with
timestamps up to j + 1: the weights into and out of later units are zeroed for the split
(restored after), so units added for later tasks never change an earlier task's outputs.

Task 0 trains the network with an L1 penalty on the trunk's weights (`l1`), applied as a
proximal step after every optimizer step (soft-thresholding by lr * l1), so unused connections
are exactly zero. Each later task t:
1. Selective retraining. The task's head alone is trained with the L1 step (`select_epochs`);
   the units of the last hidden layer that its nonzero weights read are selected, then, layer
   by layer downwards, the units with a nonzero weight into a selected unit (a breadth-first
   search of the sparse connections). The task then trains (the campaign's training) only the
   weights between selected units (and their biases) plus its head, with an L2 pull
   `l2 * sum (W - W_{t-1})^2` to the values before the task.
2. Dynamic expansion. If the task's training loss (cross-entropy on its training split) is
   still above `threshold`, every hidden layer gets `k` new units (`net2wider`, the new units'
   incoming weights drawn fresh, their outgoing weights zero, every old weight unchanged); the
   new weights alone train (`expand_epochs`) with the L1 step and a group-sparsity step per new
   unit (its incoming weights scaled by max(0, 1 - lr * group / ||w||)); new units left with no
   incoming weight are removed (`prune_units`).
3. Split and duplication. Each old unit whose incoming weights drifted by more than `split`
   (rho_i = ||w_i^t - w_i^{t-1}||_2) is duplicated (`net2wider` copying that unit): the copy,
   stamped with task t, keeps the drifted weights, and the original gets its weights from
   before the task back, so earlier tasks see their own unit. The network then retrains
   (`split_epochs`) with the L2 pull to the values before the task.
Old tasks' units drift only through steps 1 and 3, within the L2 pull and the split threshold:
forgetting is bounded, not zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.masks import Guard, decays, swapped
from growth.metrics import Stored, index_bits
from growth.ops import net2wider, prune_units
from growth.ops.columns import base_column
from growth.remap import MASK, remap
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams, state_key
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.model import Model
    from growth.ops.registry import ChangeRecord

STAMP = "stamp"


class DENParams(StrategyParams):
    """DEN settings.

    l1: the L1 strength of the proximal steps (task 0's weights, the head's selection, the new
    units). l2: the pull to the weights before the task (selective retraining and after the
    split). threshold: the training loss above which the network expands. k: units added to
    every hidden layer. group: the group-sparsity strength on each new unit. split: the drift
    (L2 distance of a unit's incoming weights) above which a unit is duplicated.
    Defaults: l1 0.01 and l2 0.1 were picked on seed 0 of the quickstart stream (permuted
    digits, MLP 64-100-100) among l1 in {0.001, 0.01} and l2 in {0.01, 0.1, 1}: the setting
    where every step of the method acts (the head's L1 selects part of the first layer, new
    units are pruned by group sparsity, few units split) with the least forgetting (BWT
    -0.004, ACC 0.92 at 1.16x the base); l1 0.001 selects every unit (ACC 0.95 at 1.66x).
    """

    trunk: str = Field("features", min_length=1, description="the node every head reads")
    l1: float = Field(0.01, ge=0, description="L1 strength (proximal steps)")
    l2: float = Field(0.1, ge=0, description="pull to the weights before the task")
    threshold: float = Field(0.1, ge=0, description="expand when the task's loss stays above")
    k: int = Field(10, ge=1, description="units added to every hidden layer")
    group: float = Field(0.01, ge=0, description="group-sparsity strength on new units")
    split: float = Field(0.5, gt=0, description="drift above which a unit is duplicated")
    select_epochs: int = Field(2, ge=1, description="epochs of the head's sparse training")
    expand_epochs: int | None = Field(None, ge=1,
                                      description="new units' epochs (None: train.epochs)")
    split_epochs: int = Field(2, ge=0, description="epochs of retraining after the split")


class DEN(Strategy):
    name = "den"
    description = "dynamically expandable networks: selective retraining of the sparse " \
                  "sub-network a task reads, expansion by k units when the loss stays high, " \
                  "split of drifting units, timestamps per unit"
    Params = DENParams
    params: DENParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)
    state_roles: ClassVar[dict[str, str]] = {STAMP: MASK}

    def __init__(self, params: DENParams | None = None) -> None:
        super().__init__(params)
        self._mode = "plain"
        self._trainable: dict[str, Tensor] = {}
        self._old: dict[str, Tensor] = {}  # W_{t-1} (0 where no old value: new units)
        self._anchored: dict[str, Tensor] = {}  # where W_{t-1} exists
        self._prox: dict[str, Tensor] = {}  # entries the L1 step applies to
        self._groups: dict[str, Tensor] = {}  # layer weight -> rows under the group step
        self._guard: Guard | None = None
        self._structure: tuple[Any, NetGraph] | None = None

    # ---- structure ---------------------------------------------------------------------------
    def structure(self, model: Model) -> NetGraph:
        """The model's graph (structure and weights as last synced), read once per compiled
        module."""
        if self._structure is None or self._structure[0] is not model.module:
            self._structure = (model.module, model.graph)
        return self._structure[1]

    def layers(self, model: Model) -> list[str]:
        """The hidden layers (the trunk's linear producers, in order)."""
        graph = self.structure(model)
        return [n for n in base_column(graph, self.params.trunk)
                if graph.node(n).kind == "linear"]

    def _check(self, ctx: Context) -> None:
        graph = ctx.model.graph
        if self.params.trunk not in graph:
            raise ConfigError(f"strategy.trunk: the graph has no node {self.params.trunk!r}; "
                              "name the node the heads read (e.g. 'features')")
        for n in base_column(graph, self.params.trunk):
            node = graph.node(n)
            if node.tensors and node.kind != "linear":
                raise ConfigError(f"strategy den runs on MLP trunks (linear layers and "
                                  f"activations), but the trunk has {n!r}, a {node.kind}; use "
                                  "model.kind: mlp without batchnorm")
            if node.kind == "linear" and not node.attrs.get("bias", True):
                raise ConfigError(f"strategy den needs biases (its unit timestamps follow "
                                  f"them); {n!r} has none")
        if ctx.head_of(ctx.task) in (ctx.head_of(t) for t in ctx.seen):
            raise ConfigError("strategy den needs one head per task; use scenario: task")

    def stamps(self, model: Model) -> dict[str, Tensor]:
        """Per hidden layer, one timestamp per unit (created as 0 where missing)."""
        params = model.named_parameters()
        out = {}
        for layer in self.layers(model):
            key = state_key(STAMP, "all", f"{layer}.bias")
            if key not in self.state:
                self.state[key] = torch.zeros(params[f"{layer}.bias"].shape, dtype=torch.int16)
            out[layer] = self.state[key]
        return out

    def finished(self) -> list[int]:
        return list(self.extra.get("tasks", []))

    # ---- hooks -------------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        self._check(ctx)
        self.stamps(ctx.model)
        self._snapshot(ctx)
        layers = self.layers(ctx.model)
        weights = {f"{n}.weight" for n in layers}
        params = ctx.model.named_parameters()
        if not ctx.seen:  # task 0: the whole network, sparse
            self._mode, self._trainable = "sparse", {}
            self._prox = {n: torch.ones_like(params[n], dtype=torch.bool) for n in weights}
            return
        head = self._head_weight(ctx)
        self._mode, self._trainable = "select", {}
        self._prox = {head: torch.ones_like(params[head], dtype=torch.bool)}
        node = head.rsplit(".", 1)[0]
        ctx.train_fit(epochs=self.params.select_epochs,
                      params=[p for n, p in params.items() if n.rsplit(".", 1)[0] == node])
        selected = self.select(ctx)
        self._entry(ctx)["selected"] = {n: int(s.sum()) for n, s in selected.items()}
        self._trainable = self._subnetwork(ctx, selected)
        self._mode, self._prox = "retrain", {}

    def after_task(self, ctx: Context) -> None:
        entry = self._entry(ctx)
        if ctx.seen:
            loss = self.train_loss(ctx)
            entry["loss"] = loss
            if loss > self.params.threshold:
                entry["expanded"] = self.expand(ctx)
            entry["split"] = self.split_units(ctx)
        for s in self.stamps(ctx.model).values():
            s[s == 0] = ctx.task.index + 1
        entry["widths"] = {n: int(s.numel()) for n, s in self.stamps(ctx.model).items()}
        self._mode, self._trainable, self._prox, self._groups = "plain", {}, {}, {}
        self._old, self._anchored = {}, {}
        self.extra["tasks"] = [*self.finished(), ctx.task.index]

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        with ExitStack() as stack:
            self._guard = None
            if self._trainable:
                self._guard = Guard(ctx.model.named_parameters(), self._trainable)
                stack.callback(self._guard.restore)
            yield

    def penalty(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        """The L2 pull to the weights before the task (retraining phases)."""
        if self._mode not in ("retrain", "split") or not self.params.l2:
            return None
        params = ctx.model.named_parameters()
        terms = [(self._anchored[n] * (params[n] - self._old[n]).square()).sum()
                 for n in self._old]
        return self.params.l2 * sum(terms)

    def after_backward(self, ctx: Context) -> None:
        if self._guard is not None:
            self._guard.mask_grads()

    @torch.no_grad()
    def after_step(self, ctx: Context) -> None:
        """The proximal steps: L1 soft-thresholding, then the group step on new units."""
        lr = ctx.optimizer.param_groups[0]["lr"] if ctx.optimizer is not None else 0.0
        params = ctx.model.named_parameters()
        if self.params.l1:
            for n, where in self._prox.items():
                p = params[n]
                soft_threshold_(p, where.to(p.device), lr * self.params.l1)
        if self.params.group:
            for n, rows in self._groups.items():
                group_shrink_(params[n], rows.to(params[n].device), lr * self.params.group)
        if self._guard is not None and decays(ctx.optimizer):
            self._guard.restore()

    # ---- 1. selective retraining -------------------------------------------------------------
    def select(self, ctx: Context) -> dict[str, Tensor]:
        """Breadth-first search of the sparse connections from the task's head down: per
        hidden layer, the units (boolean) with a nonzero weight into a selected unit above."""
        params = ctx.model.named_parameters()
        layers = self.layers(ctx.model)
        below = params[self._head_weight(ctx)].detach() != 0
        selected: dict[str, Tensor] = {}
        for layer in reversed(layers):
            chosen = below.any(0) if layer == layers[-1] else \
                (below[selected[layers[layers.index(layer) + 1]]] != 0).any(0)
            selected[layer] = chosen.cpu()
            below = params[f"{layer}.weight"].detach() != 0
        return {n: selected[n] for n in layers}

    def _subnetwork(self, ctx: Context, selected: dict[str, Tensor]) -> dict[str, Tensor]:
        """Trainable entries: weights from selected units (any input for the first layer) into
        selected units, and the selected units' biases."""
        params = ctx.model.named_parameters()
        out = {}
        previous = None
        for layer in self.layers(ctx.model):
            rows = selected[layer]
            cols = (torch.ones(params[f"{layer}.weight"].shape[1], dtype=torch.bool)
                    if previous is None else previous)
            out[f"{layer}.weight"] = rows[:, None] & cols[None, :]
            out[f"{layer}.bias"] = rows.clone()
            previous = rows
        return out

    def train_loss(self, ctx: Context) -> float:
        """Mean cross-entropy of the task's training split through its head, in eval mode."""
        x, y = ctx.task.train
        labels = ctx.label_of(ctx.task, y).to(ctx.device)
        view = ctx.model.head(ctx.head_of(ctx.task))
        was = ctx.model.module.training
        ctx.model.eval()
        try:
            with torch.no_grad():
                total = sum(float(F.cross_entropy(view(x[i:i + 1024].to(ctx.device)),
                                                  labels[i:i + 1024], reduction="sum"))
                            for i in range(0, len(labels), 1024))
        finally:
            ctx.model.train(was)
        return total / max(len(labels), 1)

    # ---- 2. dynamic expansion ----------------------------------------------------------------
    def expand(self, ctx: Context) -> dict[str, Any]:
        """k new units in every hidden layer, trained alone with the L1 and group steps; the
        new units left without incoming weights are removed."""
        k = self.params.k
        graph = ctx.model.graph
        records: list[ChangeRecord] = []
        for i, layer in enumerate(self.layers(ctx.model)):
            width = graph.shape(layer)[0]
            graph, record = widen(graph, layer, list(range(k)) if k <= width else
                                  [j % width for j in range(k)], ctx.seed + i,
                                  fresh=True, keep=self._current_consumers(ctx, graph, layer))
            records.append(record)
        self._follow_records(ctx, graph, records)
        params = ctx.model.named_parameters()
        stamps = self.stamps(ctx.model)
        layers = self.layers(ctx.model)
        new = {n: s == 0 for n, s in stamps.items()}
        self._trainable, self._prox, self._groups = {}, {}, {}
        for i, layer in enumerate(layers):
            cols = new[layers[i - 1]] if i else torch.zeros(params[f"{layer}.weight"].shape[1],
                                                           dtype=torch.bool)
            entries = new[layer][:, None] | cols[None, :]
            self._trainable[f"{layer}.weight"] = entries
            self._trainable[f"{layer}.bias"] = new[layer].clone()
            self._prox[f"{layer}.weight"] = entries
            self._groups[f"{layer}.weight"] = new[layer].clone()
        self._mode = "expand"
        ctx.train_fit(epochs=self.params.expand_epochs)
        added = {n: int(v.sum()) for n, v in new.items()}
        kept = self._remove_dead(ctx)
        self._trainable, self._prox, self._groups = {}, {}, {}
        return {"added": added, "kept": kept}

    def _remove_dead(self, ctx: Context) -> dict[str, int]:
        """Remove the new units whose incoming weights are all zero."""
        kept = {}
        for layer in self.layers(ctx.model):
            params = ctx.model.named_parameters()
            stamps = self.stamps(ctx.model)
            dead = (stamps[layer] == 0) & \
                (params[f"{layer}.weight"].detach().cpu() == 0).all(1)
            kept[layer] = int(((stamps[layer] == 0) & ~dead).sum())
            if not bool(dead.any()) or bool(dead.all()):
                continue
            result = prune_units(ctx.model.graph, layer, int((~dead).sum()),
                                 scores=(~dead).float())
            self._follow_records(ctx, result.graph, [result.record])
        return kept

    # ---- 3. split and duplication ------------------------------------------------------------
    def drift(self, ctx: Context) -> dict[str, Tensor]:
        """Per hidden layer, rho_i = ||w_i - w_i^{t-1}||_2 of each old unit's incoming weights
        (0 for units created during the task)."""
        params = ctx.model.named_parameters()
        out = {}
        for layer in self.layers(ctx.model):
            n = f"{layer}.weight"
            diff = (params[n].detach().cpu() - self._old[n]) * self._anchored[n]
            old = self._anchored[f"{layer}.bias"]
            out[layer] = torch.where(old, diff.norm(dim=1), torch.zeros(len(old)))
        return out

    def split_units(self, ctx: Context) -> dict[str, list[int]]:
        """Duplicate the units that drifted more than `split`: the copy keeps the drifted
        weights (stamped with this task), the original gets its weights before the task
        back; then retrain with the L2 pull."""
        drift = self.drift(ctx)
        split: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers(ctx.model)):
            units = (drift[layer] > self.params.split).nonzero().flatten().tolist()
            if not units:
                continue
            split[layer] = units
            graph = ctx.model.graph
            graph, record = widen(graph, layer, units, ctx.seed + 100 + i, fresh=False,
                                  keep=self._current_consumers(ctx, graph, layer))
            old = {n: self._old[n] for n in (f"{layer}.weight", f"{layer}.bias")}
            node = graph.node(layer)
            for key in ("weight", "bias"):
                t = node.tensors[key].clone()
                t[units] = old[f"{layer}.{key}"][units].to(t)
                node.tensors = {**node.tensors, key: t}
            self._follow_records(ctx, graph, [record])
        if split and self.params.split_epochs:
            self._mode, self._trainable = "split", {}
            ctx.train_fit(epochs=self.params.split_epochs)
        return split

    def _current_consumers(self, ctx: Context, graph: NetGraph, layer: str) -> set[str]:
        """Consumer tensors that serve the task being learned (so new units' columns in them
        start as copies): the next hidden layer's weight and the task's head weight."""
        layers = self.layers(ctx.model)
        i = layers.index(layer)
        out = {self._head_weight(ctx)}
        if i + 1 < len(layers):
            out.add(f"{layers[i + 1]}.weight")
        return out

    # ---- state following ---------------------------------------------------------------------
    def _snapshot(self, ctx: Context) -> None:
        """W_{t-1}: the hidden layers' weights and biases at the task's start."""
        params = ctx.model.named_parameters()
        names = [f"{n}.{t}" for n in self.layers(ctx.model) for t in ("weight", "bias")]
        self._old = {n: params[n].detach().cpu().clone() for n in names}
        self._anchored = {n: torch.ones_like(t, dtype=torch.bool) for n, t in self._old.items()}

    def _follow_records(self, ctx: Context, graph: NetGraph, records: list[ChangeRecord]
                        ) -> None:
        """Swap in the changed graph; stamps follow as masks (new units 0), and so do W_{t-1}
        and where it exists (none at new units)."""
        ctx.replace_graph(graph, records)
        for n in list(self._old):
            self._old[n] = remap(self._old[n], n, records, MASK)
            self._anchored[n] = remap(self._anchored[n], n, records, MASK)

    def _head_weight(self, ctx: Context) -> str:
        graph = self.structure(ctx.model)
        return f"{graph.inputs(ctx.head_of(ctx.task))[0]}.weight"

    def _entry(self, ctx: Context) -> dict[str, Any]:
        return self.extra.setdefault("den", {}).setdefault(str(ctx.task.index), {})

    # ---- timestamps at evaluation --------------------------------------------------------------
    def visible(self, model: Model, task: int) -> dict[str, Tensor]:
        """Per hidden layer's weight, the entries task `task` uses: from and to units stamped
        1..task + 1 (inputs of the first layer always)."""
        stamps = self.stamps(model)
        params = model.named_parameters()
        out = {}
        previous = None
        for layer in self.layers(model):
            s = stamps[layer]
            rows = (s > 0) & (s <= task + 1)
            cols = (torch.ones(params[f"{layer}.weight"].shape[1], dtype=torch.bool)
                    if previous is None else previous)
            out[f"{layer}.weight"] = rows[:, None] & cols[None, :]
            previous = rows
        return out

    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        if task.index not in self.finished():  # the task in training, or not learned yet
            yield ctx.model.head(ctx.head_of(task))
            return
        params = ctx.model.named_parameters()
        tensors = dict(ctx.model.module.state_dict(keep_vars=True))
        values = {n: params[n].detach() * m.to(params[n]) for n, m in
                  self.visible(ctx.model, task.index).items()}
        with swapped(tensors, values):
            yield ctx.model.head(ctx.head_of(task))

    # ---- state and size ------------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        return {STAMP: TensorSpec(("all",), "same", "int")}

    def check_state(self, tensors: Any, extra: Any, graph_tensors: Any, finished: int
                    ) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        if extra.get("tasks", []) != list(range(finished)):
            problems.append(f"extra 'tasks' is {extra.get('tasks')!r}, expected the "
                            f"{finished} finished tasks {list(range(finished))}")
        return problems

    def run_report(self) -> dict[str, Any]:
        return {"details": {"den": self.extra.get("den", {})}}

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """Trunk and heads, plus one timestamp per hidden unit in the bits the tasks need."""
        parts = super().size_parts(model)
        bits = index_bits(len(self.finished()) + 1)
        parts["masks"] = [Stored(s.numel(), bits, parameters=False)
                          for s in self.stamps(model).values()]
        return parts


@torch.no_grad()
def soft_threshold_(p: Tensor, where: Tensor, amount: float) -> None:
    """L1 proximal step at the `where` entries: w <- sign(w) max(|w| - amount, 0)."""
    shrunk = p.sign() * (p.abs() - amount).clamp_min(0)
    p.copy_(torch.where(where, shrunk, p))


@torch.no_grad()
def group_shrink_(p: Tensor, rows: Tensor, amount: float) -> None:
    """Group-lasso proximal step on the `rows` of a weight (one group per unit's incoming
    weights): w_g <- w_g max(0, 1 - amount / ||w_g||_2)."""
    norms = p.norm(dim=1)
    scale = (1 - amount / norms.clamp_min(1e-30)).clamp_min(0)
    p.mul_(torch.where(rows, scale, torch.ones_like(scale))[:, None])


def widen(graph: NetGraph, layer: str, copies: list[int], seed: int, fresh: bool,
          keep: set[str]) -> tuple[NetGraph, ChangeRecord]:
    """`net2wider` adding one unit per entry of `copies` (copying that unit), then: every
    consumer column gets its value before the widening back (undivided) at the old units; at
    the new units it is a copy of the copied unit's (consumer tensors in `keep`, those of the
    task being learned) or zero (earlier tasks' heads). fresh: the new units' incoming weights
    and biases are drawn as torch initialises a linear layer (from `seed`) instead of copied."""
    before = graph.named_tensors()
    width = graph.shape(layer)[0]
    result = net2wider(graph, layer, width + len(copies), copies=copies, seed=seed,
                       max_new_params=None)
    out, record = result.graph, result.record
    for name in record.divisors:
        node, key = name.rsplit(".", 1)
        old = before[name]
        column = remap(old, name, record, MASK)
        if name in keep and not fresh:
            column[:, width:] = old[:, copies]
        out.node(node).tensors = {**out.node(node).tensors, key: column}
    if fresh:
        node = out.node(layer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            drawn = torch.nn.Linear(node.attrs["in_features"], len(copies))
        w, b = node.tensors["weight"].clone(), node.tensors["bias"].clone()
        w[width:] = drawn.weight.detach().to(w)
        b[width:] = drawn.bias.detach().to(b)
        node.tensors = {**node.tensors, "weight": w, "bias": b}
    return out, record


__all__ = ["DEN", "DENParams", "group_shrink_", "soft_threshold_", "widen"]
