"""The ``iopipe`` command: ``probe`` (storage and pipeline throughput) and ``run``."""
