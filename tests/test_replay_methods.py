"""iCaRL, GDumb, latent replay and generative replay checked against hand computations."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from growth.search_spaces.networks import add_head
from growth.search_spaces.networks import mlp as mlp_trunk
from runfiles import kill_after_first_checkpoint
from safetensors.torch import load, save
from test_campaign import run, write_config
from test_strategies import class_incremental, context, make_task, mlp, perturb, synthetic

from growth import train as train_module
from growth.campaign import Campaign, resume_run
from growth.cli import main
from growth.compile import compile_graph
from growth.config import load_config
from growth.data.containers import Task
from growth.data.sampling import generator
from growth.data.streaming import ImageFiles
from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import Context, make_strategy
from growth.strategies import dgr as dgr_module
from growth.strategies.dgr import _VAETrainer, elbo_loss, sample, vae_graphs
from growth.strategies.icarl import NOT_NEW
from growth.strategies.rehearsal import join_by_head
from growth.train import TrainConfig, evaluate, learn_task

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


def learn(s, tasks, model, upto, single_head=False, start=0):
    for i in range(start, upto):
        learn_task(context(model, tasks, i, single_head), s, CFG, seed=i)
    return s


# ---- iCaRL ---------------------------------------------------------------------------------
def identity_features_model() -> Model:
    """x (2-d) -> "features" (identity) -> a linear head: features are the inputs."""
    torch.manual_seed(0)
    g = NetGraph()
    g.add_input("x", [2])
    g.add("features", "identity", ["x"])
    g.add("head", "linear", ["features"], out_features=2)
    g.add_output("out0", "head")
    return Model(g)


def test_icarl_classifies_by_the_nearest_mean_of_normalised_exemplars():
    model = identity_features_model()
    ex = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 2.0], [-0.6, 0.8], [1.8, 2.4]])
    ey = torch.tensor([0, 0, 1, 1, 1])
    points = torch.tensor([[3.0, 1.0], [0.4, 1.0], [-0.2, 3.0], [1.0, 0.9], [0.2, 0.1],
                           [1.0, 1.2], [3.0, 4.3], [1.469, 2.023], [1.6, 1.9]])

    def nearest(p: torch.Tensor, means: list[torch.Tensor]) -> int:
        return min((0, 1), key=lambda c: float((p - means[c]).norm()))

    # by hand: each class's mean of its unit exemplars, normalised; the unit point's nearest
    unit = [ex[i] / ex[i].norm() for i in range(5)]
    means = [(unit[0] + unit[1]) / 2, (unit[2] + unit[3] + unit[4]) / 3]
    expect = [nearest(p / p.norm(), [m / m.norm() for m in means]) for p in points]
    task = Task(0, "t0", (ex, ey), (ex, ey), (points, torch.tensor(expect)), [0, 1], 2, 0, (2,))
    ctx = Context(model, task, [], lambda t: "out0", lambda t, y: y, torch.device("cpu"))
    s = make_strategy("icarl", {"memory": 10})
    s.memory.reservoir(ex, ey, 0, torch.Generator())
    assert evaluate(ctx, task, strategy=s) == 1.0
    labels, got = s.class_means(ctx, "out0")  # each class's mean scaled to unit length
    assert labels.tolist() == [0, 1]
    assert torch.allclose(got, torch.stack([m / m.norm() for m in means]), atol=1e-6)
    # the head, unnormalised means, or raw exemplar means would score these points otherwise
    assert model.head("out0")(points).argmax(1).tolist() != expect
    assert [nearest(p / p.norm(), means) for p in points] != expect
    raw = [ex[ey == c].mean(0) for c in (0, 1)]  # exemplars not normalised before the mean
    assert [nearest(p / p.norm(), [m / m.norm() for m in raw]) for p in points] != expect
    assert [nearest(p, [ex[ey == c].mean(0) for c in (0, 1)]) for p in points] != expect


def test_icarl_scores_a_head_without_exemplars_by_its_outputs():
    tasks, model = class_incremental(2), mlp(n_heads=1, classes=4)
    s = make_strategy("icarl", {"memory": 20})
    ctx = context(model, tasks, 0, single_head=True)
    plain = evaluate(ctx, tasks[0])
    assert evaluate(ctx, tasks[0], strategy=s) == plain


def test_icarl_loss_is_bce_on_new_classes_plus_distillation_of_old_ones():
    tasks = class_incremental(2)
    model = mlp(n_heads=1, classes=4)
    s = learn(make_strategy("icarl", {"memory": 20}), tasks, model, 1, single_head=True)
    old = {k: v.clone() for k, v in model.module.state_dict().items()}
    ctx = context(model, tasks, 1, single_head=True)
    s.before_task(ctx)
    perturb(model, 3)
    x, y = tasks[1].train[0][:6], tasks[1].train[1][:6] + 2
    y[0] = 1  # an exemplar of an old class in the batch
    logits = model.head("out0")(x)
    got = s.loss(ctx, x, y, logits)
    teacher = mlp(n_heads=1, classes=4)
    teacher.module.load_state_dict(old)
    q = torch.sigmoid(teacher.head("out0")(x)).detach()
    p = torch.sigmoid(logits).detach()
    total = 0.0
    for i in range(6):
        for c in (2, 3):  # new classes: one-hot targets
            t = float(y[i] == c)
            total -= t * math.log(p[i, c]) + (1 - t) * math.log(1 - p[i, c])
        for c in (0, 1):  # old classes: the previous model's sigmoid
            total -= q[i, c] * math.log(p[i, c]) + (1 - q[i, c]) * math.log(1 - p[i, c])
    assert float(got.detach()) == pytest.approx(float(total) / 6, rel=1e-5)


def test_icarl_distils_from_the_forward_pass_that_gave_the_logits():
    """The old classes' outputs are the loop's own forward pass (ctx.outputs): a second pass
    of the batch would move BatchNorm's running statistics twice per step."""
    tasks = class_incremental(2)
    torch.manual_seed(0)
    model = Model(add_head(mlp_trunk((1, 4, 4), [8], batchnorm=True), "out0", 4))
    s = learn(make_strategy("icarl", {"memory": 6}), tasks, model, 1, single_head=True)
    bn = dict(model.module.named_buffers())
    tracked = {k: v for k, v in bn.items() if k.endswith("num_batches_tracked")}
    assert len(tracked) == 1
    [(name, before)] = [(k, int(v)) for k, v in tracked.items()]
    joined = len(tasks[1].train[1]) + len(s.memory)  # the task's samples and every exemplar
    learn(s, tasks, model, 2, single_head=True, start=1)
    steps = CFG.epochs * math.ceil(joined / CFG.batch_size)
    assert int(dict(model.module.named_buffers())[name]) - before == steps


