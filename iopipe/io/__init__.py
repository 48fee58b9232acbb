"""Low-level file I/O: regular files opened bounded, exact reads, residency, listing."""
