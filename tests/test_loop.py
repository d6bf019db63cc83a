"""The one training loop and evaluation, step by step against hand computations: the penalty
is added to the loss, several training sets are interleaved batch by batch, evaluation scores
labels in the head's space (class offsets), and the loop's optimizer settings are used."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from test_strategies import context, mlp, synthetic

from growth.data.containers import Task
from growth.graph import NetGraph
from growth.model import Model
from growth.strategies import Context, Strategy, make_strategy
from growth.train import TrainConfig, evaluate, fit, learn_task


def linear_model(n_in: int = 3, n_out: int = 2, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    g = NetGraph()
    g.add_input("x", [n_in])
    g.add("fc", "linear", ["x"], out_features=n_out)
    g.add_output("out", "fc")
    return Model(g)


def one_task(x: torch.Tensor, y: torch.Tensor, classes: int, offset: int = 0,
             index: int = 0) -> Task:
    split = (x, y)
    return Task(index, f"t{index}", split, split, split,
                list(range(offset, offset + classes)), classes, offset, tuple(x.shape[1:]))


def ctx_of(model: Model, task: Task, seen: list[Task] | None = None,
           offset_labels: bool = False) -> Context:
    label_of = (lambda t, y: y + t.class_offset) if offset_labels else (lambda t, y: y)
    return Context(model, task, seen or [], lambda t: "out", label_of, torch.device("cpu"))


class Pull(Strategy):
    """A penalty k/2 ||W||^2 on the layer's weight: its gradient is k W."""

    name = "pull"

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def penalty(self, ctx, x, y, logits):
        return 0.5 * self.k * ctx.model.module.fc.weight.square().sum()