def test_icarl_keeps_m_herded_exemplars_per_class_and_cuts_old_classes_to_their_first_m():
    tasks = class_incremental(3, classes=2)
    model = mlp(n_heads=1, classes=6)
    s = learn(make_strategy("icarl", {"memory": 13}), tasks, model, 1, single_head=True)
    first = {c: s.memory.x[s.memory.y == c].clone() for c in (0, 1)}
    assert [int((s.memory.y == c).sum()) for c in (0, 1)] == [6, 6]  # 13 // 2
    learn(s, tasks, model, 2, single_head=True, start=1)
    assert [int((s.memory.y == c).sum()) for c in range(4)] == [3, 3, 3, 3]  # 13 // 4
    for c in (0, 1):
        assert torch.equal(s.memory.x[s.memory.y == c], first[c][:3])


def test_icarl_trains_on_the_task_joined_by_its_exemplars():
    tasks = synthetic(2)
    model = mlp(n_heads=2)
    s = learn(make_strategy("icarl", {"memory": 8}), tasks, model, 1)
    ctx = context(model, tasks, 1)
    (joined,) = s.train_sets(ctx)
    x, y = tasks[1].train
    assert torch.equal(joined.train[0], torch.cat([x, s.memory.x]))
    assert joined.train[1].tolist() == [*y.tolist(), *[NOT_NEW] * 8]  # another head's rows
    tasks = class_incremental(2)  # one head: labels in its space, exemplars keep theirs
    model = mlp(n_heads=1, classes=4)
    s = make_strategy("icarl", {"memory": 8})
    s.memory.reservoir(*(t[:8] for t in tasks[0].train), 0, torch.Generator())
    (joined,) = s.train_sets(context(model, tasks, 1, single_head=True))
    x, y = tasks[1].train
    assert tasks[1].class_offset == 2 and joined.class_offset == 0  # not added again
    assert joined.train[1].tolist() == [*(y + 2).tolist(), *s.memory.y.tolist()]
    files = ImageFiles([f"{i}.png" for i in range(len(y))], 4)  # never read
    lazy = dataclasses.replace(tasks[1], train=(files, y))
    with pytest.raises(ConfigError, match="data.load"):
        s.train_sets(Context(model, lazy, [tasks[0]], lambda t: "out0",
                             lambda t, y: y + t.class_offset, torch.device("cpu")))


# ---- GDumb ---------------------------------------------------------------------------------
def test_gdumb_memory_is_class_balanced():
    tasks = class_incremental(3, classes=2)
    model = mlp(n_heads=1, classes=6)
    s = make_strategy("gdumb", {"memory": 25})
    for i in range(3):
        learn(s, tasks, model, i + 1, single_head=True, start=i)
        counts = torch.bincount(s.memory.y, minlength=2 * (i + 1))
        assert int(counts.max() - counts.min()) <= 1, counts
    assert len(s.memory) == 25


