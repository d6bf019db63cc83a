"""Expert Gate (Aljundi, Chakravarty & Tuytelaars, CVPR 2017): one expert per task, chosen at
test time by autoencoder gates, without the task id.

Each task k gets
- a gate: an undercomplete autoencoder (input -> `code` units, ReLU -> input, sigmoid) trained on
  the task's training inputs with the mean squared reconstruction error, through the one loop
  (`fit` with the error as its `loss` hook); its tensors live in the strategy state
  (gate/<k>/<node>.<tensor>);
- an expert: task 0's is the base trunk (column 0); task k's is a new column
  (`growth.ops.add_column` without lateral adapters) whose weights start as a copy of the most
  related earlier expert's, and the task's head moves onto it. Earlier experts and heads are
  frozen (`freeze`), so their outputs stay bitwise identical.
Relatedness of an earlier task a to the new task k, on the new task's validation inputs (its
training inputs when it has none): Rel(k, a) = 1 - (Er_a - Er_k) / Er_k, with Er_a the mean
reconstruction error of gate a and Er_k that of the new gate; the expert of the task with the
largest Rel is copied.

Test time is task-agnostic: every input is sent through every gate; the gate with the lowest
reconstruction error (the largest softmax of -error / `temperature`) picks the expert, whose
head's prediction is mapped to the dataset's class ids. The score a task's evaluation sees is
that prediction in the task's labels, or an extra "none of this task's classes" column when the
chosen expert predicts a class the task does not have, so a sample routed to the wrong expert
counts as right only when that expert names the right class. The share of each task's inputs
routed to its own expert is kept in `extra["routing"]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from growth.data.sampling import generator
from growth.errors import ConfigError, OperatorError
from growth.graph import NetGraph
from growth.model import Model
from growth.ops.columns import add_column, column_count, column_members, freeze
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task

GATE = "gate"


class ExpertGateParams(StrategyParams):
    """Expert Gate settings.

    code: the gate autoencoder's hidden width; it must be below the input size (undercomplete).
    gate_epochs, gate_lr, gate_batch: the gate's training (Adam) on the task's inputs.
    temperature: t of the gate's softmax over -error / t (the paper's 2; the choice is its
    argmax, the expert with the lowest error). init: `related` starts a new expert as a copy
    of the most related earlier expert (the paper); `fresh` from torch's initialisation.
    """

    trunk: str = Field("features", min_length=1, description="the node every head reads")
    code: int = Field(32, ge=1, description="gate autoencoder's hidden width (undercomplete)")
    gate_epochs: int = Field(30, ge=1, description="epochs of each gate's training")
    gate_lr: float = Field(1e-3, gt=0, description="gate learning rate (Adam)")
    gate_batch: int = Field(64, ge=1, description="gate batch size")
    temperature: float = Field(2.0, gt=0, description="softmax temperature over -error")
    init: Literal["related", "fresh"] = Field(
        "related", description="a new expert starts from the most related one, or fresh")


def gate_graph(shape: tuple[int, ...], code: int) -> NetGraph:
    """x -> [flatten] -> encoder (code units, ReLU) -> decoder (sigmoid) -> "recon"."""
    g = NetGraph()
    src = g.add_input("x", shape)
    if len(shape) > 1:
        src = g.add("flatten", "flatten", [src])
    size = int(torch.Size(shape).numel())
    h = g.add("act", "relu", [g.add("encoder", "linear", [src], out_features=code)])
    out = g.add("sigmoid", "sigmoid", [g.add("decoder", "linear", [h], out_features=size)])
    g.add_output("recon", out)
    return g


def reconstruction_error(gate: nn.Module, x: Tensor) -> Tensor:
    """Per-sample mean squared error of the gate's reconstruction of `x`."""
    return (gate(x) - x.flatten(1)).square().mean(1)


def relatedness(own_error: float, other_error: float) -> float:
    """Rel = 1 - (Er_other - Er_own) / Er_own (1 for an equally good gate, lower for worse)."""
    return 1.0 - (other_error - own_error) / own_error


def gate_probabilities(errors: Tensor, temperature: float) -> Tensor:
    """Softmax over gates of -error / t (errors: [gates, samples]); argmax = lowest error."""
    return F.softmax(-errors / temperature, dim=0)