def ce_gradients(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean cross-entropy of softmax(W x + b) and its gradients, by the closed form
    (p - onehot(y)) x^T / B."""
    p = torch.softmax(x @ w.T + b, dim=1)
    err = p - F.one_hot(y, w.shape[0]).to(p)
    ce = float(-(p.log().gather(1, y[:, None])).mean())
    return err.T @ x / len(y), err.mean(0), ce


@pytest.mark.parametrize("k", [0.0, 0.7])
def test_one_sgd_step_follows_cross_entropy_plus_the_penalty(k):
    model = linear_model()
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([1, 0, 1])
    task = one_task(x, y, 2)
    cfg = TrainConfig(epochs=1, batch_size=3, lr=0.1, momentum=0.0)
    losses = fit(ctx_of(model, task), Pull(k), cfg)
    gw, gb, ce = ce_gradients(w0, b0, x, y)
    torch.testing.assert_close(model.module.fc.weight.detach(), w0 - 0.1 * (gw + k * w0))
    torch.testing.assert_close(model.module.fc.bias.detach(), b0 - 0.1 * gb)
    assert losses == pytest.approx([ce + 0.5 * k * float(w0.square().sum())], rel=1e-5)


def test_the_epoch_loss_is_the_mean_of_the_batches_losses_and_momentum_is_used():
    model = linear_model(seed=1)
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    task = one_task(x, y, 2)
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.5, momentum=0.5)
    order = torch.randperm(2, generator=torch.Generator().manual_seed(7)).tolist()
    losses = fit(ctx_of(model, task), Strategy(), cfg, seed=7)
    w, b, buf_w, buf_b, seen = w0.clone(), b0.clone(), None, None, []
    for i in order:  # SGD with momentum, batches of one in the loop's seeded order
        gw, gb, ce = ce_gradients(w, b, x[i:i + 1], y[i:i + 1])
        seen.append(ce)
        buf_w = gw if buf_w is None else 0.5 * buf_w + gw
        buf_b = gb if buf_b is None else 0.5 * buf_b + gb
        w, b = w - 0.5 * buf_w, b - 0.5 * buf_b
    torch.testing.assert_close(model.module.fc.weight.detach(), w)
    torch.testing.assert_close(model.module.fc.bias.detach(), b)
    assert losses == pytest.approx([sum(seen) / 2], rel=1e-5)


class HeadLog:
    """Which head computed each forward pass of the model (forward hooks on the heads)."""

    def __init__(self, model: Model, heads: list[str]) -> None:
        self.order: list[str] = []
        self.handles = [getattr(model.module, h).register_forward_hook(
            lambda m, i, o, h=h: self.order.append(h)) for h in heads]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_joint_interleaves_the_batches_of_tasks_with_their_own_heads():
    tasks, model = synthetic(3, n=64), mlp(n_heads=3)  # 48 training samples each
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01)
    log = HeadLog(model, ["head0", "head1", "head2"])
    learn_task(context(model, tasks, 2), make_strategy("joint"), cfg, seed=5)
    log.close()
    per_epoch = 3 * 48 // 8
    assert len(log.order) == 2 * per_epoch
    for e in range(2):
        epoch = log.order[e * per_epoch:(e + 1) * per_epoch]
        assert {h: epoch.count(h) for h in set(epoch)} == {"head0": 6, "head1": 6, "head2": 6}
        switches = sum(a != b for a, b in zip(epoch, epoch[1:]))
        assert switches > 6  # one task after another would switch twice
        assert len(set(epoch[:6])) > 1  # the first six batches are not all one task's


def test_joint_trains_every_seen_tasks_labels_through_its_own_head():
    tasks, model = synthetic(2, n=32), mlp(n_heads=2)
    cfg = TrainConfig(epochs=1, batch_size=24, lr=0.01)
    seen: list[tuple[str, list[int]]] = []
    hooks = [getattr(model.module, h).register_forward_hook(
        lambda m, i, o, h=h: seen.append((h, len(i[0])))) for h in ("head0", "head1")]
    learn_task(context(model, tasks, 1), make_strategy("joint"), cfg, seed=0)
    for h in hooks:
        h.remove()
    assert sorted(seen) == [("head0", 24), ("head1", 24)]


def one_hot_task(classes: list[int], local: list[int], offset: int, index: int) -> Task:
    """Inputs one_hot(class) over 4 inputs, labels local (class - offset)."""
    x = F.one_hot(torch.tensor(classes), 4).float()
    return one_task(x, torch.tensor(local), 2, offset, index)


def identity_head() -> Model:
    """A shared 4-way head computing its input: its prediction is argmax of the input."""
    g = NetGraph()
    g.add_input("x", [4])
    g.add("fc", "linear", ["x"], out_features=4)
    g.add_output("out", "fc")
    model = Model(g)
    with torch.no_grad():
        model.module.fc.weight.copy_(torch.eye(4))
        model.module.fc.bias.zero_()
    return model


def test_evaluate_compares_predictions_with_labels_in_the_heads_space():
    model = identity_head()
    second = one_hot_task([2, 3, 3, 2], [0, 1, 1, 0], offset=2, index=1)  # all right
    assert evaluate(ctx_of(model, second, offset_labels=True), second) == 1.0
    mixed = one_hot_task([2, 0, 3, 1], [0, 0, 1, 1], offset=2, index=1)  # 2 of 4 right
    assert evaluate(ctx_of(model, mixed, offset_labels=True), mixed) == 0.5
    first = one_hot_task([0, 1, 1], [0, 1, 0], offset=0, index=0)  # 2 of 3 right
    assert evaluate(ctx_of(model, first, offset_labels=True), first) == pytest.approx(2 / 3)


def test_evaluate_scores_every_batch_and_restores_the_training_mode():
    model = identity_head()
    classes = [0, 1, 2, 3, 0, 1, 2]
    task = one_task(F.one_hot(torch.tensor(classes), 4).float(),
                    torch.tensor([0, 1, 0, 3, 0, 0, 2]), 4)  # right at 0, 1, 3, 4, 6
    model.train()
    assert evaluate(ctx_of(model, task), task, batch_size=2) == pytest.approx(5 / 7)
    assert model.module.training
    model.eval()
    assert evaluate(ctx_of(model, task), task, "val", batch_size=3) == pytest.approx(5 / 7)
    assert not model.module.training
    model.train()  # a layer a strategy holds in eval mode through a fit stays there
    layer = next(m for m in model.module.modules() if m is not model.module)
    layer.eval()
    evaluate(ctx_of(model, task), task)
    assert model.module.training and not layer.training


def test_evaluate_of_an_empty_split_is_nan():
    model = identity_head()
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    task = Task(0, "t0", empty, empty, empty, [0, 1], 2, 0, (4,))
    assert math.isnan(evaluate(ctx_of(model, task), task))


def test_single_head_training_uses_labels_shifted_by_the_class_offset():
    """Through the loop: a task at offset 2 trains classes 2 and 3 of the shared head."""
    model = identity_head()
    with torch.no_grad():
        model.module.fc.weight.zero_()
    second = one_hot_task([2, 3], [0, 1], offset=2, index=1)
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1.0, momentum=0.0)
    fit(ctx_of(model, second, offset_labels=True), Strategy(), cfg)
    # from zero weights p is uniform: the gradient of the bias is (1/4 - onehot(y + 2)) mean
    expect = -(torch.full((4,), 0.25) - F.one_hot(torch.tensor([2, 3]), 4).float()).mean(0)
    torch.testing.assert_close(model.module.fc.bias.detach(), expect)



def six_samples() -> Task:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 0.0],
                      [0.5, 0.5, 0.5], [0.0, -1.0, 2.0]])
    return one_task(x, torch.tensor([1, 0, 1, 0, 0, 1]), 2)


def sgd_in_order(w: torch.Tensor, b: torch.Tensor, task: Task, order: list[int], lr: float
                 ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Plain SGD with batches of one sample, in the given order; the loss of each batch."""
    x, y = task.train
    seen = []
    for i in order:
        gw, gb, ce = ce_gradients(w, b, x[i:i + 1], y[i:i + 1])
        seen.append(ce)
        w, b = w - lr * gw, b - lr * gb
    return w, b, seen


def test_batches_come_from_the_seed_alone_default_zero():
    """The order of the batches is drawn from the fit's seed (0 unless given), never from the
    global random state, and the epoch loss is the mean over all its batches."""
    task = six_samples()
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.3, momentum=0.0)
    for seed in (None, 3):
        model = linear_model(seed=2)
        w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
        torch.manual_seed(99)  # a global state that must not matter
        ctx = ctx_of(model, task)
        losses = (fit(ctx, Strategy(), cfg) if seed is None
                  else learn_task(ctx, Strategy(), cfg, seed=seed))
        if seed is None:
            seed = 0
        order = torch.randperm(6, generator=torch.Generator().manual_seed(seed)).tolist()
        assert order != torch.randperm(6, generator=torch.Generator().manual_seed(99)).tolist()
        w, b, seen = sgd_in_order(w0, b0, task, order, 0.3)
        torch.testing.assert_close(model.module.fc.weight.detach(), w)
        torch.testing.assert_close(model.module.fc.bias.detach(), b)
        assert losses == pytest.approx([sum(seen) / 6], rel=1e-5)