def test_gdumb_trains_from_scratch_on_the_memory_alone():
    tasks = class_incremental(2)
    final = []
    for init in (0, 7):  # two different starting networks and histories
        model = mlp(n_heads=1, classes=4, seed=init)
        s = make_strategy("gdumb", {"memory": 1000})
        learn(s, tasks, model, 2, single_head=True)
        final.append(model.module.state_dict())
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k
    ctx = context(model, tasks, 1, single_head=True)
    (memory,) = s.train_sets(ctx)  # one head: one set mixing every class
    assert len(memory.train[1]) == sum(len(t.train[1]) for t in tasks)
    assert sorted(memory.train[1].unique().tolist()) == [0, 1, 2, 3]


def test_gdumb_starts_each_task_from_fresh_weights_drawn_from_the_tasks_seed():
    """Before training, every layer holds what torch's own layer draws, in the network's
    order, from a generator seeded with the task's seed; the global generator is untouched."""
    tasks = class_incremental(2)
    for seed in (3, 11):
        model = mlp(n_heads=1, classes=4, seed=5)
        ctx = context(model, tasks, 1, single_head=True)
        ctx.seed = seed
        torch.manual_seed(0)
        state = torch.get_rng_state()
        make_strategy("gdumb", {"memory": 10}).before_task(ctx)
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(seed)  # by hand: fc1 16 -> 12, features 12 -> 12, head0 12 -> 4
        want = {"fc1": torch.nn.Linear(16, 12), "features": torch.nn.Linear(12, 12),
                "head0": torch.nn.Linear(12, 4)}
        params = model.named_parameters()
        assert len(params) == 2 * len(want)
        for node, layer in want.items():
            for key, value in layer.state_dict().items():
                assert torch.equal(params[f"{node}.{key}"].detach(), value), (seed, node, key)


def test_gdumb_offers_each_tasks_stream_to_the_balanced_memory_with_the_tasks_draws():
    """The memory after each task is what greedy balanced insertion keeps of the task's samples
    offered in its seeded stream order, its evictions drawn from the task's own "balanced"
    stream (not a shared or unnamed one): a memory of 10 filled by hand through the same
    insertion, one class per label of the single head."""
    from growth.data.sampling import generator
    from growth.memory import EpisodicMemory

    tasks = class_incremental(2)
    model = mlp(n_heads=1, classes=4)
    s = make_strategy("gdumb", {"memory": 10})
    by_hand = EpisodicMemory(10)
    for i, seed in enumerate((3, 8)):
        ctx = context(model, tasks, i, single_head=True)
        ctx.seed = seed
        s.before_task(ctx)
        x, y = tasks[i].train
        order = torch.randperm(len(y), generator=generator(seed, "stream", i))
        by_hand.balanced(x[order], y[order] + 2 * i, i, lambda t, y: y,
                         generator(seed, "balanced", i))
        assert torch.equal(s.memory.x, by_hand.x) and torch.equal(s.memory.y, by_hand.y), i
        assert torch.equal(s.memory.task, by_hand.task), i
    other = EpisodicMemory(10)  # the draws matter: another stream keeps other samples
    x, y = tasks[0].train
    order = torch.randperm(len(y), generator=generator(3, "stream", 0))
    other.balanced(x[order], y[order], 0, lambda t, y: y, generator(3, "balanced", 1))
    reference = EpisodicMemory(10)
    reference.balanced(x[order], y[order], 0, lambda t, y: y, generator(3, "balanced", 0))
    assert not torch.equal(other.x, reference.x)


# ---- latent replay -------------------------------------------------------------------------
def test_latent_replay_stores_activations_and_freezes_the_layers_below():
    tasks = synthetic(3)
    model = mlp()
    s = make_strategy("latent_replay", {"layer": "r1", "memory": 500})
    start = model.module.fc1.weight.detach().clone()
    learn(s, tasks, model, 1)
    assert not torch.equal(model.module.fc1.weight, start)  # nothing frozen on the first task
    x, _ = tasks[0].train
    with torch.no_grad():
        acts = torch.relu(model.module.fc1(x.flatten(1)))  # the activations, by hand
    got = {tuple(a.tolist()) for a in s.memory.x}
    assert got == {tuple(a.tolist()) for a in acts} and len(s.memory) == len(x)
    below = {n: p.detach().clone() for n, p in model.named_parameters().items()
             if n.startswith("fc1")}
    above = model.module.features.weight.detach().clone()
    learn(s, tasks, model, 2, start=1)
    for n, p in below.items():
        assert torch.equal(model.named_parameters()[n], p), n
    assert not torch.equal(model.module.features.weight, above)


def test_latent_replay_freezes_nested_parameters_below_its_layer():
    """A ViT's attention holds its parameters one module down (block1_attn.qkv.weight): every
    parameter of a node below the layer is frozen, nested or not, and none above it."""
    from growth.search_spaces.networks import add_head, vit

    model = Model(add_head(add_head(vit((1, 8, 8)), "out0", 3), "out1", 3))
    tasks = [make_task(i, torch.randn(8, 1, 8, 8), torch.arange(8) % 3, 3) for i in (0, 1)]
    s = make_strategy("latent_replay", {"layer": "block1_add2"})
    s.before_task(context(model, tasks, 1))
    frozen = {n for n, p in model.named_parameters().items() if not p.requires_grad}
    below = ("patch.", "cls.", "pos.", "block1_")  # the nodes up to the end of block 1
    assert "block1_attn.qkv.weight" in frozen
    assert frozen == {n for n in model.named_parameters() if n.startswith(below)}


