"""Large datasets: images streamed from disk through a DataLoader, and training-batch
augmentation; the in-memory fast path is what streaming must reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from graphgen import single_thread  # noqa: F401 (fixture)
from growth.search_spaces.networks import add_head, small_cnn
from test_data import write_png_tree

from growth.config import load_config
from growth.data import build_stream, load_dataset, make_stream
from growth.data.augment import augment
from growth.data.streaming import ImageFiles
from growth.errors import ConfigError, DataError
from growth.model import Model
from growth.strategies import Context, Strategy
from growth.train import TrainConfig, evaluate, fit

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_png_tree(root, {"a": 14, "b": 12, "c": 10, "d": 12})
    return root


def test_streamed_images_read_as_the_in_memory_ones(tree: Path) -> None:
    memory = load_dataset("imagefolder", root=tree, image_size=8, load="memory")
    stream = load_dataset("imagefolder", root=tree, image_size=8, load="stream", workers=0)
    assert isinstance(stream.train_x, ImageFiles) and isinstance(stream.test_x, ImageFiles)
    assert stream.input_shape == memory.input_shape == (3, 8, 8)
    assert torch.equal(stream.train_x[:], memory.train_x)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(stream.test_x[idx], memory.test_x[idx])
    assert torch.equal(stream.train_y, memory.train_y)
    small = load_dataset("imagefolder", root=tree, image_size=8)  # auto: small fits memory
    assert isinstance(small.train_x, torch.Tensor)


def test_split_streams_cut_files_lazily(tree: Path) -> None:
    stream = load_dataset("imagefolder", root=tree, image_size=8, load="stream", workers=0)
    memory = load_dataset("imagefolder", root=tree, image_size=8, load="memory")
    lazy = make_stream(stream, "split", n_tasks=2, seed=1)
    held = make_stream(memory, "split", n_tasks=2, seed=1)
    for a, b in zip(lazy, held):
        for part in ("train", "val", "test"):
            xa, ya = getattr(a, part)
            xb, yb = getattr(b, part)
            assert isinstance(xa, ImageFiles) and torch.equal(xa[:], xb)
            assert torch.equal(ya, yb)
    with pytest.raises(DataError, match="permuted stream transforms every image in memory"):
        make_stream(stream, "permuted")


def _fit(tasks, workers: int | None = None, epochs: int = 2, global_seed: int | None = None
         ) -> tuple[Model, float]:
    torch.manual_seed(0)
    graph = add_head(small_cnn((3, 8, 8), [4], batchnorm=True), "t0", tasks[0].n_classes)
    model = Model(graph)
    if global_seed is not None:  # a global random state the loop must not draw from
        torch.manual_seed(global_seed)
    task = tasks[0]
    if workers is not None:
        task.train[0].workers = workers
    ctx = Context(model, task, [], lambda t: "t0", lambda t, y: y, torch.device("cpu"))
    fit(ctx, Strategy(), TrainConfig(epochs=epochs, batch_size=5, lr=0.05), seed=3)
    return model, evaluate(ctx, task)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_streamed_files_equals_training_in_memory(tree: Path, workers: int
                                                              ) -> None:
    """Same order (drawn from the loop's generator), same pixels: bitwise the same weights,
    whether the files are read in the main process or by worker processes."""
    memory = make_stream(load_dataset("imagefolder", root=tree, image_size=8, load="memory"),
                         "split", n_tasks=1)
    stream = make_stream(load_dataset("imagefolder", root=tree, image_size=8, load="stream"),
                         "split", n_tasks=1)
    a, acc_a = _fit(memory)
    b, acc_b = _fit(stream, workers)
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), name
    assert acc_a == acc_b


def test_joint_training_interleaves_streamed_sets_as_in_memory(tree: Path) -> None:
    """Two sets (joint training): the interleaving and each set's uneven last batch come out
    in the fast path's order."""
    from growth.strategies import make_strategy

    def run(load: str) -> Model:
        ds = load_dataset("imagefolder", root=tree, image_size=8, load=load, workers=0)
        tasks = make_stream(ds, "split", n_tasks=2, val_fraction=0.2)
        torch.manual_seed(0)
        g = small_cnn((3, 8, 8), [4], batchnorm=True)
        model = Model(add_head(add_head(g, "t0", 2), "t1", 2))
        ctx = Context(model, tasks[1], tasks[:1], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"))
        fit(ctx, make_strategy("joint"), TrainConfig(epochs=2, batch_size=4, lr=0.05), seed=5)
        return model

    a, b = run("memory"), run("stream")
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), name


def test_config_keys_reach_the_stream(tree: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{dataset: imagefolder, root: {tree}, image_size: 8, stream: split,"
                   " n_tasks: 2, load: stream, workers: 0, augment: crop_flip}\n")
    c = load_config(cfg)
    tasks = build_stream({**c.data.model_dump(), "seed": 0})
    assert all(isinstance(t.train[0], ImageFiles) and t.augment == "crop_flip" for t in tasks)
    assert tasks[0].train[0].workers == 0
    cfg.write_text("data: {dataset: digits, load: stream}\n")
    with pytest.raises(ConfigError, match="data.load: applies only to data.dataset"):
        load_config(cfg)
    cfg.write_text("data: {dataset: digits, augment: flip}\n")
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(cfg)


# ---- augmentation --------------------------------------------------------------------------
def test_crop_flip_is_a_padded_crop_and_a_flip_per_sample() -> None:
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    out = augment(x, "crop_flip", torch.Generator().manual_seed(1))
    pad = 1  # 8 // 8
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    flips, shifts = 0, set()
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy in range(3) for dx in range(3) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(
                       padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert len(matches) == 1  # random content: exactly one crop and flip explains it
        flips += matches[0][2]
        shifts.add(matches[0][:2])
    assert 0 < flips < len(x) and len(shifts) > 1  # chosen per sample
    again = augment(x, "crop_flip", torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_resized_crop_flip_resamples_each_sample_inside_the_image() -> None:
    gen = torch.Generator().manual_seed(0)
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(12, 1, 16, 16).contiguous()
    out = augment(ramp, "resized_crop_flip", gen)
    assert out.shape == ramp.shape
    assert out.min() >= 0 and out.max() <= 15  # a crop never reaches outside the image
    rows = out[:, 0, 8, :]
    increasing = (rows[:, -1] > rows[:, 0]).sum().item()
    assert 0 < increasing < 12  # some samples flipped, some not
    assert len({round(float(r[-1] - r[0]), 3) for r in rows}) > 6  # scales differ per sample
    assert augment(ramp, "none", gen) is ramp


def test_augmented_training_differs_and_is_reproducible(tree: Path) -> None:
    tasks = make_stream(load_dataset("imagefolder", root=tree, image_size=8, load="memory"),
                        "split", n_tasks=1)
    plain, _ = _fit(tasks)
    tasks[0].augment = "crop_flip"
    one, _ = _fit(tasks)
    two, _ = _fit(tasks, global_seed=123)  # the crops and flips come from the fit's seed
    p = dict(plain.module.named_parameters())
    q = dict(one.module.named_parameters())
    assert not torch.equal(p["conv1.weight"], q["conv1.weight"])
    assert all(torch.equal(a, b) for a, b in zip(one.module.parameters(),
                                                 two.module.parameters()))


def test_mixed_streamed_and_held_sets_with_augmentation_train_as_in_memory(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Joint training over a set held in memory and a set read from files, both augmented:
    the streamed loop augments each batch in the fast path's order with the loop's generator
    (bitwise the same weights as everything in memory), and reads the files through the
    DataLoader, never by indexing them in the main loop."""
    from growth import train
    from growth.strategies import make_strategy

    loaders: list[int] = []
    real = train.loader_batches
    monkeypatch.setattr(train, "loader_batches",
                        lambda files, batches, device: (loaders.append(len(batches)),
                                                        real(files, batches, device))[1])

    def run(load: str) -> Model:
        ds = load_dataset("imagefolder", root=tree, image_size=8, load=load, workers=0)
        tasks = make_stream(ds, "split", n_tasks=2, val_fraction=0.2)
        x0, y0 = tasks[0].train
        tasks[0].train = (x0[:], y0)  # the earlier task held in memory
        for t in tasks:
            t.augment = "crop_flip"
        torch.manual_seed(0)
        g = small_cnn((3, 8, 8), [4], batchnorm=True)
        model = Model(add_head(add_head(g, "t0", 2), "t1", 2))
        ctx = Context(model, tasks[1], tasks[:1], lambda t: f"t{t.index}", lambda t, y: y,
                      torch.device("cpu"))
        fit(ctx, make_strategy("joint"), TrainConfig(epochs=2, batch_size=4, lr=0.05), seed=5)
        return model

    a = run("memory")
    assert loaders == []
    b = run("stream")
    assert len(loaders) == 2  # one loader per epoch, for the streamed set only
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), name
    plain = dict(a.module.named_parameters())
    monkeypatch.setattr(train, "augment", lambda x, kind, gen: x)
    c = run("memory")  # augmentation matters here: without it the weights differ
    assert not torch.equal(plain["conv1.weight"], dict(c.module.named_parameters())["conv1.weight"])