def test_learn_task_default_seed_is_zero():
    task = six_samples()
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.3, momentum=0.0)
    model = linear_model(seed=2)
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    learn_task(ctx_of(model, task), Strategy(), cfg)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
    w, _, _ = sgd_in_order(w0, b0, task, order, 0.3)
    torch.testing.assert_close(model.module.fc.weight.detach(), w)


def test_interleaving_of_several_sets_comes_from_the_seed_alone():
    tasks = synthetic(2, n=32)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.05)

    def joint(global_seed: int, seed: int) -> list[torch.Tensor]:
        model = mlp(n_heads=2)
        torch.manual_seed(global_seed)
        fit(context(model, tasks, 1), make_strategy("joint"), cfg, seed=seed)
        return [p.detach() for p in model.module.parameters()]

    a, b, c = joint(1, 5), joint(2, 5), joint(1, 6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_fit_trains_the_given_parameters_for_the_given_epochs_and_keeps_its_optimizer():
    task = six_samples()
    model = linear_model(seed=2)
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    ctx = ctx_of(model, task)
    cfg = TrainConfig(epochs=5, batch_size=6, lr=0.3, momentum=0.0)
    losses = fit(ctx, Strategy(), cfg, epochs=2, params=[model.module.fc.bias])
    assert len(losses) == 2
    assert torch.equal(model.module.fc.weight.detach(), w0)  # not among the parameters
    x, y = task.train
    b = b0
    for _ in range(2):  # full-batch steps on the bias alone
        b = b - 0.3 * ce_gradients(w0, b, x, y)[1]
    torch.testing.assert_close(model.module.fc.bias.detach(), b)
    assert ctx.optimizer is not None
    assert ctx.optimizer.param_groups[0]["params"] == [model.module.fc.bias]
    given = torch.optim.SGD([model.module.fc.weight], lr=0.1)
    fit(ctx, Strategy(), cfg, epochs=1, optimizer=given)
    assert ctx.optimizer is given and not torch.equal(model.module.fc.weight.detach(), w0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_reaches_the_optimizer(optimizer):
    """One full-batch step with weight decay wd (L2, added to the gradient): g + wd * w; SGD steps
    -lr (g + wd w), Adam's first step is -lr (g + wd w) / (|g + wd w| + eps)."""
    task = six_samples()
    model = linear_model(seed=2)
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    cfg = TrainConfig(epochs=1, batch_size=6, lr=0.1, momentum=0.0, weight_decay=5.0,
                      optimizer=optimizer)
    fit(ctx_of(model, task), Strategy(), cfg)
    g = ce_gradients(w0, b0, *task.train)[0]
    gw = g + 5.0 * w0
    assert (g.sign() != gw.sign()).any()  # Adam's first step sees the decay only in signs
    step = gw if optimizer == "sgd" else gw / (gw.abs() + 1e-8)
    torch.testing.assert_close(model.module.fc.weight.detach(), w0 - 0.1 * step)


class StepLog(Strategy):
    """Joint training that writes down, for every step, the epoch, whether the context holds
    the batch's heads, and which heads' weights moved."""

    name = "steplog"

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, frozenset[str]]] = []
        self.before: dict[str, torch.Tensor] = {}

    def train_sets(self, ctx):
        return [*ctx.seen, ctx.task]

    def after_backward(self, ctx):
        self.before = {h: getattr(ctx.model.module, h).weight.detach().clone()
                       for h in ("head0", "head1")}

    def after_step(self, ctx):
        moved = frozenset(h for h, w in self.before.items()
                          if not torch.equal(getattr(ctx.model.module, h).weight, w))
        self.steps.append((ctx.epoch, moved))