def test_latent_replay_sends_replayed_activations_through_the_layers_above_only():
    tasks = synthetic(3)
    model = mlp()
    s = make_strategy("latent_replay", {"layer": "r1", "memory": 30, "replay_batch": 7})
    learn(s, tasks, model, 2)
    ctx = context(model, tasks, 2)
    s.before_task(ctx)
    state = s.gen.get_state()
    got = s.penalty(ctx, None, None, None)
    s.gen.set_state(state)
    a, y, t = s.memory.batch(torch.randperm(30, generator=s.gen)[:7])  # the draw, made again
    assert len(y) == 7
    m = model.module
    loss = sum(F.cross_entropy(getattr(m, f"head{int(t[i])}")(torch.relu(m.features(a[i:i + 1]))),
                               y[i:i + 1]) for i in range(len(y))) / len(y)
    assert float(got.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)


def test_latent_replay_slowed_layers_get_scaled_gradients():
    tasks = synthetic(2)
    model = mlp()
    s = make_strategy("latent_replay", {"layer": "r1", "lower_lr": 0.25})
    first = context(model, tasks, 0)
    s.before_task(first)
    F.cross_entropy(model.head("out0")(tasks[0].train[0]), tasks[0].train[1]).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters().items()
             if p.grad is not None}
    s.after_backward(first)  # the first task trains every layer at the full rate
    for n, p in model.named_parameters().items():
        if n in plain:
            assert torch.equal(p.grad, plain[n]), n
    learn(s, tasks, model, 1)
    ctx = context(model, tasks, 1)
    s.before_task(ctx)
    model.module.zero_grad()
    x, y = tasks[1].train
    F.cross_entropy(model.head("out1")(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters().items()
             if p.grad is not None}
    s.after_backward(ctx)
    for n, p in model.named_parameters().items():
        if n in plain:
            factor = 0.25 if n.startswith("fc1") else 1.0
            torch.testing.assert_close(p.grad, factor * plain[n])


def test_latent_replay_layer_errors_name_the_setting():
    tasks, model = synthetic(2), mlp()
    s = make_strategy("latent_replay", {"layer": "nope"})
    with pytest.raises(ConfigError, match="strategy.layer.*nope"):
        s.before_task(context(model, tasks, 0))
    g = NetGraph()  # a skip connection around "a": it does not cut the network
    g.add_input("x", [4])
    g.add("a", "linear", ["x"], out_features=4)
    g.add("b", "add", ["a", "x"])
    g.add("head0", "linear", ["b"], out_features=2)
    g.add_output("out0", "head0")
    skip = Model(g)
    task = make_task(0, torch.randn(8, 4), torch.randint(0, 2, (8,)), 2)
    ctx = Context(skip, task, [], lambda t: "out0", lambda t, y: y, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not cut"):
        make_strategy("latent_replay", {"layer": "a"}).before_task(ctx)


# ---- generative replay ---------------------------------------------------------------------
SMALL_VAE = {"hidden": [16], "latent": 4, "gen_epochs": 2, "gen_batch": 16}


def test_dgr_counts_its_generator_as_memory():
    tasks, model = synthetic(2), mlp()
    s = learn(make_strategy("dgr", SMALL_VAE), tasks, model, 1)
    # encoder 16->16, 16->4 twice; decoder 4->16, 16->16 (pixels of a 1x4x4 input)
    params = (16 * 16 + 16) + 2 * (16 * 4 + 4) + (4 * 16 + 16) + (16 * 16 + 16)
    assert s.memory_report() == {"samples": 0, "bytes": params * 4, "generator_params": params}
    # the checkpoint's names: the encoder's layers, its two heads, the decoder's layers
    layers = {"encoder": ["fc1", "head_mu", "head_logvar"], "decoder": ["fc1", "out"]}
    assert set(s.state) == {f"generator/{part}/{node}.{kind}" for part, nodes in layers.items()
                            for node in nodes for kind in ("weight", "bias")}


def test_the_generator_learns_the_tasks_data():
    tasks, model = synthetic(2), mlp()
    gen = torch.Generator().manual_seed(0)
    protos = (torch.rand(3, 1, 4, 4, generator=gen) > 0.5).float()  # data with a structure
    x = (protos[torch.arange(48) % 3] + 0.05 * torch.randn(48, 1, 4, 4, generator=gen)).clamp(0, 1)
    tasks[0] = make_task(0, x, tasks[0].train[1].repeat(2)[:48], 4)
    s = make_strategy("dgr", {**SMALL_VAE, "gen_epochs": 30})
    ctx = context(model, tasks, 0)
    s.before_task(ctx)
    enc, dec = s.encoder.module, s.decoder.module

    def bound() -> float:
        with torch.no_grad():
            mu = enc(x)["mu"]
            return float(F.binary_cross_entropy_with_logits(dec(mu), x.flatten(1),
                                                            reduction="sum") / len(x))
    before = bound()
    s.after_task(ctx)
    assert bound() < 0.9 * before


def test_the_evidence_bound_by_hand():
    """(sum of pixel BCEs + KL(N(mu, exp(logvar)) || N(0, 1))) / batch, z = mu + sigma eps."""
    torch.manual_seed(0)
    decoder = torch.nn.Linear(2, 3)
    x = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.2, 0.0]])
    # the log-variances do not sum to 0: KL's +logvar and -logvar terms then differ
    mu, logvar = torch.tensor([[0.3, -0.2], [1.0, 0.5]]), torch.tensor([[0.1, -0.4], [0.2, 0.3]])
    eps = torch.randn(2, 2, generator=torch.Generator().manual_seed(4))
    got = elbo_loss(x, mu, logvar, decoder, torch.Generator().manual_seed(4))
    p = torch.sigmoid(decoder(mu + torch.exp(logvar / 2) * eps)).detach()
    recon = -(x * p.log() + (1 - x) * (1 - p).log()).sum()
    kl = sum(0.5 * (math.exp(lv) + m * m - 1 - lv) for m, lv in zip(mu.flatten().tolist(),
                                                                   logvar.flatten().tolist()))
    assert float(got.detach()) == pytest.approx((float(recon) + kl) / 2, rel=1e-5)


