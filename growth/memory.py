"""The episodic memory every replay method shares: a fixed budget of stored samples.

Each row is a sample (an input, or an activation for latent replay), its label in its head's
label space and the index of its task. Insertion policies:

- reservoir (Vitter's algorithm R): the n-th sample offered is kept with probability M/n in a
  uniformly chosen slot, so after any stream every sample offered is held with the same
  probability M/n (M the budget);
- balanced (GDumb's greedy class-balanced sampler): a sample is added while the memory has
  room; once full, only if its class holds fewer than M / (classes seen) rows, evicting a random
  row of the largest class;
- herding (iCaRL): per class, repeatedly pick the sample whose L2-normalised feature brings the
  mean of those picked closest to the class mean; rows stay in herding order, so cutting a class
  to its first m rows keeps its best m exemplars.

Views are index tensors over the rows (per task, per class); `sample` draws a replay batch. The
memory is saved as tensors in strategy state ("memory/all/x", "memory/all/y", "memory/all/task")
plus the reservoir's count in `extra`, so checkpoints and `growth resume` carry it exactly. It
knows no network: features for herding and class keys come from the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

KeyFn = Callable[[Tensor, Tensor], Tensor]  # (task indices, labels) -> one integer per class
PREFIX = "memory/all/"


class EpisodicMemory:
    """Rows (x, y, task) under a budget in samples, kept on one device."""

    def __init__(self, budget: int, device: torch.device | str = "cpu") -> None:
        self.budget = int(budget)
        self.device = torch.device(device)
        self.x: Tensor | None = None  # [n, *sample shape], None until the first insertion
        self.y = torch.empty(0, dtype=torch.long, device=self.device)
        self.task = torch.empty(0, dtype=torch.long, device=self.device)
        self.seen = 0  # samples offered to the reservoir so far

    def __len__(self) -> int:
        return len(self.y)

    # ---- size ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the rows take: inputs, labels and task indices."""
        tensors = [self.y, self.task] + ([self.x] if self.x is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def report(self) -> dict[str, int]:
        return {"samples": len(self), "bytes": self.nbytes}

    # ---- insertion -----------------------------------------------------------------------
    def reservoir(self, x: Tensor, y: Tensor, task: Tensor | int, gen: torch.Generator) -> None:
        """Offer samples in order (algorithm R): slot j of a full memory takes the n-th sample
        when j = floor(u * n) < M, u uniform; so each offered sample ends up kept with
        probability M / (samples offered)."""
        task = _task_column(task, len(y))
        draws = torch.rand(len(y), generator=gen, dtype=torch.float64)
        slots: dict[int, int] = {}  # memory slot -> index of the incoming sample it takes
        n = len(self)
        for i in range(len(y)):
            count = self.seen + i + 1
            if n < self.budget:
                slots[n] = i
                n += 1
            else:
                j = int(draws[i] * count)
                if j < self.budget:
                    slots[j] = i  # a later sample overwrites an earlier one in the same slot
        self.seen += len(y)
        self._write(slots, x, y, task)

    def balanced(self, x: Tensor, y: Tensor, task: Tensor | int, key_fn: KeyFn,
                 gen: torch.Generator) -> None:
        """GDumb's greedy class-balanced insertion of samples offered in order."""
        task = _task_column(task, len(y))
        new_keys = key_fn(task, y).tolist()
        keys = key_fn(self.task, self.y).tolist()
        counts: dict[int, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        slots: dict[int, int] = {}
        for i, k in enumerate(new_keys):
            if len(keys) < self.budget:
                slots[len(keys)] = i
                keys.append(k)
            else:
                classes = len(counts) + (k not in counts)
                if counts.get(k, 0) >= self.budget / classes:
                    continue
                largest = max(sorted(counts), key=lambda c: counts[c])  # ties: smallest key
                rows = [r for r, c in enumerate(keys) if c == largest]
                r = rows[int(torch.randint(len(rows), (1,), generator=gen))]
                counts[largest] -= 1
                slots[r] = i
                keys[r] = k
            counts[k] = counts.get(k, 0) + 1
        self._write(slots, x, y, task)

    def herding(self, x: Tensor, y: Tensor, task: Tensor | int, features: Tensor,
                per_class: int, key_fn: KeyFn) -> None:
        """Add up to `per_class` exemplars of every class in (x, y), chosen by herding on the
        L2-normalised `features` (one row per sample), in the order they were picked."""
        task = _task_column(task, len(y))
        keys = key_fn(task, y)
        feats = torch.nn.functional.normalize(features.detach().double(), dim=1)
        picked = [idx[herd(feats[idx], per_class)] for k in keys.unique().tolist()
                  for idx in [torch.nonzero(keys == k).flatten()]]
        if picked:
            order = torch.cat(picked)
            self._append(x[order], y[order], task[order])

    def keep_per_class(self, m: int, key_fn: KeyFn) -> None:
        """Cut every class to its first m rows (iCaRL's reduction as classes arrive)."""
        keys = key_fn(self.task, self.y)
        keep = torch.cat([torch.nonzero(keys == k).flatten()[:m] for k in keys.unique()]
                         ) if len(keys) else keys
        self.select(torch.sort(keep).values)

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (in that order)."""
        rows = rows.to(self.y.device)
        self.y, self.task = self.y[rows], self.task[rows]
        if self.x is not None:
            self.x = self.x[rows]

    # ---- views ---------------------------------------------------------------------------
    def rows(self, task: int | None = None) -> Tensor:
        """Indices of the rows of one task (all rows if task is None)."""
        if task is None:
            return torch.arange(len(self), device=self.y.device)
        return torch.nonzero(self.task == task).flatten()

    def classes(self, key_fn: KeyFn) -> dict[int, Tensor]:
        """Class key -> indices of its rows."""
        keys = key_fn(self.task, self.y)
        return {int(k): torch.nonzero(keys == k).flatten() for k in keys.unique()}

    def sample(self, n: int, gen: torch.Generator, rows: Tensor | None = None) -> Tensor:
        """Up to n distinct rows drawn uniformly (from `rows` when given)."""
        pool = self.rows() if rows is None else rows
        pick = torch.randperm(len(pool), generator=gen)[:n].to(pool.device)
        return pool[pick]

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.x is None:
            raise IndexError("the memory is empty")
        return self.x[rows], self.y[rows], self.task[rows]

    # ---- device and state ----------------------------------------------------------------
    def to(self, device: torch.device | str) -> EpisodicMemory:
        self.device = torch.device(device)
        self.y, self.task = self.y.to(self.device), self.task.to(self.device)
        if self.x is not None:
            self.x = self.x.to(self.device)
        return self

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {PREFIX + "y": self.y, PREFIX + "task": self.task}
        if self.x is not None:
            tensors[PREFIX + "x"] = self.x
        return tensors, {"seen": self.seen}

    def load_state_dict(self, tensors: dict[str, Tensor], extra: dict[str, Any]) -> None:
        self.y = tensors.get(PREFIX + "y", torch.empty(0, dtype=torch.long)).to(self.device)
        self.task = tensors.get(PREFIX + "task", torch.empty(0, dtype=torch.long)).to(self.device)
        x = tensors.get(PREFIX + "x")
        self.x = None if x is None else x.to(self.device)
        self.seen = int(extra.get("seen", 0))

    # ---- internals -----------------------------------------------------------------------
    def _write(self, slots: dict[int, int], x: Tensor, y: Tensor, task: Tensor) -> None:
        """Put incoming sample slots[j] into row j (rows past the end are appended)."""
        if not slots:
            return
        grow = sorted(j for j in slots if j >= len(self))
        if grow:
            src = torch.tensor([slots[j] for j in grow])
            self._append(x[src], y[src], task[src])
        old = sorted(j for j in slots if j < len(self) - len(grow))
        if old:
            dst = torch.tensor(old, device=self.device)
            src = torch.tensor([slots[j] for j in old])
            self.x[dst] = x[src].to(self.x)
            self.y[dst] = y[src].to(self.device)
            self.task[dst] = task[src].to(self.device)

    def _append(self, x: Tensor, y: Tensor, task: Tensor) -> None:
        x = x.detach().to(self.device)
        self.x = x.clone() if self.x is None else torch.cat([self.x, x])
        self.y = torch.cat([self.y, y.to(self.device, torch.long)])
        self.task = torch.cat([self.task, task.to(self.device, torch.long)])


def herd(features: Tensor, m: int) -> Tensor:
    """Indices of m rows picked by herding (iCaRL): step k takes the row, not yet taken, that
    brings the mean of the k rows taken closest to the mean of all rows."""
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    free = torch.ones(len(features), dtype=torch.bool, device=features.device)
    out = []
    for k in range(1, min(m, len(features)) + 1):
        dist = (mu - (total + features) / k).norm(dim=1)
        dist[~free] = float("inf")
        i = int(dist.argmin())
        out.append(i)
        free[i] = False
        total = total + features[i]
    return torch.tensor(out, dtype=torch.long, device=features.device)


def _task_column(task: Tensor | int, n: int) -> Tensor:
    if isinstance(task, Tensor):
        return task.to(torch.long)
    return torch.full((n,), int(task), dtype=torch.long)