def test_a_head_no_batch_reaches_keeps_its_weights_under_momentum():
    """Gradients are cleared to None before each step: SGD's momentum and weight decay leave
    a head alone in the steps of the other task's batches."""
    tasks = synthetic(2, n=16)  # 12 training samples each: 3 batches of 4 per task
    model = mlp(n_heads=2)
    s = StepLog()
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.01)
    fit(context(model, tasks, 1), s, cfg, seed=1)
    assert [e for e, _ in s.steps] == [0] * 6 + [1] * 6
    assert all(len(moved) == 1 for _, moved in s.steps), s.steps
    assert sorted(h for _, m in s.steps for h in m) == ["head0"] * 6 + ["head1"] * 6


class Retrain(Strategy):
    """Checks what learn_task hands the hooks, and retrains once after the task."""

    name = "retrain"

    def before_task(self, ctx):
        self.seen_cfg = (ctx.train_config, ctx.strategy)

    def after_task(self, ctx):
        self.start = {k: v.clone() for k, v in ctx.model.module.state_dict().items()}
        self.losses = ctx.train_fit(epochs=1)


def test_learn_task_hands_hooks_its_settings_and_a_seeded_retraining_loop():
    task = six_samples()
    cfg = TrainConfig(epochs=3, batch_size=2, lr=0.3, momentum=0.0)
    model = linear_model(seed=2)
    s = Retrain()
    epochs: list[tuple[int, float]] = []
    losses = learn_task(ctx_of(model, task), s, cfg, seed=4,
                        on_epoch=lambda e, loss: epochs.append((e, loss)))
    assert len(losses) == 3 and epochs == list(enumerate(losses))
    assert s.seen_cfg[0] is cfg and s.seen_cfg[1] is s
    assert isinstance(s.losses, list) and len(s.losses) == 1
    # the retraining is one epoch of batches of two in the order of the task's seed
    w, b = s.start["fc.weight"], s.start["fc.bias"]
    x, y = task.train
    order = torch.randperm(6, generator=torch.Generator().manual_seed(4))
    for idx in order.split(2):
        gw, gb, _ = ce_gradients(w, b, x[idx], y[idx])
        w, b = w - 0.3 * gw, b - 0.3 * gb
    torch.testing.assert_close(model.module.fc.weight.detach(), w)
    torch.testing.assert_close(model.module.fc.bias.detach(), b)