def test_the_generator_trains_on_its_tasks_weight_of_data_and_the_rest_of_replays():
    """Loss w ELBO(batch) + (1 - w) ELBO(replays of the previous decoder), w = 1/t."""
    tasks, model = synthetic(2), mlp()
    s = make_strategy("dgr", SMALL_VAE)
    s.before_task(context(model, tasks, 0))  # builds the VAE
    enc, dec = s.encoder, s.decoder.module
    previous = compile_graph(s.decoder.graph)  # a copy of the decoder as it was
    perturb(s.decoder, 1)
    x = tasks[1].train[0][:6].clamp(0, 1)
    ctx = Context(enc, tasks[1], [], lambda t: "mu", lambda t, y: y, torch.device("cpu"))
    ctx.outputs = enc.head(("mu", "logvar"))(x)
    trainer = _VAETrainer(dec, previous, 0.25, 4, torch.Generator().manual_seed(2))
    got = trainer.loss(ctx, x, None, None)
    gen = torch.Generator().manual_seed(2)  # the same draws, in the same order
    own = elbo_loss(x, ctx.outputs["mu"], ctx.outputs["logvar"], dec, gen)
    fake = sample(previous, 6, 4, (1, 4, 4), gen, torch.device("cpu"))
    out = enc.head(("mu", "logvar"))(fake)
    replayed = elbo_loss(fake, out["mu"], out["logvar"], dec, gen)
    expect = float((0.25 * own + 0.75 * replayed).detach())
    assert float(got.detach()) == pytest.approx(expect, rel=1e-5)


def replay_setup(name: str, params: dict, single_head: bool):
    tasks = class_incremental(2) if single_head else synthetic(2)
    model = mlp(n_heads=1, classes=4) if single_head else mlp(n_heads=2)
    s = learn(make_strategy(name, {**SMALL_VAE, **params}), tasks, model, 1, single_head)
    ctx = context(model, tasks, 1, single_head)
    s.before_task(ctx)
    perturb(model, 2)
    return s, ctx, model


def replay_by_hand(s, model, n: int, cols: list[int], targets: str, t: float,
                   head: str = "out0", fake: torch.Tensor | None = None) -> torch.Tensor:
    """The replay loss on n samples drawn from the strategy's replay generator as it stands
    (or on `fake`): the old solver's labels over its old columns `cols` of `head`, hard or soft
    at t."""
    if fake is None:
        z = torch.randn(n, 4, generator=s.gen)
        fake = torch.sigmoid(s.decoder.module(z)).view(n, 1, 4, 4)
    teacher = s._teacher(fake)[head][:, cols].detach()
    student = model.head(head)(fake).detach()
    if targets == "hard":
        return F.cross_entropy(student, torch.tensor(cols)[teacher.argmax(1)])
    q = torch.zeros_like(student)
    q[:, cols] = torch.softmax(teacher / t, 1)
    return -(q * torch.log_softmax(student / t, 1)).sum(1).mean() * t * t


