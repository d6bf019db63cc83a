"""A task stream of your own, for `data: {dataset: python, factory: ...}`: scikit-learn's 8x8
digits seen in new domains (rotated by 0, 90, 180 degrees), the same ten labels each time."""

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset


def rotated_digits(angles=(0, 90, 180)):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(digits.target)
    test = torch.arange(len(y)) % 5 == 0  # every fifth image held out for testing
    tasks = []
    for angle in angles:
        turned = torch.rot90(x, angle // 90, dims=(2, 3))
        tasks.append({"name": f"rot{angle}",
                      "train": TensorDataset(turned[~test], y[~test]),  # a torch Dataset
                      "test": (turned[test], y[test])})                  # or (x, y) tensors
    return tasks