class Outputs(Strategy):
    """A strategy asking for extra heads: writes down the heads in ctx.outputs at each
    penalty and checks that the task's entry is the logits the loss is computed from."""

    name = "outputs"

    def __init__(self, extra: list[str]) -> None:
        super().__init__()
        self.extra = extra
        self.seen: list[list[str]] = []

    def extra_heads(self, ctx):
        return self.extra

    def penalty(self, ctx, x, y, logits):
        self.seen.append(sorted(ctx.outputs))
        assert ctx.outputs[ctx.head_of(ctx.task)] is logits
        return None


@pytest.mark.parametrize(("extra", "heads"), [(["out0"], ["out0", "out1"]),
                                              (["out1"], ["out1"])])
def test_extra_heads_reach_the_hooks_in_ctx_outputs_and_are_dropped_after_the_fit(extra,
                                                                                  heads):
    """Another task's head: the view returns both heads. The task's own head (one shared
    head, as in the class scenario): the logits alone, still under ctx.outputs."""
    tasks, model = synthetic(2, n=16), mlp(n_heads=2)
    ctx = context(model, tasks, 1)
    s = Outputs(extra)
    fit(ctx, s, TrainConfig(epochs=2, batch_size=6, lr=0.05), seed=0)
    assert s.seen == [heads] * 4
    assert ctx.outputs is None


class Frozen(Strategy):
    """Freezes the layer's weight for the length of each fit (the training hook)."""

    name = "frozen"

    @contextmanager
    def training(self, ctx):
        self.mode = ctx.model.module.training
        weight = ctx.model.module.fc.weight
        weight.requires_grad_(False)
        try:
            yield
        finally:
            weight.requires_grad_(True)


def test_the_training_hook_wraps_the_fit_before_the_optimizer_is_built():
    task = six_samples()
    model = linear_model(seed=2)
    model.eval()
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    s = Frozen()
    fit(ctx_of(model, task), s, TrainConfig(epochs=1, batch_size=6, lr=0.3, momentum=0.0))
    assert s.mode  # entered after the model was put in training mode
    assert torch.equal(model.module.fc.weight.detach(), w0)  # frozen: not optimised
    torch.testing.assert_close(model.module.fc.bias.detach(),
                               b0 - 0.3 * ce_gradients(w0, b0, *task.train)[1])
    assert model.module.fc.weight.requires_grad  # the hook's tear-down ran


class SummedLoss(Strategy):
    """The batch's summed cross-entropy in place of the mean, plus c times the mean logit of
    the true class (a penalty that reads the labels and the logits)."""

    name = "summed"

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def loss(self, ctx, x, y, logits):  # over the task's own classes (here: all of them)
        return F.cross_entropy(logits[:, :ctx.task.n_classes], y, reduction="sum")

    def penalty(self, ctx, x, y, logits):
        return self.c * logits.gather(1, y[:, None]).mean()


def test_a_strategys_own_loss_replaces_cross_entropy():
    """Gradients by hand: the summed loss is B times the mean's; the penalty's gradient on W
    is c onehot(y)^T x / B and on b is c mean(onehot(y))."""
    task = six_samples()
    model = linear_model(seed=2)
    w0, b0 = model.module.fc.weight.detach().clone(), model.module.fc.bias.detach().clone()
    cfg = TrainConfig(epochs=1, batch_size=6, lr=0.05, momentum=0.0)
    losses = fit(ctx_of(model, task), SummedLoss(0.4), cfg)
    x, y = task.train
    gw, gb, ce = ce_gradients(w0, b0, x, y)
    onehot = F.one_hot(y, 2).float()
    torch.testing.assert_close(model.module.fc.weight.detach(),
                               w0 - 0.05 * (6 * gw + 0.4 * onehot.T @ x / 6))
    torch.testing.assert_close(model.module.fc.bias.detach(),
                               b0 - 0.05 * (6 * gb + 0.4 * onehot.mean(0)))
    margin = float((x @ w0.T + b0).gather(1, y[:, None]).mean())
    assert losses == pytest.approx([6 * ce + 0.4 * margin], rel=1e-5)


