"""Load a sharded safetensors checkpoint into a model built on the meta device.

Writes a tiny GPT-style model as a two-shard Hugging Face layout
(``model-0000N-of-00002.safetensors`` + ``model.safetensors.index.json``) in a temp
dir, builds a fresh model on the meta device (no memory for weights), fills it with
``iopipe.load_into`` and checks that a forward pass matches the original model.

Run: ``.venv/bin/python examples/load_checkpoint.py`` (a few seconds on CPU).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import iopipe


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 4096, dim: int = 256, layers: int = 4, ctx: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads=4) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def save_sharded(model: nn.Module, folder: Path) -> Path:
    """Save ``model`` as two shards plus an index, the way Hugging Face lays it out."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del state["head.weight"]  # tied to tok.weight: saved once
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / "model.safetensors.index.json"
    total = sum(t.nbytes for t in state.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def main() -> None:
    torch.manual_seed(0)
    reference = TinyGPT().eval()
    with tempfile.TemporaryDirectory() as tmp:
        index = save_sharded(reference, Path(tmp))
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))

        # The first normal_() on the meta device imports torch._dynamo (a few
        # seconds, once): do it before timing.
        with torch.device("meta"):
            nn.Embedding(1, 1)
        start = time.perf_counter()
        with torch.device("meta"):
            model = TinyGPT()  # no weight memory yet
        built = time.perf_counter()
        result = iopipe.load_into(model, index)  # strict: every key checked first
        loaded = time.perf_counter()

    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert model.head.weight is model.tok.weight  # the tie survived
    model.eval()
    idx = torch.randint(0, 4096, (2, 64))
    with torch.no_grad():
        same = torch.equal(model(idx), reference(idx))
    print(f"checkpoint: {size / 1e6:.1f} MB in 2 shards ({index.name})")
    print(
        f"build on meta: {(built - start) * 1e3:.1f} ms; load_into: {(loaded - built) * 1e3:.1f} ms"
    )
    print(f"forward pass matches the saved model: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