@pytest.mark.parametrize("targets", ["hard", "soft"])
@pytest.mark.parametrize("single_head", [False, True])
def test_dgr_replay_is_labelled_by_the_previous_solver(targets, single_head):
    s, ctx, model = replay_setup("dgr", {"targets": targets, "temperature": 3.0}, single_head)
    state = s.gen.get_state()
    got = float(s.replay_loss(ctx, 10, (1, 4, 4)).detach())
    s.gen.set_state(state)
    cols = [0, 1]  # class-incremental: the old task's classes in the shared head
    if not single_head:
        cols = [0, 1, 2, 3]  # task-incremental: the old task's whole head
    expect = replay_by_hand(s, model, 10, cols, targets, 3.0)
    assert got == pytest.approx(float(expect), rel=1e-5)


def test_dgr_averages_the_replay_loss_over_the_old_heads():
    """Third task, task-incremental: the replays are scored through both old heads, averaged."""
    tasks, model = synthetic(3), mlp(n_heads=3)
    s = learn(make_strategy("dgr", SMALL_VAE), tasks, model, 2)
    s.before_task(context(model, tasks, 2))
    perturb(model, 2)
    state = s.gen.get_state()
    got = float(s.replay_loss(context(model, tasks, 2), 10, (1, 4, 4)).detach())
    s.gen.set_state(state)
    z = torch.randn(10, 4, generator=s.gen)
    fake = torch.sigmoid(s.decoder.module(z)).view(10, 1, 4, 4)
    heads = [float(replay_by_hand(s, model, 10, [0, 1, 2, 3], "soft", 2.0, head, fake))
             for head in ("out0", "out1")]
    assert got == pytest.approx(sum(heads) / 2, rel=1e-5)


def test_dgr_weighs_the_current_batch_one_over_the_tasks_so_far_and_replays_the_rest():
    """Second task (t = 2): loss = CE(batch) / 2 + replay loss / 2, the replay as large as the
    batch."""
    s, ctx, model = replay_setup("dgr", {"targets": "hard"}, single_head=False)
    x, y = ctx.task.train[0][:8], ctx.task.train[1][:8]
    logits = model.head("out1")(x)
    state = s.gen.get_state()
    got = float(s.loss(ctx, x, y, logits).detach())
    s.gen.set_state(state)
    replay = replay_by_hand(s, model, 8, [0, 1, 2, 3], "hard", 1.0)
    expect = 0.5 * float(F.cross_entropy(logits, y).detach()) + 0.5 * float(replay)
    assert got == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("name", ["dgr", "dgr_negative"])
def test_generative_replay_draws_from_the_tasks_seed_under_its_own_keys(name, monkeypatch):
    """Replays under `<method>/replay/<task>`, the generator's training under
    `generator/<task>`: each task draws its own streams, and a resumed run the same ones."""
    tasks, model = class_incremental(2), mlp(n_heads=1, classes=4)
    fits: list[tuple[torch.Generator, torch.Tensor]] = []  # each fit's generator, first state

    def first_draws(x, mu, logvar, decoder, gen):
        if not any(g is gen for g, _ in fits):
            fits.append((gen, gen.get_state()))
        return elbo_loss(x, mu, logvar, decoder, gen)

    monkeypatch.setattr(dgr_module, "elbo_loss", first_draws)
    s = make_strategy(name, SMALL_VAE)
    for i in range(2):
        ctx = context(model, tasks, i, single_head=True)
        ctx.seed = 11
        s.before_task(ctx)
        assert torch.equal(s.gen.get_state(), generator(11, name, "replay", i).get_state())
        learn_task(ctx, s, CFG, seed=11)
    assert len(fits) == 2
    for i, (_, state) in enumerate(fits):
        assert torch.equal(state, generator(11, "generator", i).get_state()), i


def test_the_evidence_bound_and_the_samples_follow_the_datas_device():
    """On the meta device (an accelerator's stand-in) the bound's noise and the samples' latent
    codes are moved to the data's device: a CPU tensor beside a meta one fails at once."""
    meta = torch.device("meta")
    decoder = torch.nn.Linear(2, 3).to(meta)
    mu = torch.zeros(4, 2, device=meta)
    got = elbo_loss(torch.zeros(4, 3, device=meta), mu, mu, decoder, torch.Generator())
    assert got.device == meta
    assert sample(decoder, 5, 2, (3,), torch.Generator(), meta).device == meta


def test_the_generator_takes_adam_steps_at_its_own_rate():
    """One epoch of one batch: Adam's first step moves every weight that has a gradient by
    gen_lr (lr g / (|g| + eps)), whatever the gradient's size (SGD would move it lr g)."""
    tasks, model = synthetic(1), mlp()
    s = make_strategy("dgr", {**SMALL_VAE, "gen_epochs": 1, "gen_batch": 64, "gen_lr": 0.01})
    ctx = context(model, tasks, 0)
    s.before_task(ctx)  # builds the VAE
    parts = (s.encoder.module, s.decoder.module)
    before = [p.detach().clone() for part in parts for p in part.parameters()]
    s.after_task(ctx)  # trains it on the task's 36 inputs
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in
                       zip((p for part in parts for p in part.parameters()), before)])
    stepped = moved[moved > 1e-6]
    assert len(stepped) > 0.9 * len(moved)  # units that never fire have no gradient
    torch.testing.assert_close(stepped, torch.full_like(stepped, 0.01), rtol=1e-2, atol=0)


