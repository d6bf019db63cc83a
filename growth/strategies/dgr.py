"""Deep generative replay (Shin et al. 2017) and generative negative replay (Graffieti et al.
2023).

The generator is a small VAE built as two graphs (growth.graph): an encoder x -> hidden ->
("mu", "logvar") and a decoder z -> hidden -> pixel logits, trained through the one loop
(`fit` with the evidence bound as its `loss` hook). After each task it goes on training on the
task's data plus its own replays: loss = (1/t) ELBO(current) + (1 - 1/t) ELBO(x~), x~ drawn
from a frozen copy of the generator as it was before the task (t = tasks so far). The solver
trains on (1/t) CE(current batch) + (1 - 1/t) L(replay), the replayed batch (as large as the
current one) drawn from the generator and labelled by a frozen copy of the previous solver:
`targets: hard` takes its argmax over the old classes (cross-entropy), `soft` distils its old
classes' outputs at `temperature` (KD, T^2-scaled). Task-incremental: the replay is scored
through every old head and averaged over them.

Negative variant (`dgr_negative`, class-incremental only; the project's reading of the paper
on this engine): the old classes' outputs are detached in both losses, so after its task an
old class's output is trained by nothing (as CWR* consolidates old output units), generated
samples only push the other classes' outputs down on old-looking inputs (negatives for the new
classes, never positives for old ones: their labels do not matter), and the current data
raises its classes above the old ones. Generated samples are not stored; the VAE's parameters
are reported as memory (`generator_params`, `bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from growth.compile import compile_graph
from growth.data.sampling import generator
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies.base import Context, Strategy, StrategyParams
from growth.strategies.lwf import old_outputs
from growth.strategies.spec import TensorSpec

PARTS = ("encoder", "decoder")


class DGRParams(StrategyParams):
    """Generative replay settings: a VAE with hidden layers [200, 200] and a 16-d latent,
    trained 50 epochs per task with Adam (lr 1e-3, batch 64); replays labelled with soft
    targets (T = 2)."""

    hidden: list[int] = Field(default_factory=lambda: [200, 200], min_length=1,
                              description="widths of the VAE's hidden layers")
    latent: int = Field(16, ge=1, description="VAE latent dimension")
    gen_epochs: int = Field(50, ge=1, description="generator epochs per task")
    gen_lr: float = Field(1e-3, gt=0, description="generator learning rate (Adam)")
    gen_batch: int = Field(64, ge=1, description="generator batch size")
    targets: Literal["hard", "soft"] = Field("soft", description="how the old solver labels")
    temperature: float = Field(2.0, gt=0, description="soft targets' temperature")


def vae_graphs(shape: tuple[int, ...], hidden: list[int], latent: int) -> tuple[NetGraph,
                                                                                 NetGraph]:
    """Encoder x -> ("mu", "logvar") and decoder z -> "pixels" (logits of every input value)."""
    enc = NetGraph()
    src = enc.add_input("x", shape)
    if len(shape) > 1:
        src = enc.add("flatten", "flatten", [src])
    for i, width in enumerate(hidden, start=1):
        src = enc.add(f"act{i}", "relu", [enc.add(f"fc{i}", "linear", [src], out_features=width)])
    for head in ("mu", "logvar"):
        enc.add_output(head, enc.add(f"head_{head}", "linear", [src], out_features=latent))
    dec = NetGraph()
    src = dec.add_input("z", (latent,))
    for i, width in enumerate(reversed(hidden), start=1):
        src = dec.add(f"act{i}", "relu", [dec.add(f"fc{i}", "linear", [src], out_features=width)])
    dec.add_output("pixels", dec.add("out", "linear", [src], out_features=math.prod(shape)))
    return enc, dec


def elbo_loss(x: Tensor, mu: Tensor, logvar: Tensor, decoder: nn.Module,
              gen: torch.Generator) -> Tensor:
    """Negative evidence lower bound per sample (Bernoulli pixels, Gaussian posterior)."""
    eps = torch.randn(mu.shape, generator=gen).to(mu)
    pixels = decoder(mu + torch.exp(0.5 * logvar) * eps)
    recon = F.binary_cross_entropy_with_logits(pixels, x.flatten(1), reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp())
    return (recon + kl) / len(x)


@torch.no_grad()
def sample(decoder: nn.Module, n: int, latent: int, shape: tuple[int, ...],
           gen: torch.Generator, device: torch.device) -> Tensor:
    """n generated inputs in [0, 1], shaped like the data."""
    z = torch.randn(n, latent, generator=gen).to(device)
    return torch.sigmoid(decoder(z)).view(n, *shape)


class _VAETrainer(Strategy):
    """The generator's training as a strategy of the one loop: its loss is the evidence bound
    on the batch, plus that of replays from the previous generator."""

    name = "vae_training"
    fitting = "DGR's generator"  # named by the loop if the fit diverges, with this advice
    diverged_advice = "lower strategy.gen_lr"

    def __init__(self, decoder: nn.Module, previous: nn.Module | None, current_weight: float,
                 latent: int, gen: torch.Generator) -> None:
        super().__init__()
        self.decoder, self.previous, self.w = decoder, previous, current_weight
        self.latent, self.gen = latent, gen

    def extra_heads(self, ctx: Context) -> list[str]:
        return ["logvar"]

    def loss(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        out = ctx.outputs
        total = elbo_loss(x, out["mu"], out["logvar"], self.decoder, self.gen)
        if self.previous is None:
            return total
        replay = sample(self.previous, len(x), self.latent, tuple(x.shape[1:]), self.gen,
                        x.device)
        enc = ctx.model.head(("mu", "logvar"))(replay)
        fake = elbo_loss(replay, enc["mu"], enc["logvar"], self.decoder, self.gen)
        return self.w * total + (1 - self.w) * fake


class DGR(Strategy):
    name = "dgr"
    description = "deep generative replay: a VAE's samples labelled by the previous solver"
    Params = DGRParams
    params: DGRParams
    negative: ClassVar[bool] = False

    def __init__(self, params: DGRParams | None = None) -> None:
        super().__init__(params)
        self.encoder: Model | None = None
        self.decoder: Model | None = None
        self._teacher: nn.Module | None = None
        self._old: dict[str, Tensor] = {}
        self._new = torch.empty(0, dtype=torch.long)
        self.gen = torch.Generator()

    # ---- the generator -------------------------------------------------------------------
    def build_generator(self, ctx: Context) -> None:
        """The VAE for this data: fresh weights drawn from the run's first task seed, or the
        saved ones after a resume."""
        shape = tuple(ctx.task.input_shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            enc, dec = vae_graphs(shape, self.params.hidden, self.params.latent)
        for part, graph in zip(PARTS, (enc, dec)):
            prefix = f"generator/{part}/"
            saved = {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}
            for name in graph.topo_order():
                node = graph.node(name)
                if node.tensors and saved:
                    node.tensors = {k: saved[f"{name}.{k}"] for k in node.tensors}
        self.encoder, self.decoder = Model(enc, ctx.device), Model(dec, ctx.device)
        self.extra["input_shape"] = list(shape)

    def train_generator(self, ctx: Context) -> None:
        from growth.train import TrainConfig, fit  # the loop imports strategies: import late

        t = len(ctx.seen) + 1
        previous = None
        if ctx.seen:
            previous = compile_graph(self.decoder.graph).to(ctx.device).eval()
            previous.requires_grad_(False)
        x, _ = ctx.task.train
        data = dataclasses.replace(ctx.task, train=(x, torch.zeros(len(x), dtype=torch.long)))
        vae_ctx = Context(self.encoder, data, [], lambda task: "mu", lambda task, y: y,
                          ctx.device, seed=ctx.seed)
        gen = generator(ctx.seed, "generator", ctx.task.index)
        trainer = _VAETrainer(self.decoder.module, previous, 1.0 / t, self.params.latent, gen)
        cfg = TrainConfig(epochs=self.params.gen_epochs, batch_size=self.params.gen_batch,
                          optimizer="adam", lr=self.params.gen_lr)
        params = [*self.encoder.module.parameters(), *self.decoder.module.parameters()]
        fit(vae_ctx, trainer, cfg, seed=ctx.seed, params=params)
        for part, model in zip(PARTS, (self.encoder, self.decoder)):
            for name, tensor in model.module.state_dict().items():
                self.state[f"generator/{part}/{name}"] = tensor.detach().cpu().clone()

    # ---- hooks ---------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        if self.encoder is None:
            self.build_generator(ctx)
        self.gen = generator(ctx.seed, self.name, "replay", ctx.task.index)
        self._old = old_outputs(ctx)
        self._new = ctx.label_of(ctx.task, torch.arange(ctx.task.n_classes)).to(ctx.device)
        self._teacher = None
        if self._old:
            teacher = compile_graph(ctx.model.graph, head=list(self._old)).to(ctx.device)
            self._teacher = teacher.eval().requires_grad_(False)

    def loss(self, ctx: Context, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        if self.negative:  # old classes' outputs stay as their tasks left them
            logits = self.freeze_old(logits)
        current = F.cross_entropy(logits, y)
        if self._teacher is None:
            return current
        w = 1.0 / (len(ctx.seen) + 1)
        return w * current + (1 - w) * self.replay_loss(ctx, len(x), tuple(x.shape[1:]))

    def replay_loss(self, ctx: Context, n: int, shape: tuple[int, ...]) -> Tensor:
        """The solver's loss on n generated samples labelled by the previous solver."""
        fake = sample(self.decoder.module, n, self.params.latent, shape, self.gen, ctx.device)
        with torch.no_grad():
            teacher = self._teacher(fake)
        student = ctx.model.head(tuple(self._old))(fake)  # a dict, as the teacher's
        losses = [self.head_loss(student[h], teacher[h], cols) for h, cols in self._old.items()]
        return sum(losses) / len(losses)

    def head_loss(self, student: Tensor, teacher: Tensor, cols: Tensor) -> Tensor:
        """One head's replay loss: cross-entropy of the student's outputs (all the head's
        columns) to the previous solver's labels over the old columns `cols` (zero elsewhere,
        so other classes are pushed down): its argmax (hard) or its softmax at temperature T
        (soft, T^2-scaled). Negative variant: the old columns are detached, so the labels do
        not matter: the other columns are pushed down (T = 1)."""
        soft = self.params.targets == "soft" and not self.negative
        t = self.params.temperature if soft else 1.0
        target = torch.zeros_like(student)
        target[:, cols] = (F.softmax(teacher[:, cols] / t, dim=1) if soft
                           else F.one_hot(teacher[:, cols].argmax(1), len(cols)).to(student))
        if self.negative:
            student = self.freeze_old(student)
        return -(target * F.log_softmax(student / t, dim=1)).sum(1).mean() * (t * t)

    def freeze_old(self, logits: Tensor) -> Tensor:
        """The old classes' columns detached: no gradient reaches them (class-incremental)."""
        old = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        for cols in self._old.values():
            old[cols] = True
        return torch.where(old, logits.detach(), logits)

    def after_task(self, ctx: Context) -> None:
        self.train_generator(ctx)

    # ---- state ---------------------------------------------------------------------------
    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        super().load_state_dict(tensors, extra)
        self.encoder = self.decoder = None  # rebuilt from the state at the next task start

    def state_spec(self) -> dict[str, TensorSpec]:
        return {"generator": TensorSpec(slots=PARTS, shape="any", parameter=False)}

    def memory_report(self) -> dict[str, int]:
        gen = [t for k, t in self.state.items() if k.startswith("generator/")]
        params = [t for k, t in self.state.items() if k.startswith("generator/")
                  and k.rsplit(".", 1)[-1] in ("weight", "bias")]
        return {"samples": 0, "bytes": sum(t.numel() * t.element_size() for t in gen),
                "generator_params": sum(t.numel() for t in params)}


class DGRNegative(DGR):
    name = "dgr_negative"
    description = "generative negative replay: generated samples only as negatives for new classes"
    scenarios = ("class",)
    negative = True
