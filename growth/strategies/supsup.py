"""SupSup, supermasks in superposition (Wortsman et al. 2020).

The network's weights are random and never train: with `weights: signed_constant` (default,
as edge-popup and the paper) every linear and conv weight becomes sign(w) * sqrt(2 / fan_in)
and their biases 0 before the first task; BatchNorm stays at its initial state (eval mode).
Each task learns a supermask per weight tensor it uses (the trunk's and its own head's, or the
one shared head's): a real-valued score per weight, initialised as torch initialises a layer
(Kaiming uniform) from the task's seed; the forward pass uses W * [|score| among the `keep`
fraction largest of its tensor] (edge-popup's top-k, recomputed every step), and the scores
train through it with the straight-through estimator (a score's gradient is its masked
weight's gradient times W times sign(score)), with their own optimizer. After the task the
mask is stored, one bit per weight (state mask/<task>/<param>).

Task known (`infer_task: never`, scenario task): task k is evaluated with W * mask_k and its own
head. Task unknown (`infer_task: batch | example`, scenario class: one shared head, no task id
at test time): the paper's one-shot inference. The network runs with the superposition
W * sum_i alpha_i mask_i, alpha_i = 1/k over the k learned tasks; the inferred task is the one
whose alpha most decreases the entropy of the output, argmin_i d H / d alpha_i (computed by
forward-mode differentiation), per evaluation batch (`batch`, the paper's setting: the batch is
assumed to come from one task, as a campaign's evaluation batches do) or per input
(`example`); the input is then scored with the inferred task's mask. Each task's rate of
correctly inferred tasks in its latest evaluation is kept in `metrics.json` (details.supsup).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from growth.masks import ScoredMasks, TopK, batchnorms, score_optimizer, swapped
from growth.metrics import Stored
from growth.regularizers import stored
from growth.remap import MASK as MASK_ROLE
from growth.strategies.base import Context, Scorer, Strategy, StrategyParams, state_key
from growth.strategies.spec import TensorSpec

if TYPE_CHECKING:
    from growth.data import Task
    from growth.model import Model

MASK = "mask"


class SupSupParams(StrategyParams):
    """SupSup settings."""

    keep: float = Field(0.5, gt=0, le=1, description="fraction of each weight tensor a "
                                                      "supermask keeps (edge-popup's top-k)")
    weights: Literal["signed_constant", "initial"] = Field(
        "signed_constant", description="the fixed weights: signed Kaiming constants (biases "
                                       "0), or the network's initialisation")
    score_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="optimizer of the mask scores (sgd: momentum 0.9)")
    score_lr: float = Field(1e-3, gt=0, description="learning rate of the mask scores")
    infer_task: Literal["never", "batch", "example"] = Field(
        "never", description="never: the task is given (scenario task); batch or example: "
                             "inferred by the one-shot entropy gradient (scenario class)")


class SupSup(Strategy):
    name = "supsup"
    description = "supermasks in superposition: a top-k mask per task over fixed random " \
                  "weights; the task given, or inferred by the one-shot entropy gradient"
    Params = SupSupParams
    params: SupSupParams
    state_roles: ClassVar[dict[str, str]] = {MASK: MASK_ROLE}

    def __init__(self, params: SupSupParams | None = None) -> None:
        super().__init__(params)
        self._scores: dict[str, Tensor] = {}
        self._scored: ScoredMasks | None = None

    @property  # type: ignore[override]
    def scenarios(self) -> tuple[str, ...]:
        """Task given: one head per task; task inferred: one shared head (over all classes, or
        over one domain's classes)."""
        return ("task",) if self.params.infer_task == "never" else ("class", "domain")

    def finished(self) -> list[int]:
        return list(self.extra.get("tasks", []))

    def masked(self, model: Model, head: str) -> list[str]:
        """The linear and conv weights a head uses (the trunk's and the head's own)."""
        below = model.nodes_below(head)
        return [n for n, p in model.named_parameters().items()
                if n.endswith(".weight") and p.dim() >= 2 and n.rsplit(".", 1)[0] in below]

    # ---- hooks -----------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        if self.params.weights == "signed_constant" and not self.extra.get("signed"):
            _signed_constant(ctx.model)
            self.extra["signed"] = True
        gen = torch.Generator().manual_seed(ctx.seed)
        params = ctx.model.named_parameters()
        self._scores = {}
        for n in self.masked(ctx.model, ctx.head_of(ctx.task)):
            score = torch.empty(params[n].shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(score, a=math.sqrt(5), generator=gen)
            self._scores[n] = score.to(params[n].device).requires_grad_()
        tops = {n: TopK(s.detach(), self.params.keep) for n, s in self._scores.items()}
        self._scored = ScoredMasks(
            self._scores, lambda n, s, out: tops[n](s, out),
            score_optimizer(list(self._scores.values()), self.params.score_optimizer,
                            self.params.score_lr),
            magnitude=True)

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        """Only the masked weights take gradients (moved to their scores); BatchNorm in eval
        mode; the parameters hold W * mask during the fit."""
        params = ctx.model.named_parameters()
        grads = {n: p.requires_grad for n, p in params.items()}
        norms = [(m, m.training) for m in batchnorms(ctx.model)]
        try:
            for n, p in params.items():
                p.requires_grad_(n in self._scores)
            for m, _ in norms:
                m.eval()
            with ExitStack() as stack:
                if self._scored is not None:
                    stack.enter_context(self._scored.applied(params))
                yield
        finally:
            for n, p in params.items():
                p.requires_grad_(grads[n])
            for m, mode in norms:
                m.train(mode)

    def after_backward(self, ctx: Context) -> None:
        if self._scored is not None:
            self._scored.move_grads()

    def after_step(self, ctx: Context) -> None:
        if self._scored is not None:
            self._scored.step()

    def after_task(self, ctx: Context) -> None:
        k = ctx.task.index
        if self._scored is not None:
            for n, m in self._scored.binary().items():
                self.state[state_key(MASK, k, n)] = m
        self.extra["tasks"] = [*self.finished(), k]
        self._scores, self._scored = {}, None

    # ---- evaluation ------------------------------------------------------------------------
    @contextmanager
    def evaluation(self, ctx: Context, task: Task) -> Iterator[Scorer]:
        head = ctx.model.head(ctx.head_of(task))
        finished = self.finished()
        if self.params.infer_task != "never" and finished:
            inferred = [0, 0]
            try:
                yield self._inferring(ctx, head, task, inferred)
            finally:
                self.extra.setdefault("task_inference", {})[str(task.index)] = \
                    inferred[0] / max(inferred[1], 1)
            return
        values = {}
        if task.index in finished:
            params = ctx.model.named_parameters()
            values = {n: params[n].detach() * m.to(params[n].device)
                      for n, m in stored(self.state, MASK, task.index).items()}
        with swapped(dict(ctx.model.module.state_dict(keep_vars=True)), values):
            yield head

    def _inferring(self, ctx: Context, head: torch.nn.Module, task: Task,
                   inferred: list[int]) -> Scorer:
        """A scorer that infers each batch's (or input's) task, then scores it with that
        task's mask; `inferred` counts the inputs whose task was right and all inputs."""
        tasks = self.finished()
        params = ctx.model.named_parameters()
        names = list(stored(self.state, MASK, tasks[0]))
        weights = {n: params[n].detach() for n in names}
        masks = {n: torch.stack([self.state[state_key(MASK, k, n)] for k in tasks])
                 .to(weights[n]) for n in names}

        def score(x: Tensor) -> Tensor:
            pick = infer_task(head, weights, masks, x, per_example=
                              self.params.infer_task == "example")
            out = None
            for i in pick.unique().tolist():
                rows = pick == i
                logits = torch.func.functional_call(
                    head, {n: weights[n] * masks[n][i] for n in names}, (x[rows],))
                if out is None:
                    out = logits.new_empty(len(x), logits.shape[1])
                out[rows] = logits
            inferred[0] += int((torch.tensor(tasks, device=pick.device)[pick]
                                == task.index).sum())
            inferred[1] += len(x)
            assert out is not None
            return out

        return score

    # ---- state and size --------------------------------------------------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        return {MASK: TensorSpec("tasks", "same", "bool")}

    def check_state(self, tensors: Any, extra: Any, graph_tensors: Any, finished: int
                    ) -> list[str]:
        problems = super().check_state(tensors, extra, graph_tensors, finished)
        if extra.get("tasks", []) != list(range(finished)):
            problems.append(f"extra 'tasks' is {extra.get('tasks')!r}, expected the "
                            f"{finished} finished tasks {list(range(finished))}")
        return problems

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """The fixed weights and heads, plus one bit per masked weight and task."""
        parts = super().size_parts(model)
        parts["masks"] = [Stored(t.numel(), 1, parameters=False)
                          for k, t in self.state.items() if k.startswith(f"{MASK}/")]
        return parts

    def run_report(self) -> dict[str, Any]:
        """With the task inferred: each task's rate of correctly inferred tasks."""
        rates = self.extra.get("task_inference")
        return {"details": {"supsup": {"task_inference": rates}}} if rates else {}


def infer_task(head: torch.nn.Module, weights: dict[str, Tensor], masks: dict[str, Tensor],
               x: Tensor, per_example: bool) -> Tensor:
    """SupSup's one-shot task inference: the index i (into the masks' first dim) minimising
    d H / d alpha_i at alpha = 1/k, H the entropy of the softmax of the network run with
    weights W * sum_i alpha_i mask_i; per input, or one index for the whole batch (the
    gradient of the batch's summed entropy)."""
    k = next(iter(masks.values())).shape[0]

    def entropies(alpha: Tensor) -> Tensor:
        superposed = {n: weights[n] * torch.tensordot(alpha, masks[n], dims=1)
                      for n in weights}
        logp = F.log_softmax(torch.func.functional_call(head, superposed, (x,)), dim=1)
        return -(logp.exp() * logp).sum(1)

    alpha = torch.full((k,), 1.0 / k, device=x.device, dtype=next(iter(weights.values())).dtype)
    grads = torch.func.jacfwd(entropies)(alpha)  # (inputs, k)
    if per_example:
        return grads.argmin(1)
    return grads.sum(0).argmin().expand(len(x))


@torch.no_grad()
def _signed_constant(model: Model) -> None:
    """Every linear and conv weight <- sign(w) * sqrt(2 / fan_in); their biases <- 0."""
    for module in model.module.children():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or weight is None:
            continue
        fan_in = torch.nn.init._calculate_fan_in_and_fan_out(weight)[0]
        weight.copy_(torch.sign(weight) * math.sqrt(2.0 / fan_in))
        if module.bias is not None:
            module.bias.zero_()
