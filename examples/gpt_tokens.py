"""Train a tiny GPT-style model on token shards read by iopipe.TokenShards (CPU, < 1 minute).

What it shows:

* a few token shards (raw ``.bin`` uint16 files and one ``.npy``) generated in a
  temporary folder from a small Markov "language", so the loss has somewhere to go;
* ``iopipe.TokenShards(mode="windows")``: random windows of ``seq_len + 1`` tokens,
  the nanoGPT recipe, read on a background thread while the model trains;
* the loader's ``state_dict()`` (resume exactly where training stopped) and
  ``stats()`` (how long the training loop waited for data);
* an evaluation pass with ``mode="packed"``: every token of the held-out shard is a
  target exactly once.

Run: ``.venv/bin/python examples/gpt_tokens.py [--steps 300]``
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import iopipe

VOCAB = 96
SEQ_LEN = 64
BATCH = 16


# -- data ------------------------------------------------------------------------------


def write_shards(folder: Path, *, tokens_per_shard: int = 60_000, seed: int = 0) -> Path:
    """Write 3 training shards (.bin) and 1 held-out shard (.npy); return the held-out one.

    Each token has two likely successors (and a 10% chance of a random one), so a
    model that learns the table gets well below the uniform loss ln(VOCAB).
    """
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 2))
    for i in range(4):
        picks = rng.integers(0, 2, size=tokens_per_shard)
        noise = rng.random(tokens_per_shard) < 0.1
        random_tokens = rng.integers(0, VOCAB, size=tokens_per_shard)
        out = np.empty(tokens_per_shard, dtype=np.uint16)
        tok = int(rng.integers(0, VOCAB))
        for k in range(tokens_per_shard):
            tok = int(random_tokens[k]) if noise[k] else int(successors[tok, picks[k]])
            out[k] = tok
        if i < 3:
            out.tofile(folder / f"train_{i:02d}.bin")
        else:
            np.save(folder / "val.npy", out)
    return folder / "val.npy"


# -- model -----------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.blocks(self.tok(idx) + self.pos(pos))
        logits: torch.Tensor = self.head(self.ln(h))
        return logits


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    loss: torch.Tensor = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss


# -- training --------------------------------------------------------------------------


def train(folder: Path, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = iopipe.TokenShards(
        folder / "train_*.bin",
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        dtype="uint16",
        mode="windows",
        windows_per_epoch=steps * BATCH,
        seed=0,
    )
    print(f"{loader!r}: {len(loader)} batches per epoch")
    waited = 0.0
    start = time.perf_counter()
    with loader:
        it = iter(loader)
        for step in range(steps):
            t0 = time.perf_counter()
            x, y = next(it)  # (BATCH, SEQ_LEN) int64; y is x shifted by one token
            waited += time.perf_counter() - t0
            loss = loss_of(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                now = time.perf_counter()
                done = step + 1
                rate = done * BATCH * SEQ_LEN / (now - start)
                print(
                    f"step {step:4d}  loss {loss.item():.3f}  {rate:9,.0f} tokens/s  "
                    f"waiting for data {waited / (now - start):5.1%}"
                )
            if step == steps // 2:
                state = loader.state_dict()  # save it with the model to resume exactly here
                print(f"  loader state at step {step}: {state}")
        del it
        total = time.perf_counter() - start
        stats = loader.stats()
        print(
            f"trained {steps} steps in {total:.1f} s; waited {waited:.2f} s for batches "
            f"({waited / total:.1%}); the loader read {stats.stage('tokens').bytes / 1e6:.1f} MB"
        )
    return model


@torch.no_grad()
def evaluate(model: nn.Module, val: Path) -> None:
    """Mean loss over every token of the held-out shard, each a target exactly once."""
    loader = iopipe.TokenShards(
        val, seq_len=SEQ_LEN, batch_size=64, mode="packed", shuffle=False, drop_last=False
    )
    total, count = 0.0, 0
    with loader:
        for x, y in loader:
            total += loss_of(model, x, y).item() * y.numel()
            count += y.numel()
    print(
        f"held-out loss {total / count:.3f} over {count:,} targets "
        f"(uniform guess: {math.log(VOCAB):.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # leave a core for the loader
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="iopipe-gpt-") as tmp:
        folder = Path(tmp)
        val = write_shards(folder)
        model = train(folder, args.steps)
        evaluate(model, val)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
