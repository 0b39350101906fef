"""A short example: the article's model trained for a few epochs on MNIST-1D."""

from __future__ import annotations

import time

import torch
from torch import nn

import batchnorm


def article_model(in_features: int, with_bn: bool = True) -> nn.Sequential:
    """Dense(128, relu) -> BatchNormalization -> Dense(10) (softmax lives in the loss)."""
    bn: nn.Module = batchnorm.BatchNorm1d(128) if with_bn else nn.Identity()
    return nn.Sequential(nn.Linear(in_features, 128), nn.ReLU(), bn, nn.Linear(128, 10))


def run(epochs: int = 1, seed: int = 0, batch_size: int = 100, lr: float = 1e-3) -> int:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
    x_test, y_test = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
    print(f"MNIST-1D: {len(x)} train / {len(x_test)} test samples of length {x.shape[1]}")
    for with_bn in (False, True):
        torch.manual_seed(seed)
        model = article_model(x.shape[1], with_bn)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        start = time.perf_counter()
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x))
            xs, ys = x[order], y[order]
            for i in range(0, len(x), batch_size):
                loss = nn.functional.cross_entropy(
                    model(xs[i : i + batch_size]), ys[i : i + batch_size]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        label = "with BN   " if with_bn else "without BN"
        print(
            f"{label}: test accuracy {accuracy:.3f}, last loss {loss.item():.3f}, "
            f"{time.perf_counter() - start:.2f} s for {epochs} epoch(s)"
        )
    return 0
