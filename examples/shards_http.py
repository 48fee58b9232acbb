"""Pack JPEGs into WebDataset shards, serve them over HTTP, train a tiny classifier from them.

Uses the JPEG bench data (``bench/data/scale-1/jpeg``) when it exists, else makes
200 small JPEGs in a temp folder; packs them with ``iopipe pack``'s function,
serves the shards with nginx on 127.0.0.1 (Debian's ``nginx-light``; without it,
reads the shards from disk instead), and trains a linear model for one shuffled
epoch from ``Pipeline.from_shards("http://.../shard-{000000..N}.tar")``.

Run: ``.venv/bin/python examples/shards_http.py`` (needs pillow; under a minute on CPU).
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iopipe import Pipeline
from iopipe.shards import pack_folder

BENCH_JPEG = Path(__file__).resolve().parent.parent / "bench" / "data" / "scale-1" / "jpeg"


def _images(folder: Path) -> Path:
    """A folder of ``KEY.jpg`` + ``KEY.cls`` samples (the bench data's JPEGs, or new ones)."""
    src = folder / "src"
    src.mkdir()
    jpgs = sorted(BENCH_JPEG.rglob("*.jpg"))[:2000] if BENCH_JPEG.exists() else []
    rng = np.random.default_rng(0)
    for i in range(len(jpgs) or 200):
        if jpgs:
            shutil.copy(jpgs[i], src / f"{i:05d}.jpg")
        else:
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / f"{i:05d}.jpg", quality=85)
        (src / f"{i:05d}.cls").write_text(str(i % 10))
    return src


def _serve(folder: Path, work: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """nginx on 127.0.0.1 serving ``folder``, or (None, the folder) without nginx."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not exe:
        return None, str(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process off; error_log {work}/e.log; pid {work}/p;"
        f"events {{}} http {{ access_log off; client_body_temp_path {work}/b;"
        f" server {{ listen 127.0.0.1:{port}; root {folder}; }} }}"
    )
    proc = subprocess.Popen([exe, "-p", str(work), "-c", str(conf)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def decode(sample: dict) -> tuple[torch.Tensor, int]:
    img = Image.open(io.BytesIO(sample["jpg"])).convert("L").resize((32, 32))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).flatten()
    return x, int(bytes(sample["cls"]))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = pack_folder(_images(work), work / "shards", shard_bytes=8 << 20)
        print(f"packed into {len(shards)} shards")
        proc, base = _serve(work / "shards", work)
        try:
            url = f"{base}/shard-{{000000..{len(shards) - 1:06d}}}.tar"
            pipe = Pipeline.from_shards(url, shuffle=True, seed=0).map(decode).batch(32)
            model = torch.nn.Linear(32 * 32, 10)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            t0, n = time.perf_counter(), 0
            with pipe:
                for x, y in pipe:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    n += len(y)
            rate = n / (time.perf_counter() - t0)
            print(f"trained on {n} samples from {base}: {rate:,.0f} samples/s")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
