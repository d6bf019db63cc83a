"""Datasets and continual-learning task streams.

`load_dataset` reads a dataset fully into memory; `make_stream` cuts it into tasks;
`build_stream` does both from a plain config dict.
"""

from growth.data.containers import Dataset, Task
from growth.data.datasets import DATASETS, load_dataset
from growth.data.orders import CURRICULA, reorder, resolve_order
from growth.data.streams import STREAMS, build_stream, make_stream
from growth.data.variations import VARIATIONS

__all__ = [
    "CURRICULA",
    "DATASETS",
    "STREAMS",
    "VARIATIONS",
    "Dataset",
    "Task",
    "build_stream",
    "load_dataset",
    "make_stream",
    "reorder",
    "resolve_order",
]
