"""Datasets and task streams.

Loaders are tested on tiny files written in the real on-disk formats (MNIST idx, CIFAR pickles,
the CUB-200-2011 folder layout, ImageFolder trees) and read through the same `load_dataset`
path users run; streams are tested on the bundled digits and on small synthetic datasets.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from growth.data import VARIATIONS, Dataset, build_stream, load_dataset, make_stream
from growth.data.variations import BACKGROUND_THRESHOLD, rotate
from growth.errors import DataError

RNG = np.random.default_rng(1234)


# ---- writers for the real file formats ----------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx file (magic 0x08 = uint8, then ndim; big-endian dims; raw bytes)."""
    header = struct.pack(">I", 0x0800 + array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 20, n_test: int = 10) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    data = {
        "train_x": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    write_idx(raw / "train-images-idx3-ubyte", data["train_x"])
    write_idx(raw / "train-labels-idx1-ubyte", data["train_y"])
    write_idx(raw / "t10k-images-idx3-ubyte", data["test_x"])
    write_idx(raw / "t10k-labels-idx1-ubyte", data["test_y"])
    return data


def write_pickle(path: Path, obj: dict) -> list[str]:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return [path.name, hashlib.md5(path.read_bytes()).hexdigest()]


def cifar_rows(n: int) -> np.ndarray:
    """n CIFAR rows: 3072 bytes each, the red plane, then green, then blue (32 x 32 each)."""
    return RNG.integers(0, 256, (n, 3072), dtype=np.uint8)


def as_images(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


@pytest.fixture
def cifar10_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = [(cifar_rows(4), RNG.integers(0, 10, 4).tolist()) for _ in range(5)]
    train_list = [
        write_pickle(base / f"data_batch_{i + 1}", {"data": x, "labels": y})
        for i, (x, y) in enumerate(batches)
    ]
    test = (cifar_rows(6), RNG.integers(0, 10, 6).tolist())
    test_list = [write_pickle(base / "test_batch", {"data": test[0], "labels": test[1]})]
    names = [f"class{i}" for i in range(10)]
    meta = write_pickle(base / "batches.meta", {"label_names": names})
    # torchvision checks md5s against the published files; point it at the tiny ones instead.
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(
        tvd.CIFAR10, "meta", {"filename": meta[0], "key": "label_names", "md5": meta[1]}
    )
    return {
        "root": tmp_path,
        "train_x": as_images(np.concatenate([b[0] for b in batches])),
        "train_y": [label for b in batches for label in b[1]],
        "test_x": as_images(test[0]),
        "test_y": test[1],
        "names": names,
    }


@pytest.fixture
def cifar100_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    coarse_of = np.empty(100, dtype=np.int64)
    coarse_of[RNG.permutation(100)] = np.repeat(np.arange(20), 5)  # 5 fine classes per superclass
    parts = {}
    for part, per_class in (("train", 3), ("test", 1)):
        fine = RNG.permutation(np.repeat(np.arange(100), per_class))
        rows = cifar_rows(len(fine))
        entry = {
            "data": rows,
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse_of[fine].tolist(),
        }
        parts[part] = (write_pickle(base / part, entry), rows, fine)
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]
    meta = write_pickle(
        base / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    )
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [parts["train"][0]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [parts["test"][0]])
    monkeypatch.setattr(
        tvd.CIFAR100, "meta", {"filename": meta[0], "key": "fine_label_names", "md5": meta[1]}
    )
    return {
        "root": tmp_path,
        "coarse_of": coarse_of,
        "parts": parts,
        "fine_names": fine_names,
        "coarse_names": coarse_names,
    }


def solid_jpeg(path: Path, color: tuple[int, int, int], size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format="JPEG", quality=95)


@pytest.fixture
def cub_files(tmp_path: Path) -> dict:
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, splits, colors = [], [], [], {}
    for image_id in range(1, 13):
        class_id = (image_id - 1) % 3 + 1  # 1-based, as in the official files
        rel = f"{classes[class_id - 1]}/img_{image_id:03d}.jpg"
        color = tuple(int(v) for v in RNG.integers(0, 256, 3))
        solid_jpeg(base / "images" / rel, color)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {class_id}")
        splits.append(f"{image_id} {int(image_id <= 6)}")
        colors[image_id] = (color, class_id - 1, image_id <= 6)
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", splits),
        ("classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)]),
    ):
        (base / name).write_text("\n".join(lines) + "\n")
    return {"root": tmp_path, "colors": colors}


def write_png_tree(root: Path, per_class: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """One folder per class holding random 8x8 RGB PNGs (lossless, so values compare exactly)."""
    written = {}
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        written[cls] = []
        for i in range(n):
            pixels = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
            written[cls].append(pixels)
    return written


def rows_of(x: torch.Tensor) -> list[tuple[float, ...]]:
    """The images of x as a sorted list, to compare sets of images regardless of order."""
    return sorted(tuple(r) for r in x.flatten(1).tolist())


def png_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


# ---- dataset loaders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_is_a_fixed_stratified_split_of_the_bundled_set(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    sk = load_digits()
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.train_x.dtype == torch.float32
    assert digits.train_y.dtype == torch.int64
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert len(digits.test_y) == round(0.2 * 1797)
    assert 0.0 <= float(digits.train_x.min()) and float(digits.train_x.max()) <= 1.0
    everything = torch.cat([digits.train_x, digits.test_x]).sum(0)
    assert torch.allclose(everything[0], torch.tensor(sk.images.sum(0) / 16.0, dtype=torch.float32))
    share = torch.bincount(digits.test_y) / torch.bincount(
        torch.cat([digits.train_y, digits.test_y])
    )
    assert torch.all((share - 0.2).abs() < 0.02)
    again = load_dataset("digits")
    assert torch.equal(again.test_x, digits.test_x) and torch.equal(again.test_y, digits.test_y)
    assert digits.class_names == [str(i) for i in range(10)]


def test_the_digits_file_is_read_as_scikit_learn_reads_it() -> None:
    """The engine reads the bundled file itself (no scikit-learn import); every image and
    label must be scikit-learn's own, in its order."""
    from sklearn.datasets import load_digits

    from growth.data.datasets import digits_arrays

    sk = load_digits()
    images, target = digits_arrays()
    assert np.array_equal(images, sk.images) and np.array_equal(target, sk.target)
    assert images.dtype == sk.images.dtype


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_load_exactly(tmp_path: Path, name: str, folder: str) -> None:
    data = write_mnist_like(tmp_path, folder)
    ds = load_dataset(name, root=tmp_path)
    for part in ("train", "test"):
        x, y = getattr(ds, f"{part}_x"), getattr(ds, f"{part}_y")
        assert x.shape == (len(data[f"{part}_y"]), 1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(x[:, 0], torch.from_numpy(data[f"{part}_x"]).float() / 255.0)
        assert torch.equal(y, torch.from_numpy(data[f"{part}_y"]).long())
    assert ds.n_classes == 10 and ds.input_shape == (1, 28, 28)


def test_cifar10_pickles_load_exactly(cifar10_files: dict) -> None:
    ds = load_dataset("cifar10", root=cifar10_files["root"])
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert torch.equal(ds.train_x, cifar10_files["train_x"])
    assert torch.equal(ds.test_x, cifar10_files["test_x"])
    assert ds.train_y.tolist() == cifar10_files["train_y"]
    assert ds.test_y.tolist() == cifar10_files["test_y"]
    assert ds.class_names == cifar10_files["names"] and ds.train_coarse is None


def test_cifar100_pickles_load_with_coarse_labels(cifar100_files: dict) -> None:
    ds = load_dataset("cifar100", root=cifar100_files["root"])
    coarse_of = torch.from_numpy(cifar100_files["coarse_of"])
    for part in ("train", "test"):
        _, rows, fine = cifar100_files["parts"][part]
        assert torch.equal(getattr(ds, f"{part}_x"), as_images(rows))
        assert torch.equal(getattr(ds, f"{part}_y"), torch.from_numpy(fine))
        assert torch.equal(getattr(ds, f"{part}_coarse"), coarse_of[torch.from_numpy(fine)])
    assert ds.class_names == cifar100_files["fine_names"]
    assert ds.coarse_names == cifar100_files["coarse_names"]


def test_cifar100_reads_each_verified_pickle_once(cifar100_files: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real_load = pickle.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f.name).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(pickle, "load", counting_load)
    ds = load_dataset("cifar100", root=cifar100_files["root"])
    assert sorted(reads) == ["meta", "test", "train"]
    assert ds.coarse_names == cifar100_files["coarse_names"] and ds.train_coarse is not None
    # the pickles are only read after torchvision's MD5 check: a changed file is refused
    train = cifar100_files["root"] / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes() + b"x")
    reads.clear()
    with pytest.raises(DataError, match="not found .or corrupted."):
        load_dataset("cifar100", root=cifar100_files["root"])
    assert reads == []


def test_cifar100_superclass_split_gives_20_tasks_of_5_classes(cifar100_files: dict) -> None:
    ds = load_dataset("cifar100", root=cifar100_files["root"])
    tasks = make_stream(ds, "split", by="superclass", val_fraction=0.0)
    coarse_of = cifar100_files["coarse_of"]
    assert len(tasks) == 20
    assert sorted(int(coarse_of[t.classes[0]]) for t in tasks) == list(range(20))
    for t in tasks:
        assert t.n_classes == 5 and len(set(coarse_of[t.classes])) == 1
        assert t.class_offset == 5 * t.index
        assert sorted(t.train[1].unique().tolist()) == list(range(5))
    assert sorted(c for t in tasks for c in t.classes) == list(range(100))
    with pytest.raises(DataError, match="must be 20"):
        make_stream(ds, "split", by="superclass", n_tasks=5)


def test_cub200_official_layout(cub_files: dict) -> None:
    ds = load_dataset("cub200", root=cub_files["root"], image_size=6)
    assert ds.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert ds.train_x.shape == (6, 3, 6, 6) and ds.test_x.shape == (6, 3, 6, 6)
    for part, ids in (("train", range(1, 7)), ("test", range(7, 13))):
        x, y = getattr(ds, f"{part}_x"), getattr(ds, f"{part}_y")
        assert y.tolist() == [cub_files["colors"][i][1] for i in ids]
        for row, image_id in enumerate(ids):
            color = torch.tensor(cub_files["colors"][image_id][0]) / 255.0
            # JPEG is lossy; a solid colour survives to within a few levels.
            assert (x[row] - color[:, None, None]).abs().max() <= 4 / 255


def test_imagefolder_with_train_and_test_folders(tmp_path: Path) -> None:
    train = write_png_tree(tmp_path / "train", {"cat": 3, "dog": 2})
    test = write_png_tree(tmp_path / "test", {"cat": 1, "dog": 2})
    ds = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert ds.class_names == ["cat", "dog"]
    assert torch.equal(ds.train_x, png_tensor(train["cat"] + train["dog"]))
    assert torch.equal(ds.test_x, png_tensor(test["cat"] + test["dog"]))
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1] and ds.test_y.tolist() == [0, 1, 1]


def test_imagefolder_single_tree_is_split_stratified_and_seeded(tmp_path: Path) -> None:
    written = write_png_tree(tmp_path, {"a": 10, "b": 5})
    ds = load_dataset("imagefolder", root=tmp_path, image_size=8, seed=3)
    assert torch.bincount(ds.test_y).tolist() == [2, 1]
    assert torch.bincount(ds.train_y).tolist() == [8, 4]
    every = torch.cat([ds.train_x, ds.test_x])
    assert rows_of(every) == rows_of(png_tensor(written["a"] + written["b"]))
    again = load_dataset("imagefolder", root=tmp_path, image_size=8, seed=3)
    assert torch.equal(again.test_x, ds.test_x)


def test_imagefolder_resizes_to_image_size(tmp_path: Path) -> None:
    write_png_tree(tmp_path, {"a": 5, "b": 5})
    ds = load_dataset("imagefolder", root=tmp_path, image_size=4)
    assert ds.train_x.shape[1:] == (3, 4, 4) and ds.input_shape == (3, 4, 4)


@pytest.mark.parametrize(
    "name, where",
    [
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
    ],
)
def test_missing_torchvision_files_name_the_path(tmp_path: Path, name: str, where: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, root=tmp_path, download=False)
    assert str(tmp_path / where) in str(err.value) and "download" in str(err.value)


def test_missing_folder_datasets_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CUB_200_2011"):
        load_dataset("cub200", root=tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        load_dataset("imagefolder", root=tmp_path / "nowhere")


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError, match="cifar100"):
        load_dataset("imagenet")


# ---- streams ------------------------------------------------------------------------------------


def synthetic(n_train: int = 60, n_test: int = 30, shape=(1, 4, 4), k: int = 3) -> Dataset:
    """Random images (every pixel column distinct) with balanced labels."""
    g = torch.Generator().manual_seed(0)
    return Dataset(
        "synthetic",
        torch.rand((n_train, *shape), generator=g),
        torch.arange(n_train) % k,
        torch.rand((n_test, *shape), generator=g),
        torch.arange(n_test) % k,
        class_names=[str(i) for i in range(k)],
    )


def same_tasks(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(ta.train[0], tb.train[0])
        and torch.equal(ta.val[1], tb.val[1])
        and torch.equal(ta.test[0], tb.test[0])
        and ta.classes == tb.classes
        for ta, tb in zip(a, b)
    )


@pytest.mark.parametrize(
    "kind, options",
    [("permuted", {"n_tasks": 3}), ("variations", {}), ("split", {"class_order": "shuffled"})],
)
def test_same_seed_same_stream_other_seed_other_stream(digits: Dataset, kind, options) -> None:
    first = make_stream(digits, kind, seed=7, max_train_per_task=200, **options)
    assert same_tasks(first, make_stream(digits, kind, seed=7, max_train_per_task=200, **options))
    assert not same_tasks(
        first, make_stream(digits, kind, seed=8, max_train_per_task=200, **options)
    )


def pixel_map(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """For each output pixel, the one input pixel whose column it equals (asserts uniqueness)."""
    match = (after.flatten(1).T[:, None, :] == before.flatten(1).T[None, :, :]).all(-1)
    assert torch.all(match.sum(1) == 1)
    return match.int().argmax(1)


def test_permutations_are_real_fixed_per_task_and_differ(digits: Dataset) -> None:
    ds = synthetic()
    tasks = make_stream(ds, "permuted", n_tasks=3, val_fraction=0.2)
    perms = []
    for t in tasks:
        perm = pixel_map(ds.test_x, t.test[0])
        assert sorted(perm.tolist()) == list(range(16))
        assert torch.equal(t.test[1], ds.test_y) and t.classes == [0, 1, 2]
        assert t.class_offset == 3 * t.index and t.input_shape == (1, 4, 4)
        inverse = torch.argsort(perm)
        for x, y in (t.train, t.val):  # train and val use the same permutation
            back = x.flatten(1)[:, inverse]
            hit = (back[:, None, :] == ds.train_x.flatten(1)[None]).all(-1)
            assert torch.equal(ds.train_y[hit.int().argmax(1)], y)
            assert torch.all(hit.sum(1) == 1)
        assert len(t.train[1]) + len(t.val[1]) == 60 and len(t.val[1]) == 12
        perms.append(perm)
    assert not torch.equal(perms[0], torch.arange(16))
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    assert [t.name for t in tasks] == ["perm-0", "perm-1", "perm-2"]


@pytest.mark.parametrize("order", ["fixed", "shuffled"])
def test_split_tasks_are_disjoint_cover_all_classes_with_local_labels(
    digits: Dataset, order: str
) -> None:
    tasks = make_stream(digits, "split", n_tasks=5, class_order=order)
    classes = [c for t in tasks for c in t.classes]
    assert sorted(classes) == list(range(10)) and len(set(classes)) == 10
    if order == "fixed":
        assert [t.classes for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    offset = 0
    for t in tasks:
        assert t.n_classes == 2 and t.class_offset == offset and t.name == f"split-{t.index}"
        offset += t.n_classes
        for x, y in (t.train, t.val, t.test):
            assert sorted(y.unique().tolist()) == [0, 1] and len(x) == len(y)
        original = torch.tensor(t.classes)[t.test[1]]
        mask = torch.isin(digits.test_y, torch.tensor(t.classes))
        assert torch.equal(original, digits.test_y[mask])
        assert torch.equal(t.test[0], digits.test_x[mask])
        n_pool = int(torch.isin(digits.train_y, torch.tensor(t.classes)).sum())
        assert len(t.train[1]) + len(t.val[1]) == n_pool
    assert sum(len(t.test[1]) for t in tasks) == len(digits.test_y)


def test_validation_is_carved_stratified_and_disjoint_from_train() -> None:
    ds = synthetic(n_train=300, k=3)
    (task,) = make_stream(ds, "split", n_tasks=1, val_fraction=0.2)
    assert torch.bincount(task.val[1]).tolist() == [20, 20, 20]
    train_rows = {tuple(r.tolist()) for r in task.train[0].flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in task.val[0].flatten(1))


def test_max_train_per_task_subsamples_stratified(digits: Dataset) -> None:
    tasks = make_stream(digits, "split", n_tasks=2, max_train_per_task=100, val_fraction=0.1)
    for t in tasks:
        assert len(t.train[1]) == 90 and len(t.val[1]) == 10
        counts = torch.bincount(torch.cat([t.train[1], t.val[1]]), minlength=5)
        assert counts.min() >= 19 and counts.max() <= 21
        assert len(t.test[1]) == int(torch.isin(digits.test_y, torch.tensor(t.classes)).sum())


def test_variations_produce_the_listed_tasks(digits: Dataset) -> None:
    tasks = make_stream(digits, "variations", max_train_per_task=300)
    assert [t.name for t in tasks] == list(VARIATIONS)
    for t in tasks:
        assert t.classes == list(range(10)) and t.class_offset == 10 * t.index
        for x, y in (t.train, t.val, t.test):
            assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and len(x) == len(y)
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert torch.equal(t.test[1], digits.test_y)
    original, rotated, noise, image, rot_bg = (t.test[0] for t in tasks)
    assert torch.equal(original, digits.test_x)
    assert not torch.allclose(rotated, original)
    digit = original >= BACKGROUND_THRESHOLD
    for varied in (noise, image):
        assert torch.equal(varied[digit], original[digit])
        assert (varied[~digit] > 0.05).float().mean() > 0.5
    assert (rot_bg > 0.05).float().mean() > 0.5
    short = make_stream(digits, "variations", n_tasks=2, variations=["rotated", "original"])
    assert [t.name for t in short] == ["rotated", "original"]


def test_rotation_matches_quarter_turns_and_identity() -> None:
    x = torch.rand(4, 3, 6, 6)
    assert torch.allclose(rotate(x, torch.zeros(4)), x, atol=1e-6)
    assert torch.allclose(rotate(x, torch.full((4,), 90.0)), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(rotate(x, torch.full((4,), 180.0)), torch.rot90(x, 2, (2, 3)), atol=1e-5)


def test_bad_stream_values_raise_data_error(digits: Dataset) -> None:
    with pytest.raises(DataError, match=r"\[1, 2, 5, 10\]"):
        make_stream(digits, "split", n_tasks=3)
    for bad in (0, -1, 2.5):
        with pytest.raises(DataError, match="n_tasks"):
            make_stream(digits, "permuted", n_tasks=bad)
    with pytest.raises(DataError, match="only 5 variations"):
        make_stream(digits, "variations", n_tasks=6)
    with pytest.raises(DataError, match="unknown variations"):
        make_stream(digits, "variations", variations=["blurred"])
    with pytest.raises(DataError, match="superclass"):
        make_stream(digits, "split", by="superclass")
    with pytest.raises(DataError, match="class_order"):
        make_stream(digits, "split", class_order="sorted")
    with pytest.raises(DataError, match="val_fraction"):
        make_stream(digits, "split", val_fraction=1.0)
    with pytest.raises(DataError, match="max_train_per_task"):
        make_stream(digits, "split", max_train_per_task=0)
    with pytest.raises(DataError, match="permuted"):
        make_stream(digits, "shuffled")


def test_build_stream_from_a_config_dict(digits: Dataset) -> None:
    cfg = {
        "dataset": "digits",
        "root": "unused",
        "download": False,
        "image_size": 64,
        "stream": "split",
        "n_tasks": 5,
        "seed": 3,
        "val_fraction": 0.1,
        "max_train_per_task": None,
        "variations": None,
        "by": "classes",
        "class_order": "shuffled",
    }
    expected = make_stream(digits, "split", n_tasks=5, seed=3, class_order="shuffled")
    assert same_tasks(build_stream(cfg), expected)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_says_what_to_do_and_leaves_no_folders(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_dataset(name, root=root, download=True)
    message = str(err.value)
    folder = root / ("MNIST/raw" if name == "mnist" else "cifar-10-batches-py")
    assert str(folder) in message and "no network here" in message
    assert "data.download: false" in message and "data.root" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no empty folders left behind
    with pytest.raises(DataError, match="set data.download: true"):
        load_dataset(name, root=root, download=False)
    assert list(tmp_path.iterdir()) == []
