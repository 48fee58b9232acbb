"""iopipe's benchmark suite (issue 6): iopipe against the plain loop, torch, SPDL, torchdata.

Layout:
    gen_data.py        deterministic data sets under bench/data/scale-S/ (git-ignored)
    _workloads.py      what one sample costs per workload: read, transform, batch size
    systems/           one module per system; each turns a workload into an iterator of batches
    case.py            one measured case in a fresh process: prints one JSON line
    _proctree.py       process-tree CPU seconds and peak RSS/PSS, read from /proc
    _harness.py        page-cache control (warm/cold) and the interleaved matrix of cases
    _report.py         console table, docs/benchmarks.md and docs/benchmarks.png
    run.py             the command behind `bash scripts/bench`
    bench_pipeline.py  issue 2's preset: small files, Pipeline vs torch vs plain loop

Nothing here is imported by the `iopipe` package itself.
"""
