"""Train the seed article's linear regression with its data flowing through iopipe.

The article (section 5.2) trains ``nn.Linear(2, 1)`` on batches sliced from an
in-memory tensor.  Here the same model learns from data on disk: samples are
written as shard files in a temporary folder, and an iopipe pipeline reads,
decodes and batches them on a background event loop while the training loop
runs.  Prints the loss per epoch, samples/s, and the share of time the training
loop waited for data.

Run: ``bash scripts/demo`` (or ``python examples/linear_regression.py --help``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from iopipe import Pipeline

TRUE_W = np.array([[2.0], [-3.4]], dtype=np.float32)
TRUE_B = np.float32(4.2)


class LinearRegression(nn.Module):
    """The seed article's model: one linear layer."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def make_dataset(folder: str, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Write ``shards`` files of ``per_shard`` float32 records ``(x0, x1, y)``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(shards):
        x = rng.standard_normal((per_shard, 2), dtype=np.float32)
        y = x @ TRUE_W + TRUE_B + 0.01 * rng.standard_normal((per_shard, 1), dtype=np.float32)
        path = os.path.join(folder, f"shard-{i:05d}.f32")
        np.concatenate([x, y], axis=1).astype(np.float32).tofile(path)
        paths.append(path)
    return paths


def decode(buf: np.ndarray) -> torch.Tensor:
    """Bytes of one shard -> a (records, 3) float32 tensor."""
    return torch.from_numpy(buf.view(np.float32).reshape(-1, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=400, help="shard files to generate")
    ap.add_argument("--per-shard", type=int, default=500, help="samples per shard")
    ap.add_argument("--shards-per-batch", type=int, default=2, help="shards per batch")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the model is tiny; leave the cores to the loader

    with tempfile.TemporaryDirectory(prefix="iopipe-demo-") as folder:
        make_dataset(folder, args.shards, args.per_shard)
        n_samples = args.shards * args.per_shard
        print(f"dataset: {n_samples} samples in {args.shards} files under {folder}")

        model = LinearRegression(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        loss_fn = nn.MSELoss()
        pipe = (
            Pipeline.from_files(os.path.join(folder, "*.f32"), shuffle=True, seed=0)
            .read(chunk_bytes=1 << 20, concurrency=4)
            .map(decode, concurrency=2)
            .batch(args.shards_per_batch, collate_fn=torch.cat)
            .prefetch(4)
        )
        total_samples, total_time, total_wait = 0, 0.0, 0.0
        with pipe:
            for epoch in range(args.epochs):
                start = time.perf_counter()
                for batch in pipe:
                    inputs, targets = batch[:, :2], batch[:, 2:]
                    optimizer.zero_grad()
                    loss = loss_fn(model(inputs), targets)
                    loss.backward()
                    optimizer.step()
                    total_samples += len(batch)
                elapsed = time.perf_counter() - start
                stats = pipe.stats()
                total_time += elapsed
                total_wait += stats.consumer_wait_s
                print(
                    f"Epoch [{epoch + 1}/{args.epochs}], Loss: {loss.item():.4f}, "
                    f"{n_samples / elapsed:,.0f} samples/s, waited for data "
                    f"{stats.consumer_wait_share:.1%} of the time"
                )
            print(pipe.stats())
        w = model.linear.weight.detach().numpy().ravel()
        b = float(model.linear.bias.detach())
        print(f"learned w = [{w[0]:.3f}, {w[1]:.3f}], b = {b:.3f} (true: [2.000, -3.400], 4.200)")
        print(
            f"overall: {total_samples / total_time:,.0f} samples/s; "
            f"training loop waited for data {total_wait / total_time:.1%} of the time"
        )


if __name__ == "__main__":
    main()
