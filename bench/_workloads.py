"""The workloads: what one sample costs, identical for every system.

A :class:`Workload` gives each system the same pieces: ``items`` (what a source yields),
``load(item)`` (read and transform one sample: what a torch ``Dataset.__getitem__`` does),
and, split for pipelines with a reader stage, ``read(item)`` and ``transform(buffer)`` with
``load(item) == transform(read(item))``. Batches are collated with torch's
``default_collate`` everywhere, so every system delivers identical tensors.

Every sample is a whole number of 8-byte words, so the checksum (sum of the batch's uint64
words mod 2**64, see ``bench/case.py``) does not depend on the order of samples.

Only ``paths()`` is used by the harness process (to warm or evict the page cache); the rest
runs inside the case process.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import gen_data

SMALL_SAMPLE_BYTES = 8 << 10
JPEG_CROP = 224
TOKEN_WINDOW = 1025
TOKEN_WINDOWS = 20_000
WINDOW_SEED = 1234

#: workload name -> data kind it needs (see gen_data.KINDS)
KIND = {"small_files": "small", "jpeg": "jpeg", "tokens": "tokens", "overlap": "small"}
WORKLOADS = tuple(KIND)


@dataclass(frozen=True)
class Workload:
    """One workload, as handed to a system.

    Attributes:
        name: Workload name (a key of ``KIND``).
        items: What the source yields, in order (paths, or window offsets for tokens).
        load: Reads and transforms one item into a tensor (a Dataset's ``__getitem__``).
        read: Reads one item's bytes (the reader stage of a pipeline).
        transform: Turns one item's bytes (any buffer) into the sample tensor.
        batch_size: Samples per batch; the last batch may be short.
        threads: Thread-pool size for frameworks with one stage doing ``load``.
        read_concurrency: Reads in flight, for pipelines with a reader stage.
        map_concurrency: Transforms in flight, for pipelines with a map stage.
        input_bytes: Bytes read from storage in one epoch (for MB/s).
        ranges: For tokens: ``(path, offset, length)`` byte ranges matching ``items``.
        step_s: Simulated accelerator step per batch (overlap only), seconds.
    """

    name: str
    items: Sequence[Any]
    load: Callable[[Any], Any]
    read: Callable[[Any], Any]
    transform: Callable[[Any], Any]
    batch_size: int
    threads: int
    read_concurrency: int
    map_concurrency: int
    input_bytes: int
    ranges: Sequence[tuple[str, int, int]] = field(default_factory=list)
    step_s: float = 0.0


def read_file(path: str) -> bytes:
    """Return the whole content of ``path``."""
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def first_8k(buf: Any) -> Any:
    """Return the first 8 KiB of ``buf`` as a uint8 tensor of its own."""
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, count=SMALL_SAMPLE_BYTES).copy())


def decode_jpeg(buf: Any) -> Any:
    """Decode a JPEG with PIL, centre-crop 224x224 and return it as a CHW uint8 tensor."""
    from PIL import Image  # the bench extra; the smoke test runs without it

    with Image.open(io.BytesIO(buf)) as im:
        w, h = im.size
        left, top = (w - JPEG_CROP) // 2, (h - JPEG_CROP) // 2
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        hwc = np.array(rgb.crop((left, top, left + JPEG_CROP, top + JPEG_CROP)))
    return torch.from_numpy(hwc).permute(2, 0, 1)


def tokens_from_bytes(buf: Any) -> Any:
    """Return a window of uint16 tokens (bytes) as an int64 tensor."""
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint16).astype(np.int64))


def _load_file(transform: Callable[[Any], Any], path: str) -> Any:
    return transform(read_file(path))


class TokenWindows:
    """Slices windows of ``TOKEN_WINDOW`` tokens out of a memory-mapped uint16 file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")

    def read(self, offset: int) -> np.ndarray:
        """Return the raw uint16 window starting at token ``offset`` (a view of the map)."""
        return self.tokens[offset : offset + TOKEN_WINDOW]

    def load(self, offset: int) -> Any:
        """Return the window starting at token ``offset`` as an int64 tensor."""
        return torch.from_numpy(self.tokens[offset : offset + TOKEN_WINDOW].astype(np.int64))


def window_offsets(n_tokens: int, n_windows: int) -> list[int]:
    """Return the fixed, seeded token offsets of the windows."""
    rng = np.random.default_rng(WINDOW_SEED)
    return [int(x) for x in rng.integers(0, n_tokens - TOKEN_WINDOW, size=n_windows)]


def n_windows(scale: float) -> int:
    """Return how many token windows one epoch reads at ``scale``."""
    return max(1, round(TOKEN_WINDOWS * scale))


def paths(name: str, data_dir: Path) -> list[str]:
    """Return every file that workload ``name`` reads (for warming and evicting)."""
    manifest = gen_data.read_manifest(data_dir)
    kind = KIND[name]
    if kind not in manifest:
        raise FileNotFoundError(f"{data_dir}: no {kind!r} data; run python -m bench.gen_data")
    if kind == "small":
        n = manifest["small"]["params"]["count"]
        return [str(gen_data.small_path(data_dir, i)) for i in range(n)]
    if kind == "jpeg":
        n = manifest["jpeg"]["params"]["count"]
        return [str(gen_data.jpeg_path(data_dir, i)) for i in range(n)]
    return [str(gen_data.token_path(data_dir))]


def make(name: str, data_dir: Path, *, step_s: float = 0.0) -> Workload:
    """Build workload ``name`` over the data set in ``data_dir``.

    Raises:
        ValueError: ``name`` is not a known workload.
    """
    if name not in KIND:
        raise ValueError(f"workload: unknown {name!r}; expected one of {WORKLOADS}")
    files = paths(name, data_dir)
    if name in ("small_files", "overlap"):
        return Workload(
            name=name,
            items=files,
            load=partial(_load_file, first_8k),
            read=read_file,
            transform=first_8k,
            batch_size=256,
            threads=8,
            read_concurrency=16,
            map_concurrency=2,
            input_bytes=gen_data.read_manifest(data_dir)["small"]["bytes"],
            step_s=step_s,
        )
    if name == "jpeg":
        return Workload(
            name=name,
            items=files,
            load=partial(_load_file, decode_jpeg),
            read=read_file,
            transform=decode_jpeg,
            batch_size=64,
            threads=4,
            read_concurrency=16,
            map_concurrency=2,
            input_bytes=gen_data.read_manifest(data_dir)["jpeg"]["bytes"],
        )
    windows = TokenWindows(files[0])
    offsets = window_offsets(
        len(windows.tokens), n_windows(gen_data.read_manifest(data_dir)["scale"])
    )
    return Workload(
        name=name,
        items=offsets,
        load=windows.load,
        read=windows.read,
        transform=tokens_from_bytes,
        batch_size=32,
        threads=4,
        read_concurrency=16,
        map_concurrency=2,
        input_bytes=len(offsets) * TOKEN_WINDOW * 2,
        ranges=[(files[0], 2 * off, 2 * TOKEN_WINDOW) for off in offsets],
    )
