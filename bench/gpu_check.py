"""GPU check of the pipeline's device stage: pinned, non-blocking copies on a side stream.

Prints, on a CUDA machine:
* correctness: every batch from ``.to_device("cuda", pin_memory=True)`` equals the CPU batch;
* H2D throughput of the device stage vs a synchronous ``batch.to("cuda")`` in the loop;
* overlap: wall time of a loop doing a GPU matmul per batch, with batches from iopipe's
  device stage, against the compute alone.

Exits non-zero on a mismatch or when CUDA is missing.  Usage: ``python bench/gpu_check.py``.
"""

from __future__ import annotations

import sys
import time

import torch

from iopipe import Pipeline

N_BATCHES = 64
BATCH = 32
ITEM = (1024, 1024)  # 4 MiB float32 per item, 128 MiB per batch


def make(i: int) -> torch.Tensor:
    return torch.full(ITEM, float(i), dtype=torch.float32)


def pipeline(device: str | None) -> Pipeline:
    p = Pipeline.from_iterable(range(N_BATCHES * BATCH)).map(make, concurrency=4).batch(BATCH)
    return p.to_device(device, pin_memory=True) if device else p


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.zeros(1, device="cuda")
    nbytes = N_BATCHES * BATCH * ITEM[0] * ITEM[1] * 4
    # correctness
    with pipeline("cuda") as gpu_pipe:
        for i, batch in enumerate(gpu_pipe):
            assert batch.is_cuda, batch.device
            expect = torch.arange(i * BATCH, (i + 1) * BATCH, dtype=torch.float32, device="cuda")
            if not torch.equal(batch[:, 0, 0], expect) or not torch.equal(batch[:, -1, -1], expect):
                print(f"MISMATCH in batch {i}", file=sys.stderr)
                return 1
        print("correct: all batches on cuda and equal to the CPU batches")
        # throughput: device stage vs synchronous copy in the loop
        for _ in range(2):
            t0 = time.perf_counter()
            for _batch in gpu_pipe:
                pass
            torch.cuda.synchronize()
            t_stage = time.perf_counter() - t0
    with pipeline(None) as cpu_pipe:
        for _ in range(2):
            t0 = time.perf_counter()
            for batch in cpu_pipe:
                batch.to("cuda")
            torch.cuda.synchronize()
            t_sync = time.perf_counter() - t0
    print(f"device stage (pinned, side stream): {nbytes / t_stage / 1e9:6.2f} GB/s end to end")
    print(f"synchronous .to('cuda') in the loop: {nbytes / t_sync / 1e9:6.2f} GB/s end to end")
    # overlap with compute
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def step(batch: torch.Tensor) -> None:
        for _ in range(6):
            a @ a
        batch.sum()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ref = torch.zeros(BATCH, *ITEM, device="cuda")
    for _ in range(N_BATCHES):
        step(ref)
    torch.cuda.synchronize()
    t_compute = time.perf_counter() - t0
    with pipeline("cuda") as gpu_pipe:
        for _batch in gpu_pipe:  # warm the workers
            pass
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in gpu_pipe:
            step(batch)
        torch.cuda.synchronize()
        t_both = time.perf_counter() - t0
        wait = gpu_pipe.stats().consumer_wait_share
    print(
        f"overlap: compute alone {t_compute:.3f} s, compute fed by iopipe {t_both:.3f} s "
        f"({t_both / t_compute:.2f}x); loop waited {wait:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
