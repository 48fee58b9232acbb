"""Generate the benchmark data sets, deterministically, under ``bench/data/scale-S/``.

At scale 1 (the default):

* ``small/NNN/NNNNN.bin``: 20,000 files of 8-24 KiB of random bytes, 200 per folder;
* ``jpeg/NN/NNNN.jpg``: 3,000 JPEGs of 320x240 with smooth content (~15-25 KiB each, like
  photos of that size rather than incompressible noise);
* ``tokens/tokens.u16``: a 512 MiB file of uint16 tokens in ``[0, 50257)``.

``--scale`` multiplies every count and size (``--scale 0.1`` for smoke runs). A set is
reused when its ``manifest.json`` says it is complete with the same parameters; the manifest
is written last, so an interrupted run is redone.

Usage: ``python -m bench.gen_data [--scale S] [--root DIR] [--only small,jpeg,tokens]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent / "data"
SEED = 20240601
VERSION = 1
KINDS = ("small", "jpeg", "tokens")

SMALL_COUNT = 20_000
SMALL_MIN_BYTES = 8 << 10
SMALL_MAX_BYTES = 24 << 10
SMALL_PER_DIR = 200
JPEG_COUNT = 3_000
JPEG_SIZE = (320, 240)
JPEG_PER_DIR = 100
JPEG_QUALITY = 90
TOKEN_BYTES = 512 << 20
TOKEN_VOCAB = 50257


def dataset_dir(scale: float, root: Path = ROOT) -> Path:
    """Return the folder of the data set generated at ``scale`` under ``root``."""
    return Path(root) / f"scale-{scale:g}"


def small_count(scale: float) -> int:
    """Return how many small files a data set of ``scale`` holds."""
    return max(1, round(SMALL_COUNT * scale))


def jpeg_count(scale: float) -> int:
    """Return how many JPEGs a data set of ``scale`` holds."""
    return max(1, round(JPEG_COUNT * scale))


def token_count(scale: float) -> int:
    """Return how many uint16 tokens the token file of ``scale`` holds."""
    return max(1 << 16, round(TOKEN_BYTES * scale) // 2)


def small_path(data_dir: Path, i: int) -> Path:
    """Return the path of small file ``i``."""
    return data_dir / "small" / f"{i // SMALL_PER_DIR:03d}" / f"{i:05d}.bin"


def jpeg_path(data_dir: Path, i: int) -> Path:
    """Return the path of JPEG ``i``."""
    return data_dir / "jpeg" / f"{i // JPEG_PER_DIR:02d}" / f"{i:04d}.jpg"


def token_path(data_dir: Path) -> Path:
    """Return the path of the token file."""
    return data_dir / "tokens" / "tokens.u16"


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """Return the manifest of ``data_dir``, or an empty dict when there is none."""
    try:
        with open(data_dir / "manifest.json") as f:
            manifest: dict[str, Any] = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return manifest


def _params(kind: str, scale: float) -> dict[str, Any]:
    if kind == "small":
        return {"count": small_count(scale), "min": SMALL_MIN_BYTES, "max": SMALL_MAX_BYTES}
    if kind == "jpeg":
        return {"count": jpeg_count(scale), "size": list(JPEG_SIZE), "quality": JPEG_QUALITY}
    return {"tokens": token_count(scale), "vocab": TOKEN_VOCAB}


def _gen_small(data_dir: Path, scale: float) -> int:
    rng = np.random.default_rng([SEED, 1])
    n = small_count(scale)
    sizes = rng.integers(SMALL_MIN_BYTES, SMALL_MAX_BYTES + 1, size=n)
    total = 0
    for i, size in enumerate(sizes.tolist()):
        path = small_path(data_dir, i)
        if i % SMALL_PER_DIR == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(size))
        total += size
    return total


def _smooth_image(rng: np.random.Generator) -> np.ndarray:
    """Return a 240x320x3 uint8 image: coarse colour fields, finer detail and mild noise."""
    from PIL import Image

    w, h = JPEG_SIZE
    acc = np.zeros((h, w, 3), np.float32)
    for (gw, gh), amp in (((4, 3), 90.0), ((16, 12), 40.0), ((64, 48), 18.0)):
        grid = rng.uniform(-1.0, 1.0, size=(gh, gw, 3)).astype(np.float32)
        layer = np.stack(
            [
                np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.Resampling.BICUBIC))
                for c in range(3)
            ],
            axis=-1,
        )
        acc += amp * layer
    acc += rng.normal(0.0, 3.0, size=acc.shape).astype(np.float32)
    image: np.ndarray = np.clip(acc + 128.0, 0, 255).astype(np.uint8)
    return image


def _gen_jpeg(data_dir: Path, scale: float) -> int:
    from PIL import Image

    rng = np.random.default_rng([SEED, 2])
    total = 0
    for i in range(jpeg_count(scale)):
        path = jpeg_path(data_dir, i)
        if i % JPEG_PER_DIR == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth_image(rng)).save(path, format="JPEG", quality=JPEG_QUALITY)
        total += path.stat().st_size
    return total


def _gen_tokens(data_dir: Path, scale: float) -> int:
    rng = np.random.default_rng([SEED, 3])
    path = token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    left = token_count(scale)
    with open(path, "wb") as f:
        while left:
            n = min(left, 16 << 20)
            f.write(rng.integers(0, TOKEN_VOCAB, size=n, dtype=np.uint16).tobytes())
            left -= n
    return path.stat().st_size


_GENERATORS = {"small": _gen_small, "jpeg": _gen_jpeg, "tokens": _gen_tokens}


def generate(
    data_dir: Path | str | None = None,
    *,
    scale: float = 1.0,
    only: Iterable[str] = KINDS,
    verbose: bool = False,
) -> Path:
    """Make sure the data sets in ``only`` exist at ``scale``; generate what is missing.

    Args:
        data_dir: Folder of the data set; ``bench/data/scale-S`` when None.
        scale: Multiplier of every count and size (1.0 is the issue's full size).
        only: Which kinds to make: any of ``"small"``, ``"jpeg"``, ``"tokens"``.
        verbose: Print what is generated and how long it took.

    Returns:
        The data set's folder.

    Raises:
        ValueError: ``scale`` is not positive or ``only`` names an unknown kind.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    kinds = list(only)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"only: unknown kind {kind!r}; expected some of {KINDS}")
    out = Path(data_dir) if data_dir is not None else dataset_dir(scale)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    if manifest.get("scale", scale) != scale:
        manifest = {}
    for kind in kinds:
        params = _params(kind, scale)
        entry = manifest.get(kind, {})
        if (
            entry.get("version") == VERSION
            and entry.get("seed") == SEED
            and entry.get("params") == params
        ):
            continue
        t0 = time.perf_counter()
        nbytes = _GENERATORS[kind](out, scale)
        manifest[kind] = {"version": VERSION, "seed": SEED, "params": params, "bytes": nbytes}
        _write_manifest(out, manifest, scale)
        if verbose:
            dt = time.perf_counter() - t0
            print(f"generated {kind}: {params} {nbytes / 1e6:.0f} MB in {dt:.1f} s", flush=True)
    if manifest.get("scale") != scale:
        _write_manifest(out, manifest, scale)
    return out


def _write_manifest(out: Path, manifest: dict[str, Any], scale: float) -> None:
    manifest["scale"] = scale
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out / "manifest.json")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier (default 1)")
    parser.add_argument("--root", type=Path, default=None, help="data set folder")
    parser.add_argument("--only", default=",".join(KINDS), help="kinds to make, comma-separated")
    args = parser.parse_args(argv)
    out = generate(args.root, scale=args.scale, only=args.only.split(","), verbose=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