class _GateTraining(Strategy):
    """The gate's training as a strategy of the one loop: the loss is the reconstruction
    error of the batch (the labels are not used)."""

    name = "gate_training"

    def loss(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        return (logits - x.flatten(1)).square().mean()


class ExpertGate(Strategy):
    name = "expert_gate"
    description = "expert gate: an expert column per task, picked at test time by the " \
                  "autoencoder gate that reconstructs the input best (no task id)"
    Params = ExpertGateParams
    params: ExpertGateParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)

    def __init__(self, params: ExpertGateParams | None = None) -> None:
        super().__init__(params)
        self._gates: dict[int, nn.Module] = {}

    # ---- hooks ---------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        k = ctx.task.index
        head = ctx.head_of(ctx.task)
        seen = [ctx.head_of(t) for t in ctx.seen]
        if head in seen:
            raise ConfigError(f"strategy expert_gate needs one head per task, but task "
                              f"{ctx.task.name!r} shares head {head!r} with an earlier task; "
                              "use scenario: task")
        self._check_setup(ctx)
        self.train_gate(ctx)
        if not ctx.seen:  # task 0: the base trunk is its expert (column 0)
            self.extra.setdefault("columns", {})[str(k)] = 0
            return
        source = self.most_related(ctx)
        graph = ctx.model.graph
        frozen = freeze(graph, graph.ancestors(seen) - set(graph.input_nodes()))
        column = column_count(graph, self.params.trunk)
        init = None if self.params.init == "fresh" else self.column(source)
        try:
            result = add_column(frozen.graph, [head], trunk=self.params.trunk, seed=ctx.seed,
                                lateral=False, init_from=init)
        except OperatorError as exc:
            raise ConfigError(f"strategy expert_gate cannot add an expert for task "
                              f"{ctx.task.name!r}: {exc}") from None
        ctx.replace_graph(result.graph, [frozen.record, result.record])
        self.extra.setdefault("columns", {})[str(k)] = column

    def after_task(self, ctx: Context) -> None:
        self.extra["tasks"] = [*self.finished(), ctx.task.index]

    def _check_setup(self, ctx: Context) -> None:
        if self.params.trunk not in ctx.model.graph:
            raise ConfigError(f"strategy.trunk: the graph has no node {self.params.trunk!r}; "
                              "name the node the heads read (e.g. 'features')")
        size = int(torch.Size(ctx.task.input_shape).numel())
        if self.params.code >= size:
            raise ConfigError(f"strategy.code: the gate must be undercomplete, but code "
                              f"{self.params.code} is not below the input size {size}")

    # ---- gates -----------------------------------------------------------------------------
    def train_gate(self, ctx: Context) -> None:
        """Train task k's autoencoder on its training inputs (fresh weights from the task's
        seed) and store its tensors in the state."""
        from growth.train import TrainConfig, fit  # the loop imports strategies: import late

        k = ctx.task.index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            graph = gate_graph(tuple(ctx.task.input_shape), self.params.code)
        model = Model(graph, ctx.device)
        gate_ctx = Context(model, ctx.task, [], lambda t: "recon", lambda t, y: y, ctx.device,
                           seed=ctx.seed)
        cfg = TrainConfig(epochs=self.params.gate_epochs, batch_size=self.params.gate_batch,
                          optimizer="adam", lr=self.params.gate_lr)
        seed = int(torch.randint(2**31 - 1, (), generator=generator(ctx.seed, GATE, k)))
        fit(gate_ctx, _GateTraining(), cfg, seed=seed)
        for name, tensor in model.module.state_dict().items():
            self.state[f"{GATE}/{k}/{name}"] = tensor.detach().cpu().clone()
        self._gates.pop(k, None)

    def gate(self, k: int, device: torch.device, shape: tuple[int, ...]) -> nn.Module:
        """Task k's gate as a module in eval mode (built from the state once)."""
        module = self._gates.get(k)
        if module is None:
            graph = gate_graph(shape, self.params.code)
            prefix = f"{GATE}/{k}/"
            for name in graph.topo_order():
                node = graph.node(name)
                if node.tensors:
                    node.tensors = {t: self.state[f"{prefix}{name}.{t}"] for t in node.tensors}
            module = self._gates[k] = Model(graph, device).module.eval().requires_grad_(False)
        return module

    def gated(self) -> list[int]:
        """Tasks with a trained gate, in order."""
        found = {int(k.split("/", 2)[1]) for k in self.state if k.startswith(f"{GATE}/")}
        return sorted(found)

    def most_related(self, ctx: Context) -> int:
        """The earlier task whose gate reconstructs the new task's inputs best, relative to
        the new task's own gate (the largest Rel); recorded in extra["related"]."""
        k = ctx.task.index
        x = _inputs(ctx.task).to(ctx.device)
        shape = tuple(ctx.task.input_shape)
        with torch.no_grad():
            own = float(reconstruction_error(self.gate(k, ctx.device, shape), x).mean())
            rel = {t.index: relatedness(own, float(reconstruction_error(
                self.gate(t.index, ctx.device, shape), x).mean())) for t in ctx.seen}
        best = max(rel, key=lambda a: (rel[a], -a))
        self.extra.setdefault("related", {})[str(k)] = {
            "task": best, "relatedness": {str(a): r for a, r in rel.items()}}
        return best

    def column(self, task: int) -> int:
        return int(self.extra.get("columns", {}).get(str(task), task))

    def finished(self) -> list[int]:
        return list(self.extra.get("tasks", []))

    # ---- task-agnostic evaluation ------------------------------------------------------------
    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        experts = [k for k in self.gated() if k in self.finished()]
        if not experts:  # nothing learned yet: the task's own (untrained) head
            yield ctx.model.head(ctx.head_of(task))
            return
        tasks = {t.index: t for t in [*ctx.seen, ctx.task]}
        missing = [k for k in experts if k not in tasks]
        if missing:
            raise ConfigError(f"expert_gate: the context does not know tasks {missing}, whose "
                              "experts it must route to")
        routed = [0, 0]

        def score(x: Tensor) -> Tensor:
            shape = tuple(x.shape[1:])
            errors = torch.stack([reconstruction_error(self.gate(k, x.device, shape), x)
                                  for k in experts])
            pick = gate_probabilities(errors, self.params.temperature).argmax(0)
            own = task.n_classes  # the "none of this task's classes" column
            out = torch.zeros(len(x), own + 1, device=x.device)
            for i, k in enumerate(experts):
                rows = (pick == i).nonzero().flatten()
                if not len(rows):
                    continue
                local = ctx.model.head(ctx.head_of(tasks[k]))(x[rows]).argmax(1)
                out[rows, _to_task(tasks[k], task, local)] = 1.0
            routed[0] += int((torch.tensor(experts, device=x.device)[pick] == task.index).sum())
            routed[1] += len(x)
            return out

        yield score
        if routed[1]:
            self.extra.setdefault("routing", {})[str(task.index)] = routed[0] / routed[1]

    # ---- state and size --------------------------------------------------------------------
    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        super().load_state_dict(tensors, extra)
        self._gates = {}

    def state_spec(self) -> dict[str, TensorSpec]:
        return {GATE: TensorSpec("tasks", "any", "float", parameter=False)}

    def check_state(self, tensors: Any, extra: Any, graph_tensors: Any, finished: int
                    ) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        if extra.get("tasks", []) != list(range(finished)):
            problems.append(f"extra 'tasks' is {extra.get('tasks')!r}, expected the "
                            f"{finished} finished tasks {list(range(finished))}")
        return problems

    def run_report(self) -> dict[str, Any]:
        """Per task, the expert it was initialised from (with every relatedness) and the
        share of its test inputs the gates sent to its own expert (last evaluation)."""
        return {"details": {"expert_gate": {"related": self.extra.get("related", {}),
                                            "routing": self.extra.get("routing", {})}}}

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """"trunk": every expert's column, "heads", "gates": the autoencoders."""
        params = model.named_parameters()
        graph = model.graph
        columns = [n for k in range(column_count(graph, self.params.trunk))
                   for n in column_members(graph, k, self.params.trunk)[0]]
        trunk = [f"{n}.{t}" for n in columns for t in graph.node(n).tensors]
        gates = [t for key, t in self.state.items() if key.startswith(f"{GATE}/")
                 and key.rsplit(".", 1)[-1] in ("weight", "bias")]
        return {"trunk": [params[n] for n in trunk if n in params],
                "heads": [p for n, p in params.items() if n not in set(trunk)],
                "gates": gates}


def _inputs(task: Task) -> Tensor:
    """The new task's validation inputs (its training inputs when it has none)."""
    x, y = task.val
    return x if len(y) else task.train[0]


def _to_task(expert: Task, task: Task, local: Tensor) -> Tensor:
    """Column in `task`'s scores of each prediction of `expert` (local labels): the task's
    local label of the same dataset class, or the extra last column if it has none."""
    lookup = torch.full((expert.n_classes,), task.n_classes, dtype=torch.long)
    for i, c in enumerate(expert.classes):
        if c in task.classes:
            lookup[i] = task.classes.index(c)
    return lookup.to(local.device)[local]


__all__ = ["ExpertGate", "ExpertGateParams", "gate_graph", "gate_probabilities",
           "reconstruction_error", "relatedness"]