def test_each_generator_fit_runs_on_the_runs_device_and_weighs_its_task_one_over_t(monkeypatch):
    """The fit after task t (1, 2) trains on the run's device, its batches in the order of the
    task's seed, with the task's data weighted 1/t against replays of the generator as it was
    (none after the first task)."""
    fits = []
    real_fit = train_module.fit

    def recorded(ctx, strategy, cfg, **kw):
        if isinstance(strategy, _VAETrainer):
            fits.append((ctx.device, kw.get("seed"), strategy.w, strategy.previous is None))
        return real_fit(ctx, strategy, cfg, **kw)

    monkeypatch.setattr(train_module, "fit", recorded)
    tasks, model, s = synthetic(2), mlp(), make_strategy("dgr", SMALL_VAE)
    for i in range(2):
        ctx = context(model, tasks, i)
        ctx.seed = 7 + i
        learn_task(ctx, s, CFG, seed=7 + i)
    cpu = torch.device("cpu")
    assert fits == [(cpu, 7, 1.0, True), (cpu, 8, 0.5, False)]


def test_dgr_puts_the_previous_solver_on_the_runs_device():
    """On the meta device (an accelerator's stand-in) the previous solver's copy is put there."""
    tasks, model = synthetic(2), mlp()
    s = learn(make_strategy("dgr", SMALL_VAE), tasks, model, 1)
    meta = torch.device("meta")
    s.before_task(dataclasses.replace(context(model, tasks, 1), device=meta))
    assert all(p.device == meta for p in s._teacher.parameters())


def test_dgr_replays_inputs_of_several_channels_shaped_like_the_data():
    """Inputs of 2 x 2 x 4: the solver's and the generator's replays take the data's shape
    (without its batch dimension), not a shape with a channel dropped."""
    gen = torch.Generator().manual_seed(0)
    tasks = [make_task(i, torch.rand(32, 2, 2, 4, generator=gen),
                       torch.randint(0, 4, (32,), generator=gen), 4) for i in range(2)]
    model = mlp(n_heads=2, in_shape=(2, 2, 4))
    s = learn(make_strategy("dgr", SMALL_VAE), tasks, model, 2)  # replays on the second task
    assert sample(s.decoder.module, 3, 4, (2, 2, 4), gen, torch.device("cpu")).shape == \
        (3, 2, 2, 4)


def test_dgr_replays_on_the_runs_device():
    """A run resumed on the meta device (an accelerator's stand-in): the generator is rebuilt
    there from its saved weights, and the replays are drawn there, beside the solver."""
    tasks, model = synthetic(2), mlp()
    s = learn(make_strategy("dgr", SMALL_VAE), tasks, model, 1)
    s.load_state_dict(*s.state_dict())
    meta = torch.device("meta")
    ctx = dataclasses.replace(context(model, tasks, 1), device=meta)
    s.before_task(ctx)
    ctx.model = Model(model.graph, meta)  # the solver there too (a meta one cannot be copied)
    assert s.replay_loss(ctx, 5, (1, 4, 4)).device == meta


def test_the_generators_replays_are_drawn_on_the_datas_device():
    """On the meta device (an accelerator's stand-in) the previous generator's replays are
    drawn beside the batch: a CPU latent code beside a meta decoder fails at once."""
    meta = torch.device("meta")
    enc, dec = vae_graphs((1, 4, 4), [8], 4)
    encoder, decoder = Model(enc, meta), Model(dec, meta)
    x = torch.zeros(6, 1, 4, 4, device=meta)
    ctx = Context(encoder, synthetic(1)[0], [], lambda t: "mu", lambda t, y: y, meta)
    ctx.outputs = encoder.head(("mu", "logvar"))(x)
    previous = compile_graph(dec).to(meta)
    trainer = _VAETrainer(decoder.module, previous, 0.5, 4, torch.Generator())
    assert trainer.loss(ctx, x, None, None).device == meta


def test_the_generator_is_built_on_the_runs_device():
    """The meta device stands in for an accelerator: both parts of the VAE are put there."""
    meta = torch.device("meta")
    ctx = dataclasses.replace(context(mlp(), synthetic(1), 0), device=meta)
    s = make_strategy("dgr", SMALL_VAE)
    s.build_generator(ctx)
    for part in (s.encoder, s.decoder):
        assert part.device == meta
        assert all(p.device == meta for p in part.module.parameters())


def test_negative_replay_trains_only_the_other_classes_outputs():
    s, ctx, model = replay_setup("dgr_negative", {}, single_head=True)
    model.module.zero_grad()
    s.replay_loss(ctx, 10, (1, 4, 4)).backward()
    w = model.module.head0.weight.grad
    assert torch.all(w[:2] == 0) and torch.any(w[2:] != 0)  # old classes 0, 1 untouched
    model.module.zero_grad()
    x, y = ctx.task.train
    logits = model.head("out0")(x[:8])
    s.loss(ctx, x[:8], y[:8] + 2, logits).backward()
    assert torch.all(model.module.head0.weight.grad[:2] == 0)