class InputsSeen(Strategy):
    """Cross-entropy, as the default, but keeps the inputs its loss is given."""

    name = "inputs_seen"

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def loss(self, ctx, x, y, logits):
        self.inputs.append(x.detach().clone())
        return F.cross_entropy(logits, y)


def test_a_strategys_own_loss_is_given_the_batchs_inputs():
    """Generative replay and iCaRL's distillation read x in their loss: one epoch of batches of
    two hands it every training input once, in batches of two."""
    task = six_samples()
    s = InputsSeen()
    fit(ctx_of(linear_model(), task), s, TrainConfig(epochs=1, batch_size=2, lr=0.05))
    assert [tuple(b.shape) for b in s.inputs] == [(2, 3)] * 3
    seen = sorted(map(tuple, torch.cat(s.inputs).tolist()))
    assert seen == sorted(map(tuple, task.train[0].tolist()))


def test_early_stopping_keeps_the_best_epochs_weights_and_stops_after_patience() -> None:
    """patience 2: training stops two epochs after the best validation accuracy and ends
    with the weights that epoch had, which an independent fit of that many epochs (same seed,
    same batches) reproduces."""
    from growth.search_spaces.networks import add_head, mlp

    from growth.data import build_stream
    from growth.model import Model
    from growth.scenarios import labelers
    from growth.strategies import make_strategy

    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1, "seed": 0,
                         "val_fraction": 0.2, "max_train_per_task": 300})[0]

    def run(**kw):
        torch.manual_seed(0)
        ctx = Context(Model(add_head(mlp(task.input_shape, [8]), "t0", 10)), task, [],
                      *labelers("task"), torch.device("cpu"))
        accs = []
        losses = fit(ctx, make_strategy("finetune"), TrainConfig(lr=0.3, **kw), seed=1,
                     on_epoch=lambda e, loss: accs.append(evaluate(ctx, task, "val")))
        return ctx, losses, accs

    ctx, losses, accs = run(epochs=30, patience=2)
    best = max(range(len(accs)), key=lambda e: (accs[e], -e))  # the first best epoch
    assert len(losses) == best + 3 < 30  # two epochs without a gain, then it stopped
    assert evaluate(ctx, task, "val") == accs[best]
    again, _, _ = run(epochs=best + 1)
    for k, v in ctx.model.module.state_dict().items():
        assert torch.equal(v, again.model.module.state_dict()[k]), k


def test_early_stopping_keeps_the_starting_weights_when_no_epoch_beats_them() -> None:
    """A fit that only makes things worse (a learning rate far too high, from a trained
    network) ends with the weights it started from: the start is a candidate."""
    from growth.search_spaces.networks import add_head, mlp

    from growth.data import build_stream
    from growth.model import Model
    from growth.scenarios import labelers
    from growth.strategies import make_strategy

    task = build_stream({"dataset": "digits", "stream": "split", "n_tasks": 1, "seed": 0,
                         "val_fraction": 0.2, "max_train_per_task": 300})[0]
    torch.manual_seed(0)
    ctx = Context(Model(add_head(mlp(task.input_shape, [8]), "t0", 10)), task, [],
                  *labelers("task"), torch.device("cpu"))
    fit(ctx, make_strategy("finetune"), TrainConfig(lr=0.1, epochs=5), seed=1)
    start = {k: v.clone() for k, v in ctx.model.module.state_dict().items()}
    acc = evaluate(ctx, task, "val")
    losses = fit(ctx, make_strategy("finetune"), TrainConfig(lr=8.0, epochs=5, patience=1),
                 seed=2)
    assert len(losses) == 1 and evaluate(ctx, task, "val") == acc
    for k, v in ctx.model.module.state_dict().items():
        assert torch.equal(v, start[k]), k
