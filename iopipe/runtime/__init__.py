"""The engine: loop thread, channels and hand-off, worker threads, limits, epochs, policy."""