def test_negative_replay_detaches_the_old_columns_on_the_logits_device():
    """On the meta device (an accelerator's stand-in) the old-column mask is made beside the
    logits: a CPU mask beside meta logits fails at once."""
    s, _, _ = replay_setup("dgr_negative", {}, single_head=True)
    logits = torch.zeros(3, 4, device=torch.device("meta"), requires_grad=True)
    assert s.freeze_old(logits).device == logits.device


def test_negative_replay_is_refused_in_the_task_scenario(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", strategy={"name": "dgr_negative"})
    with pytest.raises(ConfigError, match="dgr_negative.*class"):
        Campaign(load_config(cfg), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["dgr", "dgr_negative"])
def test_a_restored_generative_replay_continues_identically(name):
    tasks = class_incremental(3)
    model_a, model_b = mlp(n_heads=1, classes=6), mlp(n_heads=1, classes=6)
    s = learn(make_strategy(name, SMALL_VAE), tasks, model_a, 2, single_head=True)
    tensors, extra = s.state_dict()
    fresh = make_strategy(name, SMALL_VAE)
    fresh.load_state_dict(load(save({k: v.contiguous() for k, v in tensors.items()})),
                          json.loads(json.dumps(extra)))
    model_b.module.load_state_dict(model_a.module.state_dict())
    learn(s, tasks, model_a, 3, single_head=True, start=2)
    learn(fresh, tasks, model_b, 3, single_head=True, start=2)
    for (n, p), q in zip(model_a.module.named_parameters(), model_b.module.parameters()):
        assert torch.equal(p, q), n
    assert all(torch.equal(s.state[k], fresh.state[k]) for k in s.state)


def test_vae_graphs_shapes():
    enc, dec = vae_graphs((1, 8, 8), [32, 16], 5)
    assert enc.shape("head_mu") == (5,) and enc.shape("head_logvar") == (5,)
    assert dec.shape("out") == (64,)
    enc, dec = vae_graphs((4, 6), [8], 3)  # two-dimensional inputs are flattened too
    assert enc.shape("head_mu") == (3,) and dec.shape("out") == (24,)


# ---- joint, the shared pieces --------------------------------------------------------------
def test_joint_mixes_classes_that_share_a_head():
    tasks = class_incremental(3)
    model = mlp(n_heads=1, classes=6)
    ctx = context(model, tasks, 2, single_head=True)
    (joined,) = join_by_head(ctx, [*ctx.seen, ctx.task])
    assert torch.equal(joined.train[0], torch.cat([t.train[0] for t in tasks]))
    assert joined.train[1].tolist() == [int(v) + t.class_offset for t in tasks
                                        for v in t.train[1]]
    assert (joined.index, joined.class_offset, tasks[2].class_offset) == (2, 0, 4)  # the last
    files = ImageFiles([f"{i}.png" for i in range(len(tasks[1].train[1]))], 4)  # never read
    lazy = [tasks[0], dataclasses.replace(tasks[1], train=(files, tasks[1].train[1]))]
    assert join_by_head(ctx, lazy) == lazy  # images streamed from disk are not joined
    tasks = synthetic(3)
    ctx = context(mlp(), tasks, 2)
    assert join_by_head(ctx, [*ctx.seen, ctx.task]) == [*ctx.seen, ctx.task]


# ---- campaigns -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["icarl", "gdumb", "latent_replay", "dgr"])
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_campaigns_resume_to_the_same_R(tmp_path, name, scenario):
    data = {"dataset": "digits", "stream": "split" if scenario == "class" else "permuted",
            "n_tasks": 5 if scenario == "class" else 3, "max_train_per_task": 80}
    strategy = {"name": name, **({"gen_epochs": 2, "hidden": [32]} if name == "dgr"
                                 else {"memory": 40})}
    cfg = write_config(tmp_path / "c.yaml", scenario=scenario, data=data, train__epochs=2,
                       strategy=strategy, model={"kind": "mlp", "hidden": [32, 32]})
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part)
    for folder in sorted((part / "checkpoints").iterdir())[2:]:
        shutil.rmtree(folder)
    assert resume_run(part)["R"] == full["R"]


@pytest.mark.slow
def test_the_memory_survives_a_kill_and_resume_to_the_same_R(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", scenario="class", train__epochs=8,
                       data={"dataset": "digits", "stream": "split", "n_tasks": 5},
                       strategy={"name": "icarl", "memory": 100})
    out = tmp_path / "killed"
    kill_after_first_checkpoint(cfg, out, last_task=4)
    assert main(["resume", str(out), "--quiet"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    full = run(cfg, tmp_path / "full")
    assert resumed["R"] == full["R"]
    assert resumed["sizes"][-1]["memory_samples"] == 100
